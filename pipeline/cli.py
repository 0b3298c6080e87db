"""The common entry point of every stage script: params in, MLflow child run around, one-line errors out."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError
from pipeline.params import Params, load_params


def run_stage(
    stage: str,
    work: Callable[..., object],
    *,
    item: str | None = None,
    track: bool = True,
    argv: Sequence[str] | None = None,
) -> int:
    """Run ``work(params)`` (or ``work(params, item)`` for foreach stages such as finetune@mel).

    item: the metavar of the foreach item (e.g. "class_code"), None for a plain stage.
    Returns the exit code; stage scripts call ``sys.exit(run_stage(...))``.
    """
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py")
    if item:
        parser.add_argument(item)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    # SIGTERM (dvc, a scheduler, Ctrl-C in a queue) unwinds like an exception, so temporary
    # outputs are removed and the MLflow run is marked FAILED instead of left RUNNING.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    value = getattr(args, item) if item else None
    name = f"{stage}@{value}" if item else stage
    try:
        params: Params = load_params(args.params)
        call = (lambda: work(params, value)) if item else (lambda: work(params))
        if not track or not _is_main_process():
            call()
        else:
            from pipeline import tracking

            tags = {"item": value} if item else None
            with tracking.stage_run(name, params, tags=tags):
                call()
    except PipelineError as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {name}: interrupted", file=sys.stderr)
        return 130
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _is_main_process() -> bool:
    """Under `accelerate launch` / torchrun only rank 0 opens the MLflow run; the others just work."""
    return int(os.environ.get("RANK", "0")) == 0
