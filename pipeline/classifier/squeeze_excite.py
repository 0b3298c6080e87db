"""EfficientNet's squeeze-and-excitation blocks with a spatial mean whose gradient stays a broadcast view.

Why: timm's ``SqueezeExcite`` pools with ``x.mean((2, 3))``. PyTorch's backward of ``mean`` writes the broadcast
gradient out as a full tensor in the default layout, which autograd then adds to the channels_last gradient of
``x * gate``: a full-size tensor and a mixed-layout add in every block. ``sum * (1 / HW)`` is the same number,
and ``sum``'s backward is an expand (a view), so the add is the only pass. One 144-channel 16x16 block's
forward + backward: 8.4 -> 2.4 ms; an EfficientNet-B0 step (64 px, batch 64, one thread): ~6 % faster.
"""

from __future__ import annotations

import torch
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn


class SumPoolSqueezeExcite(SqueezeExcite):
    """timm's ``SqueezeExcite`` (same submodules and weights); only the pooling is written differently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.sum((2, 3), keepdim=True) * (1.0 / (x.shape[-2] * x.shape[-1]))
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


def use_sum_pool_squeeze_excite(model: nn.Module) -> int:
    """Turn every timm ``SqueezeExcite`` of ``model`` into a ``SumPoolSqueezeExcite`` in place; returns how many.

    Only the exact timm class is changed (its subclasses may pool differently); tests/test_for_training.py checks
    that the whole network's outputs and gradients stay those of the plain timm model.
    """
    blocks = [m for m in model.modules() if type(m) is SqueezeExcite]
    for block in blocks:
        block.__class__ = SumPoolSqueezeExcite
    return len(blocks)
