"""Where a stage's work runs: how many processes (``compute.processes``) and how many torch threads each.

With ``compute.processes`` > 1 the stage script starts itself again under ``accelerate launch``, so DVC sees one
command and one set of outputs. Without CUDA, ``accelerate launch --cpu`` would start a single process, so the
launch asks for ``--multi_gpu`` processes and ``ACCELERATE_USE_CPU`` puts them on the CPU (gloo).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from pipeline.core.params import ComputeParams

THREADS_ENV = "OMP_NUM_THREADS"  # a thread count someone chose: torch reads it at start, the stage leaves it be


def threads_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` processes: the usable cores shared out, at least one each. Usable: the
    CPU affinity capped by a container's CPU quota (joblib's count; threads beyond the quota only wait), not the cores
    idle at the start, which would make the thread count, and with it the floating-point sums, follow the load."""
    import joblib

    return max(1, joblib.cpu_count() // processes)


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
    parsed = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(compute.processes), "--num_machines", "1",
        "--mixed_precision", compute.mixed_precision if cuda else "no", "--dynamo_backend", "no",
        "--main_process_port", "0", "-m", module, *args,  # port 0: accelerate picks a free one for the ranks
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
