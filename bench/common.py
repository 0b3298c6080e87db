"""Shared machinery: settings, one subprocess per measured arm (wall time + peak RSS), ratios, tables, reports.

Every arm runs in its own ``python -m bench.common`` child so its peak RSS is its own: the child reports
``ru_maxrss`` (its own high-water mark) and the parent samples the child's process tree with psutil every
0.1 s (catches grandchildren, e.g. dvc's stage processes). Both arms of a benchmark get the same torch
thread count, the same data and the same model.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def reports_dir() -> Path:
    """reports/ of the repository, or $BENCH_REPORTS_DIR (the smoke test writes elsewhere)."""
    return Path(os.environ.get("BENCH_REPORTS_DIR") or REPO / "reports")


def report_paths() -> tuple[Path, Path, Path]:
    """(bench.json, bench.md, bench_scaling.png)."""
    folder = reports_dir()
    return folder / "bench.json", folder / "bench.md", folder / "bench_scaling.png"


# ------------------------------------------------------------------------------------------ settings


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _auto_threads() -> tuple[int, str]:
    """BENCH_THREADS if set; else 1 on a busy box (load >= 1), else all cores (at most 4).

    Measured here: with 2 torch threads on 2 cores that other processes also use, a tiny-UNet step was
    12x slower than with 1 thread (OpenMP threads spin-waiting), and still 1.7x slower with
    OMP_WAIT_POLICY=PASSIVE at load 1.7; the ratios drift with it.
    """
    if os.environ.get("BENCH_THREADS"):
        return max(1, int(os.environ["BENCH_THREADS"])), "BENCH_THREADS"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load >= 1.0:
        return 1, f"auto: load average {load:.1f} on {cores} cores (busy box)"
    return min(cores, 4), f"auto: idle box ({cores} cores)"


@dataclass(frozen=True)
class Settings:
    """Knobs shared by all benchmarks (environment: BENCH_QUICK, BENCH_THREADS, BENCH_REPEATS, BENCH_KEEP)."""

    quick: bool
    threads: int
    threads_why: str
    repeats: int
    keep: bool
    workdir: Path

    @classmethod
    def from_env(cls, workdir: Path | None = None) -> "Settings":
        quick = _env_flag("BENCH_QUICK")
        threads, why = _auto_threads()
        repeats = int(os.environ.get("BENCH_REPEATS") or (1 if quick else 3))  # finetune arms; medians
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="lesion-bench-"))
        return cls(quick, threads, why, max(1, repeats), _env_flag("BENCH_KEEP"), workdir)


def python() -> str:
    return sys.executable


# ---------------------------------------------------------------------------------------- arm runner


@dataclass
class ArmResult:
    """What one subprocess arm returned plus what the parent measured around it."""

    name: str
    result: dict
    wall_s: float  # the whole child process, imports included
    peak_rss_mib: float  # max(child's ru_maxrss, sampled process-tree RSS)
    peak_tree_rss_mib: float
    samples: int = 0

    def as_dict(self) -> dict:
        return {"process_wall_s": round(self.wall_s, 3), "peak_rss_mib": round(self.peak_rss_mib, 1),
                "peak_tree_rss_mib": round(self.peak_tree_rss_mib, 1), **self.result}


class TreeMonitor:
    """Samples the RSS of a process and all its descendants every ``interval`` s in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1, on_sample: Callable[[float, float], None] | None = None):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0.0
        self.samples = 0
        self.on_sample = on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tree_rss(self) -> float:
        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return 0.0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except self._psutil.Error:
                pass
        return total / MiB

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.tree_rss()
            self.samples += 1
            self.peak = max(self.peak, rss)
            if self.on_sample is not None:
                self.on_sample(time.perf_counter(), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def workspace_env(root: Path | str) -> dict[str, str]:
    """Point the project's ``workspace_root()`` at ``root`` (LESION_SYNTH_WORKSPACE; DVC_ROOT for older checkouts)."""
    return {"LESION_SYNTH_WORKSPACE": str(root), "DVC_ROOT": str(root)}


def enter_workspace(root: Path | str) -> None:
    """Inside an arm: make ``root`` the workspace by every means the project looks at (env and CWD)."""
    os.environ.update(workspace_env(root))
    os.chdir(root)


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": str(settings.threads),
        "MKL_NUM_THREADS": str(settings.threads),
        "BENCH_CHILD_THREADS": str(settings.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore",
    })
    for key in ("LESION_SYNTH_WORKSPACE", "DVC_ROOT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_arm(settings: Settings, name: str, target: str, kwargs: dict, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 1800) -> ArmResult:
    """Run ``target`` ("bench.module:function") with ``kwargs`` in a fresh child; returns its dict and measurements."""
    out = Path(tempfile.mkstemp(prefix="arm-", suffix=".json", dir=settings.workdir)[1])
    args = Path(tempfile.mkstemp(prefix="args-", suffix=".json", dir=settings.workdir)[1])
    args.write_text(json.dumps(kwargs))  # a file, not argv: arms may get thousands of rows
    cmd = [python(), "-m", "bench.common", target, str(args), str(out)]
    log = settings.workdir / f"{name.replace('/', '_')}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=child_env(settings, env), stdout=handle, stderr=subprocess.STDOUT)
        with TreeMonitor(proc.pid) as monitor:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"bench arm {name} timed out after {timeout:.0f}s (log: {log})") from None
    wall = time.perf_counter() - start
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"bench arm {name} failed (exit {code}); last lines of {log}:\n{tail}")
    result = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    args.unlink(missing_ok=True)
    own_peak = result.pop("_ru_maxrss_mib", 0.0)
    return ArmResult(name, result, wall, max(own_peak, monitor.peak), monitor.peak, monitor.samples)


