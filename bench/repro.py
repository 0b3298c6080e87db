"""Pipeline level: ``dvc repro`` of the embedded default in a throw-away copy of the repository.

Measures the wall time and peak RSS of every stage (stdout of one real ``dvc repro`` is read line by line; each
"Running stage" line starts a stage, and a psutil sampler attributes the process tree's RSS every 0.2 s to the
stage running), then a no-op ``dvc repro``, then which stages rerun after swapping one entry of ``data.classes``.
BENCH_QUICK=1 uses the micro params of tests/test_pipeline_e2e.py instead of the default params.yaml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import yaml

from bench.common import REPO, BenchResult, Settings, TreeMonitor, python, table, target

BUDGET_TOTAL_S = 15 * 60
BUDGET_PEAK_MIB = 4 * 1024
BUDGET_NOOP_S = 10.0
MICRO = {
    "data": {"classes": ["df", "vasc"], "finetune_images": 4, "real_per_class": None, "image_size": 32},
    "demo": {"images": 160, "size": 48},
    "diffusion": {"resolution": 32, "steps": 4, "batch": 2, "checkpoint_every": 2,
                  "pretrain": {"vae_steps": 3, "unet_steps": 3, "batch": 4}},
    "generate": {"per_class": 4, "steps": 2, "batch": 4},
    "classifier": {"image_size": 32, "epochs": 1, "batch": 16},
    "oracle": {"epochs": 1, "epoch_images": 32},
}
_RUNNING = re.compile(r"Running stage '([^']+)'")


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def copy_repo(root: Path, quick: bool) -> dict[str, str]:
    """Copy tracked + untracked-not-ignored files (not dvc.lock), git init + commit; returns the env for dvc."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if name == "dvc.lock" or not (REPO / name).is_file():
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    if quick:
        params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), MICRO)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(python()).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(root), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}  # dvc's stage lines arrive as printed
    for key in ("DVC_ROOT", "LESION_SYNTH_WORKSPACE"):  # the copy is the workspace (stages find it from the CWD)
        env.pop(key, None)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "bench snapshot"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return env


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and every descendant (a timed-out dvc must not leave its stage process running)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _stage_processes(pid: int) -> list[str]:
    """Stage names (finetune@df, ...) of the running stage-script descendants of ``pid``."""
    import psutil

    names = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return names
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        for i, part in enumerate(cmd):  # `python stages/<x>.py [item]` or `python -m stages.<x> [item]`
            if part.startswith("stages/") and part.endswith(".py"):
                stem = Path(part).stem
            elif part.startswith("stages.") and i > 0 and cmd[i - 1] == "-m":
                stem = part.split(".", 1)[1]
            else:
                continue
            item = next((a for a in cmd[i + 1 :] if not a.startswith("-")), None)
            names.append(f"{stem}@{item}" if item else stem)
            break
    return names


