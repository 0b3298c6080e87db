"""The classifier network (timm): one step of it (a batch's training loss or class probabilities) and its weights on
disk (safetensors only: loading never unpickles code). A step makes every tensor on its input's device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.core.atomic import read_json
from pipeline.classifier.augment import augment, normalize
from pipeline.core.errors import PipelineError, first_line, require_file

CONFIG_NAME = "config.json"
EVAL_BATCH = 256


def weights_name(seed: int) -> str:
    return f"seed{seed}.safetensors"


def create_classifier(arch: str, num_classes: int, pretrained: bool) -> torch.nn.Module:
    """A timm model with a fresh ``num_classes`` head; ImageNet weights when ``pretrained`` (needs them cached or a network)."""
    import timm

    if not timm.is_model(arch):
        raise PipelineError(f"classifier.arch: unknown timm architecture {arch!r} (e.g. efficientnet_b0)")
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except Exception as exc:  # hub/network/cache errors come in many types; all mean the same to the user
        if not pretrained:
            raise
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise PipelineError(
            f"classifier.pretrained: could not load ImageNet weights for {arch} ({reason}); set "
            f"`classifier.pretrained: false` in params.yaml, or pre-download them once with network access: "
            f"python -c \"import timm; timm.create_model('{arch}', pretrained=True)\""
        ) from None


def read_config(folder: Path) -> dict:
    return read_json(folder / CONFIG_NAME, "classifier config not found; run `dvc repro train` first")


def load_classifier(folder: Path, seed: int, classes: list[str] | None = None) -> torch.nn.Module:
    """Rebuild the network from ``config.json`` and load ``seed<k>.safetensors`` (eval mode, CPU)."""
    config = read_config(folder)
    if classes is not None and list(config["classes"]) != list(classes):
        raise PipelineError(
            f"{folder / CONFIG_NAME}: trained for classes {config['classes']} but data.classes is {classes}; rerun `dvc repro train`"
        )
    missing = f"weights of seed {seed} not found; rerun `dvc repro train` (classifier.seeds changed?)"
    path = require_file(folder / weights_name(seed), missing)
    model = create_classifier(config["arch"], len(config["classes"]), pretrained=False)
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise PipelineError(f"{path}: cannot load into {config['arch']} with {len(config['classes'])} classes "
                            f"({first_line(exc)})") from None
    return model.eval()


def classifier_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the model on augmented uint8 ``images`` (N, 3, H, W); logits in fp32 under mixed precision."""
    return F.cross_entropy(model(augment(images)).float(), labels, weight=class_weight)


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (N, classes) of uint8 ``images``, on the model's device."""
    return torch.softmax(model(normalize(images)).float(), dim=1)


def predict_proba(model: torch.nn.Module, images: torch.Tensor, device: torch.device | str | None = None) -> np.ndarray:
    """Probabilities (N, classes) for cached uint8 images, in order, computed on ``device`` (default: the GPU if any).
    The model is moved there and set to eval mode."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    out = [predict_batch(model, images[start : start + EVAL_BATCH].to(device, non_blocking=True)).cpu()
           for start in range(0, len(images), EVAL_BATCH)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)
