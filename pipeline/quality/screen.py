"""The `screen` stage: measure every class's synthetic images against real ones and decide which may be used.

Per class it embeds the synthetic images, the real *train* images and the fine-tuning images once (on the
GPU when there is one), maps them into ``features.feature_space``, then computes FID / KID / k-NN
precision-recall-coverage against real train, the same FID / KID between two sets of real images (the
floor to read them against), the memorization gate against the fine-tuning images, and (optionally)
the baseline classifier's confidence filter. A figure out of range (``sanity``) is named in the log
and listed in the class's ``flags``.

Outputs (all written atomically):
- ``data/screened/synthetic.csv``: one row per synthetic image with ``kept``; augmented training
  reads only kept rows, through ``load_kept_synthetic``.
- ``reports/quality.json``: per-class metrics and counts plus totals (a DVC metrics file); per class,
  ``flags`` maps each figure that must not be shown as a plain number to the reason, and
  ``totals.flagged`` lists them as ``<class>.<figure>``.
- ``reports/quality/closest_<class>.png``: the synthetic images closest to a fine-tuning image,
  side by side with it, for a person to judge the memorization gate.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import atomic, tracking
from pipeline.data.images import open_rgb
from pipeline.errors import PipelineError
from pipeline.params import CLASS_NAMES, Params
from pipeline.paths import CLASSIFIER_DIR, FINETUNE_DIR, REPORTS_DIR, SPLIT_CSV, SYNTHETIC_DIR, workspace_root

SCREENED_DIR = Path("data/screened")
SCREENED_CSV = SCREENED_DIR / "synthetic.csv"
QUALITY_JSON = REPORTS_DIR / "quality.json"
QUALITY_DIR = REPORTS_DIR / "quality"
BASELINE_DIR = CLASSIFIER_DIR / "baseline"
COLUMNS = ["class", "path", "kept", "memorized", "nn_image_id", "nn_cosine", "nn_ssim", "confidence", "reason"]
SSIM_MAX_SIZE = 128  # memorization pairs are compared at the synthetic resolution, capped here


@dataclass
class ClassInputs:
    """Everything one class's screening reads, validated before any image is decoded."""

    synthetic: list[Path]  # absolute
    synthetic_rel: list[str]  # as written to synthetic.csv: relative to the workspace root
    train: list[Path]
    finetune: list[Path]
    finetune_ids: list[str]
    synthetic_masks: list[Path]  # diffusion.control mask: each synthetic image's conditioning mask, else empty
    train_masks: list[tuple[Path, Path]]  # (image, mask) of the real train images that have masks


def _read_csv(path: Path, required: list[str], what: str, hint: str) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found ({hint})")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable {what} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: {what} lacks column {missing[0]!r} (has {', '.join(frame.columns) or 'none'})")
    return frame


