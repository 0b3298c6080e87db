"""Faults a real run meets: a stage killed mid-write, and code paths that could unpickle untrusted files."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def demo_stage(root: Path, seed: int) -> subprocess.Popen:
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "demo": {"images": 400, "size": 64}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, str(REPO / "stages/demo_data.py")], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_partial_output(root: Path, proc: subprocess.Popen) -> Path:
    """Block until the stage is half-way: its temporary folder holds some images but it has not finished."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = list((root / "data").glob(".demo.tmp-*"))
        if temps and len(list(temps[0].rglob("*.jpg"))) >= 20:
            return temps[0]
        assert proc.poll() is None, f"stage ended before it could be killed: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError("the stage never started writing")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_stage_keeps_old_output_and_a_rerun_completes(tmp_path, sig):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    first = demo_stage(root, seed=1)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    output = root / "data" / "demo"
    complete = tree_digest(output)

    victim = demo_stage(root, seed=2)  # different seed: different images, so partial writes would show
    temp = wait_for_partial_output(root, victim)
    victim.send_signal(sig)
    code = victim.wait(timeout=60)
    assert code != 0
    assert tree_digest(output) == complete  # the old complete output, untouched
    if sig == signal.SIGTERM:  # a catchable signal unwinds quietly: exit 143, temporary folder removed
        assert code == 128 + signal.SIGTERM and not temp.exists()
        assert "Traceback" not in victim.stderr.read()

    rerun = demo_stage(root, seed=2)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert tree_digest(output) != complete
    assert not list((root / "data").glob(".demo.tmp-*"))  # the rerun swept what SIGKILL left behind


SOURCES = [p for folder in ("pipeline", "stages", "bench") for p in (REPO / folder).rglob("*.py")]


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True unpickles arbitrary code"),
        (r"\bpickle\.loads?\(|\bjoblib\.load\(", "pickle can run code from a file"),
        (r"trust_remote_code\s*=\s*True", "remote code from a checkpoint must never run"),
        (r"use_safetensors\s*=\s*False", "weights load from safetensors only"),
    ],
)
def test_no_unsafe_loading_in_the_product(pattern, why):
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert SOURCES and not offenders, f"{why}: {offenders}"
