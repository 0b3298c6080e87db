"""The prepare stage: validated table -> lesion-grouped, dx-stratified train/val/test split + per-class fine-tune samples.
Every class in the data is split by a generator seeded by (seed, class): without a cap, changing ``data.classes`` leaves
split.csv byte-identical and DVC does not retrain the base model. Train images beyond ``data.real_per_class`` become
``reserve`` (read only by ``real_ceiling`` and the oracle); fine-tune images come from the capped train images only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.data.ham10000 import read_source
from pipeline.data.masks import MASK_FOLDER
from pipeline.core.digest import derive_seed
from pipeline.core.errors import PipelineError
from pipeline.core.params import CLASS_NAMES, Params
from pipeline.core.paths import (DEMO_DIR, FINETUNE_DIR, PREPARED_DIR, REPORTS_DIR, SPLIT_CSV, resolve_user_path,
                                 workspace_root)

RESERVE = "reserve"  # train images of a selected class beyond data.real_per_class
SPLIT_COLUMNS = ["image_id", "lesion_id", "dx", "split", "path", "mask_path"]
FINETUNE_COLUMNS = ["image_id", "lesion_id", "dx", "path", "mask_path"]
DATA_JSON = REPORTS_DIR / "data.json"


def assign_splits(frame: pd.DataFrame, val: float, test: float, seed: int) -> pd.DataFrame:
    """Add a ``split`` column: each class's lesions, shuffled and laid end to end, fall in test/val/train by where
    their middle image lands (close to the fractions); classes with 3+ lesions get at least one lesion in each split."""
    # One row per lesion: its stratum (most frequent dx, ties alphabetical) and image count.
    lesions = frame.groupby(["lesion_id", "dx"]).size().rename("n").reset_index()
    lesions["images"] = lesions.groupby("lesion_id")["n"].transform("sum")
    lesions = lesions.sort_values(["lesion_id", "n", "dx"], ascending=[True, False, True]).drop_duplicates("lesion_id")
    split_of: dict[str, str] = {}
    for dx, group in lesions.groupby("dx", sort=True):
        order = group.iloc[np.random.default_rng(derive_seed(seed, str(dx), 1)).permutation(len(group))]
        sizes = order["images"].to_numpy()
        total = sizes.sum()
        middle = np.cumsum(sizes) - sizes / 2
        labels = np.where(middle < test * total, "test", np.where(middle < (test + val) * total, "val", "train"))
        if len(order) >= 3:
            if "test" not in labels:
                labels[0] = "test"
            if "val" not in labels:
                labels[np.flatnonzero(labels != "test")[0]] = "val"
            if "train" not in labels:
                labels[-1] = "train"
        split_of.update(zip(order["lesion_id"], labels))
    out = frame.copy()
    out["split"] = out["lesion_id"].map(split_of)
    return out


def cap_train(split: pd.DataFrame, classes: list[str], per_class: int, seed: int) -> pd.DataFrame:
    """Keep at most ``per_class`` train images of each of ``classes``, whole lesions only; the rest becomes ``reserve``.
    Shuffled lesions are taken first-fit (one that would overshoot is passed over for a later, smaller one), so a
    class gets exactly ``per_class`` images unless no remaining lesion fits, or a lesion it shares with another
    diagnosis is reserved there; then it rounds down, never up."""
    out = split.copy()
    for class_code in classes:
        train = out[(out["dx"] == class_code) & (out["split"] == "train")]
        if len(train) < per_class:
            raise PipelineError(
                f"data.real_per_class is {per_class} but class {class_code!r} has only {len(train)} train image(s) "
                f"({train['lesion_id'].nunique()} lesion(s)); lower data.real_per_class or set it to null (all)"
            )
        sizes = train.groupby("lesion_id").size().sort_index()
        order = sizes.iloc[np.random.default_rng(derive_seed(seed, class_code, 3)).permutation(len(sizes))]
        kept, taken = set(), 0
        for lesion, size in order.items():
            if taken + size <= per_class:
                kept.add(lesion)
                taken += size
        out.loc[train.index[~train["lesion_id"].isin(kept)], "split"] = RESERVE
    # A lesion with images of two diagnoses is capped under each; reserved under one, it leaves train whole.
    reserved = out["lesion_id"].isin(out.loc[out["split"] == RESERVE, "lesion_id"])
    out.loc[reserved & (out["split"] == "train"), "split"] = RESERVE
    return out


def sample_finetune(split: pd.DataFrame, class_code: str, count: int, seed: int) -> pd.DataFrame:
    """``count`` train images of one class, one per lesion before any lesion gives a second; sorted by image_id."""
    train = split[(split["dx"] == class_code) & (split["split"] == "train")].sort_values("image_id")
    if len(train) < count:
        lesions = train["lesion_id"].nunique()
        raise PipelineError(
            f"class {class_code!r} has only {len(train)} train image(s) ({lesions} lesion(s)) but data.finetune_images "
            f"is {count}; lower data.finetune_images or add images of {class_code}"
        )
    shuffled = train.iloc[np.random.default_rng(derive_seed(seed, class_code, 2)).permutation(len(train))]
    first_rounds = np.argsort(shuffled.groupby("lesion_id").cumcount().to_numpy(), kind="stable")[:count]
    return shuffled.iloc[first_rounds].sort_values("image_id")[FINETUNE_COLUMNS].reset_index(drop=True)


def check_no_leakage(split: pd.DataFrame, finetune: Mapping[str, pd.DataFrame]) -> None:
    """Refuse to write a split where a lesion crosses splits or a fine-tune image is not a train image."""
    crossing = split.groupby("lesion_id")["split"].nunique()
    crossing = crossing[crossing > 1]
    if len(crossing):
        lesion = crossing.index[0]
        where = sorted(set(split.loc[split["lesion_id"] == lesion, "split"]))
        raise PipelineError(
            f"leakage: lesion {lesion!r} is in several splits ({', '.join(where)}); {len(crossing)} lesion(s) affected"
        )
    train_ids = set(split.loc[split["split"] == "train", "image_id"])
    for class_code, sample in finetune.items():
        outside = sample.loc[~sample["image_id"].isin(train_ids), "image_id"]
        if len(outside):
            raise PipelineError(
                f"leakage: fine-tune image {outside.iloc[0]!r} of class {class_code!r} is not in the train split "
                f"({len(outside)} such image(s))"
            )


def _relative(path: str, root: Path) -> str:
    """Workspace-relative POSIX path inside the workspace (portable across copies), else absolute; "" stays ""."""
    if not path:
        return ""
    p = Path(path)
    return (p.relative_to(root) if p.is_relative_to(root) else p).as_posix()


def _counts(rows: pd.DataFrame) -> dict:
    """Images per split value, images and lesions of some split rows (for reports/data.json)."""
    per_split = {name: int((rows["split"] == name).sum()) for name in ("train", "val", "test", RESERVE)}
    return {**per_split, "images": len(rows), "lesions": int(rows["lesion_id"].nunique())}


def build(params: Params) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict, list[dict]]:
    """Everything prepare writes, computed in memory: (split table, fine-tune tables, data report, skipped images)."""
    data = params.data
    if data.real_per_class is not None and data.finetune_images > data.real_per_class:
        raise PipelineError(f"data.finetune_images ({data.finetune_images}) exceeds data.real_per_class "
                            f"({data.real_per_class}): fine-tune images are drawn from the capped train images")
    root = workspace_root()
    folder = root / DEMO_DIR if data.is_demo else resolve_user_path(data.source, "data.source")
    if data.is_demo and not folder.exists():
        raise PipelineError(f"{folder}: demo data not found; run `dvc repro demo_data` first")
    table, source = read_source(folder, on_bad_image=data.on_bad_image)
    present = sorted(set(table["dx"]))
    for class_code in data.classes:
        if class_code not in present:
            raise PipelineError(
                f"data.classes: class {class_code!r} ({CLASS_NAMES[class_code]}) has no images in {source.metadata} "
                f"(classes present: {', '.join(present)})"
            )

    split = assign_splits(table, data.split.val, data.split.test, params.seed)
    for column in ("path", "mask_path"):
        split[column] = split[column].map(lambda p: _relative(p, root))
    split = split.sort_values("image_id")[SPLIT_COLUMNS].reset_index(drop=True)
    if data.real_per_class is not None:
        split = cap_train(split, data.classes, data.real_per_class, params.seed)

    per_class = {c: _counts(split[split["dx"] == c]) for c in data.classes}
    for class_code, counts in per_class.items():
        for name in ("val", "test"):
            if counts[name] == 0:
                raise PipelineError(
                    f"class {class_code!r} gets no {name} image: only {counts['images']} image(s) in "
                    f"{counts['lesions']} lesion(s), at least 3 lesions are needed to fill train, val and test"
                )
    finetune = {c: sample_finetune(split, c, data.finetune_images, params.seed) for c in data.classes}
    check_no_leakage(split, finetune)

    report = {
        "source": data.source,  # as configured: absolute paths would differ per machine in `dvc metrics diff`
        "layout": source.layout,
        "real_per_class": data.real_per_class,  # null: no cap, so no reserve
        "classes": {c: {**counts, "finetune": len(finetune[c])} for c, counts in per_class.items()},
        "totals": _counts(split[split["dx"].isin(data.classes)]),
        "all_classes": _counts(split),
        "images_with_masks": int((split["mask_path"] != "").sum()),
        "masks": (f"lesion masks read from {_relative(str(source.masks), folder.resolve())}" if source.masks is not None
                  else f"no lesion masks found (no {MASK_FOLDER} folder in the data folder): mask_path is empty"),
        "skipped_images": len(source.skipped),
        "warnings": len(source.warnings),
    }
    return split, finetune, report, source.skipped


def prepare(params: Params) -> dict:
    """The prepare stage (see module docstring); returns the data report also written to reports/data.json."""
    split, finetune, report, skipped = build(params)
    cap = params.data.real_per_class
    for class_code, counts in report["classes"].items():
        if cap is not None and counts["train"] < cap:
            print(f"prepare: class {class_code!r} keeps {counts['train']} train images, not data.real_per_class={cap}: "
                  "no remaining lesion fits the cap (lesions are never split)")
    root = workspace_root()
    with atomic_dir(root / PREPARED_DIR) as temp:  # data/prepared appears complete in one rename
        split.to_csv(temp / SPLIT_CSV.name, index=False, lineterminator="\n")
        (temp / FINETUNE_DIR.name).mkdir()
        for class_code, sample in sorted(finetune.items()):
            sample.to_csv(temp / FINETUNE_DIR.name / f"{class_code}.csv", index=False, lineterminator="\n")
        skipped_rows = pd.DataFrame(skipped, columns=["image_id", "reason"])
        skipped_rows.to_csv(temp / "skipped.csv", index=False, lineterminator="\n")
    write_json(root / DATA_JSON, report)
    metrics = {f"{c}.{k}": v for c, counts in report["classes"].items() for k, v in counts.items()}
    metrics.update({f"total.{k}": v for k, v in report["totals"].items()})
    metrics["skipped_images"] = report["skipped_images"]
    tracking.log_metrics(metrics)
    tracking.log_artifact(root / DATA_JSON)
    return report
