"""Throw-away workspaces for the arms: real demo images, a base model, fine-tune lists; plus cached trained models.

Data comes from the repository's own ``data/prepared`` (after ``dvc repro prepare``); without it the demo
set of the default params is drawn with the project's ``write_demo`` + ``prepare`` into ``.cache/bench/data``
once (``BENCH_QUICK``: a small one), so a fresh clone measures on the same data as ``make repro``.
Functions whose name ends in ``_child`` run inside a ``run_arm`` subprocess (they import torch/diffusers).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from bench.common import REPO, Settings, enter_workspace, run_arm, workspace_env

CACHE = REPO / ".cache" / "bench"
FINETUNE_COLUMNS = ("image_id", "lesion_id", "dx", "path")
BENCH_CLASS = "df"  # the class every diffusion benchmark fine-tunes / generates (always in the default classes)


# ------------------------------------------------------------------------------------------------ data


def data_root(settings: Settings) -> Path:
    """A folder holding ``data/prepared/{split.csv,finetune/}`` whose paths resolve against it."""
    if (REPO / "data" / "prepared" / "split.csv").is_file() and (REPO / "data" / "prepared" / "finetune").is_dir():
        return REPO
    from pipeline.core.params import parse_params

    demo = parse_params({}).demo
    images, size = (160, 48) if settings.quick else (demo.images, demo.size)
    root = CACHE / f"data-{images}-{size}"
    if not (root / "data" / "prepared" / "split.csv").is_file():
        run_arm(settings, "setup-demo-data", "bench.workspace:demo_data_child", {"root": str(root), "images": images,
                "size": size}, env=workspace_env(root))
    return root


def demo_data_child(root: str, images: int, size: int) -> dict:
    """Draw a small demo set and split it with the project's own demo_data + prepare code."""
    from pipeline.data.demo import write_demo
    from pipeline.data.split import prepare
    from pipeline.core.params import parse_params

    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    (root_path / "dvc.yaml").write_text("stages: {}\n")
    enter_workspace(root_path)  # prepare writes data/prepared into the workspace, never into the repository
    params = parse_params({"demo": {"images": images, "size": size}, "data": {"finetune_images": 20 if images >= 600 else 4}})
    write_demo(root_path / "data" / "demo" / "HAM10000", params.seed, params.demo.images, params.demo.size, params.demo.min_per_class)
    prepare(params)
    return {}


def _abs(path: str, root: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else (root / p).resolve())


def finetune_rows(settings: Settings, class_code: str = BENCH_CLASS, count: int | None = None) -> list[dict]:
    """The class's fine-tune list (absolute paths), optionally cut or topped up from its train images to ``count``."""
    root = data_root(settings)
    with open(root / "data" / "prepared" / "finetune" / f"{class_code}.csv", newline="") as handle:
        rows = [{**r, "path": _abs(r["path"], root)} for r in csv.DictReader(handle)]
    if count is not None and count > len(rows):
        have = {r["image_id"] for r in rows}
        extra = [r for r in split_rows(settings) if r["dx"] == class_code and r["split"] == "train" and r["image_id"] not in have]
        rows += [{k: r[k] for k in FINETUNE_COLUMNS} for r in extra[: count - len(rows)]]
    return [{k: r[k] for k in FINETUNE_COLUMNS} for r in (rows if count is None else rows[:count])]


def split_rows(settings: Settings) -> list[dict]:
    root = data_root(settings)
    with open(root / "data" / "prepared" / "split.csv", newline="") as handle:
        return [{**r, "path": _abs(r["path"], root)} for r in csv.DictReader(handle)]


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] | list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------ workspaces


def diffusion_workspace(root: Path, base: Path, rows: list[dict], class_code: str = BENCH_CLASS,
                        class_model: Path | None = None) -> Path:
    """dvc.yaml placeholder, models/base -> ``base``, data/prepared/finetune/<class>.csv, optional trained class model."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    models = root / "models"
    models.mkdir(exist_ok=True)
    link = models / "base"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(base.resolve(), target_is_directory=True)
    if class_model is not None:
        target = models / "diffusion" / class_code
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(class_model.resolve(), target_is_directory=True)
    write_csv(root / "data" / "prepared" / "finetune" / f"{class_code}.csv", rows, FINETUNE_COLUMNS)
    return root


def tiny_base(settings: Settings, resolution: int) -> Path:
    """An untrained tiny SD base at ``resolution`` saved in diffusers' format (throughput does not depend on weights)."""
    folder = settings.workdir / f"tiny-base-{resolution}"
    if not (folder / "model_index.json").is_file():
        run_arm(settings, f"setup-tiny-{resolution}", "bench.workspace:tiny_base_child", {"folder": str(folder), "resolution": resolution})
    return folder


