"""Where a stage's work runs: how many processes (``compute.processes``) and how many torch threads each.

With ``compute.processes`` > 1 the stage script starts itself again under ``accelerate launch`` (the same
``python -m stages.<stage> <item>`` that dvc.yaml runs, so DVC sees one command and one set of outputs); each
process then runs the stage as one rank. Without CUDA the ranks run on the CPU and talk over gloo:
``accelerate launch --cpu`` would start a single process, so the launch asks for ``--multi_gpu`` processes and
``ACCELERATE_USE_CPU`` puts them on the CPU.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

from pipeline.params import ComputeParams

THREADS_ENV = "OMP_NUM_THREADS"  # a thread count someone chose: torch reads it at start, the stage leaves it be


def under_launcher() -> bool:
    """True in a rank started by ``accelerate launch`` / torchrun (they set WORLD_SIZE for every rank)."""
    return "WORLD_SIZE" in os.environ


def cgroup_cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores, or None without one: cgroup v2 ``cpu.max`` ("<quota> <period>") or
    cgroup v1 ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1: none). A container may see every core of its
    host but be allowed only a few; threads beyond the quota only wait, and spin or sleep in the kernel meanwhile."""
    v1 = cgroup / "cpu"
    try:
        if (cgroup / "cpu.max").is_file():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota, period = (v1 / "cpu.cfs_quota_us").read_text().strip(), (v1 / "cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the container's CPU quota.

    Not the cores idle at the moment a stage starts: the thread count would then follow whatever else ran in that
    moment, and with it the floating-point sums, so the same seed gave other weights (the from-scratch oracle's
    mean class fidelity moved by about 0.1 between 1 and 2 threads), and a stage that started during a few seconds
    of other work kept half the cores for all its minutes (the base model: 408 s on 1 thread, 291 s on 2).
    Under lasting competition for the cores, set OMP_NUM_THREADS.
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, allowed if limit is None else min(allowed, round(limit)))


def threads_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` processes: the usable cores shared out, at least one each."""
    return max(1, usable_cores() // processes)


def set_torch_threads(processes: int) -> None:
    """Set this process's torch intra-op threads for a stage run by ``processes`` processes (OMP_NUM_THREADS wins)."""
    if THREADS_ENV in os.environ:
        return
    import torch

    torch.set_num_threads(threads_per_process(processes))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_arguments(module: str, args: list[str], compute: ComputeParams, cuda: bool) -> list[str]:
    """``accelerate launch`` arguments that run ``python -m module *args`` on ``compute.processes`` processes."""
    return [
        "--multi_gpu", "--num_processes", str(compute.processes), "--num_machines", "1",
        "--mixed_precision", compute.mixed_precision if cuda else "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", module, *args,
    ]


def relaunch(module: str, args: list[str], compute: ComputeParams, name: str) -> int:
    """Run ``python -m module *args`` under ``accelerate launch`` and return its exit code.

    Each rank prints its own one-line error; a rank killed by a signal (the OOM killer, say) gets one line here.
    torch's launcher reports a failed rank by raising, with a long traceback that says nothing the ranks did not.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from pipeline.device import cpu_only  # imports torch: only the launching process needs it here

    cuda = not cpu_only()
    env = {} if cuda else {"ACCELERATE_USE_CPU": "true"}
    if THREADS_ENV not in os.environ:
        env[THREADS_ENV] = str(threads_per_process(compute.processes))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its report of a failed rank repeats the rank's own
    parsed = launch_command_parser().parse_args(launch_arguments(module, args, compute, cuda))
    with patch_environment(**env):
        try:
            launch_command(parsed)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            if failure.exitcode < 0:
                signame = signal.Signals(-failure.exitcode).name
                print(f"error: {name}: process rank {rank} was killed by {signame}", file=sys.stderr)
                return 128 - failure.exitcode
            return failure.exitcode
    return 0
