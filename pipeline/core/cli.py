"""The common entry point of every stage script: params in, MLflow child run around, one-line errors out."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

from pipeline.core import launch, tracking
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params, load_params


def stage_main(stage: str, work: Callable[..., object], *, item: str | None = None, track: bool = True,
               several_processes: bool = False) -> int:
    """What ``python -m stages.<stage>`` runs: ``run_stage``, if ``several_processes`` (finetune, generate, train) on
    ``compute.processes`` processes (``accelerate launch``), each with its share of the usable cores as threads."""
    argv = sys.argv[1:]
    args, name = _parse(stage, item, argv)
    try:
        compute = load_params(args.params).compute
    except PipelineError as exc:
        sys.stderr.write(f"error: {name}: {exc}\n")  # one write: the ranks of a launched stage share stderr
        return 1
    processes = compute.processes if several_processes else 1
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet a rank: accelerate and torchrun set it in each
        return launch.relaunch(f"stages.{stage}", argv, compute, name)
    if launch.THREADS_ENV not in os.environ:  # a thread count someone chose wins
        import torch

        torch.set_num_threads(launch.threads_per_process(processes))
    code = run_stage(stage, work, item=item, track=track, argv=argv)
    # The interpreter's exit then skips collecting the millions of objects torch, diffusers and MLflow imported:
    # 1.6 s -> 0.3 s a stage process.
    gc.freeze()
    return code


def run_stage(stage: str, work: Callable[..., object], *, item: str | None = None, track: bool = True,
              argv: Sequence[str] | None = None) -> int:
    """Run ``work(params)`` (or ``work(params, item)`` for foreach stages such as finetune@mel) in this process;
    returns the exit code. The done line with peak GPU memory and torch threads is what ``make gpu-smoke`` reads."""
    args, name = _parse(stage, item, argv)
    # SIGTERM (dvc, a scheduler, Ctrl-C in a queue) unwinds like an exception, so temporary
    # outputs are removed and the MLflow run is marked FAILED instead of left RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    inputs = (getattr(args, item),) if item else ()
    tracked = track and is_main_process()
    start = time.perf_counter()
    try:
        params: Params = load_params(args.params)
        with tracking.stage_run(name, params, tags={"item": inputs[0]} if item else None) if tracked else nullcontext():
            work(params, *inputs)
            usage = {"stage_seconds": time.perf_counter() - start}
            torch = sys.modules.get("torch")  # a stage that never imported torch never used it
            if torch is not None:
                usage["torch_threads"] = float(torch.get_num_threads())
                if torch.cuda.is_initialized():
                    usage["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if tracked:
                tracking.log_metrics(usage)
    except PipelineError as exc:
        sys.stderr.write(f"error: {name}: {exc}\n")  # one write: the ranks of a launched stage share stderr
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"error: {name}: interrupted\n")
        return 130
    if is_main_process():
        gpu = f", peak GPU memory {usage['gpu_peak_memory_mib']:.0f} MiB" if "gpu_peak_memory_mib" in usage else ""
        threads = f", {usage['torch_threads']:.0f} torch thread(s)" if "torch_threads" in usage else ""
        print(f"{name}: done in {usage['stage_seconds']:.1f} s{gpu}{threads}", flush=True)
    return 0


def _parse(stage: str, item: str | None, argv: Sequence[str] | None) -> tuple[argparse.Namespace, str]:
    """The stage's command line; returns (arguments, run name such as finetune@mel)."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py")
    if item:
        parser.add_argument(item)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    return args, f"{stage}@{getattr(args, item)}" if item else stage


def is_main_process() -> bool:
    """Under `accelerate launch` / torchrun only rank 0 opens the MLflow run and prints; the others just work."""
    return int(os.environ.get("RANK", "0")) == 0
