"""controlnet: one lesion-mask ControlNet (diffusers' ``ControlNetModel.from_unet``) for every selected class.

Trained on the selected classes' train images and masks under each class's prompt, with finetune's loop, checkpoints
and resume. At generation it steers whichever class model is loaded, each image conditioned on one of the class's
fine-tuning masks (so generate@<class> needs no other class) under a random affine and elastic change: every
(image, mask) pair is a new segmentation training pair. Under ``diffusion.control: none`` it writes only a marker.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import torch
from diffusers import ControlNetModel, DDPMScheduler
from tqdm.auto import tqdm

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, read_json, read_table, write_json
from pipeline.data.images import load_square
from pipeline.core.device import DTYPES, make_accelerator
from pipeline.diffusion.generate import META_FILE
from pipeline.diffusion.training_data import encode_images, encode_prompts
from pipeline.core.digest import derive_seed, json_digest, sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.params import ControlNetParams, Params
from pipeline.core.paths import BASE_MODEL_DIR, CHECKPOINT_DIR, CONTROLNET_DIR, SPLIT_CSV, workspace_root

# The condition branch's channels for an 8x VAE (diffusers' default); a VAE that downsamples less uses fewer of them,
# one stride-2 step per halving, so the condition lands at the latents' size.
CONDITION_CHANNELS = (16, 32, 96, 256)
WARP_SIDE = 64
# torchvision's ElasticTransform at WARP_SIDE px and sigma WARP_SIDE / 8 moves pixels by a mean of ~alpha / 4600 of the
# side (measured): this alpha per unit of diffusion.controlnet.elastic makes that setting the mean reach.
ELASTIC_ALPHA = 4600.0


def masked_images(csv_path: Path, classes: list[str]) -> pd.DataFrame:
    """The train rows of ``classes`` in split.csv or in a fine-tuning list, with absolute ``path`` and ``mask_path``."""
    rows = read_table(csv_path, ("image_id", "dx", "path", "mask_path"), "not found; run the prepare stage first")
    if "split" in rows.columns:
        rows = rows[rows["split"] == "train"]
    rows = rows[rows["dx"].isin(classes)].reset_index(drop=True)
    missing = sorted(set(classes) - set(rows["dx"]))
    if missing:
        raise PipelineError(f"{csv_path}: no train images of class {missing[0]!r}")
    unmasked = rows.loc[rows["mask_path"] == "", "image_id"]  # prepare writes the column, empty without a mask
    if len(unmasked):
        raise PipelineError(
            f"{csv_path}: image {unmasked.iloc[0]} has no lesion mask; diffusion.control: mask needs HAM10000's "
            "segmentation folder (HAM10000_segmentations_lesion_tschandl) in the data folder"
        )
    root = workspace_root()
    for column in ("path", "mask_path"):
        rows[column] = [str(root / value) for value in rows[column]]  # a relative path is from the workspace root
    return rows


def load_masks(paths: list[str], size: int) -> torch.Tensor:
    """Binary masks as float [N, 3, size, size] in {0, 1}: the same centre crop and resize as the images, then 0.5."""
    return (load_square([Path(p) for p in paths], size)[:, :1] >= 128).float().expand(-1, 3, -1, -1).contiguous()


def make_controlnet(unet, vae_scale_factor: int) -> ControlNetModel:
    """A ControlNet copied from ``unet`` whose condition branch downsamples pixels as much as the VAE does."""
    halvings = round(math.log2(vae_scale_factor))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITION_CHANNELS[: halvings + 1])


def controlled(unet, controlnet, condition: torch.Tensor, scale: float = 1.0):
    """``unet(noisy, t, states)`` steered by ``controlnet`` under ``condition``. The ControlNet runs in its own weights'
    dtype (fp32 while it trains beside a half-precision UNet); its residuals join the UNet in the UNet's dtype."""

    def forward(noisy, timesteps, states):
        dtype = next(controlnet.parameters()).dtype
        down, mid = controlnet(noisy.to(dtype), timesteps, states.to(dtype), controlnet_cond=condition.to(dtype),
                               conditioning_scale=scale, return_dict=False)
        down, mid = [r.to(noisy.dtype) for r in down], mid.to(noisy.dtype)
        return unet(noisy, timesteps, states, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return forward


def conditioning_mask(mask: torch.Tensor, seed: int, cfg: ControlNetParams) -> torch.Tensor:
    """A new lesion shape from a train mask ([3, R, R] in {0, 1}) drawn from the image's ``seed`` (the same in any batch
    or process); the warp runs at ``WARP_SIDE`` pixels, so ``cfg.elastic`` reaches as far at 32 px as at 512."""
    from torchvision.transforms import v2

    change = v2.Compose([
        v2.Resize(WARP_SIDE, antialias=True),
        v2.RandomAffine(degrees=180, translate=(cfg.shift, cfg.shift), scale=(1 - cfg.scale, 1 + cfg.scale)),
        v2.ElasticTransform(alpha=cfg.elastic * ELASTIC_ALPHA, sigma=WARP_SIDE / 8),
        v2.Resize(mask.shape[-1], antialias=True),
    ])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (change(mask[:1].float()) >= 0.5).float().expand(3, -1, -1).contiguous()


def load_controlnet(params: Params, dtype: torch.dtype = torch.float32) -> ControlNetModel | None:
    """The trained ControlNet in ``dtype`` under ``diffusion.control: mask``, else None."""
    if params.diffusion.control == "none":
        return None
    folder = workspace_root() / CONTROLNET_DIR
    meta = read_json(folder / META_FILE, "no ControlNet here; run `dvc repro controlnet` first")
    if meta.get("control") != params.diffusion.control:
        raise PipelineError(
            f"{folder / META_FILE}: made for diffusion.control {meta.get('control')!r}, params give "
            f"{params.diffusion.control!r}; rerun `dvc repro controlnet`"
        )
    return ControlNetModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)