def _resolve(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def gather_inputs(classes: list[str], root: Path) -> dict[str, ClassInputs]:
    """Read split, fine-tune lists and manifests of every class; fail on the first missing/malformed file."""
    split = _read_csv(root / SPLIT_CSV, ["image_id", "dx", "split", "path"], "split file", "run `dvc repro prepare`")
    inputs = {}
    for code in classes:
        ft_csv = root / FINETUNE_DIR / f"{code}.csv"
        finetune = _read_csv(ft_csv, ["image_id", "dx", "path"], "fine-tune list", "run `dvc repro prepare`")
        if finetune.empty:
            raise PipelineError(f"{ft_csv}: fine-tune list is empty; the memorization check needs the fine-tuning images")
        wrong = finetune.loc[finetune["dx"] != code, "dx"]
        if not wrong.empty:
            raise PipelineError(f"{ft_csv}: row with dx {wrong.iloc[0]!r} in the fine-tune list of {code!r}")
        folder = root / SYNTHETIC_DIR / code
        manifest = _read_csv(folder / "manifest.csv", ["file", "class"], "synthetic manifest", f"run `dvc repro generate@{code}`")
        wrong = manifest.loc[manifest["class"] != code, "class"]
        if not wrong.empty:
            raise PipelineError(f"{folder / 'manifest.csv'}: row with class {wrong.iloc[0]!r} in the manifest of {code!r}")
        outside = [name for name in manifest["file"] if folder.resolve() not in (folder / name).resolve().parents]
        if outside:
            raise PipelineError(f"{folder / 'manifest.csv'}: file {outside[0]!r} lies outside {folder}")
        rel = [(SYNTHETIC_DIR / code / name).as_posix() for name in manifest["file"]]
        masks = [folder / name for name in manifest["mask"] if name] if "mask" in manifest.columns else []
        train = split[(split["split"] == "train") & (split["dx"] == code)]
        masked = train[train["mask_path"] != ""] if "mask_path" in train.columns else None
        inputs[code] = ClassInputs(
            synthetic=[root / r for r in rel],
            synthetic_rel=rel,
            train=[_resolve(root, p) for p in train["path"]],
            finetune=[_resolve(root, p) for p in finetune["path"]],
            finetune_ids=list(finetune["image_id"]),
            synthetic_masks=masks,
            train_masks=[] if masked is None else [(_resolve(root, p), _resolve(root, m)) for p, m in zip(masked["path"], masked["mask_path"])],
        )
    return inputs


def _metric(fn, *args, **kwargs):
    """A metric's value, or None when the sets are too small for it (reported as null and flagged, never as a fake number)."""
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return None


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, params: Params, seed: int) -> dict[str, float | None]:
    """FID, KID mean/std and k-NN precision/recall/coverage of ``fake`` against ``real``."""
    from pipeline.quality.metrics import frechet_distance, kernel_inception_distance, precision_recall

    q = params.quality
    kid = _metric(kernel_inception_distance, real, fake, subset_size=q.kid_subset_size, subsets=q.kid_subsets, seed=seed)
    pr = _metric(precision_recall, real, fake, k=q.pr_neighbours) or {}
    return {
        "fid": _metric(frechet_distance, real, fake),
        "kid_mean": kid[0] if kid else None,
        "kid_std": kid[1] if kid else None,
        "precision": pr.get("precision"),
        "recall": pr.get("recall"),
        "coverage": pr.get("coverage"),
    }


def real_vs_real(real: torch.Tensor, size: int, params: Params, seed: int) -> dict[str, float | None]:
    """FID and KID between two disjoint random sets of ``size`` real images (at most half each).

    The floor a synthetic set's figures are read against; drawn at the synthetic set's size, because FID's
    small-sample bias depends on it.
    """
    from pipeline.quality.metrics import frechet_distance, kernel_inception_distance

    q = params.quality
    size = min(size, len(real) // 2)
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).to(real.device)
    first, second = real[order[:size]], real[order[size : 2 * size]]
    kid = _metric(kernel_inception_distance, first, second, subset_size=q.kid_subset_size, subsets=q.kid_subsets, seed=seed)
    return {"fid_real_vs_real": _metric(frechet_distance, first, second), "kid_real_vs_real": kid[0] if kid else None}


def _reason(memorized: bool, exclude: bool, low_confidence: bool, confidence: float, tau: float | None) -> str:
    parts = []
    if memorized:
        parts.append("memorized" if exclude else "memorized (kept: quality.memorization.exclude is false)")
    if low_confidence:
        parts.append(f"low_confidence ({confidence:.3f} < {tau})")
    return "; ".join(parts)


