"""Batched classifier augmentations: one draw per image, label-preserving colour maths, ImageNet normalisation."""

from __future__ import annotations

import math

import torch

from pipeline.classifier.augment import MEAN, STD, _luma, _shift_hue, augment, normalize


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _photo(n: int = 1, size: int = 16) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_normalize_scales_with_timms_imagenet_statistics():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[1] = 255
    x = normalize(images)
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert torch.allclose(_unnormalize(x)[0], torch.zeros(3, 4, 4), atol=1e-6)
    assert torch.allclose(_unnormalize(x)[1], torch.ones(3, 4, 4), atol=1e-6)


def test_each_image_gets_its_own_draw_and_a_seed_repeats_it():
    batch = _photo().repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    first = augment(batch)
    torch.manual_seed(0)
    again = augment(batch)
    assert torch.equal(first, again)
    assert first.shape == batch.shape and first.dtype == torch.float32
    distinct = {tuple(img.flatten()[:64].tolist()) for img in first}
    assert len(distinct) == 8  # the same photo drawn 8 times: 8 different augmentations


def test_colour_jitter_keeps_grey_grey_and_values_in_range():
    grey = torch.full((16, 3, 8, 8), 128, dtype=torch.uint8)
    torch.manual_seed(1)
    out = _unnormalize(augment(grey))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    centre = out[:, 0, 4, 4]
    assert (centre - 128 / 255).abs().max() <= 128 / 255 * 0.45  # brightness x contrast within 0.8..1.2 each


def test_hue_shift_keeps_luma_and_undoes_itself():
    x = _photo(2).float() / 255
    turn = torch.tensor([0.02, -0.02]) * 2 * math.pi
    shifted = _shift_hue(x, turn)
    assert not torch.allclose(shifted, x, atol=1e-3)
    assert torch.allclose(_luma(shifted), _luma(x), atol=1e-5)
    assert torch.allclose(_shift_hue(shifted, -turn), x, atol=1e-5)