def tiny_base_child(folder: str, resolution: int) -> dict:
    from pipeline.diffusion.tiny import build_tiny_pipeline

    build_tiny_pipeline(resolution, seed=0).save_pretrained(folder, safe_serialization=True)
    return {}


# ------------------------------------------------------------------------------------ trained models


def _repo_trained(class_code: str) -> tuple[Path, Path] | None:
    base, model = REPO / "models" / "base", REPO / "models" / "diffusion" / class_code
    try:
        meta = json.loads((model / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # Only a real run's models: micro test runs (32 px, a handful of steps) would say nothing about quality.
    if (base / "model_index.json").is_file() and meta.get("method") == "lora" and meta.get("resolution", 0) >= 64 \
            and meta.get("steps", 0) >= 100:
        return base, model
    return None


# Quick training used when the repo has no trained base + LoRA: enough for images that look like skin.
QUICK_TRAIN = {"pretrain": {"vae_steps": 100, "unet_steps": 300, "batch": 16}, "steps": 150}
MICRO_TRAIN = {"pretrain": {"vae_steps": 2, "unet_steps": 2, "batch": 4}, "steps": 2}


def trained_models(settings: Settings, class_code: str = BENCH_CLASS) -> tuple[Path, Path, str, int]:
    """(base folder, class LoRA folder, where they came from, resolution) for the generation benchmark."""
    if not settings.quick and (found := _repo_trained(class_code)) is not None:
        base, model = found
        resolution = json.loads((model / "meta.json").read_text()).get("resolution", 64)
        return base, model, f"repository's trained models/base + models/diffusion/{class_code}", int(resolution)
    plan = MICRO_TRAIN if settings.quick else QUICK_TRAIN
    resolution = 32 if settings.quick else 64
    rows = finetune_rows(settings, class_code)
    key = hashlib.sha256(json.dumps([plan, resolution, class_code, rows], sort_keys=True).encode()).hexdigest()[:12]
    root = CACHE / f"trained-{class_code}-{resolution}-{key}"
    if not (root / "models" / "diffusion" / class_code / "meta.json").is_file():
        split = split_rows(settings)
        run_arm(settings, "setup-train-models", "bench.workspace:train_models_child",
                {"root": str(root), "class_code": class_code, "plan": plan, "resolution": resolution, "rows": rows,
                 "split": split}, env=workspace_env(root), timeout=3600)
    how = (f"trained by the bench (cached in {root.relative_to(REPO)}): tiny base pre-trained "
           f"{plan['pretrain']['vae_steps']}+{plan['pretrain']['unet_steps']} steps, LoRA {plan['steps']} steps")
    return root / "models" / "base", root / "models" / "diffusion" / class_code, how, resolution


def train_models_child(root: str, class_code: str, plan: dict, resolution: int, rows: list[dict], split: list[dict]) -> dict:
    """Pre-train the tiny base on the train split and fine-tune the class LoRA, with the project's own stage code."""
    import time

    from pipeline.diffusion.base import prepare_base
    from pipeline.diffusion.finetune import finetune_class
    from pipeline.core.params import parse_params

    root_path = Path(root)
    (root_path / "dvc.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root_path / "dvc.yaml").write_text("stages: {}\n")
    write_csv(root_path / "data" / "prepared" / "split.csv", split, ["image_id", "lesion_id", "dx", "split", "path"])
    write_csv(root_path / "data" / "prepared" / "finetune" / f"{class_code}.csv", rows, FINETUNE_COLUMNS)
    enter_workspace(root_path)  # models/ go to the cache folder, never into the repository
    params = parse_params({"diffusion": {"resolution": resolution, "steps": plan["steps"], "pretrain": plan["pretrain"]}})
    start = time.perf_counter()
    prepare_base(params)
    finetune_class(params, class_code)
    return {"train_s": time.perf_counter() - start}
