"""The `screen` stage: score every class's synthetic images against its real ones and decide which may be used.

Writes ``data/screened/synthetic.csv`` (``kept`` per image, read by ``load_kept_synthetic``), ``reports/quality.json``
(figures, ``flags`` naming each one out of range and why, totals) and ``reports/quality/closest_<class>.png`` (the
synthetic images nearest to a fine-tuning image beside it, for a person to judge the memorization gate).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.core import atomic, tracking
from pipeline.data.images import open_rgb
from pipeline.core.errors import PipelineError
from pipeline.core.params import CLASS_NAMES, Params, QualityParams
from pipeline.core.paths import CLASSIFIER_DIR, FINETUNE_DIR, REPORTS_DIR, SPLIT_CSV, SYNTHETIC_DIR, workspace_root

SCREENED_DIR = Path("data/screened")
SCREENED_CSV = SCREENED_DIR / "synthetic.csv"
QUALITY_JSON = REPORTS_DIR / "quality.json"
QUALITY_DIR = REPORTS_DIR / "quality"
BASELINE_DIR = CLASSIFIER_DIR / "baseline"
SSIM_MAX_SIZE = 128  # memorization pairs are compared at the synthetic resolution, capped here
FIGURES = ("fid", "fid_kept", "kid_mean", "kid_std", "precision", "recall", "coverage", "median_nn_cosine")


@dataclass
class ClassInputs:
    """Everything one class's screening reads, validated before any image is decoded."""

    synthetic: list[Path]
    synthetic_rel: list[str]  # as written to synthetic.csv: relative to the workspace root
    train: list[Path]
    finetune: list[Path]
    finetune_ids: list[str]
    synthetic_masks: list[Path]  # diffusion.control mask: each synthetic image's conditioning mask, else empty
    train_masks: list[tuple[Path, Path]]  # (image, mask) of the real train images that have masks


def gather_inputs(classes: list[str], root: Path) -> dict[str, ClassInputs]:
    """Read split, fine-tune lists and manifests of every class; fail on the first missing/malformed file."""
    prepare = "not found (run `dvc repro prepare`)"
    split = atomic.read_table(root / SPLIT_CSV, ["image_id", "dx", "split", "path"], f"split file {prepare}")
    inputs = {}
    for code in classes:
        ft_csv = root / FINETUNE_DIR / f"{code}.csv"
        finetune = atomic.read_table(ft_csv, ["image_id", "path"], f"fine-tune list {prepare}")
        if finetune.empty:
            raise PipelineError(f"{ft_csv}: fine-tune list is empty; the memorization check needs the "
                                "fine-tuning images")
        folder = root / SYNTHETIC_DIR / code
        hint = f"synthetic manifest not found (run `dvc repro generate@{code}`)"
        manifest = atomic.read_table(folder / "manifest.csv", ["file"], hint)
        rel = [(SYNTHETIC_DIR / code / name).as_posix() for name in manifest["file"]]
        train = split[(split["split"] == "train") & (split["dx"] == code)]
        train_masks = train["mask_path"] if "mask_path" in train.columns else [""] * len(train)
        inputs[code] = ClassInputs(
            synthetic=[root / r for r in rel],
            synthetic_rel=rel,
            train=[root / p for p in train["path"]],  # absolute paths stay as they are
            finetune=[root / p for p in finetune["path"]],
            finetune_ids=list(finetune["image_id"]),
            synthetic_masks=[folder / name for name in manifest.get("mask", []) if name],
            train_masks=[(root / p, root / m) for p, m in zip(train["path"], train_masks) if m],
        )
    return inputs


