"""``make gpu-smoke``: the micro settings through every stage on CUDA (the mask ControlNet included), one PASS/FAIL
line per stage.

Run it on the GPU machine before a real job. It copies the repository into a temporary folder with the micro
params of ``make bench`` (BENCH_QUICK; compute.mixed_precision fp16 unless told otherwise), runs ``dvc repro``
there, and prints for each stage its wall time (as DVC saw it, and the stage's own) and the peak GPU memory torch
allocated in it; the stages print both (pipeline/core/cli.py). Exit code 0 only when every stage passed.

    python -m bench.gpu_smoke [--processes N] [--mixed-precision no|fp16|bf16] [--keep]

Without a visible CUDA device it stops at once with one line.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

# On one H200 machine (16 cores) two partial runs added up to ~460 s: each stage spent ~20 s starting (imports
# 10-16 s, CUDA's first call 4.5 s) and a few seconds working, so the micro run measures start-up, not the GPU.
BUDGET_S = 600


@dataclass(frozen=True)
class StageResult:
    name: str
    passed: bool
    wall_s: float | None  # DVC's wall for the stage (imports, hashing, caching)
    stage_s: float | None  # the stage's own, as it printed it
    gpu_mib: float | None  # None: the stage never used CUDA
    error: str = ""

    def line(self) -> str:
        if not self.passed:
            return f"FAIL  {self.name:<18} {self.error}"
        wall = f"{self.wall_s:7.1f} s" if self.wall_s is not None else "      - "
        gpu = f"{self.gpu_mib:8.0f} MiB" if self.gpu_mib is not None else "   no CUDA"
        return f"PASS  {self.name:<18} wall {wall} (stage {self.stage_s:6.1f} s)  peak GPU memory {gpu}"


def summarize(stages: list[str], log: str, walls: dict[str, dict]) -> list[StageResult]:
    """One result per stage from the ``dvc repro`` output: passed when the stage printed its ``done`` line."""
    results = []
    for name in stages:
        done = re.search(rf"^{re.escape(name)}: done in ([\d.]+) s(?:, peak GPU memory ([\d.]+) MiB)?(?:, \d+ torch thread\(s\))?$", log, re.M)
        wall = (walls.get(name) or {}).get("wall_s")
        if done:
            gpu = float(done.group(2)) if done.group(2) else None
            results.append(StageResult(name, True, wall, float(done.group(1)), gpu))
            continue
        error = re.search(rf"^error: {re.escape(name)}: (.*)$", log, re.M)
        reason = error.group(0) if error else ("failed, see the log" if name in walls else "not run (an earlier stage failed)")
        results.append(StageResult(name, False, wall, None, None, reason))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="compute.processes (default 1)")
    parser.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its dvc log and mlflow.db)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-smoke: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU, its driver and a CUDA build of torch", file=sys.stderr)
        return 1
    from bench.repro import copy_repo, repro

    print(f"gpu-smoke: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s); "
          f"micro params, {args.processes} process(es), mixed precision {args.mixed_precision}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    root = workdir / "repo"
    root.mkdir()
    env = copy_repo(root, quick=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compute"] = {"processes": args.processes, "mixed_precision": args.mixed_precision}
    # The mask ControlNet too: its training, and generation conditioned on masks (the demo set has them).
    params["diffusion"]["control"] = "mask"
    params["diffusion"]["controlnet"] = {**params["diffusion"].get("controlnet", {}), "steps": 20}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    start = time.perf_counter()
    log = workdir / "dvc-repro.log"
    run = repro(root, env, log, timeout=2 * BUDGET_S)
    total = time.perf_counter() - start
    names = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=root, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    results = summarize(names, log.read_text(), run["stages"])
    for result in results:
        print(result.line())
    passed = run["exit_code"] == 0 and all(r.passed for r in results)
    budget = "within" if total <= BUDGET_S else "OVER"
    print(f"{'PASS' if passed else 'FAIL'}  all stages: {total:.0f} s ({budget} the {BUDGET_S} s budget)")
    if args.keep or not passed:
        print(f"gpu-smoke: kept {workdir} (dvc output: {log})")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
