"""generate@<class>: sample the class's synthetic images, each from its own seed, with a manifest that explains every file.

Every image ``k`` has its own seed ``image_seed(params.seed, class, k)`` and its own torch.Generator,
so any single image can be regenerated alone (``generate_images(pipe, ..., [seed])``): same initial
noise, same denoising; only float rounding may differ with the batch it is computed in (at most
one 8-bit level in rare pixels, seen on CPU). Under ``accelerate launch`` the batches are split
between processes; the main process gathers the manifest rows and writes ``manifest.csv`` and
``grid.png``.
"""

from __future__ import annotations

import csv
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from tqdm.auto import tqdm

from pipeline import tracking
from pipeline.atomic import atomic_dir
from pipeline.digest import derive_seed, sha256_file
from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.paths import BASE_MODEL_DIR, CLASS_MODELS_DIR, SYNTHETIC_DIR, workspace_root

MANIFEST_COLUMNS = ("file", "class", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "weights_sha256")
GRID_IMAGES = 16
META_FILE = "meta.json"

# generate.scheduler -> (diffusers class, overrides); each is built from the base model's scheduler config.
SCHEDULERS = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # as SD 1.x ships it; PRK warm-up needs many steps
}


def cpu_only() -> bool:
    """No GPU-like device: accelerate must then be told ``cpu=True``, or processes started by
    ``accelerate launch``/torchrun on a CPU machine each think they are alone (and race on the outputs)."""
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()))


def image_seed(seed: int, class_code: str, index: int) -> int:
    return derive_seed(seed, "generate", class_code, index)


def image_name(class_code: str, index: int) -> str:
    return f"{class_code}_{index:05d}.png"


def make_scheduler(name: str, config):
    if name not in SCHEDULERS:
        raise PipelineError(f"generate.scheduler: unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def clean_own_temps(target: Path) -> None:
    """Remove what a killed run left beside ``target`` (.<name>.tmp-*/.old-*), and only that: the
    folder also holds the other classes' outputs, possibly being written right now."""
    import shutil

    if target.parent.is_dir():
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def check_class(params: Params, class_code: str) -> None:
    if class_code not in params.data.classes:
        raise PipelineError(f"class {class_code!r} is not in data.classes ({', '.join(params.data.classes)})")


def read_model_meta(model_dir: Path) -> dict:
    path = model_dir / META_FILE
    if not path.is_file():
        raise PipelineError(f"{model_dir}: no fine-tuned class model ({META_FILE} missing); run the finetune stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg})") from None


def load_class_pipeline(params: Params, class_code: str, fuse: bool = True) -> tuple[StableDiffusionPipeline, Path, dict]:
    """Base model + the class's adapter, fine-tuned UNet or learned word; returns (pipe, weights file, meta)."""
    from pipeline.diffusion.base import load_base_pipeline
    from pipeline.diffusion.dreambooth import load_unet
    from pipeline.diffusion.lora import load_lora
    from pipeline.diffusion.textual_inversion import load_embedding

    check_class(params, class_code)
    root = workspace_root()
    model_dir = root / CLASS_MODELS_DIR / class_code
    meta = read_model_meta(model_dir)
    token = params.instance_token(class_code)
    if meta.get("token") != token:
        raise PipelineError(
            f"{model_dir}: trained with instance token {meta.get('token')!r} but params give {token!r}; rerun finetune@{class_code}"
        )
    pipe = load_base_pipeline(root / BASE_MODEL_DIR)
    method = meta.get("method")
    if method == "lora":
        weights = load_lora(pipe, model_dir, fuse=fuse)
    elif method == "dreambooth":
        weights = load_unet(pipe, model_dir)
    elif method == "textual_inversion":
        weights = load_embedding(pipe, model_dir, token)
    else:
        raise PipelineError(f"{model_dir / META_FILE}: unknown method {method!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe, weights, meta


@torch.no_grad()
def generate_images(
    pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str, seeds: list[int], *, steps: int, guidance: float, resolution: int
) -> list[Image.Image]:
    """One image per seed, each drawn from its own CPU generator (identical on any device and in any batch)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(seeds)
    return pipe(
        [prompt] * n, negative_prompt=[negative_prompt] * n, generator=generators, num_inference_steps=steps,
        guidance_scale=guidance, height=resolution, width=resolution, output_type="pil",
    ).images


def generate_class(params: Params, class_code: str) -> Path:
    """Write ``data/synthetic/<class>/``: ``<class>_<k:05d>.png``, ``manifest.csv`` and ``grid.png``, atomically."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    g = params.generate
    resolution = params.diffusion.resolution
    state = PartialState(cpu=cpu_only())
    pipe, weights, _ = load_class_pipeline(params, class_code)
    pipe.scheduler = make_scheduler(g.scheduler, pipe.scheduler.config)
    pipe.to(state.device)
    weights_sha = sha256_file(weights)
    prompt = params.class_prompt(class_code)

    root = workspace_root()
    target = root / SYNTHETIC_DIR / class_code
    if state.is_main_process:
        clean_own_temps(target)
    # Only the main process owns the temporary folder; the others learn its path and write into it.
    with atomic_dir(target) if state.is_main_process else nullcontext(None) as temp:
        out = Path(broadcast_object_list([str(temp) if temp else None])[0])
        rows = []
        # Whole batches are shared out, not single indices: every image is then computed in the same batch
        # whatever the number of processes, so the output is bit-identical to a single-process run.
        batches = [list(range(i, min(i + g.batch, g.per_class))) for i in range(0, g.per_class, g.batch)]
        with state.split_between_processes(batches) as mine:
            for indices in tqdm(mine, desc=f"generate {class_code}", disable=not state.is_local_main_process):
                seeds = [image_seed(params.seed, class_code, k) for k in indices]
                images = generate_images(
                    pipe, prompt, g.negative_prompt, seeds, steps=g.steps, guidance=g.guidance, resolution=resolution
                )
                for k, seed, img in zip(indices, seeds, images):
                    img.save(out / image_name(class_code, k), format="PNG")
                    rows.append({
                        "file": image_name(class_code, k), "class": class_code, "prompt": prompt,
                        "negative_prompt": g.negative_prompt, "seed": seed, "scheduler": g.scheduler,
                        "steps": g.steps, "guidance": g.guidance, "weights_sha256": weights_sha,
                    })
        rows = gather_object(rows)
        state.wait_for_everyone()
        if state.is_main_process:
            rows.sort(key=lambda row: row["file"])
            with (out / "manifest.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            if rows:
                shown = [Image.open(out / row["file"]).convert("RGB") for row in rows[:GRID_IMAGES]]
                image_grid(shown, cols=4).save(out / "grid.png")
    state.wait_for_everyone()
    if state.is_main_process and (target / "grid.png").is_file():
        tracking.log_artifact(target / "grid.png", artifact_path=f"generate/{class_code}")
    return target