def _closest_figure(target: Path, code: str, frame: pd.DataFrame, synth_px, nearest_px, count: int) -> None:
    """The ``count`` synthetic images nearest to a fine-tuning image (top row) above that image (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-frame["nn_cosine"].to_numpy(), kind="stable")[:count]
    cols = max(1, len(order))
    fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols, 4.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if len(order) == 0:
        axes[0, 0].text(0.5, 0.5, "no synthetic images", ha="center", va="center")
    for col, i in enumerate(order):
        row = frame.iloc[i]
        axes[0, col].imshow(synth_px[i].permute(1, 2, 0).numpy())
        axes[1, col].imshow(nearest_px[i].permute(1, 2, 0).numpy())
        colour = "red" if row["memorized"] else "black"
        axes[0, col].set_title(
            f"cos {row['nn_cosine']:.3f}\nssim {row['nn_ssim']:.3f}" + ("\nMEMORIZED" if row["memorized"] else ""),
            fontsize=8, color=colour,
        )
        axes[1, col].set_title(str(row["nn_image_id"]), fontsize=7)
    fig.suptitle(f"{code} ({CLASS_NAMES[code]}): synthetic (top) vs nearest fine-tuning image (bottom)", fontsize=9)
    fig.tight_layout()
    with atomic.atomic_file(target) as temp:
        fig.savefig(temp, format="png", dpi=90)
    plt.close(fig)


def screen(params: Params) -> dict:
    """Run the `screen` stage in the current workspace; returns the quality report it wrote."""
    from pipeline.quality.features import (
        ClassifierFeatures,
        InceptionFeatures,
        inception_weights_path,
        load_baseline_classifier,
        screening_device,
    )

    root = workspace_root()
    q = params.quality
    classes = params.data.classes
    inputs = gather_inputs(classes, root)
    device = screening_device()
    baseline = load_baseline_classifier(root / BASELINE_DIR, device)
    unknown = [c for c in classes if c not in baseline.classes]
    if unknown:
        raise PipelineError(
            f"{root / BASELINE_DIR / 'config.json'}: baseline classifier has no class {unknown[0]!r} "
            f"(trained on {', '.join(baseline.classes)}; run `dvc repro train@baseline`)"
        )
    classifier = ClassifierFeatures(baseline)
    extractor = (
        classifier if q.extractor == "baseline_classifier" else InceptionFeatures(inception_weights_path(q.inception_weights), device)
    )

    frames, report, figures = [], {}, {}
    for index, code in enumerate(tqdm(classes, desc="screen", unit="class")):
        entry, frame, pixels = screen_class(code, inputs[code], extractor, classifier, params, seed=params.seed + index)
        for key, why in entry["flags"].items():
            tqdm.write(f"warning: screen: {code}: {key} flagged: {why}", file=sys.stderr)
        report[code] = entry
        frames.append(frame)
        figures[code] = (frame, *pixels)

    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    quality = {
        "extractor": extractor.name,
        "feature_space": "unit-norm rows, centred and scaled by the class's real train images (features.feature_space)",
        "settings": {
            "memorization_cosine": q.memorization.cosine,
            "memorization_ssim": q.memorization.ssim,
            "memorization_rule": q.memorization.rule,
            "memorization_exclude": q.memorization.exclude,
            "filter_confidence": q.filter_confidence,
            "sanity_factor": q.sanity_factor,
        },
        "classes": report,
        "totals": _totals(report),
    }

    with atomic.atomic_dir(root / SCREENED_DIR) as folder:
        table.to_csv(folder / SCREENED_CSV.name, index=False)
    with atomic.atomic_dir(root / QUALITY_DIR) as folder:
        for code, (frame, synth_px, nearest_px) in figures.items():
            _closest_figure(folder / f"closest_{code}.png", code, frame, synth_px, nearest_px, q.closest_pairs)
    atomic.write_json(root / QUALITY_JSON, quality)

    flat = {
        f"quality.{code}.{k}": v for code, values in report.items() for k, v in values.items() if _loggable(v) and k not in values["flags"]
    }
    flat.update({f"quality.{code}.n_flags": len(values["flags"]) for code, values in report.items()})
    flat.update({f"quality.total.{k}": v for k, v in quality["totals"].items() if _loggable(v)})
    tracking.log_metrics(flat)
    for code in classes:
        tracking.log_artifact(root / QUALITY_DIR / f"closest_{code}.png", artifact_path="quality")
    tracking.log_artifact(root / QUALITY_JSON, artifact_path="quality")
    tracking.log_artifact(root / SCREENED_CSV, artifact_path="quality")
    return quality


def screen_class(code: str, inp: ClassInputs, extractor, classifier, params: Params, seed: int):
    """One class's quality entry, its rows of the screened table, and for its figure the synthetic pixels with the
    pixels of each one's nearest fine-tuning image."""
    from pipeline.quality.features import embed_paths, feature_space, load_arrays
    from pipeline.quality.memorization import check_memorization
    from pipeline.quality.metrics import frechet_distance
    from pipeline.quality.sanity import Bounds, out_of_range

    q = params.quality
    n = len(inp.synthetic)
    train_raw = embed_paths(inp.train, extractor, extractor.input_size, q.batch, desc=f"{code} real train")
    ft_raw = embed_paths(inp.finetune, extractor, extractor.input_size, q.batch, desc=f"{code} fine-tune")
    synth_in = load_arrays(inp.synthetic, extractor.input_size, desc=f"{code} synthetic")
    if extractor is classifier:
        synth_raw, probs = _batched(classifier.features_and_probs, synth_in, q.batch)
    else:
        synth_raw = _batched(lambda chunk: (extractor(chunk),), synth_in, q.batch)[0]
        clf_in = load_arrays(inp.synthetic, classifier.input_size, desc=f"{code} synthetic")
        probs = _batched(classifier.features_and_probs, clf_in, q.batch)[1]
    confidence = probs[:, classifier.classifier.classes.index(code)].cpu().numpy() if n else np.empty(0)
    train, ft, synth = feature_space(train_raw, ft_raw, synth_raw)

    # Pixels for SSIM and the figure: the synthetic resolution (all generated images share it), capped.
    px_size = min(SSIM_MAX_SIZE, *open_rgb(inp.synthetic[0]).size) if n else SSIM_MAX_SIZE
    synth_px = load_arrays(inp.synthetic, px_size, desc=f"{code} synthetic pixels")
    ft_px = load_arrays(inp.finetune, px_size, desc=f"{code} fine-tune pixels")
    memo = check_memorization(synth, synth_px.to(synth.device), ft, ft_px, q.memorization)

    tau = q.filter_confidence
    low_conf = confidence < tau if tau is not None else np.zeros(n, dtype=bool)
    kept = ~(memo.memorized & q.memorization.exclude) & ~low_conf
    frame = pd.DataFrame(
        {
            "class": code,
            "path": inp.synthetic_rel,
            "kept": kept,
            "memorized": memo.memorized,
            "nn_image_id": [inp.finetune_ids[i] for i in memo.nn_index],
            "nn_cosine": np.round(memo.nn_cosine, 6),
            "nn_ssim": np.round(memo.nn_ssim, 6),
            "confidence": np.round(confidence, 6),
            "reason": [
                _reason(bool(m), q.memorization.exclude, bool(lc), float(c), tau)
                for m, lc, c in zip(memo.memorized, low_conf, confidence)
            ],
        },
        columns=COLUMNS,
    )

    metrics = distribution_metrics(train, synth, params, seed=seed)
    keep = torch.from_numpy(kept).to(synth.device)
    metrics["fid_kept"] = _metric(frechet_distance, train, synth[keep]) if kept.sum() else None
    reference = real_vs_real(train, n, params, seed=seed)
    entry = {
        **metrics,
        **reference,
        "n_synthetic": n,
        "n_real_train": len(inp.train),
        "n_finetune": len(inp.finetune),
        "n_memorized": int(memo.memorized.sum()),
        "n_filtered": int(low_conf.sum()),
        "n_kept": int(kept.sum()),
        "max_nn_cosine": float(memo.nn_cosine.max()) if n else None,
        "median_nn_cosine": float(np.median(memo.nn_cosine)) if n else None,
        "max_nn_ssim": float(memo.nn_ssim.max()) if n else None,
        "mean_confidence": float(confidence.mean()) if n else None,
    }
    if inp.synthetic_masks:
        from pipeline.quality.mask_fidelity import mask_ious

        real_images, real_masks = map(list, zip(*inp.train_masks)) if inp.train_masks else ([], [])
        entry["mask_iou"] = float(mask_ious(inp.synthetic, inp.synthetic_masks, px_size).mean())
        entry["mask_iou_real"] = float(mask_ious(real_images, real_masks, px_size).mean()) if real_images else None
    bounds = Bounds(
        fid_real_vs_real=reference["fid_real_vs_real"],
        kid_real_vs_real=reference["kid_real_vs_real"],
        kid_subset_used=min(q.kid_subset_size, len(train), n),
        kid_subset_size=q.kid_subset_size,
        sanity_factor=q.sanity_factor,
        memorization_cosine=q.memorization.cosine,
        n_real=len(inp.train),
        n_synthetic=n,
    )
    entry["flags"] = out_of_range(entry, bounds)
    return entry, frame, (synth_px, ft_px[torch.as_tensor(memo.nn_index, dtype=torch.long)])


