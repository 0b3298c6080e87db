"""End to end: real `dvc repro` of every stage on micro settings, in a throw-away copy of this repo.

Checks the contract a researcher relies on: every stage runs and writes its outputs, a second
`dvc repro` has nothing to do, swapping one class reruns only that class's diffusion stages plus
the classifier stages, MLflow holds one baseline and one augmented run, and the headline leads the parent run,
`dvc exp show` and `dvc plots show`. Then the method sweep runs as
queued experiments in the same copy (DVC's run cache restores the stages its points share).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

MICRO = {
    "data": {"classes": ["df", "vasc"], "finetune_images": 4, "real_per_class": None, "image_size": 32},
    "demo": {"images": 160, "size": 48},
    "diffusion": {
        "resolution": 32, "steps": 4, "batch": 2, "checkpoint_every": 2,
        "pretrain": {"vae_steps": 3, "unet_steps": 3, "batch": 4},
    },
    "generate": {"per_class": 4, "steps": 2, "batch": 4},
    "classifier": {"image_size": 32, "epochs": 1, "batch": 16},
    "oracle": {"epochs": 1, "epoch_images": 32},
}


def merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
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


def assert_headline_everywhere(root: Path, env: dict, metrics: dict) -> None:
    """The headline where users compare experiments: the parent MLflow run, `dvc exp show`, `dvc plots show`."""
    gains = metrics["gain_over_baseline"]
    headline = {f"balanced_accuracy_{v}": metrics[v]["balanced_accuracy"] for v in metrics["variants"]}
    for variant in gains:
        headline.update({f"gain_{variant}": gains[variant]["balanced_accuracy"],
                         f"gain_{variant}_ci_low": gains[variant]["ci_low"],
                         f"gain_{variant}_ci_high": gains[variant]["ci_high"]})
    assert {"balanced_accuracy_baseline", "balanced_accuracy_augmented", "gain_augmented"} <= set(headline)
    # The store a user's `mlflow ui` opens: the repo's mlflow.db. Set explicitly, since a URI an earlier test set
    # in this process would win over the environment.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        parents = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string="tags.kind = 'pipeline'")
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert {k: parent[f"metrics.{k}"] for k in headline} == pytest.approx(headline)
    assert parent["tags.verdict"] == metrics["verdict"]
    assert parent["params.data.classes"] == '["df", "vasc"]' and parent["params.diffusion.method"] == "lora"
    assert parent["params.generate.per_class"] == "4" and parent["params.diffusion.base_model"] == "embedded-tiny"

    def dvc_json(*args: str):
        done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args, "--json"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)  # stderr may hold warnings, e.g. that the sweep's plot data is not there yet

    shown = dvc_json("exp", "show")[0]["data"]["metrics"]
    assert list(shown)[0] == "reports/headline.json" and "reports/data.json" not in shown
    assert list(shown["reports/headline.json"]["data"])[:len(headline)] == list(headline)

    plots = dvc_json("plots", "show")["data"]
    bars = plots["reports/figures/per_class_gain.json"][0]["content"]["data"]["values"]
    assert sorted(b["class"] for b in bars) == ["df", "vasc"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "repo"
    return root, copy_repo(root, MICRO)


@pytest.mark.slow
def test_full_pipeline_then_noop_then_class_swap(workspace):
    root, env = workspace
    dvc = str(Path(sys.executable).parent / "dvc")

    first = run([dvc, "repro"], root, env)
    assert {"demo_data", "prepare", "base", "finetune@df", "generate@vasc", "generate_base", "train@baseline",
            "screen", "train@augmented", "train@base_only", "train@real_ceiling", "oracle", "fidelity", "evaluate",
            "report"} <= stages_ran(first)

    metrics = json.loads((root / "reports/metrics.json").read_text())
    for variant in ("baseline", "augmented"):
        assert 0.0 <= metrics[variant]["balanced_accuracy"] <= 1.0
    assert (root / "reports/summary.md").is_file()
    manifest = pd.read_csv(root / "data/synthetic/vasc/manifest.csv")
    assert len(manifest) == 4 and all((root / "data/synthetic/vasc" / f).is_file() for f in manifest.file)

    runs = [r for r in experiment_runs(root) if r.data.tags.get("stage") == "evaluate"]
    assert sorted(r.data.tags.get("variant") for r in runs) == ["augmented", "base_only", "baseline"]  # no reserve: no ceiling
    assert metrics["skipped"] == {"real_ceiling": json.loads((root / "reports/train/real_ceiling.json").read_text())["skipped"]}
    fidelity = json.loads((root / "reports/fidelity.json").read_text())
    assert set(fidelity["classes"]) == {"df", "vasc"} and set(fidelity["mean"]) == {"augmented", "base_only", "oracle_test_recall"}
    assert all("balanced_accuracy" in r.data.metrics for r in runs)
    assert_headline_everywhere(root, env, metrics)

    second = run([dvc, "repro"], root, env)
    assert stages_ran(second) == set(), second

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["classes"] = ["df", "mel"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    swapped = stages_ran(run([dvc, "repro"], root, env))
    assert {"finetune@mel", "generate@mel", "screen", "train@baseline", "train@augmented", "evaluate"} <= swapped
    assert not swapped & {"demo_data", "base", "finetune@df", "generate@df"}, swapped

    # The mask ControlNet: it trains, generation takes masks, the screen scores them; no class model is retrained.
    params["diffusion"]["control"] = "mask"
    params["diffusion"]["controlnet"] = {**params["diffusion"]["controlnet"], "steps": 4, "batch": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    masked = stages_ran(run([dvc, "repro"], root, env))
    assert {"controlnet", "generate@df", "generate@mel", "generate_base", "screen", "train@augmented"} <= masked
    assert not masked & {"base", "finetune@df", "finetune@mel", "train@baseline"}, masked
    manifest = pd.read_csv(root / "data/synthetic/df/manifest.csv")
    assert all((root / "data/synthetic/df" / m).is_file() for m in manifest["mask"])
    quality = json.loads((root / "reports/quality.json").read_text())["classes"]
    assert all(0.0 <= quality[c]["mask_iou"] <= 1.0 and 0.0 <= quality[c]["mask_iou_real"] <= 1.0 for c in ("df", "mel"))


@pytest.mark.slow
def test_method_sweep_queues_one_experiment_per_point_and_draws_the_chart(workspace):
    """`python -m pipeline.sweep` over three methods at `-j 2`, on both axes (synthetic amount, real images per
    class): every point runs as its own queued experiment (in its own copy, logging to the repo's one mlflow.db),
    and its gain lands in the charts' data."""
    root, env = workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    # 3 per class, not the workspace's 4: with the workspace's own params DVC's run cache would restore every stage
    # of the lora point, evaluate included, and it would log no MLflow run of its own.
    params["sweep"] = {"methods": ["lora", "dreambooth", "textual_inversion"], "amounts": [3], "real_per_class": [2],
                       "jobs": 2, "timeout_minutes": 25}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run([sys.executable, "-m", "pipeline.sweep", "--id", "t1"], root, env, timeout=1800)  # six queued experiments

    result = json.loads((root / "reports/sweep/sweep.json").read_text())
    points = {(p["method"], p["amount"], p["real_per_class"]): p for p in result["points"]}
    methods = params["sweep"]["methods"]
    # the amount axis at the workspace's data.real_per_class (null: all train images), the scarcity axis at K = 2
    assert set(points) == {(m, a, None) for m in methods for a in (0, 3)} | {(m, a, 2) for m in methods for a in (0, 4)}
    names = {f"t1-{m.replace('_', '-')}-{a}-real{k or 'all'}": m for m in methods for a, k in ((3, None), (4, 2))}
    for method in methods:
        for amount, cap in ((3, None), (4, 2)):
            point = points[(method, amount, cap)]
            assert point["experiment"] == f"t1-{method.replace('_', '-')}-{amount}-real{cap or 'all'}"
            assert point["gain"] == pytest.approx(point["augmented"] - point["baseline"], abs=1e-9)
            assert point["ci_low"] <= point["gain"] <= point["ci_high"]
            assert points[(method, 0, cap)]["gain"] == 0.0
    for chart in ("gain_vs_amount.png", "gain_vs_real.png"):
        assert (root / "reports/sweep" / chart).stat().st_size > 10_000
    assert "| dreambooth | 3 | all |" in (root / "reports/sweep/sweep.md").read_text()

    runs = experiment_runs(root)
    evaluated = {r.data.tags["dvc_exp_name"]: r for r in runs
                 if r.data.tags.get("stage") == "evaluate" and r.data.tags.get("variant") == "augmented"}
    for name, method in names.items():
        assert evaluated[name].data.tags["method"] == method  # each point ran its own method, in its own copy
    parents = {evaluated[n].data.tags["mlflow.parentRunId"] for n in names}
    assert len(parents) == len(names)
    assert any(r.data.tags.get("kind") == "sweep" for r in runs)
    assert yaml.safe_load((root / "params.yaml").read_text())["diffusion"]["method"] == "lora"  # workspace untouched
