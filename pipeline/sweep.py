"""The method × amount sweep: which fine-tuning method, and how many synthetic images per class, help the most?

Each point (``diffusion.method``, ``generate.per_class``) is one queued DVC experiment (``dvc exp run --queue``), so
every point is a full, recorded pipeline run (params, metrics, outputs under ``refs/exps``). DVC's run cache restores
what points share (demo data, split, base model, baseline classifier, and one method's fine-tuned models across
amounts), so mostly generation and the augmented classifier rerun (plus the short stages whose outputs git keeps
uncached: demo_data, screen, report). Amount 0 is the baseline itself (no synthetic
image): its gain is 0 by definition and is drawn, not run.

Results are read back from each experiment's git commit (``reports/metrics.json`` is a DVC metric kept in git), and
written to ``reports/sweep/``: ``gain_vs_amount.png`` (one line per method, 95% CI bars), ``sweep.md`` and
``sweep.json``; the same files go to an MLflow run tagged ``kind=sweep``.

    python -m pipeline.sweep            # or: make sweep   (methods, amounts, jobs: the `sweep` section of params.yaml)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipeline.atomic import atomic_file, write_json, write_text
from pipeline.errors import PipelineError
from pipeline.params import Params, load_params
from pipeline.paths import REPORTS_DIR, workspace_root

SWEEP_DIR = REPORTS_DIR / "sweep"
METRIC = "balanced_accuracy"
POLL_SECONDS = 5


@dataclass(frozen=True)
class Point:
    method: str
    amount: int
    name: str  # the DVC experiment name


def plan(params: Params, sweep_id: str) -> list[Point]:
    s = params.sweep
    return [Point(m, a, f"{sweep_id}-{m.replace('_', '-')}-{a}") for m in s.methods for a in s.amounts]


def _env(jobs: int = 1) -> dict[str, str]:
    """The queue's workers run the stages' `python -m stages.<x>`: that must be this interpreter, as under `make`.

    Experiments running side by side share the cores, so their OpenMP threads sleep instead of spinning
    (pipeline/__init__.py has the measurements)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if jobs > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _dvc(args: list[str], root: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PipelineError(f"dvc {' '.join(args)} failed: {tail[0]}")
    return done.stdout


def queue(points: list[Point], root: Path) -> None:
    for p in points:
        _dvc(["exp", "run", "--queue", "-n", p.name, "-S", f"diffusion.method={p.method}",
              "-S", f"generate.per_class={p.amount}"], root)


def queue_states(root: Path) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed}: what `dvc queue status` shows."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {e["name"]: e["status"] for e in repo.experiments.celery_queue.status() if e.get("name")}


def run_queue(points: list[Point], root: Path, jobs: int, timeout_s: float) -> None:
    """Start the queue's workers and wait for our experiments; one failure stops the sweep with its log hint."""
    from tqdm import tqdm

    start = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=_env(jobs),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the workers it forks keep pipes open
    if start.returncode != 0:
        raise PipelineError(f"dvc queue start -j {jobs} failed (exit {start.returncode}); try it by hand to see why")
    deadline = time.monotonic() + timeout_s
    names = {p.name for p in points}
    with tqdm(total=len(points), desc="sweep", unit="exp") as bar:
        while True:
            states = {n: s for n, s in queue_states(root).items() if n in names}
            failed = sorted(n for n, s in states.items() if s == "Failed")
            if failed:
                raise PipelineError(f"experiment {failed[0]} failed; see `dvc queue logs {failed[0]}`")
            done = sum(s == "Success" for s in states.values())
            bar.update(done - bar.n)
            if done == len(points):
                return
            if time.monotonic() > deadline:
                raise PipelineError(f"sweep.timeout_minutes: {done}/{len(points)} experiments done in time; "
                                    "`dvc queue status` shows the rest")
            time.sleep(POLL_SECONDS)


def _experiment_refs(root: Path) -> dict[str, str]:
    """{experiment name: git ref}; DVC keeps each experiment as a commit at refs/exps/<..>/<baseline>/<name>."""
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return {ref.rsplit("/", 1)[-1]: ref for ref in out.split()}


def _git_show(root: Path, ref: str, path: str) -> str:
    done = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"experiment {ref.rsplit('/', 1)[-1]}: {path} is not in its commit")
    return done.stdout


