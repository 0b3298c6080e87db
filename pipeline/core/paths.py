"""Where everything lives: ``workspace_root``, the checkout a stage runs in (possibly a DVC experiment's temporary
copy), and ``store_root``, the original repository, where shared stores (MLflow) live."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.core.errors import PipelineError

_TEMP_EXPERIMENT = re.compile(r"^(?P<root>.+?)/\.dvc/tmp/exps/")
WORKSPACE_ENV = "LESION_SYNTH_WORKSPACE"


def workspace_root() -> Path:
    """$LESION_SYNTH_WORKSPACE, else the nearest folder holding dvc.yaml from the CWD. Not $DVC_ROOT: under
    `dvc exp run --queue` it names the parent repository, not the copy the stage runs in."""
    if os.environ.get(WORKSPACE_ENV):
        return Path(os.environ[WORKSPACE_ENV]).resolve()
    here = Path.cwd().resolve()
    return next((folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()), here)


def store_root() -> Path:
    """The original repository, also from a queued experiment's copy: $DVC_ROOT, or for runners that do not set it,
    the repository holding a path inside .dvc/tmp/exps/."""
    root = Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else workspace_root()
    match = _TEMP_EXPERIMENT.match(root.as_posix() + "/")
    return Path(match.group("root")) if match else root


# Stage outputs, relative to the workspace root (the same strings appear in dvc.yaml).
DEMO_DIR = Path("data/demo/HAM10000")
PREPARED_DIR = Path("data/prepared")
SPLIT_CSV = PREPARED_DIR / "split.csv"
FINETUNE_DIR = PREPARED_DIR / "finetune"
BASE_MODEL_DIR = Path("models/base")
CLASS_MODELS_DIR = Path("models/diffusion")
CONTROLNET_DIR = Path("models/controlnet")  # diffusion.control mask: one ControlNet for every class
SYNTHETIC_DIR = Path("data/synthetic")
SYNTHETIC_BASE_DIR = Path("data/synthetic_base")  # the base_only control: base model, class prompt, no class weights
CLASSIFIER_DIR = Path("models/classifier")
CHECKPOINT_DIR = Path("checkpoints")  # resumable state; deliberately not a DVC output
CACHE_DIR = Path(".cache")  # decoded-image caches; safe to delete
REPORTS_DIR = Path("reports")
PLOTS_DIR = REPORTS_DIR / "plots"

# Folders a relative path from params may point into; anything else must be given as an absolute path.
_ALLOWED_RELATIVE_ROOTS = ("data", "models", "tests", "checkpoints")


def resolve_user_path(value: str, key: str) -> Path:
    """Turn a path from params into an absolute one; a relative path must stay inside the repo's data folders, an
    absolute one is taken as given (a HAM10000 folder elsewhere on disk)."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return path
    root = workspace_root()
    resolved = (root / path).resolve()
    if not any(resolved.is_relative_to((root / name).resolve()) for name in _ALLOWED_RELATIVE_ROOTS):
        raise PipelineError(f"{key}: relative path {value!r} leaves the repository's "
                            f"{'/'.join(_ALLOWED_RELATIVE_ROOTS)} folders; give an absolute path to use a folder elsewhere")
    return resolved
