"""HAM10000's optional segmentation release (``HAM10000_segmentations_lesion_tschandl/<image_id>_segmentation.png``):
once its folder exists every image needs a mask of the image's size holding only 0/255 (or 0/1), checked here once,
so a later mask-conditioned stage can trust ``mask_path`` without re-checking thousands of files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.images import check_image
from pipeline.core.errors import PipelineError

MASK_FOLDER = "HAM10000_segmentations_lesion_tschandl"
MASK_SUFFIX = "_segmentation.png"
_SINGLE_CHANNEL = ("1", "L", "I", "I;16", "I;16B", "I;16L")
_BINARY_LEVELS = ({0, 255}, {0, 1})


def checked_mask(mask_folder: Path, image_id: str, image: str | Path) -> Path:
    """The mask of ``image_id``; PipelineError naming both if missing, unreadable, not the image's size, not binary."""
    mask = mask_folder / f"{image_id}{MASK_SUFFIX}"
    where = f"image {image_id}: lesion mask {mask}"
    if not mask.is_file():
        raise PipelineError(f"{where} not found; expected {mask.name} in {mask_folder} for every image once that folder exists")
    try:
        check_image(mask)
    except PipelineError as exc:  # an unreadable file: the message names it
        raise PipelineError(f"image {image_id}: {exc}") from None
    with Image.open(image) as img:  # the reader checked the image before its mask
        expected = img.size
    with Image.open(mask) as img:
        found = img.size
        pixels = np.asarray(img if img.mode in _SINGLE_CHANNEL else img.convert("L"))
    if found != expected:
        raise PipelineError(f"{where} is {found[0]}x{found[1]} pixels; expected the image's {expected[0]}x{expected[1]}")
    levels = {int(v) for v in np.unique(pixels)}
    if not any(levels <= allowed for allowed in _BINARY_LEVELS):
        odd = sorted(levels - {0, 1, 255})[:3] or sorted(levels)[:3]
        raise PipelineError(
            f"{where} is not binary ({len(levels)} distinct values, e.g. {', '.join(map(str, odd))}); "
            "expected only 0 and 255 (or 0 and 1)"
        )
    return mask
