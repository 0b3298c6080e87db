"""An exact, faster weight gradient for depthwise convolutions whose kernel covers the whole feature map (CPU).

Why: at the classifier's 64 px the last stages of EfficientNet-B0 run on 4x4 and 2x2 maps with 5x5 (and 3x3)
depthwise kernels. For those oneDNN computes the weight gradient with its generic grouped kernel (``ONEDNN_VERBOSE``
names it ``jit:avx512_core backward_weights``): 2-7 ms a layer where the forward takes 0.1-0.3 ms, ~35 ms of a
~280 ms training step (batch 64, one thread). On a map of P output and Q input positions each channel's convolution
is a P x Q matrix whose entries are kernel taps, so the weight gradient is, per channel, the (P x N) @ (N x Q)
product of output gradients and inputs summed into the taps: one broadcast product for the 2x2 maps (0.2 ms instead
of 2.5-7 ms), a batched matmul for the 4x4 ones (2-3 ms instead of 3-6 ms).

Forward and input gradient stay oneDNN's; only the weight gradient is computed differently, so results agree
with ``nn.Conv2d`` to float rounding (tests/test_for_training.py). Any other call (GPU, maps larger than the kernel,
inference, autocast or half precision, bias, dilation) is the plain convolution.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

BROADCAST_PAIRS = 64  # up to this many (output, input) position pairs one broadcast product is cheapest, above a bmm


@lru_cache(maxsize=64)
def _pair_to_tap(in_hw: tuple[int, int], out_hw: tuple[int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """(P*Q, kh*kw) 0/1 matrix: which kernel tap connects output position p to input position q (at most one)."""
    (h, w), (oh, ow), (kh, kw) = in_hw, out_hw, kernel
    oy, ox, iy, ix = torch.meshgrid(torch.arange(oh), torch.arange(ow), torch.arange(h), torch.arange(w), indexing="ij")
    ty, tx = iy - oy * stride[0] + padding[0], ix - ox * stride[1] + padding[1]
    connected = ((ty >= 0) & (ty < kh) & (tx >= 0) & (tx < kw)).reshape(-1)
    taps = (ty * kw + tx).reshape(-1)
    incidence = torch.zeros(oh * ow * h * w, kh * kw)
    incidence[connected.nonzero().squeeze(1), taps[connected]] = 1.0
    return incidence


def depthwise_weight_grad(grad_output: torch.Tensor, x: torch.Tensor, kernel: tuple[int, int],
                          stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """d loss / d weight (C, 1, kh, kw) of a bias-free depthwise convolution, via per-channel position matrices."""
    n, c, h, w = x.shape
    oh, ow = grad_output.shape[2:]
    pairs = oh * ow * h * w
    incidence = _pair_to_tap((h, w), (oh, ow), kernel, stride, padding).to(x.dtype)
    if pairs <= BROADCAST_PAIRS:
        g = grad_output.permute(0, 2, 3, 1).reshape(n, oh * ow, 1, c)
        xs = x.permute(0, 2, 3, 1).reshape(n, 1, h * w, c)
        per_pair = (g * xs).sum(0).view(pairs, c)  # d loss / d (entry p, q of each channel's P x Q matrix)
        grad = (incidence.t() @ per_pair).t()
    else:
        g = grad_output.permute(1, 2, 3, 0).reshape(c, oh * ow, n)  # (C, P, N)
        xs = x.permute(1, 0, 2, 3).reshape(c, n, h * w)  # (C, N, Q)
        grad = torch.bmm(g, xs).view(c, pairs) @ incidence
    return grad.reshape(c, 1, *kernel)


class _SmallMapDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0],
                x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(grad_output, x, tuple(weight.shape[2:]), ctx.stride, ctx.padding)
        return grad_input, grad_weight, None, None


class SmallMapDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient on small CPU maps comes from ``depthwise_weight_grad``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        covered = x.shape[-2] <= self.kernel_size[0] and x.shape[-1] <= self.kernel_size[1]
        plain_fp32 = x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        if covered and plain_fp32 and x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad:
            return _SmallMapDepthwise.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)


def _eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def use_small_map_depthwise(model: nn.Module) -> int:
    """Swap every eligible depthwise ``nn.Conv2d`` for a ``SmallMapDepthwiseConv2d`` sharing its weight (state-dict
    keys unchanged); returns how many were swapped. Call before the optimizer is built."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _eligible(child):
                conv = SmallMapDepthwiseConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                               child.padding, groups=child.groups, bias=False,
                                               device="meta")
                conv.weight = child.weight
                conv.train(child.training)
                setattr(parent, name, conv)
                swapped += 1
    return swapped
