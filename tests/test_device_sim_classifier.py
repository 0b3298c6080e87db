"""The classifier's training step and evaluation batch on a fake CUDA device (no GPU needed).

torch's FakeTensorMode runs the real timm EfficientNet-B0 and our step functions with every tensor on a fake
``cuda`` device and raises FakeTensorDeviceMismatchError on any cpu/cuda mix, so a tensor left on the CPU (an
augmentation draw, the normalisation constants, labels, class weights) fails here as it would on a GPU.
Backward needs a real CUDA context, so the training step stops at the loss.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from pipeline.classifier.model import classifier_loss, create_classifier, predict_batch

pytestmark = [pytest.mark.device_sim, pytest.mark.usefixtures("one_thread")]

CLASSES = 3


@pytest.fixture
def fake_cuda():
    """Inside the mode: an EfficientNet-B0 and a uint8 batch with labels, all on fake ``cuda``."""
    with FakeTensorMode():
        with torch.device("cuda"):  # only while building: the steps below must place their own tensors
            model = create_classifier("efficientnet_b0", CLASSES, pretrained=False)
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
        labels = torch.tensor([0, 1, 2, 0], device="cuda")
        yield model, images, labels


def test_training_step_up_to_the_loss_stays_on_the_model_device(fake_cuda):
    model, images, labels = fake_cuda
    model.train()
    weight = torch.ones(CLASSES, device="cuda")  # classifier.balance: class_weighted_loss
    loss = classifier_loss(model, images, labels, weight)
    assert loss.device.type == "cuda" and loss.shape == () and loss.dtype == torch.float32
    with pytest.raises(FakeTensorDeviceMismatchError):  # the mode does catch a mix: labels left on the CPU
        classifier_loss(model, images, labels.cpu(), weight)


def test_evaluation_batch_stays_on_the_model_device(fake_cuda):
    model, images, _ = fake_cuda
    model.eval()
    proba = predict_batch(model, images)
    assert proba.device.type == "cuda" and proba.shape == (4, CLASSES) and proba.dtype == torch.float32
    with pytest.raises(RuntimeError, match="same device"):  # a CPU batch meets the CUDA model's first convolution
        predict_batch(model, images.cpu())
