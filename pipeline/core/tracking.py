"""MLflow tracking: one parent run per pipeline execution (same git commit, DVC experiment name and params hash),
one child run per stage, so the runs table shows one comparable row per experiment (docs/architecture.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from pipeline.core.digest import json_digest
from pipeline.core.paths import store_root, workspace_root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


def flatten(mapping: Mapping) -> dict[str, str]:
    """{'a': {'b': 1, 'c': [2]}} -> {'a.b': '1', 'a.c': '[2]'}: MLflow params are flat strings."""
    import pandas as pd  # imported by mlflow anyway

    row = pd.json_normalize(dict(mapping), sep=".").iloc[0].to_dict()
    return {key: json.dumps(value) if isinstance(value, list) else str(value) for key, value in row.items()}


def configured_mlflow():
    """The mlflow module, pointed at this repository's store."""
    import mlflow  # imported lazily: it takes a couple of seconds

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _sqlite_folder() -> Path | None:
    uri = tracking_uri()
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


def _store_lock() -> FileLock:
    """Serialises creating the store and the parent run across concurrent stages (`dvc queue start -j N`)."""
    folder = _sqlite_folder() or store_root()
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".mlflow.lock"), timeout=300)


def ensure_experiment(name: str) -> str:
    """The experiment's id; a new one keeps its artifacts beside a SQLite store (a server decides itself)."""
    mlflow = configured_mlflow()
    with _store_lock():  # two processes opening a new SQLite store at once both try to create its tables
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        folder = _sqlite_folder()
        return mlflow.create_experiment(name, artifact_location=(folder / "mlartifacts").as_uri() if folder else None)


def execution_tags(params) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace_root(), capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"git_commit": commit, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "params_hash": json_digest(params.model_dump(mode="json"))}


def parent_run_id(params) -> str:
    """Find or create the parent run of this pipeline execution, named after the DVC experiment, holding every param."""
    from mlflow.entities import Param

    mlflow = configured_mlflow()
    experiment_id = ensure_experiment(params.mlflow.experiment)
    tags = execution_tags(params)
    key = json_digest(tags)
    with _store_lock():
        found = mlflow.search_runs([experiment_id], filter_string=f"tags.pipeline_key = '{key}'", max_results=1,
                                   output_format="list")
        if found:
            return found[0].info.run_id
        client = mlflow.MlflowClient()
        name = tags["dvc_exp_name"] or f"pipeline workspace {tags['git_commit'][:8]}"
        run = client.create_run(experiment_id, run_name=name, tags={**tags, "pipeline_key": key, "kind": "pipeline"})
        flat = [Param(k, v[:6000]) for k, v in flatten(params.model_dump(mode="json")).items()]
        client.log_batch(run.info.run_id, params=flat)  # the client splits it into batches of at most 100
        return run.info.run_id


@contextmanager
def stage_run(stage: str, params, tags: Mapping[str, str] | None = None) -> Iterator:
    """A child run for one stage; an exception marks it (and its parent) FAILED before propagating."""
    mlflow = configured_mlflow()
    experiment_id = ensure_experiment(params.mlflow.experiment)
    parent = parent_run_id(params)
    all_tags = {**execution_tags(params), "stage": stage, "mlflow.parentRunId": parent, **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags) as run:
        try:
            yield run
        except BaseException:
            mlflow.MlflowClient().set_terminated(parent, status="FAILED")
            raise


def log_headline(params, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
    """The headline onto the parent run, which it then marks FINISHED (the last stage calls this): the row MLflow's
    runs table shows collapsed, so experiments compare there."""
    mlflow = configured_mlflow()
    with mlflow.start_run(run_id=parent_run_id(params), nested=True, tags=dict(tags)):  # resumed; FINISHED on exit
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def _active_mlflow():
    """The mlflow module while a run is active, else None: library code also runs outside a stage (tests, benchmarks),
    and a process that never imported mlflow has no run (importing it costs seconds)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if mlflow := _active_mlflow():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if mlflow := _active_mlflow():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_metric_history(name: str, values: Mapping[int, float]) -> None:
    """One metric's values at several steps ({step: value}) in one write."""
    if mlflow := _active_mlflow():
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(name, float(v), now, step) for step, v in values.items()]
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)
