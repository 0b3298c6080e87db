"""The train@<variant> stage: EfficientNet-B0 on the real train rows plus each variant's extra images.

Every variant sees the same split and val set and, for each seed in ``classifier.seeds``, the same initial weights,
so evaluate can pair them. The loop runs under ``accelerate`` (device placement, mixed precision, DDP under
``accelerate launch``); one step is ``model.classifier_loss``. An epoch ends with a checkpoint once
``classifier.checkpoint_minutes`` have passed, and when a seed other than the last finishes; a rerun with the same
params and data resumes from it and reaches bit-identical weights on CPU, because each epoch's randomness
(augmentations, sampling order) is reseeded from (seed, epoch) instead of carried over.

Several processes: ``classifier.batch`` is the *global* batch. Every process draws the same epoch order and each
step's images are split between them (``epoch_batches``), so steps per epoch and the schedule are those of one
process. BatchNorm statistics are per process (no SyncBatchNorm): N processes match one closely, not bitwise.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight
from torch.utils.data import RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.classifier.augment import MEAN, STD
from pipeline.classifier.dataset import (
    Sample,
    assert_no_leakage,
    assert_real_heldout,
    load_images,
    read_split,
    real_samples,
    synthetic_samples,
)
from pipeline.classifier.metrics import classification_metrics
from pipeline.classifier.model import (
    CONFIG_NAME,
    classifier_loss,
    create_classifier,
    predict_proba,
    weights_name,
)
from pipeline.core.device import make_accelerator
from pipeline.core.digest import derive_seed, json_digest, sha256_file
from pipeline.core.errors import PipelineError
from pipeline.optim import adamw
from pipeline.core.params import Params
from pipeline.core.paths import (
    CHECKPOINT_DIR,
    CLASSIFIER_DIR,
    REPORTS_DIR,
    SYNTHETIC_BASE_DIR,
    SYNTHETIC_DIR,
    workspace_root,
)
from pipeline.quality.screen import SCREENED_CSV, load_kept_synthetic

VARIANTS = ("baseline", "augmented")
CONTROL_VARIANTS = ("base_only", "real_ceiling")
ORACLE = "oracle"
ALL_VARIANTS = (*VARIANTS, *CONTROL_VARIANTS, ORACLE)
SYNTHETIC_VARIANTS = ("augmented", "base_only")  # the variants whose training list may hold synthetic images
RESERVE = "reserve"


def skip_reason(params: Params, variant: str) -> str | None:
    """Why ``variant`` has nothing to train under these params, or None when it applies."""
    if variant == "real_ceiling" and params.data.real_per_class is None:
        return "data.real_per_class is null: every real train image is already used, so no reserve is left for a ceiling"
    return None


def training_samples(params: Params, variant: str, split: pd.DataFrame, root: Path,
                     draw: int | None = None) -> list[Sample]:
    """The real train rows, plus for classifier seed ``draw`` (default the first): ``augmented``, the synthetic images
    the `screen` stage kept; ``base_only``, the base model's class-prompt images (``generate_base``: what any
    lesion-like image adds, so augmented minus base_only is what fine-tuning added); ``real_ceiling``,
    ``generate.per_class`` reserve rows per class (what a perfect generator could add); ``oracle``, every reserve row.
    """
    draw = params.classifier.seeds[0] if draw is None else draw
    samples = real_samples(split, "train")
    if variant == "augmented":
        kept = load_kept_synthetic(root / SCREENED_CSV, params.data.classes)
        kept_paths = {(root / path).resolve() for path in kept["path"]}
        return samples + [s for s in synthetic_samples(params, root, draw=draw) if s.path in kept_paths]
    if variant == "base_only":
        return samples + synthetic_samples(params, root, SYNTHETIC_BASE_DIR, draw=draw)
    if variant == "real_ceiling":
        reserve, picked = split[split["split"] == RESERVE], []
        for label, class_code in enumerate(params.data.classes):
            rows = reserve[reserve["label"] == label].sort_values("image_id")
            rng = np.random.default_rng(derive_seed(params.seed, "real_ceiling", class_code, draw))
            take = rng.choice(len(rows), size=min(params.generate.per_class, len(rows)), replace=False)
            picked.append(rows.iloc[np.sort(take)])
        return samples + real_samples(pd.concat(picked), RESERVE)
    if variant == ORACLE:
        return samples + real_samples(split, RESERVE)
    return samples


def make_sampler(labels: list[int], balance: str, generator: torch.Generator, num_samples: int):
    """``num_samples`` draws per epoch. weighted_sampler: each image with probability ∝ 1 / its class count (classes
    equally often in expectation); otherwise a shuffle without replacement (class_weighted_loss re-weights the loss)."""
    if balance == "weighted_sampler":
        weights = compute_sample_weight("balanced", labels)
        return WeightedRandomSampler(weights, num_samples=num_samples, replacement=True, generator=generator)
    return RandomSampler(range(len(labels)), num_samples=num_samples, generator=generator)


def epoch_batches(order: torch.Tensor, batch: int, rank: int, processes: int) -> list[torch.Tensor]:
    """This process's image indices for each optimizer step of an epoch drawn in ``order``: ceil(len / batch) steps
    of nearly equal size (no image dropped), each cut into ``processes`` nearly equal shares. Every process gets the
    same number of steps, as DDP needs."""
    steps = math.ceil(len(order) / batch)
    smallest = len(order) // steps // processes
    if smallest < 2:
        raise PipelineError(
            f"classifier.batch: {len(order)} images per epoch in steps of {batch} over {processes} process(es) leave "
            f"{smallest} image(s) per process and step; BatchNorm needs at least 2 (raise classifier.batch or use "
            f"fewer processes)")
    return [chunk.tensor_split(processes)[rank] for chunk in order.tensor_split(steps)]


def log_epoch(accelerator, label: str, epochs: int, entry: dict, meta: dict, suffix: str) -> None:
    """Print one epoch's line (a non-finite train loss is flagged) and log it to MLflow."""
    loss, score = entry["train_loss"], entry["val_balanced_accuracy"]
    flag = "" if math.isfinite(loss) else " (NOT FINITE: training diverged; lower classifier.lr)"
    tracking.log_metrics({f"train_loss{suffix}": loss, f"val_balanced_accuracy{suffix}": score}, step=entry["epoch"])
    accelerator.print(f"{label} epoch {entry['epoch']}/{epochs}: train loss {loss:.4f}{flag}, "
                      f"val balanced acc {score:.4f} (best {meta['best_score']:.4f} @ {meta['best_epoch']})")


