"""One classifier step: a batch's training loss and its class probabilities (train.py, evaluate, the device tests).

Inputs are expected on the model's device; everything made here is made there too, so a step never mixes devices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.classifier.augment import augment, normalize

EVAL_BATCH = 256


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weight per class, ∝ 1 / its count and 1 on average over images (classifier.balance: class_weighted_loss)."""
    counts = (labels[:, None] == torch.arange(num_classes, device=labels.device)).sum(0).double()
    return (counts.sum() / (num_classes * counts)).float()


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
