"""Resumable training state for both trainers (classifier and diffusion fine-tuning): one format, one code path.

A folder of ``state.safetensors`` (every tensor under a ``<group>.`` prefix) and ``state.json`` (the rest, with the
run key), replaced in one rename. Not accelerate's ``save_state``: it pickles the optimizer and RNG state.
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
from pipeline.optim import load_optimizer_state, state_from_tensors, state_tensors

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
        load_optimizer_state(optimizer, state_from_tensors(self.group(OPTIMIZER), self.meta[OPTIMIZER]))


def save_checkpoint(folder: Path, key: str, groups: dict[str, dict[str, torch.Tensor]], meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Replace ``folder`` with ``groups`` of tensors (+ the optimizer's state) and JSON-able ``meta``, tagged ``key``."""
    tensors = {f"{group}.{name}": t.detach().cpu().contiguous() for group, entries in groups.items()
               for name, t in entries.items()}
    meta = {**meta, "key": key}
    if optimizer is not None:
        opt_tensors, meta[OPTIMIZER] = state_tensors(optimizer)
        tensors.update({f"{OPTIMIZER}.{k}": v for k, v in opt_tensors.items()})
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


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's random state: ``generator``, torch's CPU generator and every CUDA generator."""
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_state(states: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        cuda = [states[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in states]
        torch.cuda.set_rng_state_all(cuda)
