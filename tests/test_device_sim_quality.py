"""The screen stage's feature extraction on a fake CUDA device (no GPU needed).

Inside torch's FakeTensorMode, tensors and modules can live on "cuda" on a CPU-only machine; any op that
mixes a cuda and a cpu tensor raises FakeTensorDeviceMismatchError, so a tensor created on the wrong
device anywhere in the extraction path fails this test.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline.quality.features import ClassifierFeatures, feature_space
from pipeline.quality.memorization import cosine_matrix

pytestmark = pytest.mark.device_sim

CLASSES = ["df", "mel", "vasc"]


def test_classifier_features_and_their_comparison_stay_on_the_models_cuda_device():
    with FakeTensorMode():
        with torch.device("cuda"):  # built on cuda: Module.to cannot move fake parameters; cpu stays the default after
            models = [timm.create_model("efficientnet_b0", num_classes=len(CLASSES), pretrained=False).eval() for _ in range(2)]
        extractor = ClassifierFeatures(models, CLASSES, 32)
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
        features, probs = extractor.features_and_probs(images)
        real_images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, device="cuda")
        real, synthetic = feature_space(extractor(real_images), features)
        nearest = cosine_matrix(synthetic, real).max(dim=1)  # the memorization gate's nearest neighbours

    assert extractor.device.type == "cuda"
    assert features.device.type == probs.device.type == real.device.type == synthetic.device.type == "cuda"
    assert nearest.values.device.type == nearest.indices.device.type == "cuda" and nearest.values.shape == (4,)
    assert features.shape == (4, 1280) and features.dtype == torch.float64
    assert probs.shape == (4, len(CLASSES)) and synthetic.shape == (4, 1280)
