"""The report stage: ``reports/summary.md``, the one page a person reads, answer first, from files earlier stages
wrote (no model); the headline to ``reports/headline.json`` and the parent MLflow run (docs/architecture.md)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no backend to choose, no global figure to close
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, read_json, write_figure, write_json, write_text
from pipeline.classifier.evaluate import METRICS_JSON, confusion_csv, plot_confusion, verdict_lines
from pipeline.classifier.metrics import HEADLINE
from pipeline.classifier.dataset import read_split, synthetic_samples
from pipeline.classifier.oracle import FIDELITY_JSON, SOURCES, fidelity_lines
from pipeline.classifier.train import VARIANTS
from pipeline.data.images import open_rgb, resize_square
from pipeline.data.split import DATA_JSON
from pipeline.core.errors import PipelineError
from pipeline.core.params import CLASS_NAMES, Params
from pipeline.core.paths import REPORTS_DIR, workspace_root
from pipeline.quality.screen import QUALITY_JSON

SUMMARY_MD = REPORTS_DIR / "summary.md"
FIGURES_DIR = REPORTS_DIR / "figures"
HEADLINE_JSON = REPORTS_DIR / "headline.json"
SAMPLES_PER_SIDE = 4
_METRIC_LABELS = {"balanced_accuracy": "balanced accuracy", "macro_recall": "macro recall", "macro_f1": "macro F1",
                  "auroc_macro": "macro AUROC (one-vs-rest)", "accuracy": "accuracy"}


def samples_figure(params: Params, split: pd.DataFrame, synthetic: dict[str, list[Path]], path: Path) -> None:
    """A row per class: a few real train images | a few synthetic ones, drawn with ``params.seed``."""
    classes = list(params.data.classes)
    rng = np.random.default_rng(params.seed)
    cols = 2 * SAMPLES_PER_SIDE
    fig = Figure(figsize=(cols * 1.1, len(classes) * 1.15 + 0.4))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    for row, class_code in enumerate(classes):
        real = split.loc[(split["dx"] == class_code) & (split["split"] == "train"), "abs_path"].tolist()
        for side, files in enumerate((real, synthetic[class_code])):
            chosen = rng.choice(len(files), min(SAMPLES_PER_SIDE, len(files)), replace=False) if files else []
            for k in range(SAMPLES_PER_SIDE):
                ax = axes[row, side * SAMPLES_PER_SIDE + k]
                ax.set(xticks=[], yticks=[])
                if k < len(chosen):
                    ax.imshow(resize_square(open_rgb(files[chosen[k]]), 96))
                else:
                    ax.set_facecolor("#eeeeee")
                if row == 0 and k == 0:
                    ax.set_title("real (train)" if side == 0 else "synthetic", loc="left", fontsize=9)
        axes[row, 0].set_ylabel(class_code, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle("Real training images vs synthetic images, per class", fontsize=10)
    write_figure(path, fig)


def confusion_figure(classes: list[str], root: Path, metrics: dict, path: Path) -> None:
    """Row-normalised confusion matrices of both variants side by side (the evaluate stage's CSVs)."""
    fig = Figure(figsize=(2.6 + 1.4 * len(classes), 1.2 + 0.75 * len(classes)))
    axes = fig.subplots(1, 2)
    for ax, variant in zip(axes, VARIANTS):
        table = pd.read_csv(root / confusion_csv(variant), dtype=str, keep_default_na=False)
        matrix = confusion_matrix(table["actual"], table["predicted"], labels=classes)
        ba = metrics[variant]["balanced_accuracy"]
        plot_confusion(ax, matrix, classes, f"{variant}: balanced acc {ba:.3f}", normalize=True)
    write_figure(path, fig)


def per_class_gains(classes: list[str], metrics: dict) -> list[dict]:
    """Per-class recall gain (augmented − baseline) with its 95% bootstrap CI: the rows of the gain chart."""
    gains = {c: metrics["gain"][f"recall_{c}"] for c in classes if f"recall_{c}" in metrics["gain"]}
    cis = {c: metrics["gain_ci95"].get(f"recall_{c}", {"low": g, "high": g}) for c, g in gains.items()}
    return [{"class": c, "gain": g, "ci_low": cis[c]["low"], "ci_high": cis[c]["high"]} for c, g in gains.items()]


def gain_figure(rows: list[dict], path: Path) -> None:
    """The ``per_class_gains`` rows as bars with their CI."""
    shown = [r["class"] for r in rows]
    gains = np.array([r["gain"] for r in rows])
    errors = np.array([[r["gain"] - r["ci_low"] for r in rows], [r["ci_high"] - r["gain"] for r in rows]]).clip(min=0)
    fig = Figure(figsize=(1.2 + 0.9 * max(len(shown), 1), 3.2))
    ax = fig.subplots()
    ax.bar(shown, gains, color=["#2e7d32" if g > 0 else "#c62828" for g in gains], yerr=errors if len(shown) else None,
           capsize=4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("recall gain (augmented − baseline)")
    ax.set_title("Per-class recall gain, 95% paired bootstrap CI", fontsize=10)
    write_figure(path, fig)


def curves_figure(root: Path, path: Path) -> None:
    """Validation balanced accuracy per epoch for each variant and seed (from reports/train/*.json)."""
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    for variant, style in zip(VARIANTS, ("-", "--")):  # never skipped: both always have a history
        train = read_json(root / REPORTS_DIR / "train" / f"{variant}.json", "not found; run `dvc repro train`")
        for seed, result in train["seeds"].items():
            history = result["history"]
            ax.plot([h["epoch"] for h in history], [h["val_balanced_accuracy"] for h in history], style, marker="o",
                    markersize=3, label=f"{variant} seed {seed}")
    ax.set(xlabel="epoch", ylabel="val balanced accuracy")
    ax.legend(fontsize=8)
    ax.set_title("Validation balanced accuracy during training", fontsize=10)
    write_figure(path, fig)


def headline(metrics: dict, fidelity: dict) -> dict[str, float]:
    """The numbers an experiment is compared by, flat and in reading order (reports/headline.json)."""
    values = {f"balanced_accuracy_{v}": metrics[v]["balanced_accuracy"] for v in metrics["variants"]}
    for variant, gain in metrics.get("gain_over_baseline", {}).items():
        values.update({f"gain_{variant}": gain["balanced_accuracy"], f"gain_{variant}_ci_low": gain["ci_low"],
                       f"gain_{variant}_ci_high": gain["ci_high"]})
    share = metrics.get("recovered_share") or {}
    if share.get("defined"):
        values.update({"recovered_share": share["value"], "recovered_share_ci_low": share["ci_low"],
                       "recovered_share_ci_high": share["ci_high"]})
    for source, mean in fidelity.get("mean", {}).items():
        if isinstance(mean, dict) and mean.get("share_own_class") is not None:
            values[f"fidelity_{source}_mean"] = mean["share_own_class"]
    return values


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _with_std(stats: dict, key: str) -> str:
    if key not in stats:
        return "—"
    return f"{stats[key]:.3f} ± {stats[f'{key}_std']:.3f}" if stats["n_seeds"] > 1 else f"{stats[key]:.3f}"


def _ci(metrics: dict, key: str) -> str:
    ci = metrics["gain_ci95"].get(key)
    return f"[{ci['low']:+.3f}, {ci['high']:+.3f}]" if ci else "—"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def data_table(classes: list[str], data: dict, synthetic: dict[str, int]) -> str:
    """Images per class and split, lesions and fine-tuning images (reports/data.json), synthetic images (manifests)."""
    counts = [[data["classes"][c][k] for k in ("train", "val", "test", "lesions", "finetune")] + [synthetic[c]]
              for c in classes]
    rows = [[f"`{c}`", CLASS_NAMES[c], *map(str, row)] for c, row in zip(classes, counts)]
    rows.append(["**all**", "", *(f"**{sum(column)}**" for column in zip(*counts))])
    return _table(["class", "diagnosis", "train", "val", "test", "lesions", "fine-tune", "synthetic"], rows)


def fidelity_table(fidelity: dict, classes: list[str]) -> str:
    """Per class: the oracle's recall on real test images, then each source's share and p of its own class."""
    header = ["class", "oracle recall (real test)"]
    header += [f"{s} {what}" for s in SOURCES for what in ("share own class", "p(own class)")]
    rows = []
    for class_code in [*classes, "mean"]:
        entry = fidelity["mean"] if class_code == "mean" else fidelity["classes"].get(class_code, {})
        cells = [_fmt(entry.get(s, {}).get(k)) for s in SOURCES for k in ("share_own_class", "mean_p_own_class")]
        name = "**mean**" if class_code == "mean" else f"`{class_code}`"
        rows.append([name, _fmt(entry.get("oracle_test_recall")), *cells])
    return _table(header, rows)


def quality_table(quality: dict, classes: list[str]) -> str:
    """Per class: FID and KID beside their real-vs-real floor, precision, recall, memorized, kept, mask IoU, flags."""
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


def render(params: Params, metrics: dict, data: dict, synthetic: dict[str, int], fidelity: dict, quality: dict) -> str:
    """The page; ``fidelity`` and ``quality`` are empty when their stage has not run."""
    classes = list(params.data.classes)
    base, aug, gain = metrics["baseline"], metrics["augmented"], metrics["gain"]
    low_high = metrics["gain_ci95"]["balanced_accuracy"]
    c = params.classifier
    seeds = metrics["seeds"]
    seeds_note = f"mean over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    answer = metrics["verdict"]
    per_class = [[f"`{code}`", str(metrics["test_counts"].get(code, "—")), _with_std(base, f"recall_{code}"),
                  _with_std(aug, f"recall_{code}"), _fmt(gain.get(f"recall_{code}"), True),
                  _ci(metrics, f"recall_{code}"), _with_std(base, f"precision_{code}"),
                  _with_std(aug, f"precision_{code}")] for code in classes]
    blocks = [  # paragraphs, tables and headings, a blank line between each two
        "# lesion-synth: do synthetic images help the classifier?",
        f"**{answer[0].upper() + answer[1:]}.** Balanced accuracy on the held-out real test set "
        f"({base['n_test']} images): baseline **{_fmt(base['balanced_accuracy'])}** → augmented "
        f"**{_fmt(aug['balanced_accuracy'])}**, gain **{_fmt(gain['balanced_accuracy'], True)}** "
        f"(95% CI {_fmt(low_high['low'], True)} to {_fmt(low_high['high'], True)}; paired bootstrap over test images, "
        f"{metrics['bootstrap']} resamples, {seeds_note}).",
        "\n".join(f"- {line}" for line in verdict_lines(metrics)[1:] + (fidelity_lines(fidelity) if fidelity else [])),
        f"Setup: classes {', '.join(f'`{x}`' for x in classes)}; synthetic images from per-class "
        f"{params.diffusion.method} fine-tuning of `{params.diffusion.base_model}` "
        f"({sum(synthetic.values())} in total); "
        f"classifier `{c.arch}` at {c.image_size}px, ≤{c.epochs} epochs (best on val balanced accuracy), "
        f"balancing `{c.balance}`, pretrained={str(c.pretrained).lower()}. Val and test images are real only; "
        "the augmented model trains on the same real images plus the synthetic ones.",
        "## Data",
        data_table(classes, data, synthetic),
        "Splits are grouped by lesion (no lesion in two splits); fine-tuning images come from train only.",
        "## Baseline vs augmented",
        _table(["metric", "baseline", "augmented", "gain", "95% CI of gain"],
               [[_METRIC_LABELS[k], _with_std(base, k), _with_std(aug, k), _fmt(gain.get(k), True), _ci(metrics, k)]
                for k in HEADLINE if k in base and k in aug]),
        "Macro recall over the classes present in the test set is balanced accuracy by definition.",
        "## Per-class recall",
        _table(["class", "test images", "recall baseline", "recall augmented", "gain", "95% CI",
                "precision baseline", "precision augmented"], per_class),
        "![Per-class recall gain](figures/per_class_gain.png)",
        "## Did the fine-tune learn the class?",
        *([fidelity_table(fidelity, classes),
           "An oracle classifier, trained on every real train and reserve image (never val, test or synthetic), "
           "judges each class's synthetic images; its recall on the real test images says how far to trust it."]
          if fidelity else ["No class fidelity: run `dvc repro fidelity`."]),
        "## Synthetic image quality",
        *([quality_table(quality, classes),
           f"Features: {quality.get('extractor', '—')}; in brackets the same figure between two sets of real train "
           "images of the class, the floor at this size. Memorized: a synthetic image that copies a fine-tuning "
           "image (`reports/quality/closest_<class>.png`). Mask IoU (under `diffusion.control: mask`): the overlap of "
           "each image's conditioning mask with its lesion as an Otsu split of the colour distance from the skin "
           "finds it; in brackets that segmenter's IoU on real train images against their own masks."]
          if quality else ["No quality figures: run `dvc repro screen`."]),
        "## Real vs synthetic samples",
        "![Real training images (left) and synthetic images (right), one row per class](figures/samples.png)",
        "## Confusion matrices",
        f"Row-normalised (each row is an actual class; the diagonal is its recall), "
        f"{seeds_note.replace('mean over', 'first of')}.",
        "![Confusion matrices of both variants](figures/confusion.png)",
        "## Training",
        "![Validation balanced accuracy per epoch](figures/training_curves.png)",
        "---\nNumbers: `reports/metrics.json` (all metrics, gains and CIs), `reports/train/*.json` "
        "(per-seed training). "
        f"Runs: MLflow experiment `{params.mlflow.experiment}`: the parent run of each execution holds this headline "
        "(`reports/headline.json`), its `evaluate@<variant>` children each variant's test metrics. "
        "Which method and how many images per class: `make sweep` writes [sweep/sweep.md](sweep/sweep.md) "
        "(a gain-vs-amount chart per method, one queued DVC experiment per point).",
    ]
    return "\n\n".join(blocks) + "\n"


def report(params: Params) -> Path:
    """Write summary, figures and headline, log them to MLflow (the headline onto the parent run) and close it."""
    root = workspace_root()
    classes = list(params.data.classes)
    metrics = read_json(root / METRICS_JSON, "not found; run `dvc repro evaluate` first")
    missing = [k for k in (*VARIANTS, "variants", "gain", "gain_ci95", "verdict", "seeds", "bootstrap", "test_counts")
               if k not in metrics]
    if missing:
        raise PipelineError(f"{root / METRICS_JSON}: missing key {missing[0]!r}; rerun `dvc repro evaluate`")
    data = read_json(root / DATA_JSON, "not found; run `dvc repro prepare` first")
    fidelity, quality = (read_json(path, "not found") if path.exists() else {}
                         for path in (root / FIDELITY_JSON, root / QUALITY_JSON))
    split = read_split(params, root)
    samples = synthetic_samples(params, root)
    synthetic = {c: [s.path for s in samples if s.label == label] for label, c in enumerate(classes)}

    figures = root / FIGURES_DIR
    gains = per_class_gains(classes, metrics)
    with atomic_dir(figures) as temp:  # the folder is replaced whole: no stale figure survives a rerun
        samples_figure(params, split, synthetic, temp / "samples.png")
        confusion_figure(classes, root, metrics, temp / "confusion.png")
        gain_figure(gains, temp / "per_class_gain.png")
        write_json(temp / "per_class_gain.json", gains)
        curves_figure(root, temp / "training_curves.png")
    counts = {c: len(files) for c, files in synthetic.items()}
    write_text(root / SUMMARY_MD, render(params, metrics, data, counts, fidelity, quality))
    values = headline(metrics, fidelity)
    write_text(root / HEADLINE_JSON, json.dumps({**values, "verdict": metrics["verdict"]}, indent=2) + "\n")

    for figure in sorted(figures.glob("*.png")):
        tracking.log_artifact(figure, artifact_path="figures")
    tracking.log_artifact(root / SUMMARY_MD)
    tracking.log_headline(params, values, {"verdict": metrics["verdict"]})
    print(f"report: {root / SUMMARY_MD} ({metrics['verdict']})")
    return root / SUMMARY_MD
