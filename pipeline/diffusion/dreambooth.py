"""DreamBooth: the whole UNet learns the class; prior preservation keeps it able to draw the generic class from
images the *base* model drew before training (fixed seeds, so a resumed run sees the same ones)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

from pipeline.diffusion.generate import Sampling, sample_images
from pipeline.core.errors import PipelineError

UNET_DIR = "unet"
UNET_FILE = "diffusion_pytorch_model.safetensors"
PRIOR_STEPS = 20
PRIOR_GUIDANCE = 5.0
# Config keys that decide whether a fine-tuned UNet fits the base pipeline's VAE and text encoder.
_INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "sample_size")


def prior_images(pipe: StableDiffusionPipeline, prompt: str, count: int, resolution: int, seed: int, batch: int = 8) -> torch.Tensor:
    """``count`` images of the generic class prompt from the untouched base model, uint8 [N, 3, R, R] on its device
    (8-bit like the class images diffusers' DreamBooth script saves as files)."""
    scheduler = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    sampling = Sampling(PRIOR_STEPS, PRIOR_GUIDANCE, resolution)
    images = []
    try:
        for start in range(0, count, batch):
            generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(start, min(count, start + batch))]
            images.append(sample_images(pipe, prompt, "", generators, sampling).float().mul(255).round().to(torch.uint8))
    finally:
        pipe.scheduler = scheduler
    return torch.cat(images)


def save_unet(unet, folder: str | Path) -> Path:
    unet.save_pretrained(str(Path(folder) / UNET_DIR), safe_serialization=True)
    return Path(folder) / UNET_DIR / UNET_FILE


def load_unet(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Swap the class's fine-tuned UNet into ``pipe``; returns its weights file."""
    path = Path(folder) / UNET_DIR / UNET_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: fine-tuned UNet not found; run the finetune stage first")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(Path(folder) / UNET_DIR), use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: could not load the fine-tuned UNet ({str(exc).splitlines()[0][:300]})") from None
    for key in _INTERFACE:
        if unet.config.get(key) != pipe.unet.config.get(key):
            raise PipelineError(
                f"{path}: UNet {key}={unet.config.get(key)} but the base model has {pipe.unet.config.get(key)}: "
                "it was trained for another base model"
            )
    pipe.unet = unet.to(pipe.device, pipe.unet.dtype)
    return path
