"""What the control variants and the oracle train on, beside baseline (real train rows) and augmented (+ screened synthetic).

- ``base_only``: the real train rows plus the images the *base* model drew from each class's prompt without the
  class's fine-tuned weights (``data/synthetic_base/<class>/``, stage ``generate_base``). Its gain over
  baseline is what any lesion-like image adds; augmented minus base_only is what fine-tuning added.
- ``real_ceiling``: the real train rows plus ``generate.per_class`` extra *real* images per class from the reserve
  (split.csv rows with split ``reserve``: the train images beyond ``data.real_per_class``). It shows what a perfect
  generator could add. With ``data.real_per_class`` null every train image is already used: no reserve, no
  ceiling, and ``train@real_ceiling`` writes a "skipped" marker instead of a model.
- ``oracle``: every real train-side image (train and reserve rows), never a val/test or synthetic image; the judge of
  class fidelity (``pipeline/classifier/oracle.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_dir, write_json
from pipeline.classifier.dataset import Sample, real_samples, synthetic_samples
from pipeline.classifier.model import CONFIG_NAME
from pipeline.digest import derive_seed
from pipeline.params import Params
from pipeline.paths import CLASSIFIER_DIR, REPORTS_DIR, SYNTHETIC_BASE_DIR, workspace_root

CONTROL_VARIANTS = ("base_only", "real_ceiling")
ORACLE = "oracle"
EXTRA_VARIANTS = (*CONTROL_VARIANTS, ORACLE)
SYNTHETIC_VARIANTS = ("augmented", "base_only")  # the variants whose training list may hold synthetic images
RESERVE = "reserve"


def skip_reason(params: Params, variant: str) -> str | None:
    """Why ``variant`` has nothing to train under these params, or None when it applies."""
    if variant == "real_ceiling" and params.data.real_per_class is None:
        return "data.real_per_class is null: every real train image is already used, so no reserve is left for a ceiling"
    return None


def reserve_draw(params: Params, split: pd.DataFrame, draw: int) -> list[Sample]:
    """``generate.per_class`` reserve rows of each class (all of them where the reserve holds fewer), drawn at random
    with a seed derived from ``seed``, the class and ``draw`` (the classifier seed, which redraws them as it redraws
    the synthetic images), so the draw does not move when another class changes."""
    reserve = split[split["split"] == RESERVE]
    picked = []
    for label, class_code in enumerate(params.data.classes):
        rows = reserve[reserve["label"] == label].sort_values("image_id")
        rng = np.random.default_rng(derive_seed(params.seed, "real_ceiling", class_code, draw))
        take = rng.choice(len(rows), size=min(params.generate.per_class, len(rows)), replace=False)
        picked.append(rows.iloc[np.sort(take)])
    return real_samples(pd.concat(picked), RESERVE)


def epoch_images(params: Params, variant: str, train: list[Sample], split: pd.DataFrame) -> int:
    """Images each epoch draws. With ``classifier.equal_steps`` every variant draws as many as there are real train
    rows, whatever it adds (synthetic or reserve images), so all take the baseline's steps and a gain measures data,
    not compute. The oracle draws ``oracle.epoch_images``."""
    if variant == ORACLE:
        return params.oracle.epoch_images
    return len(real_samples(split, "train")) if params.classifier.equal_steps else len(train)


def variant_samples(params: Params, variant: str, split: pd.DataFrame, root: Path, draw: int) -> list[Sample]:
    """The training list of base_only, real_ceiling or the oracle (see the module docstring) for classifier seed ``draw``."""
    train = real_samples(split, "train")
    if variant == "base_only":
        return train + synthetic_samples(params, root, SYNTHETIC_BASE_DIR, draw=draw)
    if variant == "real_ceiling":
        return train + reserve_draw(params, split, draw)
    if variant == ORACLE:
        return train + real_samples(split, RESERVE)
    raise ValueError(f"not a control variant: {variant!r}")


def write_skipped(params: Params, variant: str, reason: str) -> dict:
    """The stage's outputs for a variant that does not apply: a model folder and a train report saying why."""
    from accelerate import PartialState

    report = {"variant": variant, "skipped": reason}
    if PartialState().is_main_process:
        root = workspace_root()
        with atomic_dir(root / CLASSIFIER_DIR / variant) as temp:
            (temp / CONFIG_NAME).write_text(json.dumps({**report, "classes": list(params.data.classes)}, indent=2) + "\n")
        write_json(root / REPORTS_DIR / "train" / f"{variant}.json", report)
        print(f"train@{variant}: skipped ({reason})")
    return report
