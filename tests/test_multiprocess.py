"""Two processes from DVC: `dvc repro` of finetune, generate, train and the oracle (two seeds) with
``compute.processes: 2`` on the CPU.

The stage commands of dvc.yaml are unchanged; each stage script starts itself again under ``accelerate launch``
(pipeline/core/launch.py). Checked: one set of outputs and one MLflow run per stage, generated images byte-identical to
a one-process run (one torch thread per process in both), each drawn training image seen by exactly one process per
epoch. Then, with a stage script that imports nothing heavy: a rank's one-line error and exit code, and a rank killed
by a signal, reach the caller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import MICRO, copy_repo, experiment_runs, merge, run

REPO = Path(__file__).resolve().parents[1]
CLASS = "df"
STAGES = (f"finetune@{CLASS}", f"generate@{CLASS}", "train@baseline", "oracle")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_two_processes_from_dvc_match_one_process(tmp_path):
    root = tmp_path / "repo"
    # Two generate batches, so each rank draws one.
    change = {"compute": {"processes": 2}, "generate": {"batch": 2}, "oracle": {"seeds": [0, 1]}}
    env = copy_repo(root, merge(MICRO, change))
    # One torch thread in every process of both runs: float sums split over a different number of threads round
    # differently, and the stages otherwise pick their thread count from the cores idle at the time.
    env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    output = run([str(Path(sys.executable).parent / "dvc"), "repro", *STAGES], root, env)
    print(f"dvc repro of {', '.join(STAGES)} on 2 processes: {time.perf_counter() - started:.0f} s")

    # One set of outputs: nothing doubled, no temporary folder left by a second writer.
    synthetic = root / "data/synthetic" / CLASS
    names = sorted(p.name for p in synthetic.iterdir())
    assert names == sorted([f"{CLASS}_{k:05d}.png" for k in range(MICRO["generate"]["per_class"])] + ["grid.png", "manifest.csv"])
    leftovers = [p for p in (root / "data").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    leftovers += [p for p in (root / "models").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers
    for stage in STAGES:
        assert output.count(f"{stage}: done in") == 1, output[-3000:]  # rank 0 reports, rank 1 works silently

    runs = [r for r in experiment_runs(root) if r.data.tags.get("stage") in STAGES]
    assert sorted(r.data.tags["stage"] for r in runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)

    # Every drawn image once per epoch, shared between the two ranks; the oracle trains one seed after the other.
    for variant, seeds in (("baseline", ["0"]), ("oracle", ["0", "1"])):
        report = json.loads((root / f"reports/train/{variant}.json").read_text())
        assert sorted(report["seeds"]) == seeds
        for epoch in (e for seed in seeds for e in report["seeds"][seed]["history"]):
            per_process = epoch["images_seen_per_process"]
            assert len(per_process) == 2 and all(0 < n < report["epoch_size"] for n in per_process)
            assert sum(per_process) == report["epoch_size"]
    assert sorted(p.name for p in (root / "models/classifier/oracle").iterdir()) == [
        "config.json", "seed0.safetensors", "seed1.safetensors"]

    # The same fine-tuned model sampled by one process: the same bytes.
    two = folder_bytes(synthetic)
    one_process = root / "one_process.yaml"
    params = yaml.safe_load((root / "params.yaml").read_text())
    one_process.write_text(yaml.safe_dump(merge(params, {"compute": {"processes": 1}})))
    run([sys.executable, "-m", "stages.generate", CLASS, "--params", str(one_process)], root, env)
    one = folder_bytes(synthetic)
    assert set(one) == set(two)
    assert [name for name in one if one[name] != two[name]] == []


PROBE_STAGE = """
import os, signal, sys
from pipeline.core.cli import stage_main
from pipeline.core.errors import PipelineError

def probe(params, what):
    if what == "bad":
        raise PipelineError(f"bad item on rank {os.environ['RANK']}")
    if what == "killed" and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    sys.exit(stage_main("probe", probe, item="what", track=False, several_processes=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("what, code, lines", [
    ("bad", 1, ["error: probe@bad: bad item on rank 0", "error: probe@bad: bad item on rank 1"]),
    ("killed", 137, ["error: probe@killed: process rank 1 was killed by SIGKILL"]),
])
def test_a_launched_stage_reports_a_ranks_error_in_one_line(tmp_path, what, code, lines):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "probe.py").write_text(PROBE_STAGE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"compute": {"processes": 2}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.probe", what], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr[-3000:]
    # The launcher stops the other rank once one fails, so that one may not get as far as its own error.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and set(errors) <= set(lines), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_the_thread_count_does_not_follow_the_load_at_the_start(monkeypatch):
    """The same machine gives a stage the same threads, busy or not, so the same seed gives the same numbers."""
    import threading

    from pipeline.core import launch

    monkeypatch.delenv(launch.THREADS_ENV, raising=False)
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "2")
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    idle = [launch.threads_per_process(1), launch.threads_per_process(2), launch.threads_per_process(3)]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinners = [threading.Thread(target=spin) for _ in range(2)]
    for spinner in spinners:
        spinner.start()
    try:
        busy = [launch.threads_per_process(1), launch.threads_per_process(2), launch.threads_per_process(3)]
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
    assert idle == busy == [2, 1, 1]