def _child_main(argv: list[str]) -> int:
    """Child side of ``run_arm``: set threads, call the function, write its dict (+ ru_maxrss) as JSON."""
    target, kwargs, out = argv[0], json.loads(Path(argv[1]).read_text()), Path(argv[2])
    import torch

    threads = int(os.environ.get("BENCH_CHILD_THREADS", "1"))
    torch.set_num_threads(threads)
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        result = func(**kwargs) or {}
    except Exception:
        traceback.print_exc()
        return 1
    # Linux reports ru_maxrss in KiB.
    result["_ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.setdefault("torch_threads", torch.get_num_threads())
    out.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------- timing helpers


class StepClock:
    """Wall and process-CPU timestamps of loop iterations; rates are over the steady state (after ``warmup`` steps).

    CPU-time rates (steps per CPU-second of this process) hardly move when other processes share the cores;
    with one torch thread they equal the wall rate of an otherwise idle machine.
    """

    def __init__(self):
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []

    def mark(self) -> None:
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def rate(self, warmup: int, cpu: bool = False) -> float:
        """Steps per (CPU-)second between the end of step ``warmup`` and the last step."""
        marks = self.cpu_marks if cpu else self.marks
        warmup = min(warmup, max(0, len(marks) - 2))
        if len(marks) - warmup < 2:
            return float("nan")
        span = marks[-1] - marks[warmup]
        return (len(marks) - 1 - warmup) / span if span > 0 else float("nan")


class optimizer_clock:
    """Context manager: a StepClock marked after every ``optimizer.step()`` of any torch optimizer in this process.

    Uses torch's public global hook (``register_optimizer_step_post_hook``), so the project's training loops are
    timed from outside, step by step, without touching their code.
    """

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.clock = StepClock()
        self._handle = register_optimizer_step_post_hook(lambda *args: self.clock.mark())
        return self.clock

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def primary_ratio(settings: "Settings", wall_ratio: float | None, cpu_ratio: float | None) -> tuple[float | None, str]:
    """The ratio a target is judged on: CPU-time based with one torch thread (what an idle core would show,
    robust to other processes on the box), wall-time based otherwise."""
    if settings.threads == 1 and cpu_ratio is not None:
        return cpu_ratio, f"judged on CPU-time rates (1 thread); wall-time ratio {fmt(wall_ratio)}"
    return wall_ratio, f"judged on wall-time rates ({settings.threads} threads); CPU-time ratio {fmt(cpu_ratio)}"


def ratio(ours: float, reference: float) -> float | None:
    if ours is None or reference in (None, 0) or reference != reference or ours != ours:
        return None
    return ours / reference


def target(name: str, value: float | None, threshold: float, higher_is_better: bool = True, unit: str = "x",
           note: str = "") -> dict:
    """A pass/fail record: value compared against threshold (None value fails)."""
    ok = value is not None and (value >= threshold if higher_is_better else value <= threshold)
    return {"name": name, "value": None if value is None else round(value, 4), "threshold": threshold,
            "comparison": ">=" if higher_is_better else "<=", "unit": unit, "pass": bool(ok), "note": note}


def median(values: Iterable[float]) -> float:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


# ------------------------------------------------------------------------------------------- tables


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(str(x).ljust(w) for x, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])


