"""finetune@<class>: teach the base model one class under its own instance token.

The plain diffusion loop on cached latents and prompt embeddings (the VAE and text encoder are frozen; textual
inversion re-encodes its prompt each step); LoRA, DreamBooth, textual inversion and a hypernetwork differ only in
*which* weights train (``TrainedPart``). Every draw comes from one generator on the model's device, so the same seed
gives the same run on the same device type. Every ``diffusion.checkpoint_every`` steps the state goes to
``checkpoints/<class>/`` (outside DVC's outputs); with ``diffusion.resume`` a rerun of the same params, data and base
continues there, bit-identically on CPU."""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from pipeline import checkpoint
from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.data.images import load_square
from pipeline.diffusion.generate import (
    META_FILE,
    Sampling,
    check_class,
    generate_images,
    make_scheduler,
    sample_images,
)
from pipeline.diffusion.pretrain import Batch, diffusion_loss
from pipeline.diffusion.training_data import LatentCache, encode_images, encode_prompts, read_finetune_csv, tokenize
from pipeline.core.device import DTYPES, make_accelerator
from pipeline.core.digest import derive_seed, json_digest, sha256_file
from pipeline.core.errors import PipelineError
from pipeline.optim import adamw
from pipeline.core.params import CLASS_NAMES, Params
from pipeline.core.paths import BASE_MODEL_DIR, CHECKPOINT_DIR, CLASS_MODELS_DIR, FINETUNE_DIR, workspace_root

WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
LOSS_WINDOW = 20  # final_loss in meta.json is the mean of the last this many steps
SHOW_LOSS_EVERY = 10  # steps between progress-bar loss updates (each waits for the device)
VALIDATION = {"images": 4, "steps": 20, "guidance": 5.0, "scheduler": "dpmsolver++"}


def generic_prompt(params: Params, class_code: str) -> str:
    """The class prompt without the instance token ("a dermoscopic image of dermatofibroma"): DreamBooth's prior."""
    return " ".join(params.diffusion.prompt.format(token="", class_name=CLASS_NAMES[class_code]).split())


def base_sha256(base_dir: Path) -> str:
    """sha256 over every file of models/base (the tiny weights, or base_model.json naming a real checkpoint)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in base_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(base_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


class LossLog:
    """Per-step losses, kept on the device until read, so the host waits for them every few steps only; each read
    sends them to MLflow in one write (one SQLite write per step costs ~25 ms)."""

    def __init__(self, name: str, recent: list[float], send: bool):
        self.name, self.send = name, send
        self.recent = recent  # the last LOSS_WINDOW values: progress bar, checkpoint, meta.json
        self.pending: dict[int, torch.Tensor] = {}  # step -> loss

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.pending[step] = loss

    def mean(self) -> float:
        """Bring the pending losses to the host (and MLflow); the mean of the recent window."""
        if self.pending:
            values = torch.stack(list(self.pending.values())).tolist()
            if self.send:
                tracking.log_metric_history(self.name, dict(zip(self.pending, values)))
            self.recent = (self.recent + values)[-LOSS_WINDOW:]
            self.pending = {}
        return sum(self.recent) / len(self.recent)


@dataclass
class TrainedPart:
    """The trainable part of one method: the module accelerate prepares, its trainable tensors, and how to save it."""

    module: torch.nn.Module
    save: Callable[[Path], Path]  # writes the final weights into a folder; returns the weights file
    trains_text: bool = False  # textual inversion: prompt embeddings change every step
    adapter: bool = False  # LoRA, hypernetwork: the module is frozen but for an added part, so it may run in half precision

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}


def attach_method(pipe, params: Params, class_code: str) -> TrainedPart:
    from pipeline.diffusion import dreambooth, hypernetwork, lora, textual_inversion

    d = params.diffusion
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if d.method == "lora":
        lora.add_lora(pipe.unet, d.lora)
        return TrainedPart(pipe.unet, lambda folder: lora.save_lora(pipe.unet, folder), adapter=True)
    if d.method == "dreambooth":
        pipe.unet.requires_grad_(True)
        return TrainedPart(pipe.unet, lambda folder: dreambooth.save_unet(pipe.unet, folder))
    if d.method == "hypernetwork":
        hypernetwork.add_hypernetwork(pipe.unet, d.hypernetwork)
        return TrainedPart(pipe.unet, lambda folder: hypernetwork.save_hypernetwork(pipe.unet, folder), adapter=True)
    token = params.instance_token(class_code)
    pipe.unet.requires_grad_(False)
    embedding = textual_inversion.add_token(pipe, token, init_text=CLASS_NAMES[class_code])
    return TrainedPart(
        pipe.text_encoder, lambda folder: textual_inversion.save_embedding(embedding, token, folder), trains_text=True
    )


@dataclass
class Priors:
    """DreamBooth's prior preservation: latents of base-model images of the generic class, and its prompt."""

    latents: LatentCache
    embeds: torch.Tensor  # [1, 77, D]
    weight: float  # diffusion.prior_loss_weight


