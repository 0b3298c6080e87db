"""Pre-training of the embedded tiny base model on the train split, so fine-tuning starts from "skin with a lesion".

SD's two-stage recipe in minutes on a CPU: the VAE learns to reconstruct train images (mostly half-size crops:
many cheap steps), the images' latents are cached once, then the UNet learns to denoise them under one generic
prompt (dropped 10% of the time for classifier-free guidance) with ``diffusion_loss``, the objective fine-tuning
uses too. Both draw each diagnosis equally often; only train images are read, and the same seed on CPU gives the same
weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core import tracking
from pipeline.core.atomic import read_table
from pipeline.core.paths import workspace_root
from pipeline.diffusion.training_data import LatentCache, encode_images, encode_prompts, to_model_range
from pipeline.core.errors import PipelineError
from pipeline.core.params import BasePretrainParams

KL_WEIGHT = 1e-6  # SD's VAE weight: latents stay well-behaved without blurring reconstructions
# Pixels weigh 1 + LESION_WEIGHT x their distance from the skin's (median) colour: the small lesion carries the class.
# Unweighted, the VAE turned purple clods brown (the oracle recognised 68-72% of its reconstructions, 75-80% weighted).
LESION_WEIGHT = 12.0
UNCOND_PROB = 0.1  # share of UNet samples that see the empty prompt (classifier-free guidance)
MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al. 2023): converges several times faster
WARMUP_STEPS = 20
# Share of VAE steps on random half-size crops (4x cheaper; colour and texture are local); the last steps see whole
# images so GroupNorm statistics match inference.
VAE_CROP_SHARE = 0.9
LOG_EVERY = 10


def train_images(split_csv: str | Path) -> tuple[list[Path], list[str]]:
    """Absolute paths and diagnoses of split.csv's train rows (relative paths are from the workspace root)."""
    not_found = "split file not found; run the prepare stage first (dvc repro prepare)"
    rows = read_table(split_csv, ("dx", "path", "split"), not_found)
    train = rows[rows["split"] == "train"]
    if train.empty:
        raise PipelineError(f"{split_csv}: no rows with split == 'train'; the base model needs train images")
    return [workspace_root() / p for p in train["path"]], list(train["dx"])  # an absolute path stays as it is