@dataclass
class BenchResult:
    """One benchmark's outcome: numbers for the JSON, Markdown tables for the report, its targets."""

    name: str
    data: dict = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown)
    targets: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.name}"]
        for title, md in self.tables:
            parts += [f"**{title}**", "", md, ""]
        if self.targets:
            rows = [[t["name"], t["value"], f"{t['comparison']} {t['threshold']}{t['unit']}", t["pass"]] for t in self.targets]
            parts += ["**Targets**", "", table(["target", "measured", "required", "result"], rows), ""]
        parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts).rstrip() + "\n"

    def as_dict(self) -> dict:
        return {**self.data, "targets": self.targets, "notes": self.notes}


def environment(settings: Settings) -> dict:
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {
        "python": platform.python_version(), "torch": version("torch"), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": settings.threads, "threads_why": settings.threads_why,
        "quick": settings.quick, "repeats": settings.repeats, "git_commit": commit,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_reports(results: dict[str, BenchResult], env: dict, total_s: float, merge: bool = True) -> None:
    """reports/bench.json (numbers, ratios, targets) and reports/bench.md, atomically; earlier benchmarks are kept."""
    from pipeline.core.atomic import write_json, write_text

    report_json, report_md, _ = report_paths()
    payload = {"environment": env, "benchmarks": {}}
    if merge and report_json.is_file():
        try:
            previous = json.loads(report_json.read_text())
            payload["benchmarks"] = previous.get("benchmarks", {})
        except (json.JSONDecodeError, OSError):
            pass
    env = {**env, "load_average_end": [round(x, 2) for x in os.getloadavg()], "wall_s": round(total_s, 1),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    payload["environment"] = env
    for name, result in results.items():
        payload["benchmarks"][name] = {**result.as_dict(), "environment": env, "markdown": result.markdown()}
    payload["targets"] = [{"benchmark": b, **t} for b, r in payload["benchmarks"].items() for t in r.get("targets", [])]
    payload["all_pass"] = all(t["pass"] for t in payload["targets"])
    write_json(report_json, payload)

    lines = ["# Benchmarks", "", f"`python -m bench {' '.join(results)}` on {env['cpu_count']} CPU cores, "
             f"torch {env['torch']} with {env['torch_threads']} thread(s) ({env['threads_why']}); "
             f"load average {env['load_average_start']} -> {env['load_average_end']}; "
             f"{'BENCH_QUICK micro settings; ' if env['quick'] else ''}{env['wall_s']} s in all ({env['finished']}).", ""]
    lines += [r.markdown() for r in results.values()]
    for name in sorted(set(payload["benchmarks"]) - set(results)):  # kept from an earlier run
        earlier = payload["benchmarks"][name]
        when = earlier.get("environment", {})
        if "markdown" in earlier:
            lines += [f"_{name}: from an earlier run ({when.get('finished', '?')}, "
                      f"{'BENCH_QUICK, ' if when.get('quick') else ''}{when.get('torch_threads', '?')} thread(s))._", "",
                      earlier["markdown"]]
    write_text(report_md, "\n".join(lines))


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
