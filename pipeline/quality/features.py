"""Image embeddings for the quality metrics and the memorization gate, on the models' device.

The default extractor is the baseline classifier's penultimate layer: it exists offline after ``train@baseline``
and measures distances in the feature space the augmented classifier learns from. Inception-v3 (the FID standard)
is used only when its weights are already on disk, because stages never download.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.classifier.augment import normalize
from pipeline.classifier.dataset import load_images
from pipeline.classifier.model import CONFIG_NAME, load_classifier
from pipeline.core.atomic import read_json
from pipeline.core.errors import PipelineError, require_file
from pipeline.core.paths import resolve_user_path


def load_baseline_classifier(model_dir: Path, device: torch.device | str = "cpu") -> ClassifierFeatures:
    """Every seed's model of a trained classifier folder on ``device``; one-line errors name the file."""
    config = read_json(model_dir / CONFIG_NAME, "baseline classifier config not found (run `dvc repro train@baseline`)")
    models = [load_classifier(model_dir, seed).to(device) for seed in config["seeds"]]
    return ClassifierFeatures(models, list(config["classes"]), int(config["image_size"]))


class ClassifierFeatures:
    """A trained classifier's models (one per training seed, in eval mode) as a feature extractor: penultimate-layer
    features of the first seed's model, and class probabilities averaged over all seeds."""

    name = "baseline_classifier"

    def __init__(self, models: list[torch.nn.Module], classes: list[str], input_size: int):
        self.models, self.classes, self.input_size = models, classes, input_size
        self.device = next(models[0].parameters()).device

    @torch.no_grad()
    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 features, probabilities) of uint8 (n, 3, input_size, input_size) images, on the models' device."""
        x = normalize(images.to(self.device))  # as in training and model.predict_proba
        first, *others = self.models
        trunk = first.forward_features(x)  # the expensive part, shared by features and logits
        pooled = first.forward_head(trunk, pre_logits=True)
        probs = torch.softmax(first.forward_head(trunk), dim=1)
        for model in others:
            probs = probs + torch.softmax(model(x), dim=1)
        return pooled.double(), probs / len(self.models)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[0]


class InceptionFeatures:
    """2048-d pool features of the FID Inception-v3 (torch-fidelity's port), from a local weights file only."""

    name = "inception"
    input_size = 299

    def __init__(self, configured: str | None, device: torch.device | str = "cpu"):
        if configured:
            weights = resolve_user_path(configured, "quality.inception_weights")
        else:
            weights = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
        require_file(weights, "Inception weights not found (stages never download; set quality.inception_weights to a "
                     "local copy or use extractor: baseline_classifier)")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=str(weights))
        except ModuleNotFoundError as exc:
            raise PipelineError(f"quality.extractor: inception needs the torch-fidelity package ({exc}); "
                                "install it or use extractor: baseline_classifier") from None
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """float64 features of uint8 (n, 3, S, S) images (uint8, as torch-fidelity expects), on the model's device."""
        return self.model(images.to(self.device)).reshape(len(images), -1).double()


def feature_space(real: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """``real`` and ``others`` with each feature as the normal quantile of its mid-rank in ``real``. Why ranks: a few
    images with outsized activations (50-190x, on the demo) own the mean, the covariance and every centred cosine of
    raw features; ranks are immune, give real features zero mean and unit scale (as KID's kernel and the memorization
    cosine assume), and keep an exact copy of a real image at cosine 1."""
    ordered = real.T.contiguous().sort(dim=1).values  # (features, n_real)
    n = ordered.shape[1]

    def gaussianise(x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.new_empty((0, ordered.shape[0]))
        values = x.T.contiguous()
        below = torch.searchsorted(ordered, values, side="left")
        at_or_below = torch.searchsorted(ordered, values, side="right")
        mid_rank = (below + at_or_below).to(x.dtype) / 2  # 0 .. n; a real value at sorted position i gets i + 0.5
        return torch.special.ndtri((mid_rank + 0.5) / (n + 1)).T

    return [gaussianise(x) for x in (real, *others)]


def load_arrays(paths: Sequence[str | Path], size: int, desc: str = "images", quiet: bool = False) -> torch.Tensor:
    """Images as uint8 (n, 3, size, size) as the classifier sees them, through its decode cache."""
    missing = next((p for p in paths if not Path(p).is_file()), None)
    if missing is not None:
        raise PipelineError(f"{missing}: image file not found")
    step = 64
    quiet = quiet or len(paths) < 4 * step
    starts = tqdm(range(0, len(paths), step), desc=desc, unit="chunk", disable=quiet, leave=False)
    chunks = [load_images([Path(p) for p in paths[start : start + step]], size) for start in starts]
    return torch.cat(chunks) if chunks else torch.empty((0, 3, size, size), dtype=torch.uint8)


def embed_paths(paths: Sequence[str | Path], extract: Callable[[torch.Tensor], torch.Tensor], size: int,
                batch: int = 32, desc: str = "features") -> torch.Tensor:
    """Features of many image files, streamed in batches so thousands of real images never sit in memory at once."""
    progress = tqdm(range(0, len(paths), batch), desc=desc, unit="batch", disable=len(paths) < 4 * batch, leave=False)
    chunks = [extract(load_arrays(paths[start : start + batch], size, quiet=True)) for start in progress]
    return torch.cat(chunks) if chunks else torch.empty((0, 0), dtype=torch.float64)
