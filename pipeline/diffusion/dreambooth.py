"""DreamBooth: the whole UNet learns the class (prior preservation: ``finetune.prior_images``)."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from pipeline.core.errors import PipelineError, first_line, require_file

UNET_DIR = "unet"
UNET_FILE = "diffusion_pytorch_model.safetensors"
# Config keys that decide whether a fine-tuned UNet fits the base pipeline's VAE and text encoder.
_INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "sample_size")


def save_unet(unet, folder: str | Path) -> Path:
    unet.save_pretrained(str(Path(folder) / UNET_DIR), safe_serialization=True)
    return Path(folder) / UNET_DIR / UNET_FILE


def load_unet(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Swap the class's fine-tuned UNet into ``pipe``; returns its weights file."""
    path = require_file(Path(folder) / UNET_DIR / UNET_FILE, "fine-tuned UNet not found; run the finetune stage first")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(Path(folder) / UNET_DIR), use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: could not load the fine-tuned UNet ({first_line(exc)})") from None
    for key in _INTERFACE:
        if unet.config.get(key) != pipe.unet.config.get(key):
            raise PipelineError(
                f"{path}: UNet {key}={unet.config.get(key)} but the base model has {pipe.unet.config.get(key)}: "
                "it was trained for another base model"
            )
    pipe.unet = unet.to(pipe.device, pipe.unet.dtype)
    return path