def _metric(fn, *args, **kwargs):
    """A metric's value, or None when the sets are too small for it (reported as null and flagged, never faked)."""
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def out_of_range(entry: dict, q: QualityParams) -> dict[str, str]:
    """{figure: one-line reason} for each figure of one class's ``entry`` that must not be shown as a plain number
    (an FID beyond quality.sanity_factor x the real-vs-real one: the feature space, not the images, decides it)."""
    reasons = defaultdict(list)
    n_real, n_synthetic = entry["n_real_train"], entry["n_synthetic"]
    for key in FIGURES:
        value = entry.get(key)
        if value is None:
            if key != "fid_kept" or entry.get("n_kept", 1):
                reasons[key].append(f"not computed: too few images ({n_real} real, {n_synthetic} synthetic)")
        elif not _finite(value):
            reasons[key].append(f"{value} is not finite")
    reference = entry["fid_real_vs_real"]
    for key in ("fid", "fid_kept"):
        value = entry.get(key)
        if not _finite(value):
            continue
        if value < -1e-6 * (1.0 + abs(reference or 0.0)):
            reasons[key].append(f"{value:.4g} is negative beyond round-off")
        elif _finite(reference) and reference > 0 and value > q.sanity_factor * reference:
            reasons[key].append(f"{value:.4g} is {value / reference:.0f}x the real-vs-real FID {reference:.4g} "
                                f"(bound: quality.sanity_factor {q.sanity_factor:g}x)")
    mean, std, real_kid = entry.get("kid_mean"), entry.get("kid_std"), entry["kid_real_vs_real"]
    # Noise: the spread over subsets, or real-vs-real's distance from 0 where subsets overlap too much to show it.
    noise = max(std, abs(real_kid)) if _finite(std) and _finite(real_kid) else std
    if _finite(mean) and _finite(noise) and mean < -(2.0 * noise + 1e-9):
        reasons["kid_mean"].append(f"{mean:.3g} is negative beyond sampling noise ({noise:.2g})")
    subset = min(q.kid_subset_size, n_real, n_synthetic)
    if _finite(mean) and subset < q.kid_subset_size:
        reasons["kid_mean"].append(f"subsets of {subset} images, fewer than quality.kid_subset_size "
                                   f"{q.kid_subset_size}")
    cosine = entry.get("median_nn_cosine")
    if _finite(cosine) and cosine >= q.memorization.cosine:
        reasons["median_nn_cosine"].append(f"{cosine:.4f} >= quality.memorization.cosine {q.memorization.cosine}: "
                                           "the cosine cannot tell a copy from a sibling")
    return {key: "; ".join(why) for key, why in reasons.items()}


