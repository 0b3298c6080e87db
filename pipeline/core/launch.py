"""Where a stage's work runs: how many processes (``compute.processes``) and how many torch threads each.

With ``compute.processes`` > 1 the stage script starts itself again under ``accelerate launch``, so DVC sees one
command and one set of outputs. Without CUDA, ``accelerate launch --cpu`` would start a single process, so the
launch asks for ``--multi_gpu`` processes and ``ACCELERATE_USE_CPU`` puts them on the CPU (gloo).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

from pipeline.core.params import ComputeParams

THREADS_ENV = "OMP_NUM_THREADS"  # a thread count someone chose: torch reads it at start, the stage leaves it be


def cgroup_cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 or v1), or None without one: a container may see every core of
    its host but be allowed only a few, and threads beyond the quota only wait."""
    try:
        if (cgroup / "cpu.max").is_file():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((cgroup / "cpu" / f"cpu.cfs_{n}_us").read_text().strip() for n in ("quota", "period"))
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the container's CPU quota. Not the cores idle at
    the start: the thread count, and with it the floating-point sums, would then follow whatever else ran then."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, allowed if limit is None else min(allowed, round(limit)))


def threads_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` processes: the usable cores shared out, at least one each."""
    return max(1, usable_cores() // processes)


def relaunch(module: str, args: list[str], compute: ComputeParams, name: str) -> int:
    """Run ``python -m module *args`` under ``accelerate launch`` and return its exit code. Each rank prints its own
    one-line error; a rank killed by a signal (the OOM killer, say) gets one line here, not the launcher's traceback."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from pipeline.core.device import cpu_only  # imports torch: only the launching process needs it here

    cuda = not cpu_only()
    env = {} if cuda else {"ACCELERATE_USE_CPU": "true"}
    if THREADS_ENV not in os.environ:
        env[THREADS_ENV] = str(threads_per_process(compute.processes))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # it repeats a failed rank's report
    with socket.socket() as sock:  # a free port for the ranks to meet on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    parsed = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(compute.processes), "--num_machines", "1",
        "--mixed_precision", compute.mixed_precision if cuda else "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), "-m", module, *args,
    ])
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