def draw_batch(instances: LatentCache, priors: Priors | None, states: torch.Tensor, size: int, generator: torch.Generator) -> Batch:
    """``size`` instance latents under the class prompt ``states`` ([1, 77, D]), then as many prior-class ones."""
    latents, states = instances.draw(size, generator), states.expand(size, -1, -1)
    if priors is None:
        return Batch(latents, states)
    prior_states = priors.embeds.expand(size, -1, -1)
    return Batch(torch.cat([latents, priors.latents.draw(size, generator)]), torch.cat([states, prior_states]),
                 priors=size, prior_weight=priors.weight)


def optimizer_step(accelerator, loss: torch.Tensor, trainable: list[torch.nn.Parameter], optimizer) -> None:
    """accelerate's backward (loss-scaled under fp16), clipped gradients, the step."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cast_frozen(pipe, part: TrainedPart, weight_dtype: torch.dtype) -> None:
    """Frozen weights in ``weight_dtype`` (half precision on a GPU); trainable ones stay fp32 for the optimizer."""
    _cast([m for m in (pipe.vae, pipe.text_encoder, pipe.unet) if m is not part.module or part.adapter], weight_dtype)
    cast_training_params(part.module, dtype=torch.float32)


def _cast(modules: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """``module.to(dtype)`` only where it changes something: diffusers warns on every dtype cast, a no-op included."""
    for module in modules:
        if module.dtype != dtype:
            module.to(dtype=dtype)


@dataclass
class Resumable:
    """What a fine-tuning checkpoint saves and restores: the trainable weights, the optimizer and each process's RNG."""

    accelerator: object
    part: TrainedPart
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def save_checkpoint(folder: Path, state: Resumable, step: int, info: dict) -> None:
    """Replace ``folder`` with the state after ``step`` steps."""
    from accelerate.utils import gather_object

    rng = {"generator": state.generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    rng = gather_object([rng])  # one entry per process
    if not state.accelerator.is_main_process:
        return
    groups = {"trainable": {name: p.float() for name, p in state.part.named_trainable().items()}}
    groups.update({f"rng.{rank}": states for rank, states in enumerate(rng)})
    checkpoint.save_checkpoint(folder, info["fingerprint"], groups, {"step": step, **info}, state.optimizer)


def load_checkpoint(folder: Path, fingerprint: str, state: Resumable) -> tuple[int, list[float]]:
    """Restore the last checkpoint if it belongs to this run; returns (steps done, recent losses), (0, []) to start fresh."""
    found = checkpoint.load_checkpoint(folder, fingerprint)
    if found is None:
        return 0, []
    weights, trainable = found.group("trainable"), state.part.named_trainable()
    if set(weights) != set(trainable):
        raise PipelineError(f"{folder}: checkpoint weights do not match the model; delete the folder to start fresh")
    state.part.module.load_state_dict(weights, strict=False)  # the trainable tensors only, checked just above
    found.restore_optimizer(state.optimizer)
    rng = found.group(f"rng.{state.accelerator.process_index}")
    state.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    print(f"{folder}: resuming from step {found.meta['step']}", file=sys.stderr)
    return int(found.meta["step"]), list(found.meta.get("recent_losses", []))


def finetune_class(params: Params, class_code: str) -> Path:
    """Fine-tune the base model on ``data/prepared/finetune/<class>.csv``; writes ``models/diffusion/<class>/``."""
    from pipeline.diffusion.base import load_base_pipeline

    check_class(params, class_code)
    d = params.diffusion
    root = workspace_root()
    image_paths = read_finetune_csv(root / FINETUNE_DIR / f"{class_code}.csv", class_code)
    base_dir = root / BASE_MODEL_DIR
    out_dir = root / CLASS_MODELS_DIR / class_code
    ckpt_dir = root / CHECKPOINT_DIR / class_code

    accelerator = make_accelerator(params.compute.mixed_precision)
    device, main = accelerator.device, accelerator.is_main_process
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
    pipe = load_base_pipeline(base_dir)
    pipe.to(device)
    base_sha = base_sha256(base_dir)
    # What a checkpoint must match to be resumed: everything that changes the numbers, nothing that doesn't.
    diffusion = d.model_dump(mode="json", exclude={"resume", "checkpoint_every", "pretrain", "control", "controlnet"})
    fingerprint = json_digest({
        "seed": params.seed, "class": class_code, "diffusion": diffusion,
        "images": [sha256_file(p) for p in image_paths], "base": base_sha, "processes": accelerator.num_processes,
    })
    seed = derive_seed(params.seed, "finetune", class_code)
    torch.manual_seed(seed)  # adapter initialisation draws from the global RNG

    # Frozen encoders run once: latents of every image and its mirror image, embeddings of the prompts.
    prompt = params.class_prompt(class_code)
    instances = encode_images(pipe.vae, load_square(image_paths, d.resolution))
    priors = None
    if d.method == "dreambooth" and d.prior_preservation:
        generic = generic_prompt(params, class_code)
        prior_pixels = prior_images(pipe, generic, d.class_images, d.resolution, derive_seed(seed, "prior"))
        priors = Priors(encode_images(pipe.vae, prior_pixels), encode_prompts(pipe, [generic]), d.prior_loss_weight)
    part = attach_method(pipe, params, class_code)
    prompt_ids = tokenize(pipe.tokenizer, [prompt]).to(device)  # after attach: TI adds the token to the tokenizer
    instance_embeds = None if part.trains_text else encode_prompts(pipe, [prompt])

    cast_frozen(pipe, part, weight_dtype)
    if d.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    # channels_last: diffusers' advice for UNets on GPU. Set before any optimizer state is restored (checkpoint.py).
    pipe.unet.to(memory_format=torch.channels_last)
    trainable = list(part.named_trainable().values())
    optimizer = adamw(trainable, lr=d.learning_rate, weight_decay=0.0 if part.trains_text else WEIGHT_DECAY)
    # Every draw of the loop comes from this generator, on the model's device (one stream per process).
    generator = torch.Generator(device).manual_seed(derive_seed(seed, "steps", accelerator.process_index))

    resumable = Resumable(accelerator, part, optimizer, generator)
    start, recent = load_checkpoint(ckpt_dir, fingerprint, resumable) if d.resume else (0, [])
    if not d.resume and (ckpt_dir / "state.json").is_file() and main:
        print(f"{ckpt_dir}: diffusion.resume is false; ignoring the checkpoint there", file=sys.stderr)
    model, optimizer = accelerator.prepare(part.module, optimizer)
    resumable.optimizer = optimizer  # checkpoints save the prepared optimizer's state
    unet = model if part.module is pipe.unet else pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    model.train()

    losses = LossLog(f"finetune/{class_code}/loss", recent, send=main)
    bar = tqdm(range(start, d.steps), initial=start, total=d.steps, desc=f"finetune {class_code}", disable=not main, mininterval=1)
    for step in bar:
        states = model(prompt_ids)[0] if part.trains_text else instance_embeds  # [1, 77, D]: one prompt, whole batch
        batch = draw_batch(instances, priors, states, d.batch, generator)
        with accelerator.autocast():
            loss = diffusion_loss(unet, noise_scheduler, batch, generator, d.noise_offset, weight_dtype)
        optimizer_step(accelerator, loss, trainable, optimizer)
        done = step + 1
        losses.add(accelerator.reduce(loss.detach(), "mean"), done)
        if done % SHOW_LOSS_EVERY == 0:
            bar.set_postfix(loss=f"{losses.mean():.4f}", refresh=False)
        if done % d.checkpoint_every == 0 and done < d.steps:
            losses.mean()  # reads the pending losses: into losses.recent and MLflow
            info = {"fingerprint": fingerprint, "recent_losses": losses.recent, "method": d.method, "class": class_code}
            save_checkpoint(ckpt_dir, resumable, done, info)
    losses.mean()

    accelerator.wait_for_everyone()
    if main:
        model.eval()
        pipe.unet.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
        # One dtype for the grid: fp16 encoders beside a DreamBooth UNet that stayed fp32.
        _cast([pipe.vae, pipe.text_encoder, pipe.unet], torch.float32)
        with atomic_dir(out_dir) as temp:
            weights = part.save(temp)
            validation_grid(pipe, params, class_code).save(temp / "samples.png")
            meta = {
                "method": d.method, "class": class_code, "token": params.instance_token(class_code), "prompt": prompt,
                "steps": d.steps, "resumed_from_step": start or None,
                "final_loss": losses.mean(), "last_loss": losses.recent[-1],
                "base": {"source": d.base_model, "sha256": base_sha},
                "params_hash": fingerprint,
                "weights": weights.relative_to(temp).as_posix(), "weights_sha256": sha256_file(weights),
                "images": len(image_paths), "resolution": d.resolution, "validation": VALIDATION,
            }
            write_json(temp / META_FILE, meta)
        tracking.log_artifact(out_dir / "samples.png", artifact_path=f"finetune/{class_code}")
        tracking.log_metrics({f"finetune/{class_code}/final_loss": meta["final_loss"]})
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir


@contextmanager
def base_sampling(pipe, resolution: int) -> Iterator[Sampling]:
    """How finetune samples for itself (DreamBooth's prior images, the validation grid): DPM-Solver++ in place of the
    pipeline's scheduler, which comes back after the block."""
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(VALIDATION["scheduler"], scheduler.config)
    try:
        yield Sampling(VALIDATION["steps"], VALIDATION["guidance"], resolution)
    finally:
        pipe.scheduler = scheduler


def prior_images(pipe, prompt: str, count: int, resolution: int, seed: int) -> torch.Tensor:
    """``count`` images of the generic class prompt from the untouched base model, uint8 [N, 3, R, R] on its device
    (8-bit like the class images diffusers' DreamBooth script saves as files); fixed seeds, so a resumed run sees the
    same ones."""
    generators, images = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(count)], []
    with base_sampling(pipe, resolution) as sampling:
        for start in range(0, count, 8):  # 8 at a time bounds the memory
            batch = sample_images(pipe, prompt, "", generators[start : start + 8], sampling)
            images.append(batch.float().mul(255).round().to(torch.uint8))
    return torch.cat(images)


def validation_grid(pipe, params: Params, class_code: str):
    """4 images of the class prompt from fixed seeds, the same every run: runs compare by eye (and tests by pixel)."""
    seed = derive_seed(params.seed, "finetune", class_code)
    seeds = [derive_seed(seed, "validation", i) for i in range(VALIDATION["images"])]
    with base_sampling(pipe, params.diffusion.resolution) as sampling:
        images = generate_images(pipe, params.class_prompt(class_code), "", seeds, sampling)
    return make_image_grid(images, rows=1, cols=len(images))
