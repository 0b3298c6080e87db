"""Classifier input: ImageNet normalisation and batched, per-image random augmentations of cached uint8 batches.

One draw per image applied as whole-batch tensor ops costs ~6 ms per batch of 64 at 64 px on 2 CPU cores, one
torchvision call per image 41 ms (bench/README.md). All are label-preserving for dermoscopy (no canonical
orientation): flips, rotation up to ±30°, colour jitter. Every tensor is made on the input batch's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN  # what timm's pretrained weights expect
from timm.data import IMAGENET_DEFAULT_STD as STD
from torchvision.transforms.v2.functional import normalize as standardize

MAX_ROTATION_DEGREES = 30.0
BRIGHTNESS = CONTRAST = SATURATION = 0.2
MAX_HUE_TURN = 0.02

# Hue is a rotation of the chroma plane of YIQ (the NTSC colour space): the linear form of a hue shift, the same as
# HSV's for the small angles used here. Python numbers: each call makes its tensors on the batch's device.
_RGB_TO_YIQ = [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]]
_YIQ_TO_RGB = torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)).tolist()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, ImageNet-normalised."""
    return standardize(images.float().div_(255), MEAN, STD, inplace=True)


def augment(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> augmented like ``normalize``; every image gets its own draw from torch's global RNG."""
    x = images.float().div_(255)
    n = len(x)
    x = torch.where(_coin(n, x.device), x.flip(3), x)
    x = torch.where(_coin(n, x.device), x.flip(2), x)
    x = _rotate(x, _uniform(n, MAX_ROTATION_DEGREES, x.device, centre=0.0).mul_(math.pi / 180))
    x = (x * _factor(n, BRIGHTNESS, x.device)).clamp_(0, 1)
    mean_luma = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = torch.lerp(mean_luma, x, _factor(n, CONTRAST, x.device)).clamp_(0, 1)
    x = torch.lerp(_luma(x), x, _factor(n, SATURATION, x.device)).clamp_(0, 1)
    x = _shift_hue(x, _uniform(n, MAX_HUE_TURN, x.device, centre=0.0).mul_(2 * math.pi)).clamp_(0, 1)
    return standardize(x, MEAN, STD, inplace=True)


def _uniform(n: int, half_width: float, device: torch.device, centre: float) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(centre - half_width, centre + half_width)


def _factor(n: int, half_width: float, device: torch.device) -> torch.Tensor:
    return _uniform(n, half_width, device, centre=1.0).view(-1, 1, 1, 1)


def _coin(n: int, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, device=device) < 0.5).view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("c,nchw->nhw", torch.tensor(_RGB_TO_YIQ[0], device=x.device), x).unsqueeze(1)


def _rotate(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre; corners outside the image become black (torchvision's fill=0)."""
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift_hue(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    cos, sin, one, zero = radians.cos(), radians.sin(), torch.ones_like(radians), torch.zeros_like(radians)
    chroma_rotation = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                                   torch.stack([zero, sin, cos], 1)], 1)
    to_rgb, to_yiq = (torch.tensor(m, device=x.device) for m in (_YIQ_TO_RGB, _RGB_TO_YIQ))
    matrices = to_rgb @ chroma_rotation @ to_yiq
    return torch.einsum("nij,njhw->nihw", matrices, x)
