"""A throw-away workspace for the finetune/generate tests: a tiny random SD base, fine-tune lists with real PNGs.

The base is built once per session (``build_tiny_pipeline(32)`` + ``save_pretrained``: exactly the
embedded format the base stage writes) and linked into every workspace.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.params import Params, parse_params
from pipeline.core.paths import WORKSPACE_ENV

CLASSES = ["df", "vasc"]
_COLOURS = {"df": (150, 105, 75), "vasc": (160, 40, 60)}


def build_base(folder: Path) -> Path:
    from pipeline.diffusion.tiny import build_tiny_pipeline

    build_tiny_pipeline(32, seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def make_workspace(root: Path, base: Path, images: int = 5, size: int = 48) -> Path:
    """dvc.yaml placeholder, models/base -> the session base, data/prepared/finetune/<class>.csv + PNGs."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "models").mkdir()
    (root / "models" / "base").symlink_to(base, target_is_directory=True)
    lists = root / "data" / "prepared" / "finetune"
    lists.mkdir(parents=True)
    for dx in CLASSES:
        rows = ["image_id,lesion_id,dx,path"]
        for i in range(images):
            image_id = f"ISIC_{dx}{i:04d}"
            yy, xx = np.mgrid[:size, :size]
            disc = ((yy - size / 2 - rng.normal(0, 3)) ** 2 + (xx - size / 2) ** 2) < (size * rng.uniform(0.2, 0.3)) ** 2
            pixels = np.full((size, size, 3), (225, 185, 160), float)
            pixels[disc] = _COLOURS[dx]
            pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
            path = root / "data" / "raw" / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            rows.append(f"{image_id},HAM_{dx}{i:04d},{dx},data/raw/{image_id}.png")
        (lists / f"{dx}.csv").write_text("\n".join(rows) + "\n")
    return root


def micro_params(method: str = "lora", diffusion: dict | None = None, generate: dict | None = None) -> Params:
    """Micro settings: 32 px, a handful of steps, rank 4 with alpha 8 (so a lost alpha would show)."""
    return parse_params({
        "data": {"classes": CLASSES},
        "diffusion": {
            "method": method, "resolution": 32, "steps": 4, "batch": 2, "checkpoint_every": 2, "lr": 1e-2,
            "lora": {"rank": 4, "alpha": 8}, "class_images": 2, **(diffusion or {}),
        },
        "generate": {"per_class": 3, "steps": 2, "batch": 2, **(generate or {})},
    })


def unet_probe(unet) -> torch.Tensor:
    """The UNet's output on fixed inputs: a fingerprint of its function, independent of any file format."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), states).sample


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def trained_workspace(root: Path, base: Path, params: Params, class_code: str = "df") -> Path:
    """A workspace whose class model is already fine-tuned (for module-scoped fixtures, which cannot use monkeypatch)."""
    import pytest

    from pipeline.diffusion.finetune import finetune_class

    make_workspace(root, base)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv(WORKSPACE_ENV, raising=False)
        finetune_class(params, class_code)
    return root


@contextmanager
def killed_during_step(step: int):
    """The run inside dies with KeyboardInterrupt (as on Ctrl-C) when step ``step`` computes its loss (finetune's
    ``diffusion_loss``, which the controlnet loop calls too)."""
    from pipeline.diffusion import finetune

    real = finetune.diffusion_loss
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(finetune, "diffusion_loss", loss)
        yield
    assert len(calls) == step
