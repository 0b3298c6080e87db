"""generate@<class>: sample the class's synthetic images, each from its own seed, with a manifest that explains every file.

Each classifier seed gets its own draw of ``generate.per_class`` images (the manifest's ``draw``), so the seeds'
spread in evaluate covers the generator as well as the classifier. Image ``k`` has its own seed and generator on the
pipeline's device, so it can be regenerated alone (``generate_images(pipe, ..., [seed], ...)``); only float rounding
may differ with its batch (at most one 8-bit level in rare pixels).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    ControlNetModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, read_json
from pipeline.core.device import DTYPES, cpu_only, gpu_precision
from pipeline.core.digest import derive_seed, sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params
from pipeline.core.paths import (BASE_MODEL_DIR, CLASS_MODELS_DIR, FINETUNE_DIR, SYNTHETIC_BASE_DIR, SYNTHETIC_DIR,
                                 workspace_root)

# mask: the conditioning mask's file under diffusion.control mask (masks/<file>), else empty
MANIFEST_COLUMNS = (
    "file", "mask", "class", "draw", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "unconditional",
    "weights_sha256",
)
MASKS = "masks"
META_FILE = "meta.json"

# generate.scheduler -> (diffusers class, overrides); each is built from the base model's scheduler config.
SCHEDULERS = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # as SD 1.x ships it; PRK warm-up needs many steps
}


@dataclass(frozen=True)
class Sampling:
    """How each image is sampled (the scheduler is the pipeline's own); ``guide_unet``: the UNet of guidance's
    unconditional branch, None for the pipeline's own."""

    steps: int
    guidance: float
    resolution: int
    guide_unet: UNet2DConditionModel | None = None


def image_seed(seed: int, class_code: str, index: int) -> int:
    return derive_seed(seed, "generate", class_code, index)


def make_scheduler(name: str, config):
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def padded_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """``make_image_grid`` for any count: one row if they fit in it, else white cells fill the last row."""
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def check_class(params: Params, class_code: str) -> None:
    if class_code not in params.data.classes:
        raise PipelineError(f"class {class_code!r} is not in data.classes ({', '.join(params.data.classes)})")


def load_class_pipeline(
    params: Params, class_code: str, dtype: torch.dtype = torch.float32
) -> tuple[StableDiffusionPipeline, Path, dict]:
    """Base model + the class's adapter, fine-tuned UNet or learned word, in ``dtype``; returns (pipe, weights file, meta)."""
    from pipeline.diffusion.base import load_base_pipeline
    from pipeline.diffusion.dreambooth import load_unet
    from pipeline.diffusion.hypernetwork import load_hypernetwork
    from pipeline.diffusion.lora import load_lora
    from pipeline.diffusion.textual_inversion import load_embedding

    check_class(params, class_code)
    root = workspace_root()
    model_dir = root / CLASS_MODELS_DIR / class_code
    meta = read_json(model_dir / META_FILE, "no fine-tuned class model here; run the finetune stage first")
    token = params.instance_token(class_code)
    if meta.get("token") != token:
        raise PipelineError(
            f"{model_dir}: trained with instance token {meta.get('token')!r} but params give {token!r}; rerun finetune@{class_code}"
        )
    loaders = {"lora": load_lora, "dreambooth": load_unet, "hypernetwork": load_hypernetwork,
               "textual_inversion": lambda pipe, folder: load_embedding(pipe, folder, token)}
    pipe = load_base_pipeline(root / BASE_MODEL_DIR, dtype)
    return pipe, loaders[meta["method"]](pipe, model_dir), meta


@dataclass
class Control:
    """diffusion.control mask while sampling: the ControlNet, one mask per image ([N, 3, R, R] in {0, 1}) and its weight."""

    controlnet: ControlNetModel
    masks: torch.Tensor
    scale: float


def predict_noise(unet, latents: torch.Tensor, t, states: torch.Tensor, control: Control | None) -> torch.Tensor:
    """``unet``'s prediction, steered by the ControlNet when there is one (as the controlnet stage trains it)."""
    if control is None:
        return unet(latents, t, states, return_dict=False)[0]
    from pipeline.diffusion.controlnet import controlled

    return controlled(unet, control.controlnet, control.masks, control.scale)(latents, t, states).sample


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str, generators: list[torch.Generator], sampling: Sampling,
    control: Control | None = None,
) -> torch.Tensor:
    """One image per generator, float [N, 3, R, R] in [0, 1]: diffusers' guided denoising loop, step for step, except
    that guidance's unconditional branch may come from ``sampling.guide_unet``."""
    n, device, guide_unet = len(generators), pipe.device, sampling.guide_unet
    cond, uncond = pipe.encode_prompt(prompt, device, n, True, negative_prompt)
    side = sampling.resolution
    latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, side, side, cond.dtype, device, generators)
    step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sampling.steps, device=device)
    one_batch = sampling.guidance > 1 and guide_unet is None  # both branches in one batch, as diffusers' pipelines run them
    if one_batch and control is not None:
        control = Control(control.controlnet, torch.cat([control.masks] * 2), control.scale)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        if one_batch:
            unconditional, noise = predict_noise(pipe.unet, torch.cat([x, x]), t, torch.cat([uncond, cond]), control).chunk(2)
        else:
            noise = predict_noise(pipe.unet, x, t, cond, control)
        if sampling.guidance > 1:  # diffusers' rule: guidance <= 1 samples the prompt alone
            if not one_batch:
                unconditional = predict_noise(guide_unet, x, t, uncond, control)
            noise = unconditional + sampling.guidance * (noise - unconditional)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pt")


