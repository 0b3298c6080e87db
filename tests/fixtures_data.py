"""Helpers that write tiny but real HAM10000 / ISIC 2018 Task 3 folders (actual JPEG files) for tests.

Importable by any test module: ``from tests.fixtures_data import make_ham_folder`` (or ``from fixtures_data``
when tests/ is on sys.path, as pytest's rootdir-relative import mode puts it).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

ALL_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
# A class-dependent tint so images are not all identical (and a classifier test could learn something).
_TINT = {"akiec": (200, 120, 110), "bcc": (225, 180, 180), "bkl": (170, 125, 90), "df": (150, 105, 75),
         "mel": (60, 40, 35), "nv": (140, 90, 60), "vasc": (160, 40, 60)}  # fmt: skip


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (32, 24), tint: tuple[int, int, int] = (180, 130, 110)) -> bytes:
    """A small real JPEG: a tinted noisy image, different per seed."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(tint, float) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


def write_jpeg(path: str | Path, seed: int = 0, size: tuple[int, int] = (32, 24), tint=(180, 130, 110)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, size, tint))
    return path


def ham_table(lesions_per_class: int | dict[str, int] = 6, classes=ALL_CLASSES, images_per_lesion=(1, 2, 1, 3)) -> pd.DataFrame:
    """Metadata rows in HAM10000's columns; lesion k of a class has images_per_lesion[k % len] images."""
    counts = lesions_per_class if isinstance(lesions_per_class, dict) else {c: lesions_per_class for c in classes}
    rows, image_number, lesion_number = [], 24306, 0
    for dx, n_lesions in counts.items():
        for k in range(n_lesions):
            lesion_number += 1
            for _ in range(images_per_lesion[k % len(images_per_lesion)]):
                rows.append({
                    "lesion_id": f"HAM_{lesion_number:07d}", "image_id": f"ISIC_{image_number:07d}", "dx": dx,
                    "dx_type": "histo", "age": "" if image_number % 7 == 0 else "55.0",
                    "sex": ("male", "female", "unknown")[image_number % 3], "localization": "back",
                })  # fmt: skip
                image_number += 1
    return pd.DataFrame(rows)


def make_ham_folder(root: str | Path, table: pd.DataFrame | None = None, *, image_folders=("HAM10000_images_part_1",
                    "HAM10000_images_part_2"), size: tuple[int, int] = (32, 24), **table_kwargs) -> Path:
    """Write HAM10000_metadata.csv + one JPEG per row, alternating between ``image_folders``; returns the folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = ham_table(**table_kwargs) if table is None else table
    table.to_csv(root / "HAM10000_metadata.csv", index=False)
    for i, row in enumerate(table.itertuples(index=False)):
        folder = image_folders[i % len(image_folders)]
        write_jpeg(root / folder / f"{row.image_id}.jpg", seed=i, size=size, tint=_TINT.get(row.dx, (180, 130, 110)))
    return root


def write_masks(root: str | Path, size: tuple[int, int] = (32, 24), folder: str = "HAM10000_segmentations_lesion_tschandl") -> Path:
    """HAM10000's segmentation release for a make_ham_folder folder: one 0/255 PNG per metadata row, an ellipse
    filling the middle of the image; returns the mask folder."""
    root = Path(root)
    masks = root / folder
    masks.mkdir(parents=True, exist_ok=True)
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    inside = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 <= 1
    ids = pd.read_csv(root / "HAM10000_metadata.csv", dtype=str)["image_id"]
    for image_id in ids:
        Image.fromarray(inside.astype(np.uint8) * 255, "L").save(masks / f"{image_id}_segmentation.png")
    return masks


def image_path(root: str | Path, image_id: str) -> Path:
    """Where make_*_folder put an image (first match)."""
    return next(Path(root).rglob(f"{image_id}.*"))


def make_isic_folder(root: str | Path, table: pd.DataFrame | None = None, *, groupings: bool = True,
                     size: tuple[int, int] = (32, 24), **table_kwargs) -> Path:
    """Write the ISIC 2018 Task 3 layout: one-hot ground truth, optional lesion groupings, images in *_Input/."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = ham_table(**table_kwargs) if table is None else table
    truth = pd.DataFrame({"image": table["image_id"]})
    for code in ISIC_COLUMNS:
        truth[code] = (table["dx"].str.upper() == code).astype(float)
    truth.to_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    if groupings:
        pd.DataFrame({"image": table["image_id"], "lesion_id": table["lesion_id"], "diagnosis_confirm_type": "histopathology"}).to_csv(
            root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False
        )
    for i, row in enumerate(table.itertuples(index=False)):
        write_jpeg(root / "ISIC2018_Task3_Training_Input" / f"{row.image_id}.jpg", seed=i, size=size,
                   tint=_TINT.get(row.dx, (180, 130, 110)))
    return root


def make_workspace(root: str | Path) -> Path:
    """A throw-away repository root: pipeline.core.paths.workspace_root() finds it by its dvc.yaml."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def write_params(workspace: str | Path, raw: dict) -> Path:
    path = Path(workspace) / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
