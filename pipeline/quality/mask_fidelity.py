"""Mask fidelity of mask-conditioned images: does the generated lesion lie where its conditioning mask says?

The lesion is segmented as the field-of-view pixels whose CIELAB distance from the skin (the median of a ring at the
field's edge) passes Otsu's threshold; the figure is its IoU with the mask. The same segmenter on real images against
their own masks gives the IoU to read the synthetic one against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.color import rgb2lab
from skimage.filters import threshold_otsu

from pipeline.data.images import load_square

FIELD = 0.95  # the dermoscope's field of view: the centred disc of this radius (in half sides); its corners are dark
SKIN_RING = 0.75  # the skin: the field's pixels beyond this radius (the square border as skin: real IoU 0.11-0.44)


def segment_lesion(rgb: np.ndarray) -> np.ndarray:
    """Boolean lesion mask of an [H, W, 3] uint8 image (see the module docstring)."""
    height, width = rgb.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    radius = np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2) / (min(height, width) / 2)
    field = radius < FIELD
    lab = rgb2lab(rgb)
    distance = np.linalg.norm(lab - np.median(lab[field & (radius > SKIN_RING)], axis=0), axis=-1)
    if np.ptp(distance[field]) == 0:
        return np.zeros((height, width), bool)  # one colour: no lesion to find
    return field & (distance > threshold_otsu(distance[field]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mask_ious(images: list[Path], masks: list[Path], size: int) -> np.ndarray:
    """IoU of each image's segmented lesion with its mask, both centre-cropped and resized to ``size``."""
    pixels = load_square(images, size).permute(0, 2, 3, 1).numpy()
    truth = load_square(masks, size)[:, 0].numpy() >= 128
    return np.array([iou(segment_lesion(p), t) for p, t in zip(pixels, truth)])