@dataclass
class SeedJob:
    """One seed's training data and where its resumable checkpoint lives (resumed only when written for run_key)."""

    seed: int
    images: torch.Tensor  # uint8 (N, 3, S, S) on the CPU: every seed's train images, each loaded once
    train: tuple[torch.Tensor, list[int]]  # this seed's rows of ``images``, in its list's order, and their labels
    val: tuple[torch.Tensor, np.ndarray]
    epoch_size: int  # images drawn per epoch
    run_key: str
    checkpoint_dir: Path


def fit_seed(params: Params, variant: str, job: SeedJob, accelerator) -> tuple[dict, dict]:
    """Train one seed with early stopping on val balanced accuracy; returns (summary, best weights on CPU)."""
    from accelerate.utils import broadcast_object_list
    from diffusers.optimization import get_cosine_schedule_with_warmup

    c, classes = params.classifier, list(params.data.classes)
    device, rank, processes = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed, epoch_size, run_key, checkpoint_dir = job.seed, job.epoch_size, job.run_key, job.checkpoint_dir
    (train_rows, train_labels), (val_images, val_labels) = job.train, job.val
    suffix = f"_seed{seed}" if len(c.seeds) > 1 else ""
    label = f"train@{variant} seed {seed}"
    torch.manual_seed(seed)  # same seed -> same initial weights for every variant (paired comparison)
    model = create_classifier(c.arch, len(classes), c.pretrained)
    # channels_last: the layout CPU (oneDNN) and GPU (cuDNN, tensor cores) convolutions run fastest in; a CPU step
    # of EfficientNet-B0 takes ~2/3 of the time. Set before any optimizer state is restored (checkpoint.py).
    model.to(memory_format=torch.channels_last)
    optimizer = adamw(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    generator = torch.Generator()
    sampler = make_sampler(train_labels, c.balance, generator, epoch_size)
    steps_per_epoch = len(epoch_batches(torch.arange(epoch_size), c.batch, rank, processes))  # checks the batch too
    # Warm-up over the first epoch (from scratch, full lr at step 0 blows the logits up), then cosine decay.
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps_per_epoch, steps_per_epoch * c.epochs)
    meta = {"epoch": 0, "best_epoch": 0, "best_score": -1.0, "bad_epochs": 0, "stopped": False, "history": []}
    best = resumed_from = None
    found = load_checkpoint(checkpoint_dir, run_key)
    if found is not None:
        meta = found.meta
        model.load_state_dict(found.group("model"))
        found.restore_optimizer(optimizer)
        scheduler.load_state_dict(meta["scheduler"])
        best = found.group("best") or found.group("model")  # no "best" group: the last epoch saved was the best
        resumed_from = meta["epoch"]
        accelerator.print(f"{label}: resuming after epoch {resumed_from} from {checkpoint_dir}")

    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per optimizer step as built
    loss_weight = None
    if c.balance == "class_weighted_loss":  # ∝ 1 / class count, 1 on average over images
        weight = compute_class_weight("balanced", classes=np.arange(len(classes)), y=train_labels)
        loss_weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
    train_labels = torch.as_tensor(train_labels)

    last_checkpoint = time.monotonic()
    for epoch in range(meta["epoch"], c.epochs):
        if meta["stopped"]:
            break
        torch.manual_seed(derive_seed(seed, "epoch", epoch, "augment", rank))  # augmentations (CPU and GPU)
        generator.manual_seed(derive_seed(seed, "epoch", epoch, "order"))  # the same order on every process
        order = torch.as_tensor(list(sampler))
        model.train()
        total, seen = torch.zeros((), device=device), 0
        for indices in tqdm(epoch_batches(order, c.batch, rank, processes), desc=f"{label} epoch {epoch + 1}/{c.epochs}",
                            leave=False, disable=not accelerator.is_local_main_process):
            images = job.images[train_rows[indices]].to(device, non_blocking=True)
            labels = train_labels[indices].to(device, non_blocking=True)
            loss = classifier_loss(model, images, labels, loss_weight)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if c.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16: the grad scaler skips steps with inf gradients
                scheduler.step()
            total += loss.detach() * len(indices)
            seen += len(indices)
        train_loss = accelerator.reduce(total, "sum").item() / len(order)
        seen_per_process = accelerator.gather(torch.tensor([seen], device=device)).tolist()  # their sum: len(order)

        score = [None]
        if accelerator.is_main_process:  # one process scores val: BatchNorm buffers differ between processes
            proba = predict_proba(accelerator.unwrap_model(model), val_images, device)
            score = [classification_metrics(val_labels, proba, classes)["balanced_accuracy"]]
        score = broadcast_object_list(score)[0]
        if score > meta["best_score"]:
            meta.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
            state = accelerator.unwrap_model(model).state_dict()
            best = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}  # safetensors-ready
        else:
            meta["bad_epochs"] += 1
        meta["epoch"] = epoch + 1
        meta["stopped"] = meta["bad_epochs"] >= c.patience and epoch + 1 >= c.min_epochs
        entry = {"epoch": epoch + 1, "train_loss": train_loss, "val_balanced_accuracy": score,
                 "images_seen_per_process": seen_per_process}
        meta["history"].append(entry)
        finished = meta["stopped"] or meta["epoch"] == c.epochs
        # A finished seed other than the last is kept too, so an interruption while later seeds train does not redo it.
        if (finished and seed != c.seeds[-1]) or time.monotonic() - last_checkpoint >= 60 * c.checkpoint_minutes:
            if accelerator.is_main_process:
                groups = {"model": accelerator.unwrap_model(model).state_dict()}
                if best is not None and meta["best_epoch"] != meta["epoch"]:  # else best is the model: stored once
                    groups["best"] = best
                save_checkpoint(checkpoint_dir, run_key, groups, {**meta, "scheduler": scheduler.state_dict()},
                                optimizer)
            accelerator.wait_for_everyone()
            last_checkpoint = time.monotonic()
        log_epoch(accelerator, label, c.epochs, entry, meta, suffix)
        if meta["stopped"]:
            accelerator.print(f"{label}: early stop, no val improvement for {c.patience} epochs")

    summary = {
        "best_epoch": meta["best_epoch"],
        "best_val_balanced_accuracy": meta["best_score"],
        "epochs_run": meta["epoch"],
        "resumed_from_epoch": resumed_from,
        "history": meta["history"],
    }
    return summary, best


