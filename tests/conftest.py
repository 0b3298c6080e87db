"""Shared test set-up: every test logs to its own throw-away MLflow store and runs on few threads."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path_factory, monkeypatch):
    """Point MLflow at a per-test SQLite store so tests never touch the repo's mlflow.db."""
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    for name in ("LESION_SYNTH_WORKSPACE", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    yield store


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a 2-core box shared with other jobs, two threads spin on each other and run 3-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The tiny random SD base in the embedded format, built once for every diffusion test (diffusion_workspace.py)."""
    from diffusion_workspace import build_base

    return build_base(tmp_path_factory.mktemp("tiny") / "base")