def _batched(fn, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """``fn`` (returning a tuple of tensors) over chunks of ``batch`` images, concatenated; (0, 0) tensors for no images."""
    parts = [fn(images[start : start + batch]) for start in range(0, len(images), batch)]
    if not parts:
        return (torch.empty((0, 0), dtype=torch.float64),) * 2
    return tuple(torch.cat(column) for column in zip(*parts))


def _loggable(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _totals(report: dict[str, dict]) -> dict[str, float | int | None]:
    """Counts summed over classes; metrics averaged over the classes where they are defined and not flagged (macro mean)."""
    totals: dict = {key: int(sum(r[key] for r in report.values())) for key in ("n_synthetic", "n_memorized", "n_filtered", "n_kept")}
    for key in ("fid", "kid_mean", "precision", "recall", "coverage"):
        values = [r[key] for r in report.values() if r[key] is not None and key not in r["flags"]]
        totals[f"{key}_macro"] = float(np.mean(values)) if values else None
    totals["flagged"] = [f"{code}.{key}" for code, r in report.items() for key in r["flags"]]
    return totals


def load_kept_synthetic(path: str | Path = SCREENED_CSV, classes: list[str] | None = None) -> pd.DataFrame:
    """The synthetic images the `screen` stage kept: columns ``class``, ``path`` (relative to the workspace root).

    Augmented training calls this instead of reading data/synthetic directly, so memorized and
    low-confidence images never reach the classifier. ``classes``: the run's data.classes; a file
    screened for other classes is stale and rejected.
    """
    path = Path(path)
    full = path if path.is_absolute() else workspace_root() / path
    frame = _read_csv(full, ["class", "path", "kept"], "screened synthetic list", "run `dvc repro screen`")
    truth = {"true": True, "1": True, "false": False, "0": False}
    kept = frame["kept"].str.strip().str.lower().map(truth)
    if kept.isna().any():
        bad = frame.loc[kept.isna(), "kept"].iloc[0]
        raise PipelineError(f"{full}: column 'kept' must be True/False, got {bad!r}")
    if classes is not None:
        stale = sorted(set(frame["class"]) - set(classes))
        if stale:
            raise PipelineError(
                f"{full}: lists class {stale[0]!r} which is not in data.classes {classes} (stale; run `dvc repro screen`)"
            )
    out = frame.loc[kept.astype(bool), ["class", "path"]].reset_index(drop=True)
    root = workspace_root()
    missing = [p for p in out["path"] if not _resolve(root, p).is_file()]
    if missing:
        raise PipelineError(f"{full}: kept image {missing[0]} does not exist (stale; run `dvc repro screen`)")
    return out
