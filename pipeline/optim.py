"""The optimizer every fine-tuning and classifier run uses (fused AdamW: one kernel per step, bench/README.md), and
its state as safetensors + JSON for checkpoints.

On CPU the fused kernel walks each parameter and its moment buffers in memory order, so a channels_last weight
whose buffers were loaded in the default layout would silently get the wrong moments: ``load_optimizer_state``.
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


def state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors ("<param index>.<name>") + a JSON-able rest (param groups, scalar state)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def state_from_tensors(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The state dict ``state_tensors`` took apart, for ``load_optimizer_state``."""
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # JSON turned tuples (betas) into lists; torch wants them back as they were.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}