def generate_images(
    pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str, seeds: list[int], sampling: Sampling,
    control: Control | None = None,
) -> list[Image.Image]:
    """One image per seed, each drawn from its own generator on the pipeline's device (the same in any batch)."""
    generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds]
    images = sample_images(pipe, prompt, negative_prompt, generators, sampling, control)
    return pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(images))  # as output_type="pil" rounds


def conditioning_masks(train_masks: torch.Tensor, seeds: list[int], params: Params) -> torch.Tensor:
    """diffusion.control mask: per image seed, a new [3, R, R] shape drawn from it out of one fine-tuning mask."""
    from pipeline.diffusion.controlnet import conditioning_mask

    picks = [train_masks[derive_seed(s, "mask") % len(train_masks)] for s in seeds]
    cfg = params.diffusion.controlnet
    return torch.stack([conditioning_mask(m, derive_seed(s, "mask shape"), cfg) for m, s in zip(picks, seeds)])


@contextmanager
def png_writer(max_pending: int = 16) -> Iterator[Callable[[Image.Image, Path], None]]:
    """``save(image, path)`` that encodes the PNG on a worker thread, at most ``max_pending`` images behind, so the
    accelerator samples the next batch meanwhile. On exit every file is written, or the first error raised."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as pool:

        def save(image: Image.Image, path: Path) -> None:
            pending.append(pool.submit(image.save, path, format="PNG"))
            while len(pending) > max_pending:
                pending.popleft().result()

        yield save
        while pending:
            pending.popleft().result()


@dataclass
class Sampler:
    """What draws a class's images; the weights are hashed once (GBs)."""

    pipe: StableDiffusionPipeline
    sampling: Sampling
    controlnet: ControlNetModel | None
    weights_sha256: str


def generation_pipeline(params: Params, class_code: str, base_only: bool = False) -> Sampler:
    """The class's sampler (``base_only``: the base model) in ``compute.mixed_precision``. Under
    ``generate.unconditional: base`` guidance's unconditional branch is the base model's UNet, so guidance pushes the
    images from the base model's generic lesion towards the class (textual inversion's UNet already is the base's)."""
    from pipeline.diffusion.base import base_model_folder, load_base_pipeline, load_base_unet
    from pipeline.diffusion.controlnet import load_controlnet

    device = PartialState(cpu=cpu_only()).device
    dtype = DTYPES.get(gpu_precision(params.compute.mixed_precision, "generating"), torch.float32)
    base_dir = workspace_root() / BASE_MODEL_DIR
    guide_unet = None
    if base_only:  # generate_base: the class is one of data.classes
        pipe = load_base_pipeline(base_dir, dtype)
        unet = base_model_folder(base_dir) / "unet"
        names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
        weights = next(unet / name for name in names if (unet / name).is_file())
    else:
        pipe, weights, meta = load_class_pipeline(params, class_code, dtype=dtype)
        if params.generate.unconditional == "base" and meta["method"] != "textual_inversion":
            guide_unet = load_base_unet(base_dir, dtype).to(device)
    controlnet = load_controlnet(params, dtype)
    if controlnet is not None:
        controlnet.to(device)
    pipe.scheduler = make_scheduler(params.generate.scheduler, pipe.scheduler.config)
    pipe.vae.enable_slicing()  # one image at a time: a 512 px batch decode needs GBs
    sampling = Sampling(params.generate.steps, params.generate.guidance, params.diffusion.resolution, guide_unet)
    return Sampler(pipe.to(device), sampling, controlnet, sha256_file(weights))


