"""A tiny throw-away workspace for the classifier tests: split.csv, real JPEGs, synthetic PNGs with manifests.

Images are solid-ish discs whose colour depends on the class, so a 1-epoch model can learn something,
and every file is distinct (random noise) so content hashes never collide across splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from pipeline.core.params import Params, parse_params

CLASSES = ["bcc", "mel", "vasc"]
_COLOURS = {"bcc": (210, 120, 120), "mel": (60, 40, 30), "vasc": (160, 30, 110), "nv": (120, 90, 60)}
MANIFEST_COLUMNS = ["file", "class", "draw", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "weights_sha256"]


def _image(rng: np.random.Generator, colour: tuple[int, int, int], size: int) -> Image.Image:
    yy, xx = np.mgrid[:size, :size]
    centre = size / 2 + rng.normal(0, size / 12, 2)
    radius = size * rng.uniform(0.2, 0.35)
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius**2
    pixels = np.full((size, size, 3), (225, 185, 160), dtype=float)
    pixels[disc] = colour
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_workspace(root: Path, counts: tuple[int, int, int] = (6, 2, 2), synthetic: int = 4, size: int = 40,
                   classes: list[str] = CLASSES, seed: int = 0, reserve: int = 0, draws: tuple[int, ...] = (0, 1)) -> Path:
    """Write dvc.yaml (placeholder), data/prepared/split.csv, data/raw/*.jpg, data/synthetic/<class>/,
    data/synthetic_base/<class>/ and data/screened/synthetic.csv into ``root``.
    ``counts``: train, val and test images per class; ``reserve``: reserve rows per class (split value 'reserve');
    ``synthetic``: images per class and draw (classifier seed in ``draws``), the last of each screened out."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    rows = []
    for dx in [*classes, "nv"]:  # nv is in the data but not selected: the classifier must ignore it
        for split, n in zip(("train", "val", "test", "reserve"), (*counts, reserve)):
            for _ in range(n):
                image_id = f"ISIC_{len(rows):07d}"
                _image(rng, _COLOURS[dx], size).save(raw / f"{image_id}.jpg", quality=95)
                rows.append({"image_id": image_id, "lesion_id": f"HAM_{len(rows):07d}", "dx": dx, "split": split,
                             "path": f"data/raw/{image_id}.jpg"})
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(prepared / "split.csv", index=False)
    screened = []
    for dx in classes:
        folder = root / "data" / "synthetic" / dx
        folder.mkdir(parents=True)
        entries = []
        for draw in draws:
            for k in range(synthetic):
                name = f"{dx}_{len(entries):04d}.png"
                _image(rng, _COLOURS[dx], 32).save(folder / name)
                entries.append([name, dx, draw, f"a dermoscopic image of tok {dx}", "", k, "dpmsolver++", 20, 5.0, "0" * 64])
                # The `screen` stage's verdicts: the last image of each class and draw was flagged as memorized.
                screened.append({"class": dx, "path": f"data/synthetic/{dx}/{name}", "kept": k < synthetic - 1,
                                 "memorized": k == synthetic - 1})
        pd.DataFrame(entries, columns=MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)
    for dx in classes:  # the base_only control's images: same layout, a duller colour (the base model's guess)
        folder = root / "data" / "synthetic_base" / dx
        folder.mkdir(parents=True)
        rows = [[f"{dx}_{len(draws) * k + i:04d}.png", dx, draw, f"a dermoscopic image of tok {dx}", "", k, "dpmsolver++",
                 20, 5.0, "0" * 64] for k in range(synthetic) for i, draw in enumerate(draws)]
        for row in rows:
            _image(rng, tuple((c + 150) // 2 for c in _COLOURS[dx]), 32).save(folder / row[0])
        pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)
    (root / "data" / "screened").mkdir(parents=True)
    pd.DataFrame(screened).to_csv(root / "data" / "screened" / "synthetic.csv", index=False)
    (root / "reports").mkdir(exist_ok=True)
    return root


def micro_params(classes: list[str] = CLASSES, evaluate: dict | None = None, real_per_class: int | None = None,
                 per_class: int = 4, **classifier) -> Params:
    """Params for tests: efficientnet_b0 at 32px, 1 epoch, small batches; ``per_class``: generate.per_class."""
    c = {"image_size": 32, "epochs": 1, "batch": 8, "patience": 3, "seeds": [0], **classifier}
    return parse_params({"data": {"classes": classes, "real_per_class": real_per_class}, "classifier": c,
                         "generate": {"per_class": per_class}, "evaluate": evaluate or {"bootstrap": 50}})


def write_params(root: Path, params: Params) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
