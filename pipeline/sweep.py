"""The sweep: which fine-tuning method, how many synthetic images, and how scarce the real ones, make augmentation pay?

One queued DVC experiment per point of two axes crossed with ``sweep.methods``: ``generate.per_class`` over
``sweep.amounts`` and ``data.real_per_class`` over ``sweep.real_per_class``; the results are read back from each
experiment's commit into ``reports/sweep/`` and an MLflow run tagged ``kind=sweep`` (README: "The sweep").

    python -m pipeline.sweep            # or: make sweep   (the `sweep` section of params.yaml)
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

import numpy as np
import pandas as pd
import yaml

from pipeline.core import launch, tracking
from pipeline.core.atomic import write_figure, write_json, write_text
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params, load_params
from pipeline.core.paths import REPORTS_DIR, workspace_root

METRIC = "balanced_accuracy"
CONTROLS = ("base_only", "real_ceiling")  # control variants whose gain over baseline metrics.json may hold
CHARTS = {"amount": ("gain_vs_amount.png", "synthetic images per class (generate.per_class)"),
          "real_per_class": ("gain_vs_real.png", "real train images per class (data.real_per_class)")}
CI_COLUMNS = ("gain", "ci_low", "ci_high")


@dataclass(frozen=True)
class Point:
    method: str
    amount: int
    real_per_class: int | None  # None: every train image (no cap)
    name: str  # the DVC experiment name


def _cap_label(cap: int | None) -> str:
    return "all" if cap is None else str(cap)


def plan(params: Params, sweep_id: str) -> list[Point]:
    """Both axes' points, method-major; the point the axes share appears once."""
    s, cap, amount = params.sweep, params.data.real_per_class, params.generate.per_class
    axes = [(a, cap) for a in s.amounts] + [(amount, k) for k in s.real_per_class]
    keys = dict.fromkeys((m, a, k) for m in s.methods for a, k in axes)
    return [Point(m, a, k, f"{sweep_id}-{m.replace('_', '-')}-{a}-real{_cap_label(k)}") for m, a, k in keys]


def overrides(point: Point, params: Params) -> dict[str, object]:
    """The params a point changes (``dvc exp run -S``); fine-tuning images stay within the K real ones."""
    cap = point.real_per_class
    finetune = params.data.finetune_images if cap is None else min(params.data.finetune_images, cap)
    return {"diffusion.method": point.method, "generate.per_class": point.amount,
            "data.real_per_class": "null" if cap is None else cap, "data.finetune_images": finetune}


def _env(jobs: int = 1) -> dict[str, str]:
    """The queue's workers must run the stages with this interpreter, as under `make`; experiments side by side get
    their share of the cores as torch threads (more threads than cores spin and wait)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if jobs > 1:
        env.setdefault(launch.THREADS_ENV, str(launch.threads_per_process(jobs)))
    return env


def queue(points: list[Point], params: Params, root: Path) -> None:
    for p in points:
        args = ["exp", "run", "--queue", "-n", p.name]
        args += [arg for key, value in overrides(p, params).items() for arg in ("-S", f"{key}={value}")]
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(), capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise PipelineError(f"dvc {' '.join(args)} failed: {tail[0]}")


def run_queue(points: list[Point], root: Path, jobs: int, timeout_s: float) -> None:
    """Start the queue's workers and wait for our experiments; one failure stops the sweep with its log hint."""
    from dvc.repo import Repo
    from tqdm import tqdm

    start = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=_env(jobs),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the workers it forks keep pipes open
    if start.returncode != 0:
        raise PipelineError(f"dvc queue start -j {jobs} failed (exit {start.returncode}); try it by hand to see why")
    deadline = time.monotonic() + timeout_s
    names = {p.name for p in points}
    with tqdm(total=len(points), desc="sweep", unit="exp") as bar:
        while True:
            with Repo(str(root)) as repo:  # what `dvc queue status` shows: Queued, Running, Success or Failed
                states = {e["name"]: e["status"] for e in repo.experiments.celery_queue.status() if e.get("name") in names}
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
            time.sleep(5)


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


def _row(p: Point, metrics: dict) -> dict:
    """A point's figures; a control's gain and CI are NaN where it did not run (evaluate writes each that ran)."""
    row = {
        "method": p.method, "amount": p.amount, "real_per_class": p.real_per_class, "experiment": p.name,
        "baseline": metrics["baseline"][METRIC], "augmented": metrics["augmented"][METRIC],
        "gain": metrics["gain"][METRIC], "ci_low": metrics["gain_ci95"][METRIC]["low"],
        "ci_high": metrics["gain_ci95"][METRIC]["high"], "verdict": metrics["verdict"],
    }
    controls = metrics["gain_over_baseline"]
    row.update({f"{v}_{c}": controls.get(v, {}).get(key, np.nan) for v in CONTROLS
                for c, key in zip(CI_COLUMNS, (METRIC, "ci_low", "ci_high"))})
    return row


def collect(points: list[Point], root: Path) -> pd.DataFrame:
    """A row per point from its commit's params.yaml and metrics.json; an amount-0 (baseline) row per method, cap."""
    refs = _experiment_refs(root)
    rows, zeros = [], {}
    for p in points:
        if p.name not in refs:
            raise PipelineError(f"experiment {p.name} not found under refs/exps; did it run?")
        ran = yaml.safe_load(_git_show(root, refs[p.name], "params.yaml"))
        cap = ran.get("data", {}).get("real_per_class")
        if ran["diffusion"]["method"] != p.method or ran["generate"]["per_class"] != p.amount or cap != p.real_per_class:
            raise PipelineError(f"experiment {p.name}: its params.yaml is not ({p.method}, {p.amount}, "
                                f"real_per_class {_cap_label(p.real_per_class)})")
        row = _row(p, json.loads(_git_show(root, refs[p.name], "reports/metrics.json")))
        rows.append(row)
        zero = zeros.setdefault((p.method, p.real_per_class), {
            **row, "amount": 0, "experiment": "(baseline)", "augmented": row["baseline"], "gain": 0.0, "ci_low": 0.0,
            "ci_high": 0.0, "verdict": "reference", **{f"{v}_{c}": np.nan for v in CONTROLS for c in CI_COLUMNS}})
        for variant in CONTROLS:  # no extra image: no gain, drawn only where the control ran
            if pd.notna(row[f"{variant}_gain"]):
                zero.update({f"{variant}_{c}": 0.0 for c in CI_COLUMNS})
    frame = pd.DataFrame([*zeros.values(), *rows])
    frame["real_per_class"] = pd.Series([None if pd.isna(k) else int(k) for k in frame["real_per_class"]], dtype=object)
    return frame.sort_values(["method", "real_per_class", "amount"], na_position="last", ignore_index=True)


def per_class(points: list[Point], root: Path, params: Params) -> pd.DataFrame:
    """The methods side by side per class at the configured amount and cap: fidelity (``reports/fidelity.json``), FID,
    KID, memorized images and mask IoU (``reports/quality.json``) from each commit; a flagged figure reads "flagged"."""
    refs, rows = _experiment_refs(root), []
    for p in points:
        if p.amount != params.generate.per_class or p.real_per_class != params.data.real_per_class:
            continue
        fidelity = json.loads(_git_show(root, refs[p.name], "reports/fidelity.json")).get("classes", {})
        quality = json.loads(_git_show(root, refs[p.name], "reports/quality.json")).get("classes", {})
        for code in sorted(set(fidelity) | set(quality)):
            q = quality.get(code, {})
            shown = {k: "flagged" if k in q.get("flags", {}) else q.get(k) for k in ("fid", "kid_mean", "mask_iou")}
            rows.append({"class": code, "method": p.method,
                         "fidelity": fidelity.get(code, {}).get("augmented", {}).get("share_own_class"),
                         "fid": shown["fid"], "kid": shown["kid_mean"], "mask_iou": shown["mask_iou"],
                         "memorized": f"{q.get('n_memorized', '–')} / {q.get('n_synthetic', '–')}"})
    return pd.DataFrame(rows, columns=["class", "method", "fidelity", "fid", "kid", "mask_iou", "memorized"])


def axis_rows(frame: pd.DataFrame, axis: str, params: Params) -> pd.DataFrame:
    """The amount axis's rows at data.real_per_class, the scarcity axis's (capped points) at generate.per_class."""
    if axis == "amount":
        return frame[frame["real_per_class"].map(lambda k: k == params.data.real_per_class)]
    capped = frame["real_per_class"].map(lambda k: k is not None)
    return frame[capped & (frame["amount"] == params.generate.per_class)].astype({"real_per_class": int})


def plot(rows: pd.DataFrame, x: str, xlabel: str):
    """Gain against ``x``: a line per method (augmented), one per control present in ``rows`` (the mean over
    methods: a control does not depend on the method), 95% CI bars where known: the figure, for write_figure."""
    from matplotlib.figure import Figure  # not pyplot: no backend to choose, no global figure to close

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()

    def line(points: pd.DataFrame, prefix: str, label: str, **style) -> None:
        points = points.dropna(subset=[f"{prefix}gain"]).sort_values(x)
        if points.empty:
            return
        gain, low, high = (100 * points[f"{prefix}{c}"] for c in CI_COLUMNS)
        err = None if low.isna().all() else [(gain - low).fillna(0), (high - gain).fillna(0)]
        ax.errorbar(points[x], gain, yerr=err, marker="o", capsize=3, label=label, **style)

    for method, points in rows.groupby("method"):
        line(points, "", label=method)
    for variant, style in (("base_only", {"ls": ":", "color": "grey"}), ("real_ceiling", {"ls": "--", "color": "black"})):
        columns = [f"{variant}_{c}" for c in CI_COLUMNS]
        line(rows.groupby(x, as_index=False)[columns].mean(), f"{variant}_", label=variant, **style)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    if x == "real_per_class":  # caps grow roughly geometrically (5, 10, 20, 50)
        ax.set_xscale("log")
        ax.set_xticks(sorted(rows[x].unique()), [str(k) for k in sorted(rows[x].unique())])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("balanced accuracy gain (pp), 95% CI")
    ax.set_title("gain over baseline on the real test split")
    ax.legend()
    return fig


def _cell(value, spec: str = ".3f") -> str:
    """A table cell: text as it is, "–" for a missing figure."""
    if isinstance(value, str):
        return value
    return "–" if value is None or pd.isna(value) else format(value, spec)


def markdown(frame: pd.DataFrame, charts: list[str], classes: pd.DataFrame | None = None) -> str:
    controls = [v for v in CONTROLS if frame[f"{v}_gain"].notna().any()]
    lines = ["# Sweep: method × synthetic amount, method × real images per class", "",
             "Balanced accuracy on the real test split; gain = augmented − baseline with its paired-bootstrap 95% CI"
             f"{''.join(f'; {v} gain = {v} − baseline' for v in controls)}. Amount 0 is the baseline (no synthetic "
             "image). Real per class: data.real_per_class, the classifier's real train images per class (all: no cap).",
             "", *[f"![{name[:-4].replace('_', ' ')}]({name})" for name in charts], "",
             "| method | synthetic per class | real per class | experiment | baseline | augmented | gain | 95% CI | "
             + "".join(f"{v} gain | " for v in controls) + "verdict |",
             "|---|---:|---:|---|---:|---:|---:|---|" + "---:|" * len(controls) + "---|"]
    for r in frame.to_dict("records"):
        lines.append(f"| {r['method']} | {r['amount']} | {_cap_label(r['real_per_class'])} | {r['experiment']} | "
                     f"{r['baseline']:.3f} | {r['augmented']:.3f} | {r['gain']:+.3f} | {r['ci_low']:+.3f} .. "
                     f"{r['ci_high']:+.3f} | " + "".join(f"{_cell(r[f'{v}_gain'], '+.3f')} | " for v in controls)
                     + f"{r['verdict']} |")
    best = frame[frame.amount > 0].sort_values("gain").iloc[-1]
    lines += ["", f"Best point: **{best.method}** with {best.amount} synthetic images per class at "
              f"{_cap_label(best.real_per_class)} real per class, gain {best.gain:+.3f} "
              f"({best.verdict}){'' if best.gain > 0 else '; no point beat the baseline'}."]
    if classes is not None and not classes.empty:
        lines += ["", "## Per class, by method", "",
                  "At the configured synthetic and real images per class. Fidelity: the oracle's share of the class's "
                  "synthetic images in their own class; FID and KID against the class's real train images "
                  "(reports/quality.json); mask IoU under diffusion.control mask.", "",
                  "| class | method | fidelity | FID | KID | memorized | mask IoU |", "|---|---|---:|---:|---:|---|---:|"]
        lines += [f"| {r['class']} | {r['method']} | {_cell(r['fidelity'])} | {_cell(r['fid'])} | {_cell(r['kid'])} | "
                  f"{r['memorized']} | {_cell(r['mask_iou'])} |" for r in classes.to_dict("records")]
    return "\n".join(lines) + "\n"


def write_outputs(frame: pd.DataFrame, params: Params, root: Path, sweep_id: str,
                  classes: pd.DataFrame | None = None) -> Path:
    folder = root / REPORTS_DIR / "sweep"
    charts = []
    for axis, (name, xlabel) in CHARTS.items():
        rows = axis_rows(frame, axis, params)
        if axis == "amount" or rows["real_per_class"].nunique() > 0:
            write_figure(folder / name, plot(rows, axis, xlabel), dpi=120)
            charts.append(name)
    write_text(folder / "sweep.md", markdown(frame, charts, classes))
    points = frame.astype(object).where(frame.notna(), None).to_dict("records")  # NaN: a control not run
    write_json(folder / "sweep.json", {"sweep_id": sweep_id, "metric": METRIC, "points": points})
    _log_to_mlflow(frame, params, folder, sweep_id, charts)
    return folder / "sweep.md"


def _log_to_mlflow(frame: pd.DataFrame, params: Params, folder: Path, sweep_id: str, charts: list[str]) -> None:
    mlflow = tracking.configured_mlflow()
    experiment_id = tracking.ensure_experiment(params.mlflow.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep {sweep_id}",
                          tags={"kind": "sweep", "sweep_id": sweep_id}):
        ran = frame[frame.amount > 0].to_dict("records")
        gains = {f"gain_{r['method']}_{r['amount']}_real{_cap_label(r['real_per_class'])}": r["gain"] for r in ran}
        for variant in CONTROLS:  # one figure per (amount, cap): a control does not depend on the method
            gains.update({f"gain_{variant}_{r['amount']}_real{_cap_label(r['real_per_class'])}": r[f"{variant}_gain"]
                          for r in ran if not pd.isna(r[f"{variant}_gain"])})
        mlflow.log_metrics(gains)
        for name in (*charts, "sweep.md", "sweep.json"):
            mlflow.log_artifact(str(folder / name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--id", default=time.strftime("sweep%Y%m%d-%H%M%S"), help="prefix of the experiment names")
    args = parser.parse_args(argv)
    try:
        root = workspace_root()
        params = load_params(root / args.params)
        points, s = plan(params, args.id), params.sweep
        print(f"sweep {args.id}: {len(points)} experiments ({', '.join(s.methods)} × {s.amounts} synthetic per class "
              f"at {_cap_label(params.data.real_per_class)} real, and × {s.real_per_class} real per class at "
              f"{params.generate.per_class} synthetic), {s.jobs} at a time")
        queue(points, params, root)
        run_queue(points, root, s.jobs, s.timeout_minutes * 60)
        summary = write_outputs(collect(points, root), params, root, args.id, per_class(points, root, params))
    except PipelineError as exc:
        print(f"error: sweep: {exc}", file=sys.stderr)
        return 1
    print(f"sweep: wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