def _closest_figure(target: Path, code: str, frame: pd.DataFrame, synth_px, nearest_px, count: int) -> None:
    """The ``count`` synthetic images nearest to a fine-tuning image (top row) above that image (bottom row)."""
    from matplotlib.figure import Figure  # not pyplot: no backend to choose, no global figure to close

    order = np.argsort(-frame["nn_cosine"].to_numpy(), kind="stable")[:count]
    fig = Figure(figsize=(1.9 * max(1, len(order)), 4.4))
    axes = fig.subplots(2, max(1, len(order)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if len(order) == 0:
        axes[0, 0].text(0.5, 0.5, "no synthetic images", ha="center", va="center")
    for col, i in enumerate(order):
        row = frame.iloc[i]
        axes[0, col].imshow(synth_px[i].permute(1, 2, 0).numpy())
        axes[1, col].imshow(nearest_px[i].permute(1, 2, 0).numpy())
        title = f"cos {row['nn_cosine']:.3f}\nssim {row['nn_ssim']:.3f}" + ("\nMEMORIZED" if row["memorized"] else "")
        axes[0, col].set_title(title, fontsize=8, color="red" if row["memorized"] else "black")
        axes[1, col].set_title(str(row["nn_image_id"]), fontsize=7)
    fig.suptitle(f"{code} ({CLASS_NAMES[code]}): synthetic (top) vs nearest fine-tuning image (bottom)", fontsize=9)
    atomic.write_figure(target, fig, dpi=90)


def screen(params: Params) -> dict:
    """Run the `screen` stage in the current workspace; returns the quality report it wrote."""
    from pipeline.quality.features import InceptionFeatures, load_baseline_classifier

    root = workspace_root()
    q = params.quality
    classes = params.data.classes
    inputs = gather_inputs(classes, root)
    device = torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    classifier = load_baseline_classifier(root / BASELINE_DIR, device)
    unknown = [c for c in classes if c not in classifier.classes]
    if unknown:
        raise PipelineError(f"{root / BASELINE_DIR / 'config.json'}: baseline classifier has no class {unknown[0]!r} "
                            f"(trained on {', '.join(classifier.classes)}; run `dvc repro train@baseline`)")
    extractor = InceptionFeatures(q.inception_weights, device) if q.extractor == "inception" else classifier

    report, frames, pixels = {}, {}, {}
    for index, code in enumerate(tqdm(classes, desc="screen", unit="class")):
        seed = params.seed + index
        report[code], frames[code], pixels[code] = screen_class(code, inputs[code], extractor, classifier, params, seed)
        for key, why in report[code]["flags"].items():
            tqdm.write(f"warning: screen: {code}: {key} flagged: {why}", file=sys.stderr)

    # Totals: counts summed over classes; metrics averaged over the classes where defined and not flagged (macro mean).
    totals: dict = {key: int(sum(r[key] for r in report.values()))
                    for key in ("n_synthetic", "n_memorized", "n_filtered", "n_kept")}
    for key in ("fid", "kid_mean", "precision", "recall", "coverage"):
        values = [r[key] for r in report.values() if r[key] is not None and key not in r["flags"]]
        totals[f"{key}_macro"] = float(np.mean(values)) if values else None
    totals["flagged"] = [f"{code}.{key}" for code, r in report.items() for key in r["flags"]]
    m = q.memorization
    quality = {
        "extractor": extractor.name,
        "feature_space": "each feature as the normal quantile of its rank among the real train images "
                         "(features.feature_space)",
        "settings": {"memorization_cosine": m.cosine, "memorization_ssim": m.ssim, "memorization_rule": m.rule,
                     "memorization_exclude": m.exclude, "filter_confidence": q.filter_confidence,
                     "sanity_factor": q.sanity_factor},
        "classes": report,
        "totals": totals,
    }
    with atomic.atomic_dir(root / SCREENED_DIR) as folder:
        pd.concat(frames.values(), ignore_index=True).to_csv(folder / SCREENED_CSV.name, index=False)
    with atomic.atomic_dir(root / QUALITY_DIR) as folder:
        for code, frame in frames.items():
            _closest_figure(folder / f"closest_{code}.png", code, frame, *pixels[code], q.closest_pairs)
    atomic.write_json(root / QUALITY_JSON, quality)

    flat = {f"quality.{code}.{k}": v for code, entry in report.items()
            for k, v in entry.items() if _finite(v) and k not in entry["flags"]}
    flat.update({f"quality.{code}.n_flags": len(entry["flags"]) for code, entry in report.items()})
    flat.update({f"quality.total.{k}": v for k, v in quality["totals"].items() if _finite(v)})
    tracking.log_metrics(flat)
    for path in [*(QUALITY_DIR / f"closest_{code}.png" for code in classes), QUALITY_JSON, SCREENED_CSV]:
        tracking.log_artifact(root / path, artifact_path="quality")
    return quality


def screen_class(code: str, inp: ClassInputs, extractor, classifier, params: Params, seed: int):
    """One class's quality entry, its screened rows, and its figure's pixels (synthetic, nearest fine-tuning)."""
    from pipeline.quality.features import embed_paths, feature_space, load_arrays
    from pipeline.quality.memorization import check_memorization
    from pipeline.quality.metrics import frechet_distance, kernel_inception_distance, precision_recall

    q = params.quality
    n = len(inp.synthetic)
    train_raw = embed_paths(inp.train, extractor, extractor.input_size, q.batch, desc=f"{code} real train")
    ft_raw = embed_paths(inp.finetune, extractor, extractor.input_size, q.batch, desc=f"{code} fine-tune")
    # The classifier's features come with its probabilities at no extra cost; another extractor embeds separately.
    synth_in = load_arrays(inp.synthetic, classifier.input_size, desc=f"{code} synthetic")
    parts = [classifier.features_and_probs(synth_in[start : start + q.batch]) for start in range(0, n, q.batch)]
    synth_raw, probs = map(torch.cat, zip(*parts)) if parts else (torch.empty((0, 0), dtype=torch.float64),) * 2
    if extractor is not classifier:
        synth_raw = embed_paths(inp.synthetic, extractor, extractor.input_size, q.batch, desc=f"{code} synthetic")
    confidence = probs[:, classifier.classes.index(code)].cpu().numpy() if n else np.empty(0)
    train, ft, synth = feature_space(train_raw, ft_raw, synth_raw)

    # Pixels for SSIM and the figure: the synthetic resolution (all generated images share it), capped.
    px_size = min(SSIM_MAX_SIZE, *open_rgb(inp.synthetic[0]).size) if n else SSIM_MAX_SIZE
    synth_px = load_arrays(inp.synthetic, px_size, desc=f"{code} synthetic pixels")
    ft_px = load_arrays(inp.finetune, px_size, desc=f"{code} fine-tune pixels")
    memo = check_memorization(synth, synth_px.to(synth.device), ft, ft_px, q.memorization)

    tau = q.filter_confidence
    low_conf = confidence < tau if tau is not None else np.zeros(n, dtype=bool)
    kept = ~(memo.memorized & q.memorization.exclude) & ~low_conf
    memorized = "memorized" if q.memorization.exclude else "memorized (kept: quality.memorization.exclude is false)"
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
            "reason": ["; ".join(([memorized] if m else []) + ([f"low_confidence ({c:.3f} < {tau})"] if lc else []))
                       for m, lc, c in zip(memo.memorized, low_conf, confidence)],
        }
    )

    # The floor to read FID and KID against: the same figures between two disjoint sets of real images, drawn at
    # the synthetic set's size (at most half each), because FID's small-sample bias depends on it.
    half = min(n, len(train) // 2)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).to(train.device)
    first, second = train[order[:half]], train[order[half : 2 * half]]
    kid_args = {"subset_size": q.kid_subset_size, "subsets": q.kid_subsets, "seed": seed}
    kid = _metric(kernel_inception_distance, train, synth, **kid_args)
    kid_real = _metric(kernel_inception_distance, first, second, **kid_args)
    pr = _metric(precision_recall, train, synth, k=q.pr_neighbours) or {}
    keep = torch.from_numpy(kept).to(synth.device)
    entry = {
        "fid": _metric(frechet_distance, train, synth),
        "kid_mean": kid[0] if kid else None,
        "kid_std": kid[1] if kid else None,
        **{key: pr.get(key) for key in ("precision", "recall", "coverage")},
        "fid_kept": _metric(frechet_distance, train, synth[keep]) if kept.sum() else None,
        "fid_real_vs_real": _metric(frechet_distance, first, second),
        "kid_real_vs_real": kid_real[0] if kid_real else None,
        "n_synthetic": n, "n_real_train": len(inp.train), "n_finetune": len(inp.finetune),
        "n_memorized": int(memo.memorized.sum()), "n_filtered": int(low_conf.sum()), "n_kept": int(kept.sum()),
        "max_nn_cosine": float(memo.nn_cosine.max()) if n else None,
        "median_nn_cosine": float(np.median(memo.nn_cosine)) if n else None,
        "max_nn_ssim": float(memo.nn_ssim.max()) if n else None,
        "mean_confidence": float(confidence.mean()) if n else None,
    }
    if inp.synthetic_masks:
        from pipeline.quality.mask_fidelity import mask_ious

        entry["mask_iou"] = float(mask_ious(inp.synthetic, inp.synthetic_masks, px_size).mean())
        entry["mask_iou_real"] = float(mask_ious(*zip(*inp.train_masks), px_size).mean()) if inp.train_masks else None
    entry["flags"] = out_of_range(entry, q)
    return entry, frame, (synth_px, ft_px[torch.as_tensor(memo.nn_index, dtype=torch.long)])


def load_kept_synthetic(path: str | Path = SCREENED_CSV, classes: list[str] | None = None) -> pd.DataFrame:
    """The kept synthetic images (``class``, ``path`` relative to the workspace root) for augmented training, so
    memorized and low-confidence images never reach the classifier; a file screened for other ``classes`` is stale."""
    root = workspace_root()
    full = root / path  # an absolute path stays as it is
    frame = atomic.read_table(full, ["class", "path", "kept"], "screened synthetic list not found (run `dvc repro screen`)")
    kept = frame["kept"].str.strip().str.lower().map({"true": True, "1": True, "false": False, "0": False})
    if kept.isna().any():
        raise PipelineError(f"{full}: column 'kept' must be True/False, got {frame.loc[kept.isna(), 'kept'].iloc[0]!r}")
    stale = sorted(set(frame["class"]) - set(classes)) if classes is not None else []
    if stale:
        raise PipelineError(f"{full}: lists class {stale[0]!r} which is not in data.classes {classes} "
                            "(stale; run `dvc repro screen`)")
    out = frame.loc[kept.astype(bool), ["class", "path"]].reset_index(drop=True)
    missing = [p for p in out["path"] if not (root / p).is_file()]
    if missing:
        raise PipelineError(f"{full}: kept image {missing[0]} does not exist (stale; run `dvc repro screen`)")
    return out
