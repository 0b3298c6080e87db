"""Which device and precision a stage computes in: shared by fine-tuning, generation and the classifier."""

from __future__ import annotations

import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # compute.mixed_precision -> weight dtype; "no" is fp32


def cpu_only() -> bool:
    """No GPU-like device: accelerate must then be told ``cpu=True``, or processes started by
    ``accelerate launch``/torchrun on a CPU machine each think they are alone (and race on the outputs)."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or torch.xpu.is_available())


def gpu_precision(mixed_precision: str, doing: str) -> str:
    """``compute.mixed_precision`` where a GPU can use it; on CPU "no", with a one-line warning."""
    if mixed_precision != "no" and cpu_only():
        print(f"warning: compute.mixed_precision={mixed_precision} needs a GPU; {doing} in fp32 on CPU", file=sys.stderr)
        return "no"
    return mixed_precision


def make_accelerator(mixed_precision: str):
    """Accelerator for device placement, DDP and autocast; fp16/bf16 only where there is a GPU."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=gpu_precision(mixed_precision, "training"), cpu=cpu_only())