def train_variant(params: Params, variant: str) -> dict:
    """Train every seed of ``classifier.seeds`` for one variant; writes the model folder and returns the report
    written to reports/train/<variant>.json."""
    import mlflow
    from accelerate import PartialState

    if variant not in ALL_VARIANTS:
        raise PipelineError(f"unknown variant {variant!r}; expected one of {', '.join(ALL_VARIANTS)}")
    root, c, classes = workspace_root(), params.classifier, list(params.data.classes)
    if (reason := skip_reason(params, variant)) is not None:  # the stage's outputs then say why
        report = {"variant": variant, "skipped": reason}
        if PartialState().is_main_process:
            with atomic_dir(root / CLASSIFIER_DIR / variant) as temp:
                write_json(temp / CONFIG_NAME, {**report, "classes": classes})
            write_json(root / REPORTS_DIR / "train" / f"{variant}.json", report)
            print(f"train@{variant}: skipped ({reason})")
        return report
    split = read_split(params, root)
    # Each seed trains on its own draw of synthetic (or reserve) images: the seeds' spread then covers the generator.
    trains = {seed: training_samples(params, variant, split, root, seed) for seed in c.seeds}
    val = real_samples(split, "val")

    # The test images are hashed only, so the guard can catch byte-identical copies.
    digests = {s.path.resolve(): sha256_file(s.path) for s in real_samples(split, "test")}
    # One tensor holds each image once: the seeds' lists share their real rows (the oracle's share all), so several
    # seeds on HAM10000 at 224 px take ~1 GB, not ~1 GB each.
    paths = list(dict.fromkeys(s.path.resolve() for train in trains.values() for s in train))
    images, row = load_images(paths, c.image_size, digests), {path: i for i, path in enumerate(paths)}
    train_data = {seed: (torch.as_tensor([row[s.path.resolve()] for s in train]), [s.label for s in train])
                  for seed, train in trains.items()}
    val_data = (load_images([s.path for s in val], c.image_size, digests), np.array([s.label for s in val]))
    for train in trains.values():
        assert_no_leakage(train, split, allow_synthetic=variant in SYNTHETIC_VARIANTS, digests=digests)
    assert_real_heldout(val, split, "val", root / SYNTHETIC_DIR)

    train = trains[c.seeds[0]]  # every seed's list holds as many images of each class and origin
    counts = {origin: {cls: sum(1 for s in train if s.origin == origin and s.label == i) for i, cls in enumerate(classes)}
              for origin in ("real", "synthetic")}
    synthetic_count = sum(counts["synthetic"].values())
    if mlflow.active_run() is not None:
        mlflow.set_tags({"variant": variant, "classes": ",".join(classes), "method": params.diffusion.method,
                         "synthetic_count": str(synthetic_count), "seed": ",".join(map(str, c.seeds))})
        mlflow.log_params({f"classifier.{k}": v for k, v in tracking.flatten(c.model_dump(mode="json")).items()})

    accelerator = make_accelerator(params.compute.mixed_precision)
    accelerator.print(f"train@{variant}: {len(train) - synthetic_count} real + {synthetic_count} synthetic train images, "
                      f"{len(val)} val, {c.arch} at {c.image_size}px, seeds {c.seeds}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device.type}")
    checkpoints = root / CHECKPOINT_DIR / "classifier" / variant
    # classifier.equal_steps: every variant draws as many images per epoch as there are real train rows, whatever it
    # adds, so all take the baseline's steps and a gain measures data, not compute.
    if variant == ORACLE:
        epoch_size = params.oracle.epoch_images
    else:
        epoch_size = len(real_samples(split, "train")) if c.equal_steps else len(train)
    per_seed, best_states = {}, {}
    for seed, train in trains.items():
        # A checkpoint is resumed only if every training knob and the exact training data, in order, match.
        run_key = json_digest({
            "classifier": c.model_dump(mode="json", exclude={"seeds", "checkpoint_minutes"}),
            "classes": classes,
            "variant": variant,
            "seed": seed,
            "processes": accelerator.num_processes,
            "mixed_precision": params.compute.mixed_precision,
            "train": [(digests[s.path.resolve()], s.label) for s in train],
        })
        job = SeedJob(seed, images, train_data[seed], val_data, epoch_size, run_key, checkpoints / f"seed{seed}")
        per_seed[seed], best_states[seed] = fit_seed(params, variant, job, accelerator)

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
        with atomic_dir(target) as temp:
            for seed, state in best_states.items():
                save_file(state, str(temp / weights_name(seed)))
            write_json(temp / CONFIG_NAME, config)
        write_json(root / REPORTS_DIR / "train" / f"{variant}.json", report)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the finished models replace the resumable state
    tracking.log_metrics({"best_val_balanced_accuracy": report["best_val_balanced_accuracy"],
                          "train_real": report["train_real"], "train_synthetic": synthetic_count})
    return report