def repro(root: Path, env: dict[str, str], log: Path, timeout: float) -> dict:
    """One ``dvc repro``: total wall, peak tree RSS, and per stage wall + peak RSS, from streamed stdout."""
    dvc = str(Path(python()).parent / "dvc")
    stages: dict[str, dict] = {}
    current: list[str | None] = [None]
    lock = threading.Lock()

    commands: dict[str, dict] = {}  # stage -> first/last time its stage-script process was seen

    def on_sample(now: float, rss: float) -> None:
        with lock:
            if current[0] is not None:
                entry = stages[current[0]]
                entry["peak_rss_mib"] = max(entry["peak_rss_mib"], rss)
        for name in _stage_processes(proc.pid):
            seen = commands.setdefault(name, {"first": now, "last": now})
            seen["last"] = now

    start = time.perf_counter()
    with open(log, "w", buffering=1) as handle:
        proc = subprocess.Popen([dvc, "repro"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with TreeMonitor(proc.pid, interval=0.2, on_sample=on_sample) as monitor:
            deadline = start + timeout
            for line in proc.stdout:  # type: ignore[union-attr]
                handle.write(line)
                now = time.perf_counter()
                match = _RUNNING.search(line)
                if match:
                    with lock:
                        if current[0] is not None:
                            stages[current[0]]["wall_s"] = now - stages[current[0]]["start"]
                        current[0] = match.group(1)
                        stages[current[0]] = {"start": now, "peak_rss_mib": 0.0, "wall_s": None}
                if now > deadline:
                    _kill_tree(proc.pid)
                    break
            code = proc.wait()
        end = time.perf_counter()
        with lock:
            if current[0] is not None and stages[current[0]]["wall_s"] is None:
                stages[current[0]]["wall_s"] = end - stages[current[0]]["start"]
    for name, entry in stages.items():
        entry.pop("start")
        if name in commands:  # the stage command's own lifetime, without DVC's hashing and caching around it
            entry["command_s"] = commands[name]["last"] - commands[name]["first"]
    return {"exit_code": code, "wall_s": end - start, "peak_rss_mib": monitor.peak, "stages": stages}


def run(settings: Settings) -> BenchResult:
    root = settings.workdir / "repo"
    root.mkdir(parents=True)
    env = copy_repo(root, settings.quick)
    timeout = 3600.0
    result = BenchResult("pipeline")
    first = repro(root, env, settings.workdir / "repro-1.log", timeout)
    print(f"  dvc repro: {first['wall_s']:.0f} s, peak {first['peak_rss_mib']:.0f} MiB, exit {first['exit_code']}", flush=True)
    rows = [[name, s["wall_s"], s.get("command_s"), s["peak_rss_mib"]] for name, s in first["stages"].items()]
    rows.append(["TOTAL dvc repro", first["wall_s"], None, first["peak_rss_mib"]])
    title = f"dvc repro of the {'micro (BENCH_QUICK)' if settings.quick else 'embedded default'} params, per stage"
    result.tables.append((title, table(["stage", "wall s (incl. DVC)", "stage command s", "peak RSS MiB"], rows)))
    if first["exit_code"] != 0:
        errors = [line.strip() for line in (settings.workdir / "repro-1.log").read_text().splitlines() if "ERROR" in line]
        result.data = {"quick": settings.quick, "first": first, "error": errors[-1] if errors else "dvc repro failed"}
        result.targets.append(target("dvc repro completes", None, 1.0, unit="",
                                     note=(errors[-1] if errors else f"exit {first['exit_code']}")[:300]))
        result.notes.append(f"`dvc repro` failed after {len(first['stages'])} stage(s): {result.data['error']}; "
                            "no-op and class-swap runs skipped.")
        return result
    noop = repro(root, env, settings.workdir / "repro-2.log", 600)
    params = yaml.safe_load((root / "params.yaml").read_text())
    from pipeline.core.params import CLASS_NAMES

    classes = list(params["data"]["classes"])
    new = next(c for c in CLASS_NAMES if c not in classes and c != "nv")
    old = classes[-1]
    params["data"]["classes"] = [*classes[:-1], new]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    swap = repro(root, env, settings.workdir / "repro-3.log", timeout)
    print(f"  no-op: {noop['wall_s']:.1f} s; swap {old}->{new}: {swap['wall_s']:.0f} s, reran {sorted(swap['stages'])}", flush=True)

    expected = {"prepare", f"finetune@{new}", f"generate@{new}", "screen", "train@baseline", "train@augmented", "evaluate", "report"}
    ran = set(swap["stages"])
    result.data = {"quick": settings.quick, "first": first, "noop": noop, "swap": {**swap, "from": old, "to": new},
                   "swap_expected": sorted(expected), "swap_unexpected": sorted(ran - expected),
                   "swap_missing": sorted(expected - ran)}
    result.tables.append(("Incremental runs", table(["run", "wall s", "stages run"], [
        ["no-op dvc repro", noop["wall_s"], len(noop["stages"])],
        [f"swap data.classes {old} -> {new}", swap["wall_s"], ", ".join(sorted(ran))],
    ])))
    budget_note = "micro params (BENCH_QUICK): not the budgeted configuration" if settings.quick else ""
    result.notes.append("Stages run exactly as `make repro` runs them (their own torch thread count; BENCH_THREADS does not "
                        f"apply); load average during the run: see the header. Work dir: {root}.")
    result.targets += [
        target("dvc repro total wall", first["wall_s"], BUDGET_TOTAL_S, higher_is_better=False, unit=" s", note=budget_note),
        target("dvc repro peak RSS", first["peak_rss_mib"], BUDGET_PEAK_MIB, higher_is_better=False, unit=" MiB", note=budget_note),
        target("no-op dvc repro wall", noop["wall_s"], BUDGET_NOOP_S, higher_is_better=False, unit=" s",
               note=f"{len(noop['stages'])} stage(s) ran"),
        {**target("class swap reruns only the expected stages", float(ran == expected), 1.0, unit=""),
         "note": f"unexpected: {sorted(ran - expected) or 'none'}; missing: {sorted(expected - ran) or 'none'}"},
    ]
    return result
