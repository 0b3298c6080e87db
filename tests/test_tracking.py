"""MLflow layout: anchored store, one parent per execution (named after the DVC experiment, holding the headline),
child per stage, FAILED on error."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.core import tracking
from pipeline.core.digest import json_digest
from pipeline.core.params import parse_params
from pipeline.core.paths import store_root, workspace_root


def test_store_is_anchored_at_the_original_repo_inside_experiment_copies(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert store_root() == tmp_path / "repo"
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"


def test_queued_experiment_works_in_its_copy_but_logs_to_the_parent_repo(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs stages in a temp copy (the CWD) with DVC_ROOT naming the parent repo."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    parent = tmp_path / "repo"
    copy = parent / ".dvc" / "tmp" / "exps" / "tmpq1"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(parent))
    assert workspace_root() == copy
    assert store_root() == parent
    assert tracking.tracking_uri() == f"sqlite:///{parent / 'mlflow.db'}"


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri() == "http://mlflow.example:5000"


def test_params_flatten_to_dotted_strings():
    nested = {"diffusion": {"lr": {"lora": 0.0001}, "lora": {"rank": 8, "target_modules": ["to_q", "to_k"]}},
              "data": {"real_per_class": None, "is_demo": True}, "seed": 0}
    assert tracking.flatten(nested) == {
        "diffusion.lr.lora": "0.0001", "diffusion.lora.rank": "8", "diffusion.lora.target_modules": '["to_q", "to_k"]',
        "data.real_per_class": "None", "data.is_demo": "True", "seed": "0"}


def test_stage_runs_share_one_parent_and_carry_execution_tags(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    params = parse_params({"mlflow": {"experiment": "tracking-test"}})
    with tracking.stage_run("prepare", params) as first:
        tracking.log_metrics({"images": 12})
    with tracking.stage_run("finetune@mel", params, tags={"item": "mel"}) as second:
        pass
    client = mlflow.MlflowClient()
    a, b = client.get_run(first.info.run_id), client.get_run(second.info.run_id)
    parent = a.data.tags["mlflow.parentRunId"]
    assert parent == b.data.tags["mlflow.parentRunId"]
    assert a.data.tags["dvc_exp_name"] == "exp-test" and a.data.tags["stage"] == "prepare"
    assert a.data.tags["params_hash"] == json_digest(params.model_dump(mode="json"))
    assert a.data.metrics["images"] == 12
    parent_run = client.get_run(parent)
    assert parent_run.data.params["data.classes"] == '["akiec", "bcc", "df", "mel", "vasc"]'

    assert parent_run.info.run_name == "exp-test"  # the DVC experiment's name, as `dvc exp show` lists it

    other = parse_params({"mlflow": {"experiment": "tracking-test"}, "seed": 7})
    assert tracking.parent_run_id(other) != parent  # other params: another execution


def test_the_headline_lands_on_the_parent_run_which_parent_only_searches_find(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = parse_params({"mlflow": {"experiment": "tracking-headline"}})
    with tracking.stage_run("report", params):
        tracking.log_headline(params, {"balanced_accuracy_baseline": 0.5, "gain_augmented": -0.125},
                              {"verdict": "inconclusive at 95%"})
    parents = mlflow.search_runs(experiment_names=["tracking-headline"], filter_string="tags.kind = 'pipeline'")
    assert len(parents) == 1
    row = parents.iloc[0]
    assert row["metrics.balanced_accuracy_baseline"] == 0.5 and row["metrics.gain_augmented"] == -0.125
    assert row["tags.verdict"] == "inconclusive at 95%"
    assert row["tags.mlflow.runName"].startswith("pipeline workspace ")  # no DVC experiment: the workspace


def test_a_failing_stage_marks_its_run_and_parent_failed():
    params = parse_params({"mlflow": {"experiment": "tracking-fail"}})
    with pytest.raises(RuntimeError):
        with tracking.stage_run("train@baseline", params):
            raise RuntimeError("boom")
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["tracking-fail"], output_format="list")
    by_stage = {r.data.tags.get("stage", "parent"): r for r in runs}
    assert by_stage["train@baseline"].info.status == "FAILED"
    assert client.get_run(by_stage["parent"].info.run_id).info.status == "FAILED"


def test_artifacts_land_beside_a_sqlite_store(isolated_mlflow):
    params = parse_params({"mlflow": {"experiment": "tracking-artifacts"}})
    experiment = mlflow.get_experiment(tracking.ensure_experiment(params.mlflow.experiment))
    assert experiment.artifact_location == (isolated_mlflow / "mlartifacts").as_uri()


def test_concurrent_stages_can_open_a_new_store_together(tmp_path):
    """`dvc queue start -j 2` starts two stages at once against a store that does not exist yet."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    code = (
        "from pipeline.core import tracking; from pipeline.core.params import parse_params; "
        "import sys; p = parse_params({'seed': int(sys.argv[1])}); "
        "ctx = tracking.stage_run('demo_data', p); ctx.__enter__(); ctx.__exit__(None, None, None)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seed)], env=env, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2, 3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("lesion-synth").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("stage") == "demo_data"]
    assert len(stage_runs) == 3 and len({r.data.tags["mlflow.parentRunId"] for r in stage_runs}) == 3
