"""Image embeddings for the quality metrics and the memorization check.

The default extractor is the baseline classifier's penultimate layer (timm ``forward_head(...,
pre_logits=True)``): it exists offline after ``train@baseline``, and it measures distances in
the very feature space the augmented classifier learns from. Inception-v3 (the FID standard,
via torchmetrics/torch-fidelity) is offered only when its weights are already on disk, because
stages never download.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import PipelineError

# timm's default normalisation (its pretrained_cfg for efficientnet_b0); config.json may override it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torch-fidelity's FID Inception weights, as torchmetrics would download them into torch hub's cache.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass
class BaselineClassifier:
    """The trained baseline classifier(s): one model per training seed, in eval mode."""

    models: list[torch.nn.Module]
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: Path


def load_baseline_classifier(model_dir: str | Path) -> BaselineClassifier:
    """Every seed's model of a trained classifier folder, built by the classifier package; one-line errors name the file."""
    from safetensors import SafetensorError

    from pipeline.classifier.model import CONFIG_NAME, load_classifier, read_config, weights_name

    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise PipelineError(f"{config_path}: baseline classifier config not found (run `dvc repro train@baseline`)")
    try:
        config = read_config(model_dir)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    missing = [key for key in ("arch", "classes", "image_size", "seeds") if key not in config]
    if missing:
        raise PipelineError(f"{config_path}: missing key {missing[0]!r}")
    if not config["seeds"]:
        raise PipelineError(f"{config_path}: 'seeds' is empty")
    models = []
    for seed in config["seeds"]:
        weights = model_dir / weights_name(seed)
        if not weights.is_file():
            raise PipelineError(f"{weights}: baseline classifier weights not found (run `dvc repro train@baseline`)")
        try:
            models.append(load_classifier(model_dir, seed))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise PipelineError(
                f"{weights}: cannot load into {config['arch']} with {len(config['classes'])} classes "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
    mean = tuple(config.get("mean", IMAGENET_MEAN))
    std = tuple(config.get("std", IMAGENET_STD))
    return BaselineClassifier(models, list(config["classes"]), int(config["image_size"]), mean, std, model_dir)


class ClassifierFeatures:
    """Penultimate-layer features of the first seed's model, and class probabilities averaged over all seeds."""

    name = "baseline_classifier"

    def __init__(self, classifier: BaselineClassifier):
        self.classifier = classifier
        self.input_size = classifier.image_size
        self._mean = torch.tensor(classifier.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(classifier.std, dtype=torch.float32).view(1, 3, 1, 1)

    def _tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return (x - self._mean) / self._std

    @torch.no_grad()
    def features_and_probs(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(features, probabilities) for uint8 HxWx3 arrays of size ``input_size``."""
        x = self._tensor(images)
        first, *others = self.classifier.models
        trunk = first.forward_features(x)  # the expensive part, shared by features and logits
        pooled = first.forward_head(trunk, pre_logits=True)
        probs = torch.softmax(first.forward_head(trunk), dim=1)
        for model in others:
            probs = probs + torch.softmax(model(x), dim=1)
        return pooled.numpy().astype(np.float64), (probs / len(self.classifier.models)).numpy()

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.features_and_probs(images)[0]


class InceptionFeatures:
    """2048-d pool features of the FID Inception-v3 (torch-fidelity's port), from a local weights file only."""

    name = "inception"
    input_size = 299

    def __init__(self, weights: Path):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.model = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
            )
        except ModuleNotFoundError as exc:
            raise PipelineError(
                f"quality.extractor: inception needs the torch-fidelity package ({exc}); "
                "install it or use extractor: baseline_classifier"
            ) from None
        self.model.eval()

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8, as torch-fidelity expects
        return self.model(x).reshape(len(images), -1).numpy().astype(np.float64)


def inception_weights_path(configured: str | None) -> Path:
    """The Inception weights file to use: ``quality.inception_weights``, else torch hub's cache; must exist."""
    if configured:
        from pipeline.paths import resolve_user_path

        path = resolve_user_path(configured, "quality.inception_weights")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise PipelineError(
            f"{path}: Inception weights not found (stages never download; set quality.inception_weights "
            "to a local copy or use extractor: baseline_classifier)"
        )
    return path


def load_arrays(paths: Sequence[str | Path], size: int, desc: str = "images", quiet: bool = False) -> np.ndarray:
    """Images as uint8 (n, size, size, 3), centre-cropped and resized exactly as the classifier sees them.

    Goes through the classifier's decode cache (``.cache/classifier``), so real images that
    train@baseline already decoded are not decoded again; a broken file is a one-line error naming it.
    """
    from pipeline.classifier.dataset import load_images

    missing = next((p for p in paths if not Path(p).is_file()), None)
    if missing is not None:
        raise PipelineError(f"{missing}: image file not found")
    chunks = []
    step = 64
    for start in tqdm(range(0, len(paths), step), desc=desc, unit="chunk", disable=quiet or len(paths) < 4 * step, leave=False):
        chunks.append(load_images([Path(p) for p in paths[start : start + step]], size).permute(0, 2, 3, 1).numpy())
    return np.concatenate(chunks) if chunks else np.empty((0, size, size, 3), dtype=np.uint8)


def embed_paths(
    paths: Sequence[str | Path],
    extract: Callable[[Sequence[np.ndarray]], np.ndarray],
    size: int,
    batch: int = 32,
    desc: str = "features",
) -> np.ndarray:
    """Features of many image files, streamed in batches so thousands of real images never sit in memory at once."""
    chunks = []
    for start in tqdm(range(0, len(paths), batch), desc=desc, unit="batch", disable=len(paths) < 4 * batch, leave=False):
        arrays = load_arrays(paths[start : start + batch], size, quiet=True)
        chunks.append(extract(list(arrays)))
    return np.concatenate(chunks) if chunks else np.empty((0, 0))
