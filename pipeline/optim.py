"""The optimizer every fine-tuning and classifier run uses, and how to restore its state from a checkpoint.

Why fused: one kernel per step instead of a Python loop over the parameters: a tiny-UNet LoRA step and an
EfficientNet-B0 step on CPU are ~4 % faster, and it is the usual choice on GPU (bench/README.md).
Why the restore helper: on CPU the fused kernel walks each parameter and its moment buffers in memory order, so a
channels_last weight whose buffers were loaded from a checkpoint in the default layout is updated with the wrong
moments, silently. Buffers are therefore copied into their parameter's layout after loading.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict`` + every per-parameter buffer in the memory layout of its parameter."""
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            buffers = optimizer.state.get(param, {})
            for name, value in buffers.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    buffers[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
