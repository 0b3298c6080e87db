"""The train@<variant> stage: EfficientNet-B0 on real train images (baseline) or real + synthetic (augmented).

Both variants see the same split, the same val set and, for each seed in ``classifier.seeds``, the same
initial weights, so evaluate can pair them. The loop is deliberately plain (nanoGPT style) and runs
unchanged under ``accelerate launch``. An epoch ends with a checkpoint once ``classifier.checkpoint_minutes``
have passed since the last one, and when a seed other than the last finishes; a rerun with the same params
and data resumes from it and reaches bit-identical weights on CPU, because all randomness of an epoch
(augmentations, dropout, sampling order) is reseeded from (seed, epoch) instead of carried over.

With ``classifier.equal_steps`` (default) an epoch draws as many images as there are real train images for
both variants: augmented spreads the same number of optimizer steps over real + synthetic images, so a gain
cannot come from simply training longer.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.classifier.augment import MEAN, STD, augment, normalize
from pipeline.classifier.dataset import (
    Sample,
    TensorImages,
    assert_no_leakage,
    assert_real_heldout,
    load_images,
    read_split,
    real_samples,
    synthetic_samples,
)
from pipeline.classifier.metrics import fast_metrics
from pipeline.classifier.model import CONFIG_NAME, create_classifier, for_training, save_weights, state_to_cpu, weights_name
from pipeline.classifier.variants import EXTRA_VARIANTS, SYNTHETIC_VARIANTS, skip_reason, variant_samples, write_skipped
from pipeline.digest import derive_seed, json_digest, sha256_file
from pipeline.errors import PipelineError
from pipeline.optim import adamw, load_optimizer_state, state_from_tensors, state_tensors
from pipeline.params import Params
from pipeline.paths import CHECKPOINT_DIR, CLASSIFIER_DIR, REPORTS_DIR, SYNTHETIC_DIR, workspace_root
from pipeline.quality.screen import SCREENED_CSV, load_kept_synthetic

VARIANTS = ("baseline", "augmented")
EVAL_BATCH = 256


def check_variant(variant: str) -> None:
    if variant not in (*VARIANTS, *EXTRA_VARIANTS):
        raise PipelineError(f"unknown variant {variant!r}; expected one of {', '.join((*VARIANTS, *EXTRA_VARIANTS))}")


def training_samples(params: Params, variant: str, split, root: Path) -> list[Sample]:
    """Baseline: the real train rows. Augmented: the same rows plus the synthetic images the `screen` stage kept
    (memorized copies and, when enabled, low-confidence images are left out). The controls and the oracle: variants.py."""
    check_variant(variant)
    if variant in EXTRA_VARIANTS:
        return variant_samples(params, variant, split, root)
    samples = real_samples(split, "train")
    if variant == "augmented":
        kept = load_kept_synthetic(root / SCREENED_CSV, params.data.classes)
        kept_paths = {(root / path).resolve() for path in kept["path"]}
        samples += [s for s in synthetic_samples(params, root) if s.path in kept_paths]
    return samples


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                  batch: int = EVAL_BATCH) -> np.ndarray:
    """Softmax probabilities (N, classes) for cached uint8 images, in order."""
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        x = normalize(images[start : start + batch].to(device))
        out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def make_sampler(labels: list[int], num_classes: int, balance: str, generator: torch.Generator,
                 num_samples: int | None = None):
    """weighted_sampler: draw each image with probability ∝ 1 / its class count (classes equally often in expectation);
    otherwise a shuffle without replacement (class_weighted_loss re-weights the loss instead).
    ``num_samples``: images per epoch (default: all of them)."""
    num_samples = num_samples or len(labels)
    if balance == "weighted_sampler":
        labels_t = torch.as_tensor(labels)
        counts = torch.bincount(labels_t, minlength=num_classes).double()
        return WeightedRandomSampler((1.0 / counts)[labels_t], num_samples=num_samples, replacement=True, generator=generator)
    return RandomSampler(range(len(labels)), num_samples=num_samples, generator=generator)


def learning_rate(base: float, epoch: int, step: int, steps: int, epochs: int) -> float:
    """Linear warm-up over the first epoch (from scratch, full lr at step 0 blows the logits up), then cosine decay.
    A pure function of (epoch, step), so a resumed run follows the same schedule without saved scheduler state."""
    if epoch == 0:
        return base * (step + 1) / steps
    progress = (epoch - 1 + step / steps) / max(epochs - 1, 1)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def _run_key(params: Params, variant: str, seed: int, train: list[Sample], digests: dict[Path, str]) -> str:
    """What a checkpoint must match to be resumed: every training knob and the exact training data, in order."""
    payload = {
        "classifier": params.classifier.model_dump(mode="json", exclude={"seeds", "checkpoint_minutes"}),
        "classes": list(params.data.classes),
        "variant": variant,
        "seed": seed,
        "train": [(digests[s.path.resolve()], s.label) for s in train],
    }
    return json_digest(payload)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    best: dict[str, torch.Tensor] | None, meta: dict) -> None:
    """Model, best-so-far weights and optimizer as safetensors; epoch, history and run key as JSON; one atomic folder.

    Written every epoch, so it copies no tensor it need not: the file is written before training goes on, and
    best weights from this very epoch are the model's, stored once.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if best is not None and meta["best_epoch"] != meta["epoch"]:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    opt_tensors, opt_rest = state_tensors(optimizer)
    tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    meta = {**meta, "optimizer": opt_rest}
    with atomic_dir(folder) as temp:
        save_file(tensors, str(temp / "state.safetensors"))
        (temp / "state.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(folder: Path, run_key: str):
    """(meta, model state, best state or None, optimizer state dict) if a checkpoint with this run key exists, else None."""
    meta_path, tensor_path = folder / "state.json", folder / "state.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("run_key") != run_key:
        return None
    tensors = load_file(str(tensor_path))
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")} or None
    if best is None and meta["best_epoch"] == meta["epoch"] > 0:  # the best epoch was the last one saved
        best = {k: v.clone() for k, v in model.items()}
    opt_tensors = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
    return meta, model, best, state_from_tensors(opt_tensors, meta["optimizer"])


# ----------------------------------------------------------------------------- one seed

def fit_seed(params: Params, variant: str, seed: int, train_images: torch.Tensor, train_labels: list[int],
             val_images: torch.Tensor, val_labels: np.ndarray, run_key: str, checkpoint: Path, accelerator,
             on_epoch_end: Callable[[int, int], None] | None = None, metric_suffix: str = "",
             epoch_size: int | None = None, checkpoint_at_end: bool = True) -> tuple[dict, dict]:
    """Train one seed with early stopping on val balanced accuracy; returns (summary, best weights).

    ``checkpoint_at_end``: also checkpoint the finished seed, so that an interruption while later seeds train
    does not redo it (the last seed's finished weights are written as the model right away instead)."""
    from pipeline import tracking

    c, classes = params.classifier, list(params.data.classes)
    torch.manual_seed(seed)  # same seed -> same initial weights for both variants (paired comparison)
    model = for_training(create_classifier(c.arch, len(classes), c.pretrained))  # before any optimizer state is restored
    optimizer = adamw(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    meta = {"run_key": run_key, "epoch": 0, "best_epoch": 0, "best_score": -1.0, "bad_epochs": 0,
            "stopped": False, "history": []}
    best = None
    resumed_from = None
    found = load_checkpoint(checkpoint, run_key)
    if found is not None:
        meta, model_state, best, optimizer_state = found
        model.load_state_dict(model_state)
        load_optimizer_state(optimizer, optimizer_state)
        resumed_from = meta["epoch"]
        accelerator.print(f"train@{variant} seed {seed}: resuming after epoch {resumed_from} from {checkpoint}")

    generator = torch.Generator()
    epoch_size = epoch_size or len(train_labels)
    sampler = make_sampler(train_labels, len(classes), c.balance, generator, epoch_size)
    counts = torch.bincount(torch.as_tensor(train_labels), minlength=len(classes)).double()
    loss_weight = (counts.sum() / (len(classes) * counts)).float() if c.balance == "class_weighted_loss" else None
    batch = min(c.batch, epoch_size)
    dataset = TensorImages(train_images, train_labels)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)  # drop_last: BatchNorm needs >1 sample
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if loss_weight is not None:
        loss_weight = loss_weight.to(accelerator.device)

    last_checkpoint = time.monotonic()
    for epoch in range(meta["epoch"], c.epochs):
        if meta["stopped"]:
            break
        torch.manual_seed(derive_seed(seed, "epoch", epoch, "augment"))  # augmentations + dropout
        generator.manual_seed(derive_seed(seed, "epoch", epoch, "order"))  # sampling order
        model.train()
        total, seen = 0.0, 0
        for step, (x, y) in enumerate(tqdm(loader, desc=f"train@{variant} seed {seed} epoch {epoch + 1}/{c.epochs}",
                                           leave=False, disable=not accelerator.is_local_main_process)):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(c.lr, epoch, step, len(loader), c.epochs)
            loss = F.cross_entropy(model(augment(x)), y, weight=loss_weight)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if c.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
        train_loss = total / max(seen, 1)

        proba = predict_proba(accelerator.unwrap_model(model), val_images, accelerator.device)
        val = fast_metrics(val_labels, proba.argmax(axis=1), proba, classes)  # scikit-learn's numbers, ~50x faster
        score = val["balanced_accuracy"]
        if score > meta["best_score"]:
            meta.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
            best = state_to_cpu(accelerator.unwrap_model(model))
        else:
            meta["bad_epochs"] += 1
        meta["epoch"] = epoch + 1
        meta["stopped"] = meta["bad_epochs"] >= c.patience and epoch + 1 >= c.min_epochs
        meta["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_balanced_accuracy": score})
        tracking.log_metrics({f"train_loss{metric_suffix}": train_loss,
                              f"val_balanced_accuracy{metric_suffix}": score,
                              f"val_macro_recall{metric_suffix}": val["macro_recall"]}, step=epoch + 1)
        accelerator.print(f"train@{variant} seed {seed} epoch {epoch + 1}/{c.epochs}: train loss {train_loss:.4f}, "
                          f"val balanced acc {score:.4f} (best {meta['best_score']:.4f} @ {meta['best_epoch']})")
        finished = meta["stopped"] or meta["epoch"] == c.epochs
        if (finished and checkpoint_at_end) or time.monotonic() - last_checkpoint >= 60 * c.checkpoint_minutes:
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, best, meta)
            accelerator.wait_for_everyone()
            last_checkpoint = time.monotonic()
        if on_epoch_end is not None:
            on_epoch_end(seed, epoch + 1)
        if meta["stopped"]:
            accelerator.print(f"train@{variant} seed {seed}: early stop, no val improvement for {c.patience} epochs")

    summary = {
        "best_epoch": meta["best_epoch"],
        "best_val_balanced_accuracy": meta["best_score"],
        "epochs_run": meta["epoch"],
        "resumed_from_epoch": resumed_from,
        "history": meta["history"],
    }
    return summary, best


