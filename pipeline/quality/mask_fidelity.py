"""Mask fidelity of mask-conditioned images: does the generated lesion lie where its conditioning mask says?

A simple segmentation of the lesion: each pixel's CIELAB distance from the skin (the median colour of the image's
border), split by Otsu's threshold. The figure is its IoU with the mask. The same segmentation of real images against
their own masks gives the IoU this segmenter reaches on real lesions: the figure to read the synthetic one against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.color import rgb2lab
from skimage.filters import threshold_otsu

from pipeline.data.images import load_square

BORDER = 0.1  # the outer tenth of each side is taken as skin


def segment_lesion(rgb: np.ndarray) -> np.ndarray:
    """Boolean lesion mask of an [H, W, 3] uint8 image: pixels farther from the border's median colour than Otsu's
    threshold of those distances."""
    lab = rgb2lab(rgb)
    edge = max(1, round(BORDER * min(rgb.shape[:2])))
    border = np.ones(rgb.shape[:2], bool)
    border[edge:-edge, edge:-edge] = False
    distance = np.linalg.norm(lab - np.median(lab[border], axis=0), axis=-1)
    if np.ptp(distance) == 0:
        return np.zeros(rgb.shape[:2], bool)  # one colour: no lesion to find
    return distance > threshold_otsu(distance)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mask_ious(images: list[Path], masks: list[Path], size: int) -> np.ndarray:
    """IoU of each image's segmented lesion with its mask, both centre-cropped and resized to ``size``."""
    if not images:
        return np.empty(0)
    pixels = load_square(images, size).permute(0, 2, 3, 1).numpy()
    truth = load_square(masks, size)[:, 0].numpy() >= 128
    return np.array([iou(segment_lesion(p), t) for p, t in zip(pixels, truth)])