def random_flips(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dermoscopy has no up or left: flip each sample horizontally and/or vertically at random."""
    flip_h = torch.rand(x.shape[0], generator=generator) < 0.5
    flip_v = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    return torch.where(flip_v[:, None, None, None], x.flip(-2), x)


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size``×``size`` window at an independent random position in each sample."""
    top = torch.randint(0, x.shape[-2] - size + 1, (x.shape[0],), generator=generator).tolist()
    left = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([img[:, t : t + size, l : l + size] for img, t, l in zip(x, top, left)])


def fit(module, step_loss: Callable[[int], torch.Tensor], steps: int, lr: float, weight_decay: float,
        name: str) -> list[float]:
    """The VAE's or UNet's loop: clipped AdamW, warm-up then cosine decay to 10% of the peak (transformers' schedule;
    diffusers' decays to 0); the mean loss of every LOG_EVERY steps (and the last) to the progress bar and MLflow."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(WARMUP_STEPS, max(1, steps // 10))
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, max(steps, warmup + 1), min_lr_rate=0.1)
    losses: list[float] = []
    for step in (bar := tqdm(range(steps), desc=name, mininterval=2)):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % LOG_EVERY == 0 or len(losses) == steps:
            recent = float(np.mean(losses[-LOG_EVERY:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            tracking.log_metrics({f"base/{name}_loss": recent}, step=len(losses))
    module.eval().requires_grad_(False)
    return losses


def lesion_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights [N, 1, H, W] with mean 1 per image, higher the farther a pixel is from the skin colour."""
    skin = x.flatten(2).median(-1).values[..., None, None]
    weights = 1 + LESION_WEIGHT * (x - skin).abs().sum(1, keepdim=True)
    return weights / weights.mean((1, 2, 3), keepdim=True)


def vae_loss(vae, x: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    error = vae.decode(posterior.sample()).sample - x
    return (lesion_weights(x) * (error.abs() + error.square())).mean() + KL_WEIGHT * posterior.kl().mean()


def train_vae(vae, images: torch.Tensor, weights: torch.Tensor, cfg: BasePretrainParams, generator: torch.Generator) -> list[float]:
    crop_steps = int(cfg.vae_steps * VAE_CROP_SHARE)

    def step_loss(step: int) -> torch.Tensor:
        # Drawn with replacement, so each image exactly with probability ∝ its weight.
        index = torch.multinomial(weights, cfg.batch, replacement=True, generator=generator)
        x = random_flips(to_model_range(images[index]), generator)
        if step < crop_steps:
            x = random_crops(x, x.shape[-1] // 2, generator)
        return vae_loss(vae, x)

    return fit(vae, step_loss, cfg.vae_steps, cfg.vae_lr, 0.0, "vae")


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's regression target for the scheduler's prediction_type, as in diffusers' train scripts."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise PipelineError(f"base scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v; ``diffusion_target`` refuses the
    rest): else the nearly noise-free timesteps dominate and the coarse layout is learned slowly."""
    snr = compute_snr(scheduler, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    return snr.clamp(max=gamma) / ((snr + 1) if v_prediction else snr)


@dataclass
class Batch:
    """One step's latents and prompt embeddings (one row each), on the model's device."""

    latents: torch.Tensor
    states: torch.Tensor
    priors: int = 0  # the last this many rows are prior-class samples ...
    prior_weight: float = 1.0  # ... and their loss counts this many times


def diffusion_loss(unet, noise_scheduler, batch: Batch, generator: torch.Generator, noise_offset: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Min-SNR-weighted MSE of ``unet`` (run in ``dtype``) on the batch noised at random timesteps: the objective of
    pre-training, fine-tuning and the ControlNet. Prior-class rows add ``batch.prior_weight`` times their own loss.
    ``noise_offset`` adds one random constant per image and latent channel to the noise (diffusers' ``--noise_offset``),
    so a fine-tune can move a class's overall colour, which zero-mean noise barely teaches. ``generator`` must live on
    the latents' device."""
    latents = batch.latents
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * shift
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator, device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(dtype, memory_format=torch.channels_last)
    pred = unet(noisy, timesteps, batch.states.to(dtype)).sample.float()
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    per_sample = F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) * min_snr_weights(noise_scheduler, timesteps)
    n = len(latents) - batch.priors
    return per_sample[:n].mean() + (batch.prior_weight * per_sample[n:].mean() if batch.priors else 0.0)


def train_unet(pipe: StableDiffusionPipeline, latents: LatentCache, weights: torch.Tensor, cfg: BasePretrainParams,
               generator: torch.Generator) -> list[float]:
    unet, scheduler = pipe.unet, pipe.scheduler
    pipe.text_encoder.eval().requires_grad_(False)
    cond, uncond = encode_prompts(pipe, [cfg.prompt, ""]).unsqueeze(1)  # each [1, 77, D]
    weights = weights.repeat(len(latents) // len(weights))  # each image and its mirror

    def step_loss(step: int) -> torch.Tensor:
        index = torch.multinomial(weights, cfg.batch, replacement=True, generator=generator)
        x = random_flips(latents.sample(index, generator), generator)  # latent vertical flips: the VAE saw both
        drop = (torch.rand(cfg.batch, generator=generator) < UNCOND_PROB)[:, None, None]
        return diffusion_loss(unet, scheduler, Batch(x, torch.where(drop, uncond, cond)), generator)

    return fit(unet, step_loss, cfg.unet_steps, cfg.unet_lr, 1e-2, "unet")


@torch.no_grad()
def sample_grid(pipe: StableDiffusionPipeline, prompt: str, seed: int) -> Image.Image:
    """16 images of the generic prompt in 2 rows, by a fast multistep solver (the saved scheduler is untouched)."""
    sampler = StableDiffusionPipeline(
        **{**pipe.components, "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)},
        requires_safety_checker=False,
    )
    sampler.set_progress_bar_config(disable=True)
    images = sampler([prompt] * 16, num_inference_steps=25, guidance_scale=3.0,  # at the UNet's own size by default
                     generator=torch.Generator().manual_seed(seed), output_type="pil").images
    return make_image_grid(images, rows=2, cols=8)


@torch.no_grad()
def reconstruction_grid(vae, images: torch.Tensor) -> Image.Image:
    """Real images (top row) over their VAE reconstructions (bottom row): shows what the latent space keeps."""
    x = to_model_range(images)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    both = torch.cat([x, recon]).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return make_image_grid([Image.fromarray(a) for a in both], rows=2, cols=len(images))


def pretrain(pipe: StableDiffusionPipeline, images: torch.Tensor, weights: torch.Tensor, cfg: BasePretrainParams,
             seed: int) -> tuple[dict, dict[str, float]]:
    """VAE, latent cache, UNet, drawing image ``i`` with probability ∝ ``weights[i]``, in place (VAE scaling_factor
    too). Returns pretrain.json's summary (no timings: the same seed gives the same file) and each phase's seconds."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    vae_losses = train_vae(pipe.vae, images, weights, cfg, generator)
    vae_done = time.perf_counter()
    latents = encode_images(pipe.vae, images, chunk=64)
    # SD's rule: scale latents to unit variance so the noise schedule fits them (0.18215 for SD's own VAE).
    latents.scaling_factor = float(1.0 / latents.mean.std().clamp_min(1e-6))
    pipe.vae.register_to_config(scaling_factor=latents.scaling_factor)
    encoded = time.perf_counter()
    unet_losses = train_unet(pipe, latents, weights, cfg, generator)
    seconds = {"vae": vae_done - start, "encode": encoded - vae_done, "unet": time.perf_counter() - encoded}
    summary = {"train_images": len(images), "scaling_factor": latents.scaling_factor}
    for name, losses in (("vae", vae_losses), ("unet", unet_losses)):
        summary[f"{name}_steps"] = len(losses)
        summary[f"{name}_loss_first"] = losses[0] if losses else None
        summary[f"{name}_loss_last"] = float(np.mean(losses[-LOG_EVERY:])) if losses else None
    return summary, seconds