def generate_class(params: Params, class_code: str, base_only: bool = False, loaded: Sampler | None = None) -> Path:
    """Write ``data/synthetic/<class>/``: ``<class>_<k:05d>.png`` (``generate.per_class`` for each classifier seed),
    ``manifest.csv`` and ``grid.png``, atomically.
    ``base_only``: the same images from the base model without the class's weights, in ``data/synthetic_base/<class>/``.
    ``loaded``: ``generation_pipeline``'s output when the caller already has it (generate_base: one for every class)."""
    g = params.generate
    state = PartialState(cpu=cpu_only())
    sampler = loaded or generation_pipeline(params, class_code, base_only)
    root = workspace_root()
    train_masks = None
    if sampler.controlnet is not None:
        from pipeline.diffusion.controlnet import load_masks, masked_images

        listed = masked_images(root / FINETUNE_DIR / f"{class_code}.csv", [class_code])
        train_masks = load_masks(list(listed["mask_path"]), params.diffusion.resolution)
    prompt = params.class_prompt(class_code)
    same = {  # in every manifest row; textual inversion's own UNet is the base's
        "class": class_code, "prompt": prompt, "negative_prompt": g.negative_prompt, "scheduler": g.scheduler,
        "steps": g.steps, "guidance": g.guidance, "unconditional": "base" if base_only else g.unconditional,
        "weights_sha256": sampler.weights_sha256,
    }
    target = root / (SYNTHETIC_BASE_DIR if base_only else SYNTHETIC_DIR) / class_code
    # Only the main process owns the temporary folder; the others learn its path and write into it.
    with atomic_dir(target) if state.is_main_process else nullcontext(None) as temp:
        out = Path(broadcast_object_list([str(temp) if temp else None])[0])
        if train_masks is not None and state.is_main_process:
            (out / MASKS).mkdir()
        state.wait_for_everyone()
        rows = []
        # Whole batches are shared out, not single indices: every image is then computed in the same batch
        # whatever the number of processes (or of draws), so the output is bit-identical to a single-process run.
        draws, n = params.classifier.seeds, g.per_class
        batches = [list(range(j * n + i, j * n + min(i + g.batch, n))) for j in range(len(draws)) for i in range(0, n, g.batch)]
        with state.split_between_processes(batches) as mine, png_writer() as save:
            for indices in tqdm(mine, desc=f"generate {class_code}", disable=not state.is_local_main_process):
                seeds = [image_seed(params.seed, class_code, k) for k in indices]
                shapes = control = None
                if train_masks is not None:
                    shapes = conditioning_masks(train_masks, seeds, params)
                    scale = params.diffusion.controlnet.conditioning_scale
                    control = Control(sampler.controlnet, shapes.to(state.device), scale)
                images = generate_images(sampler.pipe, prompt, g.negative_prompt, seeds, sampler.sampling, control)
                for i, (k, seed, img) in enumerate(zip(indices, seeds, images)):
                    name = f"{class_code}_{k:05d}.png"
                    save(img, out / name)
                    mask = f"{MASKS}/{name}" if shapes is not None else ""
                    if mask:  # as HAM10000's segmentation release: one channel, 0/255
                        save(Image.fromarray(shapes[i][0].mul(255).to(torch.uint8).cpu().numpy(), mode="L"), out / mask)
                    rows.append({"file": name, "mask": mask, "draw": draws[k // n], "seed": seed, **same})
        rows = gather_object(rows)
        state.wait_for_everyone()
        if state.is_main_process:
            rows.sort(key=lambda row: row["file"])
            manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
            manifest.to_csv(out / "manifest.csv", index=False, lineterminator="\r\n")  # as the csv module writes
            if rows:
                # Under diffusion.control mask each image is followed by its conditioning mask.
                files = [name for row in rows for name in (row["file"], row["mask"]) if name][:16]
                shown = [Image.open(out / name).convert("RGB") for name in files]
                padded_grid(shown, cols=4).save(out / "grid.png")
    state.wait_for_everyone()
    if state.is_main_process and (target / "grid.png").is_file():
        tracking.log_artifact(target / "grid.png", artifact_path=f"generate{'_base' if base_only else ''}/{class_code}")
    return target