# ----------------------------------------------------------------------------- the stage

def _set_tags(tags: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


@contextmanager
def _long_lived_objects_frozen():
    """Keep Python's cyclic garbage collector off the ~0.5 M objects that imports and set-up created.

    A full collection walks all of them: measured 230-300 ms each, twice in a 6-epoch demo training, landing in
    random epochs (an epoch is ~0.8 s). Frozen objects are skipped; reference counting still frees everything.
    """
    import timm  # noqa: F401  (create_classifier imports it lazily: freeze it too)

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train_variant(params: Params, variant: str, *, on_epoch_end: Callable[[int, int], None] | None = None) -> dict:
    """Train every seed of ``classifier.seeds`` for one variant; writes the model folder and reports/train/<variant>.json.

    ``on_epoch_end(seed, epoch)`` runs after each epoch, and after its checkpoint when one was due (an interruption
    there resumes from the last checkpoint).
    Returns the report written to reports/train/<variant>.json.
    """
    from accelerate import Accelerator

    from pipeline import tracking

    check_variant(variant)
    if (reason := skip_reason(params, variant)) is not None:
        return write_skipped(params, variant, reason)
    root = workspace_root()
    c, classes = params.classifier, list(params.data.classes)
    split = read_split(params, root)
    train = training_samples(params, variant, split, root)
    val = real_samples(split, "val")

    digests: dict[Path, str] = {}
    for sample in real_samples(split, "test"):  # hashed only, so the guard can catch byte-identical copies
        digests[sample.path.resolve()] = sha256_file(sample.path)
    train_images = load_images([s.path for s in train], c.image_size, digests)
    val_images = load_images([s.path for s in val], c.image_size, digests)
    assert_no_leakage(train, split, allow_synthetic=variant in SYNTHETIC_VARIANTS, synthetic_root=root / SYNTHETIC_DIR, digests=digests)
    assert_real_heldout(val, split, "val", root / SYNTHETIC_DIR)

    train_labels = [s.label for s in train]
    counts = {origin: {cls: sum(1 for s in train if s.origin == origin and s.label == i) for i, cls in enumerate(classes)}
              for origin in ("real", "synthetic")}
    empty = [cls for cls in classes if counts["real"][cls] + counts["synthetic"][cls] == 0]
    if empty:
        raise PipelineError(f"no training image of class {empty[0]!r} in the train split; check data/prepared/split.csv")
    synthetic_count = sum(counts["synthetic"].values())
    _set_tags({"variant": variant, "classes": ",".join(classes), "method": params.diffusion.method,
               "synthetic_count": str(synthetic_count), "seed": ",".join(map(str, c.seeds))})
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_params({f"classifier.{k}": v for k, v in tracking.flatten(c.model_dump(mode="json")).items()})

    accelerator = Accelerator()
    accelerator.print(f"train@{variant}: {len(train) - synthetic_count} real + {synthetic_count} synthetic train images, "
                      f"{len(val)} val, {c.arch} at {c.image_size}px, seeds {c.seeds}")
    val_labels = np.array([s.label for s in val])
    checkpoints = root / CHECKPOINT_DIR / "classifier" / variant
    per_seed, best_states = {}, {}
    epoch_size = len(train) - synthetic_count if c.equal_steps else len(train)
    with _long_lived_objects_frozen():
        for seed in c.seeds:
            run_key = _run_key(params, variant, seed, train, digests)
            suffix = f"_seed{seed}" if len(c.seeds) > 1 else ""
            per_seed[seed], best_states[seed] = fit_seed(
                params, variant, seed, train_images, train_labels, val_images, val_labels, run_key,
                checkpoints / f"seed{seed}", accelerator, on_epoch_end, suffix, epoch_size,
                checkpoint_at_end=seed != c.seeds[-1])

    report = {
        "variant": variant,
        "seeds": {str(s): r for s, r in per_seed.items()},
        "best_val_balanced_accuracy": float(np.mean([r["best_val_balanced_accuracy"] for r in per_seed.values()])),
        "train_counts": counts,
        "train_real": len(train) - synthetic_count,
        "train_synthetic": synthetic_count,
        "epoch_size": epoch_size,
        "val": len(val),
    }
    if accelerator.is_main_process:
        config = {
            "arch": c.arch, "classes": classes, "num_classes": len(classes), "image_size": c.image_size,
            "pretrained": c.pretrained, "mean": list(MEAN), "std": list(STD), "variant": variant,
            "seeds": list(c.seeds), "best_epochs": {str(s): r["best_epoch"] for s, r in per_seed.items()},
        }
        target = root / CLASSIFIER_DIR / variant
        for stale in target.parent.glob(f".{variant}.*"):  # temporaries a killed run of this variant left behind
            if ".tmp-" in stale.name or ".old-" in stale.name:
                shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(target) as temp:
            for seed, state in best_states.items():
                save_weights(state, temp / weights_name(seed))
            (temp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        write_json(root / REPORTS_DIR / "train" / f"{variant}.json", report)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the finished models replace the resumable state
    tracking.log_metrics({"best_val_balanced_accuracy": report["best_val_balanced_accuracy"],
                          "train_real": report["train_real"], "train_synthetic": synthetic_count})
    return report
