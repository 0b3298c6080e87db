"""Resumable training state for both trainers (classifier and diffusion fine-tuning): one format, one code path.

A folder of ``state.safetensors`` (every tensor under a ``<group>.`` prefix; the optimizer's, AdamW's only state, as
``optimizer.<param index>.<name>``) and ``state.json`` (the rest, with the run key), replaced in one rename. Not
accelerate's ``save_state``: it pickles the optimizer and RNG state.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.core.atomic import atomic_dir

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
OPTIMIZER = "optimizer"


@dataclass
class Checkpoint:
    meta: dict
    tensors: dict[str, torch.Tensor]

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``name`` (``{}`` when there are none), keyed without the prefix."""
        prefix = f"{name}."
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.load_state_dict`` + every per-parameter buffer in the memory layout of its parameter: on CPU the
        fused kernel walks each parameter and its buffers in memory order, so a channels_last weight with buffers
        loaded in the default layout would silently get the wrong moments."""
        state: dict[int, dict] = {}
        for key, value in self.group(OPTIMIZER).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        # JSON turned tuples (betas) into lists; torch wants them back as they were.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in self.meta[OPTIMIZER]["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        for param, buffers in optimizer.state.items():
            for name, value in buffers.items():
                if value.shape == param.shape and value.stride() != param.stride():
                    buffers[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def save_checkpoint(folder: Path, key: str, groups: dict[str, dict[str, torch.Tensor]], meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Replace ``folder`` with ``groups`` of tensors (+ the optimizer's state) and JSON-able ``meta``, tagged ``key``."""
    meta = {**meta, "key": key}
    if optimizer is not None:
        state = optimizer.state_dict()
        groups = {**groups, OPTIMIZER: {f"{i}.{name}": t for i, entries in state["state"].items()
                                        for name, t in entries.items()}}
        meta[OPTIMIZER] = {"param_groups": state["param_groups"]}
    tensors = {f"{group}.{name}": t.detach().cpu().contiguous() for group, entries in groups.items()
               for name, t in entries.items()}
    with atomic_dir(folder) as temp:
        save_file(tensors, str(temp / TENSORS_FILE))
        (temp / META_FILE).write_text(json.dumps(meta, indent=1))


def load_checkpoint(folder: Path, key: str) -> Checkpoint | None:
    """The checkpoint in ``folder`` if one was written for ``key``; None (and a one-line note why) otherwise."""
    meta_path, tensor_path = folder / META_FILE, folder / TENSORS_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            print(f"{folder}: checkpoint was written for other params, data or base model; starting fresh",
                  file=sys.stderr)
            return None
        return Checkpoint(meta, load_file(str(tensor_path)))
    except (OSError, ValueError, SafetensorError) as exc:
        print(f"warning: {folder}: unreadable checkpoint ({exc}); starting fresh", file=sys.stderr)
        return None

