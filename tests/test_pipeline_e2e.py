"""End to end: real `dvc repro` of every stage on micro settings, in a throw-away copy of this repo.

Checks the contract a researcher relies on: every stage runs and writes its outputs, a second
`dvc repro` has nothing to do, swapping one class reruns only that class's diffusion stages plus
the classifier stages, and MLflow holds one baseline and one augmented run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

MICRO = {
    "data": {"classes": ["df", "vasc"], "finetune_images": 4, "image_size": 32},
    "demo": {"images": 160, "size": 48},
    "diffusion": {
        "resolution": 32, "steps": 4, "batch": 2, "checkpoint_every": 2,
        "pretrain": {"vae_steps": 3, "unet_steps": 3, "batch": 4},
    },
    "generate": {"per_class": 4, "steps": 2, "batch": 4},
    "classifier": {"image_size": 32, "epochs": 1, "batch": 16},
}


def merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def stages_ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def copy_repo(root: Path, change: dict) -> dict:
    """Copy the repo's tracked and untracked-not-ignored files into a fresh git repo; return the env to run in it."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), change)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "LESION_SYNTH_WORKSPACE", "PYTHONPATH"):
        env.pop(name, None)  # the store must be found the way a user's run finds it: at the repo root
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], root, env)
    run([*git, "add", "-A"], root, env)
    run([*git, "commit", "-qm", "snapshot"], root, env)
    return env


def experiment_runs(root: Path):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("lesion-synth").experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "repo"
    return root, copy_repo(root, MICRO)


@pytest.mark.slow
def test_full_pipeline_then_noop_then_class_swap(workspace):
    root, env = workspace
    dvc = str(Path(sys.executable).parent / "dvc")

    first = run([dvc, "repro"], root, env)
    assert {"demo_data", "prepare", "base", "finetune@df", "generate@vasc", "train@baseline",
            "screen", "train@augmented", "evaluate", "report"} <= stages_ran(first)

    metrics = json.loads((root / "reports/metrics.json").read_text())
    for variant in ("baseline", "augmented"):
        assert 0.0 <= metrics[variant]["balanced_accuracy"] <= 1.0
    assert (root / "reports/summary.md").is_file()
    manifest = pd.read_csv(root / "data/synthetic/vasc/manifest.csv")
    assert len(manifest) == 4 and all((root / "data/synthetic/vasc" / f).is_file() for f in manifest.file)

    runs = [r for r in experiment_runs(root) if r.data.tags.get("stage") == "evaluate"]
    assert sorted(r.data.tags.get("variant") for r in runs) == ["augmented", "baseline"]
    assert all("balanced_accuracy" in r.data.metrics for r in runs)

    second = run([dvc, "repro"], root, env)
    assert stages_ran(second) == set(), second

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["classes"] = ["df", "mel"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    swapped = stages_ran(run([dvc, "repro"], root, env))
    assert {"finetune@mel", "generate@mel", "screen", "train@baseline", "train@augmented", "evaluate"} <= swapped
    assert not swapped & {"demo_data", "base", "finetune@df", "generate@df"}, swapped


@pytest.mark.slow
def test_two_queued_experiments_run_concurrently_into_one_store(tmp_path):
    """`dvc exp run --queue` twice + `dvc queue start -j 2`: both finish, both log to the repo's mlflow.db."""
    root = tmp_path / "repo"
    env = copy_repo(root, MICRO)
    dvc = str(Path(sys.executable).parent / "dvc")
    for seed in (1, 2):
        run([dvc, "exp", "run", "--queue", "-S", f"seed={seed}", "-n", f"seed{seed}", "prepare"], root, env)
    run([dvc, "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 600
    while "Running" in (status := run([dvc, "queue", "status"], root, env)) or "Queued" in status:
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 2, status

    runs = experiment_runs(root)
    stages = {(r.data.tags["dvc_exp_name"], r.data.tags.get("stage", "parent")): r for r in runs}
    for name in ("seed1", "seed2"):
        assert {"demo_data", "prepare", "parent"} <= {stage for exp, stage in stages if exp == name}
        assert stages[(name, "prepare")].info.status == "FINISHED"
        parent = stages[(name, "prepare")].data.tags["mlflow.parentRunId"]
        assert parent == stages[(name, "parent")].info.run_id
    assert stages[("seed1", "parent")].data.params["seed"] == "1"
    assert stages[("seed2", "parent")].data.params["seed"] == "2"
    assert not (root / "data" / "prepared").exists()  # the experiments ran in their own copies
