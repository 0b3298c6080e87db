"""What the classifier sees: image lists from split.csv and the synthetic manifests, leakage guards, and a
decoded-once uint8 tensor cache (decoding + resizing every epoch costs more than the 64px forward pass on 2 CPU
cores), keyed by content and size under the original repository's ``.cache/``, shared by every DVC experiment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.atomic import atomic_file, read_table
from pipeline.data.images import load_square
from pipeline.core.digest import sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params
from pipeline.core.paths import CACHE_DIR, SPLIT_CSV, SYNTHETIC_BASE_DIR, SYNTHETIC_DIR, store_root, workspace_root

TRAIN_SIDE = ("train", "reserve")  # reserve: train rows beyond data.real_per_class (real_ceiling and oracle only)
_CACHE_VERSION = "v1"  # bump when the decode/resize recipe changes


@dataclass(frozen=True)
class Sample:
    """One image the classifier may see. ``origin`` is 'real' (a split.csv row) or 'synthetic' (a manifest row)."""

    path: Path  # absolute
    label: int  # index into params.data.classes
    origin: str
    image_id: str


def read_split(params: Params, root: Path) -> pd.DataFrame:
    """split.csv (the prepare stage's columns and split values) restricted to ``data.classes``, with ``label`` and
    absolute ``abs_path`` columns added."""
    path = root / SPLIT_CSV
    frame = read_table(path, ("image_id", "dx", "split", "path"), "split table not found; run `dvc repro prepare` first")
    classes = list(params.data.classes)
    frame = frame[frame["dx"].isin(classes)].copy()
    for class_code in classes:
        if not (frame["dx"] == class_code).any():
            raise PipelineError(f"{path}: no rows for class {class_code!r} of data.classes; rerun `dvc repro prepare`")
    frame["label"] = frame["dx"].map({c: i for i, c in enumerate(classes)}).astype(int)
    frame["abs_path"] = [str((root / p).resolve()) for p in frame["path"]]  # an absolute path stays as it is
    return frame.reset_index(drop=True)


def real_samples(split: pd.DataFrame, which: str) -> list[Sample]:
    rows = split[split["split"] == which]
    return [
        Sample(Path(p), int(label), "real", image_id)
        for p, label, image_id in zip(rows["abs_path"], rows["label"], rows["image_id"])
    ]


def synthetic_samples(params: Params, root: Path, images_dir: Path = SYNTHETIC_DIR,
                      draw: int | None = None) -> list[Sample]:
    """The synthetic images of the selected classes, from the generate stage's ``<images_dir>/<class>/manifest.csv``
    (data/synthetic by default): all of them, or those generated for classifier seed ``draw``."""
    samples: list[Sample] = []
    for label, class_code in enumerate(params.data.classes):
        folder = root / images_dir / class_code
        manifest = folder / "manifest.csv"
        stage = "generate_base" if images_dir == SYNTHETIC_BASE_DIR else f"generate@{class_code}"
        frame = read_table(manifest, ("file", "draw"), f"synthetic manifest missing; run `dvc repro {stage}` (the "
                           "classifier needs synthetic images of every class in data.classes)")
        if draw is not None:
            mine = frame[frame["draw"] == str(draw)]
            if mine.empty and not frame.empty:
                raise PipelineError(f"{manifest}: no image drawn for classifier seed {draw}; rerun generate@{class_code} "
                                    "after changing classifier.seeds")
            frame = mine
        for name in frame["file"]:
            path = (folder / name).resolve()
            if folder.resolve() not in path.parents:
                raise PipelineError(f"{manifest}: file {name!r} lies outside {folder}")
            if not path.is_file():
                raise PipelineError(f"{manifest}: listed image {name!r} not found")
            samples.append(Sample(path, label, "synthetic", f"synthetic:{class_code}/{name}"))
    return samples


def assert_no_leakage(train: Sequence[Sample], split: pd.DataFrame, *, allow_synthetic: bool,
                      synthetic_root: Path | None = None, digests: dict[Path, str] | None = None) -> None:
    """Runtime guard of a training list against split.csv itself (not the samples' own labels): one PipelineError
    naming the first val/test image (by path, image_id, or content when ``digests`` covers the held-out files), real
    image that is not a train-side row, or synthetic image unless ``allow_synthetic``."""
    synthetic_root = (synthetic_root or workspace_root() / SYNTHETIC_DIR).resolve()
    held = split[~split["split"].isin(TRAIN_SIDE)]
    held_paths = {Path(p).resolve(): (s, i) for p, s, i in zip(held["abs_path"], held["split"], held["image_id"])}
    held_ids = dict(zip(held["image_id"], held["split"]))
    train_ids = set(split.loc[split["split"].isin(TRAIN_SIDE), "image_id"])
    digests = digests or {}
    held_digests = {digests[p]: p for p in held_paths if p in digests}
    for sample in train:
        path = sample.path.resolve()
        synthetic = sample.origin == "synthetic" or synthetic_root in path.parents
        if synthetic and not allow_synthetic:
            raise PipelineError(f"leakage guard: synthetic image {path} is in the baseline training list")
        if path in held_paths:
            which, image_id = held_paths[path]
            raise PipelineError(f"leakage guard: {which} image {image_id} ({path}) is in the training list")
        if not synthetic and sample.image_id in held_ids:
            raise PipelineError(f"leakage guard: {held_ids[sample.image_id]} image {sample.image_id} is in the training list")
        if not synthetic and sample.image_id not in train_ids:
            raise PipelineError(f"leakage guard: {sample.image_id} ({path}) is not a train row of split.csv")
        digest = digests.get(path)
        if digest is not None and digest in held_digests:
            raise PipelineError(f"leakage guard: training image {path} is byte-identical to held-out image {held_digests[digest]}")


def assert_real_heldout(samples: Sequence[Sample], split: pd.DataFrame, which: str, synthetic_root: Path) -> None:
    """Runtime guard for val/test lists: only real rows of split.csv with split == ``which``, never synthetic."""
    synthetic_root = synthetic_root.resolve()
    rows = split[split["split"] == which]
    allowed = {Path(p).resolve(): i for p, i in zip(rows["abs_path"], rows["image_id"])}
    for sample in samples:
        path = sample.path.resolve()
        if sample.origin != "real" or synthetic_root in path.parents:
            raise PipelineError(f"leakage guard: synthetic image {path} is in the {which} list")
        if allowed.get(path) != sample.image_id:
            raise PipelineError(f"leakage guard: {sample.image_id} ({path}) is not a {which} row of split.csv")


def load_images(paths: Iterable[Path], size: int, digests: dict[Path, str] | None = None) -> torch.Tensor:
    """Images as one uint8 tensor (N, 3, size, size), decoded at most once per (content, size) ever.
    ``digests`` (path -> sha256) is filled in as a side effect so callers can reuse the hashes."""
    digests = {} if digests is None else digests
    folder = store_root() / CACHE_DIR / "classifier" / f"{_CACHE_VERSION}-{size}px"
    paths = [Path(path).resolve() for path in paths]
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        digest = digests.get(path) or sha256_file(path)
        digests[path] = digest
        cached = folder / f"{digest}.npy"
        try:
            out[i] = torch.from_numpy(np.load(cached, allow_pickle=False))
        except (ValueError, OSError):  # not cached yet (FileNotFoundError), or unreadable
            out[i] = load_square([path], size)[0]
            with atomic_file(cached) as temp, open(temp, "wb") as handle:
                np.save(handle, out[i].numpy(), allow_pickle=False)
    return out

