"""Training images and prompts, encoded once: the VAE and text encoder are frozen, so their outputs are cached.

Each image is encoded as is and mirrored (dermoscopy has no left or right), keeping the posterior's mean and std:
a step draws ``mean + std * noise``, exactly what ``latent_dist.sample()`` gives, without running the VAE again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.atomic import read_table
from pipeline.core.errors import PipelineError
from pipeline.core.paths import workspace_root

FINETUNE_COLUMNS = ("image_id", "lesion_id", "dx", "path")


def read_finetune_csv(csv_path: Path, class_code: str) -> list[Path]:
    """Absolute image paths of ``data/prepared/finetune/<class>.csv`` (prepare writes at least one row, all of the
    class); one-line errors for a missing list, column or image."""
    not_found = f"fine-tuning list of class {class_code!r} not found; run the prepare stage first"
    rows = read_table(csv_path, FINETUNE_COLUMNS, not_found)
    paths = [workspace_root() / p for p in rows["path"]]  # an absolute path stays as it is
    for image_id, path in zip(rows["image_id"], paths):
        if not path.is_file():
            raise PipelineError(f"{csv_path}: image {image_id} not found at {path}")
    return paths


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range SD's VAE works in."""
    return images.float().div(127.5).sub(1.0)


@dataclass
class LatentCache:
    """Posterior mean/std of every image and its mirror image, in the VAE's unscaled latent space, on the VAE's device."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A draw from each indexed posterior, scaled as the UNet sees latents (what SD's train scripts do); the noise
        is drawn on the cache's device, so on a GPU ``generator`` must live there too."""
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` latents of images chosen at random (with replacement), drawn on the cache's device."""
        index = torch.randint(len(self), (count,), generator=generator, device=self.mean.device)
        return self.sample(index, generator)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, chunk: int = 8) -> LatentCache:
    """Encode uint8 [N, 3, R, R] images and their mirror images with the frozen VAE, ``chunk`` at a time on its device."""
    device, dtype = vae.device, vae.dtype
    means, stds = [], []
    for flip in (False, True):
        for start in range(0, len(images), chunk):
            x = to_model_range(images[start : start + chunk].to(device))
            dist = vae.encode((x.flip(-1) if flip else x).to(dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """The frozen text encoder's [N, 77, D] embeddings of ``prompts`` (fp32, on its device; computed once per run)."""
    return pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0].float()