def train_controlnet(params: Params):
    """Train the mask ControlNet on the selected classes' train images (``diffusion.control: mask``) and write
    ``models/controlnet/`` (the stage script writes the marker of ``none`` itself)."""
    from pipeline.diffusion import finetune
    from pipeline.diffusion.base import load_base_pipeline
    from pipeline.optim import adamw

    d, cfg = params.diffusion, params.diffusion.controlnet
    root = workspace_root()
    out_dir, ckpt_dir = root / CONTROLNET_DIR, root / CHECKPOINT_DIR / "controlnet"
    accelerator = make_accelerator(params.compute.mixed_precision)
    device, main = accelerator.device, accelerator.is_main_process
    classes = params.data.classes
    rows = masked_images(root / SPLIT_CSV, classes)
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
    pipe = load_base_pipeline(root / BASE_MODEL_DIR).to(device)
    pipe.unet.requires_grad_(False)  # the VAE and text encoder run once, under no_grad
    base_sha = finetune.base_sha256(root / BASE_MODEL_DIR)
    fingerprint = json_digest({
        "seed": params.seed, "classes": classes, "resolution": d.resolution, "prompt": d.prompt,
        "tokens": [params.instance_token(c) for c in classes], "controlnet": cfg.model_dump(mode="json"),
        "pairs": [sha256_file(p) + sha256_file(m) for p, m in zip(rows["path"], rows["mask_path"])],
        "base": base_sha, "processes": accelerator.num_processes,
    })
    seed = derive_seed(params.seed, "controlnet")
    torch.manual_seed(seed)

    # Frozen encoders run once. encode_images caches each image, then its mirror image: the masks follow suit.
    latents = encode_images(pipe.vae, load_square(list(rows["path"]), d.resolution))
    masks = load_masks(list(rows["mask_path"]), d.resolution)
    masks = torch.cat([masks, masks.flip(-1)]).to(device)
    class_index = torch.tensor([classes.index(dx) for dx in rows["dx"]] * 2, device=device)
    class_states = encode_prompts(pipe, [params.class_prompt(c) for c in classes])  # [C, 77, D]

    controlnet = make_controlnet(pipe.unet, pipe.vae_scale_factor).to(device)  # in train mode, as built
    part = finetune.TrainedPart(controlnet, lambda folder: controlnet.save_pretrained(folder, safe_serialization=True))
    finetune.cast_frozen(pipe, part, weight_dtype)
    trainable = list(part.named_trainable().values())
    optimizer = adamw(trainable, lr=cfg.lr, weight_decay=1e-2)
    generator = torch.Generator(device).manual_seed(derive_seed(seed, "steps", accelerator.process_index))
    resumable = finetune.Resumable(accelerator, part, optimizer, generator)
    start, recent = finetune.load_checkpoint(ckpt_dir, fingerprint, resumable) if d.resume else (0, [])
    model, optimizer = accelerator.prepare(controlnet, optimizer)
    resumable.optimizer = optimizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    losses = finetune.LossLog("controlnet/loss", recent, send=main)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="controlnet", disable=not main, mininterval=1)
    for step in bar:
        # Cached latents of random train images, their masks and their classes' prompts.
        index = torch.randint(len(latents), (cfg.batch,), generator=generator, device=device)
        batch = finetune.Batch(latents.sample(index, generator), class_states[class_index[index]])
        unet = controlled(pipe.unet, model, masks[index])
        with accelerator.autocast():
            loss = finetune.diffusion_loss(unet, noise_scheduler, batch, generator, dtype=weight_dtype)
        finetune.optimizer_step(accelerator, loss, trainable, optimizer)
        done = step + 1
        losses.add(accelerator.reduce(loss.detach(), "mean"), done)
        if done % d.checkpoint_every == 0 and done < cfg.steps:
            losses.mean()  # reads the pending losses: into losses.recent and MLflow
            state = {"fingerprint": fingerprint, "recent_losses": losses.recent}
            finetune.save_checkpoint(ckpt_dir, resumable, done, state)
    losses.mean()

    accelerator.wait_for_everyone()
    if main:
        with atomic_dir(out_dir) as temp:
            part.save(temp)  # the trainable copy stays fp32 throughout
            meta = {
                "control": d.control, "classes": classes, "pairs": len(rows), "steps": cfg.steps,
                "resumed_from_step": start or None, "final_loss": losses.mean(),
                "base": {"source": d.base_model, "sha256": base_sha}, "params_hash": fingerprint,
                "weights_sha256": sha256_file(temp / "diffusion_pytorch_model.safetensors"),
            }
            write_json(temp / META_FILE, meta)
        tracking.log_metrics({"controlnet/final_loss": meta["final_loss"]})
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir
