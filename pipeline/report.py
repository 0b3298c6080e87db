"""The report stage: ``reports/summary.md``, the one page a person reads, answer first, and the headline.

Everything on the page is derived from files earlier stages wrote (reports/data.json, reports/metrics.json,
reports/fidelity.json, reports/quality.json, reports/plots/confusion_*.csv, reports/train/*.json, split.csv, the synthetic manifests), so
it can be regenerated without touching a model. Figures go to ``reports/figures/`` and are linked relatively; the
per-class gain's data sits beside its PNG as a DVC plot.

The headline (each variant's balanced accuracy, each gain over baseline with its 95% CI, the recovered share of the
real ceiling's gain, mean class fidelity, the verdict) goes to ``reports/headline.json``, the first metrics file in dvc.yaml so ``dvc exp show`` leads with it,
and onto the execution's parent MLflow run, so MLflow's runs table compares experiments on the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_dir, atomic_file, read_json, write_json, write_text
from pipeline.classifier.evaluate import METRICS_JSON, confusion_csv, plot_confusion, verdict_lines
from pipeline.classifier.oracle import FIDELITY_JSON, SOURCES, fidelity_lines
from pipeline.classifier.metrics import HEADLINE
from pipeline.classifier.train import VARIANTS
from pipeline.errors import PipelineError
from pipeline.params import CLASS_NAMES, Params
from pipeline.paths import REPORTS_DIR, SYNTHETIC_DIR, workspace_root
from pipeline.quality.screen import QUALITY_JSON

SUMMARY_MD = REPORTS_DIR / "summary.md"
FIGURES_DIR = REPORTS_DIR / "figures"
DATA_JSON = REPORTS_DIR / "data.json"
HEADLINE_JSON = REPORTS_DIR / "headline.json"
GAIN_PLOT_JSON = FIGURES_DIR / "per_class_gain.json"  # the data of per_class_gain.png, a DVC plot
HEADLINE_METRIC = "balanced_accuracy"
SAMPLES_PER_SIDE = 4
_METRIC_LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "macro_recall": "macro recall",
    "macro_f1": "macro F1",
    "auroc_macro": "macro AUROC (one-vs-rest)",
    "accuracy": "accuracy",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path) as temp:
        fig.savefig(temp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def _synthetic_files(root: Path, class_code: str) -> list[Path]:
    """The class's synthetic PNGs listed in its manifest (empty when the class has none)."""
    manifest = root / SYNTHETIC_DIR / class_code / "manifest.csv"
    if not manifest.is_file():
        return []
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    return [root / SYNTHETIC_DIR / class_code / name for name in frame.get("file", [])]


# ----------------------------------------------------------------------------- figures

def samples_figure(params: Params, root: Path, split: pd.DataFrame, path: Path) -> None:
    """A row per class: a few real train images | a few synthetic ones, drawn with ``params.seed``."""
    from pipeline.data.images import open_rgb, resize_square

    plt = _pyplot()
    classes = list(params.data.classes)
    size = 96
    rng = np.random.default_rng(params.seed)
    cols = 2 * SAMPLES_PER_SIDE
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 1.1, len(classes) * 1.15 + 0.4), squeeze=False)
    for row, class_code in enumerate(classes):
        real = split.loc[(split["dx"] == class_code) & (split["split"] == "train"), "abs_path"].tolist()
        synthetic = _synthetic_files(root, class_code)
        picks = [rng.choice(len(real), min(SAMPLES_PER_SIDE, len(real)), replace=False) if real else [],
                 rng.choice(len(synthetic), min(SAMPLES_PER_SIDE, len(synthetic)), replace=False) if synthetic else []]
        for side, (files, chosen) in enumerate(zip((real, synthetic), picks)):
            for k in range(SAMPLES_PER_SIDE):
                ax = axes[row, side * SAMPLES_PER_SIDE + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(chosen):
                    ax.imshow(resize_square(open_rgb(files[chosen[k]]), size))
                else:
                    ax.set_facecolor("#eeeeee")
                if row == 0 and k == 0:
                    ax.set_title("real (train)" if side == 0 else "synthetic", loc="left", fontsize=9)
        axes[row, 0].set_ylabel(class_code, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle("Real training images vs synthetic images, per class", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def confusion_figure(classes: list[str], root: Path, metrics: dict, path: Path) -> None:
    """Row-normalised confusion matrices of both variants side by side (the evaluate stage's CSVs)."""
    from pipeline.classifier.metrics import confusion

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(2.6 + 1.4 * len(classes), 1.2 + 0.75 * len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for ax, variant in zip(axes, VARIANTS):
        table = pd.read_csv(root / confusion_csv(variant), dtype=str, keep_default_na=False)
        matrix = confusion(table["actual"].map(index).to_numpy(), table["predicted"].map(index).to_numpy(), len(classes))
        ba = metrics[variant]["balanced_accuracy"]
        plot_confusion(ax, matrix, classes, f"{variant}: balanced acc {ba:.3f}", normalize=True)
    fig.tight_layout()
    _save(fig, path)


def per_class_gains(classes: list[str], metrics: dict) -> list[dict]:
    """Per-class recall gain (augmented − baseline) with its 95% bootstrap CI: the rows of the gain chart."""
    rows = []
    for class_code in classes:
        key = f"recall_{class_code}"
        if key in metrics["gain"]:
            gain = metrics["gain"][key]
            ci = metrics["gain_ci95"].get(key, {"low": gain, "high": gain})
            rows.append({"class": class_code, "gain": gain, "ci_low": ci["low"], "ci_high": ci["high"]})
    return rows


def gain_figure(rows: list[dict], path: Path) -> None:
    """The ``per_class_gains`` rows as bars with their CI."""
    plt = _pyplot()
    shown = [r["class"] for r in rows]
    gains = np.array([r["gain"] for r in rows])
    errors = np.array([[r["gain"] - r["ci_low"] for r in rows], [r["ci_high"] - r["gain"] for r in rows]]).clip(min=0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(shown), 1), 3.2))
    ax.bar(shown, gains, color=["#2e7d32" if g > 0 else "#c62828" for g in gains], yerr=errors if len(shown) else None,
           capsize=4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("recall gain (augmented − baseline)")
    ax.set_title("Per-class recall gain, 95% paired bootstrap CI", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def curves_figure(root: Path, path: Path) -> bool:
    """Validation balanced accuracy per epoch for each variant and seed (from reports/train/*.json); False if absent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    drawn = False
    for variant, style in zip(VARIANTS, ("-", "--")):
        report = root / REPORTS_DIR / "train" / f"{variant}.json"
        if not report.is_file():
            continue
        for seed, result in json.loads(report.read_text()).get("seeds", {}).items():
            history = result.get("history", [])
            ax.plot([h["epoch"] for h in history], [h["val_balanced_accuracy"] for h in history], style, marker="o",
                    markersize=3, label=f"{variant} seed {seed}")
            drawn = drawn or bool(history)
    if drawn:
        ax.set_xlabel("epoch")
        ax.set_ylabel("val balanced accuracy")
        ax.legend(fontsize=8)
        ax.set_title("Validation balanced accuracy during training", fontsize=10)
        fig.tight_layout()
        _save(fig, path)
    else:
        _pyplot().close(fig)
    return drawn


# ----------------------------------------------------------------------------- headline

def headline(metrics: dict, fidelity: dict) -> dict[str, float]:
    """The numbers an experiment is compared by, flat and in reading order: every evaluated variant's balanced
    accuracy, every gain over baseline with its 95% CI, the share of the real ceiling's gain the synthetic images
    recover (when defined), then each synthetic source's mean class fidelity (reports/fidelity.json)."""
    variants = metrics.get("variants", [v for v in VARIANTS if v in metrics])
    values = {f"{HEADLINE_METRIC}_{v}": metrics[v][HEADLINE_METRIC] for v in variants}
    for variant, gain in metrics.get("gain_over_baseline", {}).items():
        values.update({f"gain_{variant}": gain[HEADLINE_METRIC], f"gain_{variant}_ci_low": gain["ci_low"],
                       f"gain_{variant}_ci_high": gain["ci_high"]})
    share = metrics.get("recovered_share") or {}
    if share.get("defined"):
        values.update({"recovered_share": share["value"], "recovered_share_ci_low": share["ci_low"],
                       "recovered_share_ci_high": share["ci_high"]})
    for source, mean in fidelity.get("mean", {}).items():
        if isinstance(mean, dict) and mean.get("share_own_class") is not None:
            values[f"fidelity_{source}_mean"] = mean["share_own_class"]
    return values


# ----------------------------------------------------------------------------- markdown

def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _with_std(stats: dict, key: str) -> str:
    if key not in stats:
        return "—"
    std = stats.get(f"{key}_std", 0.0)
    return f"{stats[key]:.3f} ± {std:.3f}" if stats.get("n_seeds", 1) > 1 else f"{stats[key]:.3f}"


def _ci(metrics: dict, key: str) -> str:
    ci = metrics.get("gain_ci95", {}).get(key)
    return f"[{ci['low']:+.3f}, {ci['high']:+.3f}]" if ci else "—"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def data_table(params: Params, data: dict, split: pd.DataFrame, synthetic: dict[str, int]) -> str:
    """Counts per class from reports/data.json (prepare's own numbers), falling back to split.csv."""
    per_class = data.get("classes", {}) if isinstance(data, dict) else {}
    rows = []
    for class_code in params.data.classes:
        counts = per_class.get(class_code) or {}
        frame = split[split["dx"] == class_code]
        value = {s: counts.get(s, int((frame["split"] == s).sum())) for s in ("train", "val", "test")}
        rows.append([f"`{class_code}`", CLASS_NAMES[class_code], str(value["train"]), str(value["val"]), str(value["test"]),
                     str(counts.get("lesions", frame["lesion_id"].nunique())), str(counts.get("finetune", "—")),
                     str(synthetic[class_code])])
    rows.append(["**all**", "", *[f"**{sum(int(r[i]) for r in rows)}**" for i in (2, 3, 4, 5)],
                 f"**{sum(int(r[6]) for r in rows if r[6] != '—')}**", f"**{sum(synthetic.values())}**"])
    return _table(["class", "diagnosis", "train", "val", "test", "lesions", "fine-tune", "synthetic"], rows)


def fidelity_table(fidelity: dict, classes: list[str]) -> str:
    """Per class: the oracle's recall on real test images, then each source's share assigned to its own class and
    mean p(own class)."""
    header = ["class", "oracle recall (real test)"]
    header += [f"{s} {what}" for s in SOURCES for what in ("share own class", "p(own class)")]
    rows = []
    for class_code in [*classes, "mean"]:
        entry = fidelity["mean"] if class_code == "mean" else fidelity["classes"].get(class_code, {})
        recall = entry.get("oracle_test_recall")
        cells = [_fmt(entry.get(s, {}).get(k)) for s in SOURCES for k in ("share_own_class", "mean_p_own_class")]
        name = "**mean**" if class_code == "mean" else f"`{class_code}`"
        rows.append([name, _fmt(recall), *cells])
    return _table(header, rows)


def quality_table(quality: dict, classes: list[str]) -> str:
    """Per class: FID and KID beside the same figures between two sets of real images (their floor at this size),
    k-NN precision and recall, memorized and kept images, and any figure the screen flagged as out of range; under
    diffusion.control mask also the mask IoU beside the segmenter's IoU on real images."""
    entries = [quality.get("classes", {}).get(class_code, {}) for class_code in classes]
    with_masks = any("mask_iou" in q for q in entries)
    rows = []
    for class_code, q in zip(classes, entries):
        flags = "; ".join(f"{key}: {why}" for key, why in q.get("flags", {}).items()) or "—"
        masks = [f"{_fmt(q.get('mask_iou'))} ({_fmt(q.get('mask_iou_real'))})"] if with_masks else []
        rows.append([f"`{class_code}`", f"{_fmt(q.get('fid'))} ({_fmt(q.get('fid_real_vs_real'))})",
                     f"{_fmt(q.get('kid_mean'))} ({_fmt(q.get('kid_real_vs_real'))})", _fmt(q.get("precision")),
                     _fmt(q.get("recall")), f"{q.get('n_memorized', '—')} / {q.get('n_synthetic', '—')}",
                     str(q.get("n_kept", "—")), *masks, flags])
    return _table(["class", "FID (real vs real)", "KID (real vs real)", "precision", "recall", "memorized",
                   "kept", *(["mask IoU (real)"] if with_masks else []), "flagged"], rows)


def render(params: Params, metrics: dict, data: dict, split: pd.DataFrame, synthetic: dict[str, int], curves: bool,
           evidence: dict) -> str:
    """The page. ``evidence``: reports/fidelity.json and reports/quality.json as {"fidelity": ..., "quality": ...},
    either empty when its stage has not run."""
    classes = list(params.data.classes)
    fidelity, quality = evidence.get("fidelity") or {}, evidence.get("quality") or {}
    base, aug, gain = metrics["baseline"], metrics["augmented"], metrics["gain"]
    low_high = metrics["gain_ci95"].get("balanced_accuracy", {"low": float("nan"), "high": float("nan")})
    c = params.classifier
    n_seeds = len(metrics.get("seeds", c.seeds))
    seeds_note = f"mean over {n_seeds} seeds" if n_seeds > 1 else f"seed {metrics.get('seeds', c.seeds)[0]}"
    answer = metrics["verdict"]
    lines = [
        "# lesion-synth: do synthetic images help the classifier?",
        "",
        f"**{answer[0].upper() + answer[1:]}.** Balanced accuracy on the held-out real test set "
        f"({base['n_test']} images): baseline **{_fmt(base['balanced_accuracy'])}** → augmented "
        f"**{_fmt(aug['balanced_accuracy'])}**, gain **{_fmt(gain['balanced_accuracy'], True)}** "
        f"(95% CI {_fmt(low_high['low'], True)} to {_fmt(low_high['high'], True)}; paired bootstrap over test images, "
        f"{metrics.get('bootstrap', params.evaluate.bootstrap)} resamples, {seeds_note}).",
        "",
        *[f"- {line}" for line in [*verdict_lines(metrics)[1:], *(fidelity_lines(fidelity) if fidelity else [])]],
        "",
        f"Setup: classes {', '.join(f'`{x}`' for x in classes)}; synthetic images from per-class "
        f"{params.diffusion.method} fine-tuning of `{params.diffusion.base_model}` ({sum(synthetic.values())} in total); "
        f"classifier `{c.arch}` at {c.image_size}px, ≤{c.epochs} epochs (best on val balanced accuracy), "
        f"balancing `{c.balance}`, pretrained={str(c.pretrained).lower()}. Val and test images are real only; "
        "the augmented model trains on the same real images plus the synthetic ones.",
        "",
        "## Data",
        "",
        data_table(params, data, split, synthetic),
        "",
        "Splits are grouped by lesion (no lesion in two splits); fine-tuning images come from train only.",
        "",
        "## Baseline vs augmented",
        "",
        _table(["metric", "baseline", "augmented", "gain", "95% CI of gain"],
               [[_METRIC_LABELS[k], _with_std(base, k), _with_std(aug, k), _fmt(gain.get(k), True), _ci(metrics, k)]
                for k in HEADLINE if k in base and k in aug]),
        "",
        "Macro recall over the classes present in the test set is balanced accuracy by definition.",
        "",
        "## Per-class recall",
        "",
    ]
    test_counts = metrics.get("test_counts", {})
    rows = []
    for class_code in classes:
        key, prec = f"recall_{class_code}", f"precision_{class_code}"
        rows.append([f"`{class_code}`", str(test_counts.get(class_code, "—")), _with_std(base, key), _with_std(aug, key),
                     _fmt(gain.get(key), True), _ci(metrics, key), _with_std(base, prec), _with_std(aug, prec)])
    lines += [
        _table(["class", "test images", "recall baseline", "recall augmented", "gain", "95% CI",
                "precision baseline", "precision augmented"], rows),
        "",
        "![Per-class recall gain](figures/per_class_gain.png)",
        "",
        "## Did the fine-tune learn the class?",
        "",
        *([fidelity_table(fidelity, classes), "",
           "An oracle classifier, trained on every real train and reserve image (never val, test or synthetic), "
           "judges each class's synthetic images; its recall on the real test images says how far to trust it."]
          if fidelity else ["No class fidelity: run `dvc repro fidelity`."]),
        "",
        "## Synthetic image quality",
        "",
        *([quality_table(quality, classes), "",
           f"Features: {quality.get('extractor', '—')}; in brackets the same figure between two sets of real train "
           "images of the class, the floor at this size. Memorized: a synthetic image that copies a fine-tuning "
           "image (`reports/quality/closest_<class>.png`). Mask IoU (under `diffusion.control: mask`): the overlap of "
           "each image's conditioning mask with its lesion as an Otsu split of the colour distance from the skin "
           "finds it; in brackets that segmenter's IoU on real train images against their own masks."] if quality else ["No quality figures: run `dvc repro screen`."]),
        "",
        "## Real vs synthetic samples",
        "",
        "![Real training images (left) and synthetic images (right), one row per class](figures/samples.png)",
        "",
        "## Confusion matrices",
        "",
        f"Row-normalised (each row is an actual class; the diagonal is its recall), {seeds_note.replace('mean over', 'first of')}.",
        "",
        "![Confusion matrices of both variants](figures/confusion.png)",
        "",
    ]
    if curves:
        lines += ["## Training", "", "![Validation balanced accuracy per epoch](figures/training_curves.png)", ""]
    lines += [
        "---",
        "Numbers: `reports/metrics.json` (all metrics, gains and CIs), `reports/train/*.json` (per-seed training). "
        "Runs: MLflow experiment "
        f"`{params.mlflow.experiment}`: the parent run of each execution holds this headline "
        "(`reports/headline.json`), its `evaluate@<variant>` children each variant's test metrics. "
        "Which method and how many images per class: `make sweep` writes [sweep/sweep.md](sweep/sweep.md) "
        "(a gain-vs-amount chart per method, one queued DVC experiment per point).",
        "",
    ]
    return "\n".join(lines)


def report(params: Params) -> Path:
    """Write reports/summary.md, reports/figures/ and reports/headline.json, log them to MLflow (the headline onto this
    execution's parent run), and close the parent run."""
    from pipeline import tracking
    from pipeline.classifier.dataset import read_split

    root = workspace_root()
    classes = list(params.data.classes)
    metrics = read_json(root / METRICS_JSON, "not found; run `dvc repro evaluate` first")
    missing = [v for v in (*VARIANTS, "gain", "gain_ci95", "verdict") if v not in metrics]
    if missing:
        raise PipelineError(f"{root / METRICS_JSON}: missing key {missing[0]!r}; rerun `dvc repro evaluate`")
    data = read_json(root / DATA_JSON, "not found; run `dvc repro prepare` first") if (root / DATA_JSON).exists() else {}
    fidelity = read_json(root / FIDELITY_JSON, "not found; run `dvc repro fidelity` first") if (root / FIDELITY_JSON).exists() else {}
    quality = read_json(root / QUALITY_JSON, "not found; run `dvc repro screen` first") if (root / QUALITY_JSON).exists() else {}
    split = read_split(params, root)
    synthetic = {c: len(_synthetic_files(root, c)) for c in classes}

    figures = root / FIGURES_DIR
    gains = per_class_gains(classes, metrics)
    with atomic_dir(figures) as temp:  # the folder is replaced whole: no stale figure survives a rerun
        samples_figure(params, root, split, temp / "samples.png")
        confusion_figure(classes, root, metrics, temp / "confusion.png")
        gain_figure(gains, temp / "per_class_gain.png")
        write_json(temp / GAIN_PLOT_JSON.name, gains)
        curves = curves_figure(root, temp / "training_curves.png")
    evidence = {"fidelity": fidelity, "quality": quality}
    write_text(root / SUMMARY_MD, render(params, metrics, data, split, synthetic, curves, evidence))
    values = headline(metrics, fidelity)
    write_text(root / HEADLINE_JSON, json.dumps({**values, "verdict": metrics["verdict"]}, indent=2) + "\n")

    for figure in sorted(figures.glob("*.png")):
        tracking.log_artifact(figure, artifact_path="figures")
    tracking.log_artifact(root / SUMMARY_MD)
    tracking.log_headline(params, values, {"verdict": metrics["verdict"]})
    tracking.finish_parent(params)
    print(f"report: {root / SUMMARY_MD} ({metrics['verdict']})")
    return root / SUMMARY_MD