def collect(points: list[Point], root: Path) -> pd.DataFrame:
    """One row per point from the experiment's own params.yaml and reports/metrics.json, plus the amount-0 rows."""
    refs = _experiment_refs(root)
    rows = []
    for p in points:
        if p.name not in refs:
            raise PipelineError(f"experiment {p.name} not found under refs/exps; did it run?")
        ran = yaml.safe_load(_git_show(root, refs[p.name], "params.yaml"))
        if ran["diffusion"]["method"] != p.method or ran["generate"]["per_class"] != p.amount:
            raise PipelineError(f"experiment {p.name}: its params.yaml is not ({p.method}, {p.amount})")
        metrics = json.loads(_git_show(root, refs[p.name], "reports/metrics.json"))
        rows.append({
            "method": p.method, "amount": p.amount, "experiment": p.name,
            "baseline": metrics["baseline"][METRIC], "augmented": metrics["augmented"][METRIC],
            "gain": metrics["gain"][METRIC], "ci_low": metrics["gain_ci95"][METRIC]["low"],
            "ci_high": metrics["gain_ci95"][METRIC]["high"], "verdict": metrics["verdict"],
        })
    frame = pd.DataFrame(rows)
    zero = frame.groupby("method", as_index=False)["baseline"].first()
    zero = zero.assign(amount=0, experiment="(baseline)", augmented=zero.baseline, gain=0.0, ci_low=0.0, ci_high=0.0,
                       verdict="reference")
    return pd.concat([zero, frame], ignore_index=True).sort_values(["method", "amount"], ignore_index=True)


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, rows in frame.groupby("method"):
        err = [100 * (rows.gain - rows.ci_low), 100 * (rows.ci_high - rows.gain)]
        ax.errorbar(rows.amount, 100 * rows.gain, yerr=err, marker="o", capsize=3, label=method)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("synthetic images per class (generate.per_class)")
    ax.set_ylabel("balanced accuracy gain (pp), 95% CI")
    ax.set_title("augmented − baseline on the real test split")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as temp:
        fig.savefig(temp, format="png", dpi=120)
    plt.close(fig)


def markdown(frame: pd.DataFrame) -> str:
    lines = ["# Method × amount sweep", "",
             "Balanced accuracy on the real test split; gain = augmented − baseline with its paired-bootstrap 95% CI. "
             "Amount 0 is the baseline (no synthetic image).", "",
             "![gain vs amount](gain_vs_amount.png)", "",
             "| method | per class | experiment | baseline | augmented | gain | 95% CI | verdict |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for r in frame.itertuples():
        lines.append(f"| {r.method} | {r.amount} | {r.experiment} | {r.baseline:.3f} | {r.augmented:.3f} | "
                     f"{r.gain:+.3f} | {r.ci_low:+.3f} .. {r.ci_high:+.3f} | {r.verdict} |")
    best = frame[frame.amount > 0].sort_values("gain").iloc[-1]
    lines += ["", f"Best point: **{best.method}** with {best.amount} images per class, gain {best.gain:+.3f} "
              f"({best.verdict}){'' if best.gain > 0 else '; no point beat the baseline'}."]
    return "\n".join(lines) + "\n"


def write_outputs(frame: pd.DataFrame, params: Params, root: Path, sweep_id: str) -> Path:
    folder = root / SWEEP_DIR
    plot(frame, folder / "gain_vs_amount.png")
    write_text(folder / "sweep.md", markdown(frame))
    write_json(folder / "sweep.json", {"sweep_id": sweep_id, "metric": METRIC, "points": frame.to_dict("records")})
    _log_to_mlflow(frame, params, folder, sweep_id)
    return folder / "sweep.md"


def _log_to_mlflow(frame: pd.DataFrame, params: Params, folder: Path, sweep_id: str) -> None:
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment_id = tracking.ensure_experiment(params.mlflow.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep {sweep_id}",
                          tags={"kind": "sweep", "sweep_id": sweep_id}):
        mlflow.log_metrics({f"gain_{r.method}_{r.amount}": r.gain for r in frame.itertuples() if r.amount > 0})
        for name in ("gain_vs_amount.png", "sweep.md", "sweep.json"):
            mlflow.log_artifact(str(folder / name))


def sweep(params: Params, root: Path, sweep_id: str) -> Path:
    points = plan(params, sweep_id)
    print(f"sweep {sweep_id}: {len(points)} experiments ({', '.join(params.sweep.methods)} × "
          f"{params.sweep.amounts} per class), {params.sweep.jobs} at a time")
    queue(points, root)
    run_queue(points, root, params.sweep.jobs, params.sweep.timeout_minutes * 60)
    return write_outputs(collect(points, root), params, root, sweep_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--id", default=time.strftime("sweep%Y%m%d-%H%M%S"), help="prefix of the experiment names")
    args = parser.parse_args(argv)
    try:
        root = workspace_root()
        summary = sweep(load_params(root / args.params), root, args.id)
    except PipelineError as exc:
        print(f"error: sweep: {exc}", file=sys.stderr)
        return 1
    print(f"sweep: wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
