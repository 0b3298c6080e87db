"""LoRA on the UNet's layers (``diffusion.lora.target_modules``), saved so ``pipe.load_lora_weights`` reads it.
``load_lora`` first checks every key and shape against the UNet: diffusers loads a LoRA file for the wrong
architecture with at most a log line."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from pipeline.core.errors import PipelineError, first_line, require_file
from pipeline.core.params import LoraParams

LORA_FILE = "pytorch_lora_weights.safetensors"
# diffusers' format ("...to_q.lora.down.weight") and peft's ("...to_q.lora_A.weight") both appear in the wild.
_KEY = re.compile(r"^unet\.(?P<module>.+)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B)\.weight$")


def add_lora(unet, cfg: LoraParams) -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach a fresh adapter; returns the adapter's (only trainable) parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(cfg.target_modules))
    )
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(unet, folder: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (+ the adapter config as metadata, so alpha != rank survives)."""
    # peft's own key names (``lora_A``/``lora_B``): diffusers' conversion renames only attention keys, and a file that
    # mixes both namings loads only in part (diffusers then drops the attention half without a word).
    state = get_peft_model_state_dict(unet)
    metadata = unet.peft_config["default"].to_dict()
    # peft keeps target_modules as a set, whose order follows the process's hash seed: sorted, the same weights
    # always give the same file bytes (and DVC the same hash).
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in state.items()},
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    return Path(folder) / LORA_FILE


def check_lora_file(path: Path, unet) -> None:
    """Every key must name a Linear or Conv2d of this UNet with matching shape; else one PipelineError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{path}: not a readable safetensors LoRA file ({exc})") from None
    if not shapes:
        raise PipelineError(f"{path}: LoRA file holds no tensors")
    namings = {("peft" if match["kind"].startswith("lora_") else "diffusers") for key in shapes if (match := _KEY.match(key))}
    if len(namings) > 1:
        raise PipelineError(
            f"{path}: mixes peft (lora_A/lora_B) and diffusers (lora.down/lora.up) key names; "
            "diffusers would load only part of it: save all keys in one naming"
        )
    modules, ranks = dict(unet.named_modules()), {}
    for key, shape in sorted(shapes.items()):
        match = _KEY.match(key)
        if not match:
            raise PipelineError(f"{path}: key {key!r} is not a UNet LoRA weight of this pipeline")
        name = match["module"]
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by peft
        down = match["kind"] in ("lora.down", "lora_A")
        rank = shape[0 if down else 1] if len(shape) >= 2 else 0
        # peft's factors: Linear down [r, in], up [out, r]; Conv2d down [r, in, kh, kw], up a 1x1 conv [out, r, 1, 1]
        if isinstance(layer, torch.nn.Linear):
            expected = (rank, layer.in_features) if down else (layer.out_features, rank)
        elif isinstance(layer, torch.nn.Conv2d):
            expected = (rank, layer.in_channels, *layer.kernel_size) if down else (layer.out_channels, rank, 1, 1)
        else:
            raise PipelineError(f"{path}: key {key!r} targets {name!r}, which is not a linear or conv layer of this UNet")
        if shape != expected:
            raise PipelineError(
                f"{path}: {key!r} has shape {list(shape)} but {name} takes {list(expected)}: "
                "the LoRA was trained for another base model"
            )
        ranks.setdefault(name, set()).add(rank)
    uneven = sorted(name for name, r in ranks.items() if len(r) != 1)
    if uneven:
        raise PipelineError(f"{path}: down and up weights of {uneven[0]!r} disagree on the LoRA rank")


def load_lora(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Validate, load and fuse the class LoRA into ``pipe``; returns the weights file."""
    path = require_file(Path(folder) / LORA_FILE, "LoRA weights not found; run the finetune stage first")
    check_lora_file(path, pipe.unet)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers logs that the file has no text-encoder LoRA, which is by design
    try:
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name="class")
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise PipelineError(f"{path}: could not load LoRA ({first_line(exc)})") from None
    finally:
        diffusers_logging.set_verbosity(level)
    # Bake the low-rank update into the base weights: generation then costs exactly as much as the base model.
    pipe.fuse_lora(adapter_names=["class"])
    pipe.unload_lora_weights()
    return path
