"""The `base` stage and the one function every later stage uses to load the base model.

``diffusion.base_model`` is ``embedded-tiny`` (pre-train the tiny SD-shaped model into models/base) or a real SD
checkpoint, a local diffusers folder or Hub id, *referenced* from ``models/base/base_model.json`` (never copied: SD 1.5
is gigabytes) and loaded with safetensors only, so no pickle from a downloaded checkpoint is ever executed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, read_json, write_json
from pipeline.core.errors import PipelineError, first_line
from pipeline.core.params import Params
from pipeline.core.paths import BASE_MODEL_DIR, SPLIT_CSV, resolve_user_path, workspace_root

if TYPE_CHECKING:  # diffusers costs seconds to import; validating a checkpoint folder does not need it
    from diffusers import StableDiffusionPipeline

EMBEDDED = "embedded-tiny"
KEY = "diffusion.base_model"
REFERENCE_FILE = "base_model.json"
PRETRAIN_REPORT = "pretrain.json"
SAMPLES_FILE = "samples.png"

# The components StableDiffusionPipeline needs; safety_checker / feature_extractor are never loaded.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}
# component -> its safetensors weights (or their sharded index, the same name + ".index.json")
_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
            "text_encoder": "model.safetensors"}
_CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# What a Hub download fetches: configs, tokenizer files and the components' safetensors weights; not
# the multi-GB single-file checkpoints at the repo root, not fp16/non-EMA variants, not the safety checker.
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model-*.safetensors",
    "*/model.safetensors",
    "*/model-*.safetensors",
]
HUB_IGNORE_PATTERNS = ["safety_checker/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _check_weights(sub: Path, name: str) -> None:
    if (sub / name).is_file() or (sub / f"{name}.index.json").is_file():
        return
    present = sorted(p.name for p in sub.iterdir() if p.is_file())
    pickles = [n for n in present if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise PipelineError(
            f"{KEY}: {sub} has only pickle weights ({pickles[0]}); this pipeline loads safetensors only "
            "(pickles can run code): convert the checkpoint once, e.g. load it with diffusers and "
            "save_pretrained(folder, safe_serialization=True)"
        )
    variants = [n for n in present if n.endswith(".safetensors")]
    if variants:
        raise PipelineError(
            f"{KEY}: {sub} has only variant weights ({variants[0]}); expected {sub / name} "
            "(save the checkpoint without a variant)"
        )
    raise PipelineError(f"{KEY}: {sub / name} is missing")


def check_diffusers_folder(folder: Path) -> int:
    """Check that ``folder`` is a loadable SD pipeline with safetensors weights; returns its native resolution. From
    file names and small JSON files only: a 4 GB checkpoint is validated in milliseconds, each problem in one line."""
    if not folder.is_dir():
        raise PipelineError(f"{KEY}: folder {folder} does not exist")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise PipelineError(f"{KEY}: {folder} is not a diffusers pipeline folder: {index_file} is missing")
    index = read_json(index_file, "is missing")
    pipeline_class = index.get("_class_name")
    if pipeline_class is not None and pipeline_class not in SUPPORTED_PIPELINES:
        raise PipelineError(
            f"{KEY}: {index_file} describes a {pipeline_class}; "
            "expected a Stable Diffusion 1.x/2.x pipeline (StableDiffusionPipeline)"
        )
    for component in REQUIRED_COMPONENTS:
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise PipelineError(f"{KEY}: {index_file} lists no {component!r} component")
        sub = folder / component
        if not sub.is_dir():
            raise PipelineError(f"{KEY}: component folder {sub} is missing")
        if component in _CONFIGS and not (sub / _CONFIGS[component]).is_file():
            raise PipelineError(f"{KEY}: {sub / _CONFIGS[component]} is missing")
        if component in _WEIGHTS:
            _check_weights(sub, _WEIGHTS[component])
        if component == "tokenizer" and not (sub / "tokenizer.json").is_file():
            for name in ("vocab.json", "merges.txt"):
                if not (sub / name).is_file():
                    hint = "a CLIP tokenizer needs vocab.json and merges.txt"
                    raise PipelineError(f"{KEY}: {sub / name} is missing ({hint})")
    unet = read_json(folder / "unet" / "config.json", "is missing")
    vae = read_json(folder / "vae" / "config.json", "is missing")
    if unet.get("in_channels", 4) != vae.get("latent_channels", 4):
        raise PipelineError(
            f"{KEY}: {folder} has a UNet with {unet.get('in_channels')} input channels but a VAE with "
            f"{vae.get('latent_channels')} latent channels (an inpainting checkpoint?); a text-to-image SD pipeline is needed"
        )
    # The size it was trained at: UNet sample size times the VAE's downsampling (SD 1.5: 64 * 8).
    return int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def folder_fingerprint(folder: Path) -> str:
    """sha256 of model_index.json, the component configs and every component file's name and size (not contents:
    hashing gigabytes on every run is too slow, and changed weights keep their size only if edited on purpose)."""
    digest = hashlib.sha256((folder / "model_index.json").read_bytes())
    for component in REQUIRED_COMPONENTS:
        for path in sorted(p for p in (folder / component).rglob("*") if p.is_file()):
            digest.update(f"\n{path.relative_to(folder).as_posix()}\t{path.stat().st_size}".encode())
            if path.suffix == ".json" and path.stat().st_size < 1_000_000:
                digest.update(path.read_bytes())
    return digest.hexdigest()


def resolve_hub_snapshot(repo_id: str, missing_folder: Path | None = None) -> Path:
    """A Hub repo's local snapshot: cached under HF_HUB_OFFLINE, else downloaded (safetensors only);
    ``missing_folder``, the in-repo folder the same value would name, is mentioned if the Hub fails too."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    not_reachable = (
        f"{KEY}: {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached; "
        f"download it once with `huggingface-cli download {repo_id}` or set base_model to a local diffusers folder"
        + (f" (no folder {missing_folder} exists either)" if missing_folder is not None else "")
    )
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
    except GatedRepoError:
        raise PipelineError(f"{KEY}: {repo_id!r} is gated on the Hub: accept its licence there and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise PipelineError(f"{KEY}: no Hub repository {repo_id!r} (or it is private: log in with `hf auth login`)") from None
    except IncompleteSnapshotError:
        raise PipelineError(
            f"{KEY}: the cached copy of {repo_id!r} is incomplete and the Hub cannot be reached; "
            f"finish the download with `huggingface-cli download {repo_id}`"
        ) from None
    except LocalEntryNotFoundError:
        raise PipelineError(not_reachable) from None
    except (HfHubHTTPError, OSError) as exc:
        raise PipelineError(f"{KEY}: could not fetch {repo_id!r} from the Hub ({first_line(exc)})") from None
    return Path(path)


def resolve_base_source(params: Params) -> Path:
    """The local diffusers folder that a real checkpoint's ``diffusion.base_model`` names (a Hub id: its snapshot)."""
    value = params.diffusion.base_model.strip()  # empty: no path, no Hub id, so the last error below
    looks_like_path = os.path.isabs(os.path.expanduser(value)) or value.startswith((".", "~")) or value.endswith("/")
    try:
        local = resolve_user_path(value, KEY)
    except PipelineError:
        if looks_like_path:
            raise
        local = None
    if local is not None and local.exists():
        if not local.is_dir():
            raise PipelineError(f"{KEY}: {local} is a file; expected a diffusers pipeline folder (with model_index.json)")
        return local
    if not looks_like_path and _REPO_ID.match(value) and ".." not in value:
        return resolve_hub_snapshot(value, missing_folder=local)
    if local is not None:
        raise PipelineError(f"{KEY}: folder {local} does not exist")
    raise PipelineError(
        f"{KEY}: {value!r} is neither '{EMBEDDED}', an existing diffusers folder, nor a Hub id of the form owner/name"
    )


def prepare_base(params: Params) -> None:
    """Stage body: pre-train the embedded tiny model, or validate and reference a real checkpoint."""
    target = workspace_root() / BASE_MODEL_DIR
    if params.diffusion.base_model.strip() == EMBEDDED:
        _prepare_embedded(params, target)
        return
    folder = resolve_base_source(params).resolve()
    record = {
        "native_resolution": check_diffusers_folder(folder),
        "source": params.diffusion.base_model,
        "path": str(folder),
        "sha256": folder_fingerprint(folder),
    }
    with atomic_dir(target) as temp:
        write_json(temp / REFERENCE_FILE, record)
    print(f"base: using {record['source']} from {folder} (native resolution {record['native_resolution']} px)")
    if params.diffusion.resolution != record["native_resolution"]:
        print(
            f"base: note: diffusion.resolution is {params.diffusion.resolution} but this checkpoint was trained at "
            f"{record['native_resolution']} px"
        )


def _prepare_embedded(params: Params, target: Path) -> None:
    from pipeline.data.images import load_square
    from sklearn.utils.class_weight import compute_sample_weight

    from pipeline.diffusion.pretrain import pretrain, reconstruction_grid, sample_grid, train_images
    from pipeline.diffusion.tiny import build_tiny_pipeline

    resolution, cfg = params.diffusion.resolution, params.diffusion.pretrain
    if resolution % 16:
        raise PipelineError(f"diffusion.resolution: the embedded tiny model needs a multiple of 16, got {resolution}")
    paths, diagnoses = train_images(workspace_root() / SPLIT_CSV)
    images = load_square(paths, resolution)
    print(f"base: pre-training the embedded tiny model on {len(images)} train images at {resolution} px, "
          f"each of their {len(set(diagnoses))} diagnoses drawn equally often")
    pipe = build_tiny_pipeline(resolution, params.seed)
    # Each diagnosis drawn equally often: trained on HAM10000 as it comes (two thirds nevi), the base learns their
    # browns and loses the rare classes' reds and purples.
    weights = torch.as_tensor(compute_sample_weight("balanced", diagnoses))
    summary, seconds = pretrain(pipe, images, weights, cfg, params.seed)
    samples = sample_grid(pipe, cfg.prompt, params.seed)
    recon = reconstruction_grid(pipe.vae, images[:8])
    summary.update(resolution=resolution, seed=params.seed, pretrain=cfg.model_dump())
    with atomic_dir(target) as temp:
        pipe.save_pretrained(temp, safe_serialization=True)
        samples.save(temp / SAMPLES_FILE)
        recon.save(temp / "reconstructions.png")
        write_json(temp / PRETRAIN_REPORT, summary)
    final = {f"base/{k}": v for k, v in summary.items() if k in ("vae_loss_last", "unet_loss_last") and v is not None}
    tracking.log_metrics({**final, **{f"base/seconds_{k}": v for k, v in seconds.items()}})
    for name in (SAMPLES_FILE, "reconstructions.png", PRETRAIN_REPORT):
        tracking.log_artifact(target / name, "base")
    print(
        f"base: vae loss {summary['vae_loss_first']} -> {summary['vae_loss_last']}, "
        f"unet loss {summary['unet_loss_first']} -> {summary['unet_loss_last']}; "
        f"{', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())}; samples in {target / SAMPLES_FILE}"
    )


def base_model_folder(base_dir: str | Path = BASE_MODEL_DIR) -> Path:
    """The diffusers folder behind models/base: itself (embedded) or the checkpoint base_model.json points to."""
    base_dir = workspace_root() / base_dir  # an absolute base_dir stays as it is
    reference = base_dir / REFERENCE_FILE
    if reference.is_file():
        record = read_json(reference, "missing")  # as prepare_base wrote it
        folder = Path(record["path"])
        if not folder.is_dir():
            raise PipelineError(
                f"{reference}: the base model folder {folder} ({record['source']}) no longer exists; "
                "restore it or rerun `dvc repro --force base`"
            )
        check_diffusers_folder(folder)
        if folder_fingerprint(folder) != record["sha256"]:
            raise PipelineError(
                f"{reference}: the checkpoint in {folder} changed since the base stage recorded it; "
                "rerun `dvc repro --force base` so every later stage sees the change"
            )
        return folder
    if not base_dir.is_dir():
        raise PipelineError(f"{base_dir}: base model not found; run the base stage first (dvc repro base)")
    check_diffusers_folder(base_dir)
    return base_dir


def _from_pretrained(cls, what: str, base_dir: str | Path, dtype: torch.dtype, **kwargs):
    folder = base_model_folder(base_dir)
    try:
        return cls.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{KEY}: could not load {what} in {folder} ({first_line(exc)})") from None


def load_base_pipeline(base_dir: str | Path = BASE_MODEL_DIR, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load the base SD pipeline (embedded or referenced) from safetensors only, without safety checker or remote code."""
    from diffusers import StableDiffusionPipeline

    return _from_pretrained(StableDiffusionPipeline, "the pipeline", base_dir, dtype, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False)


def load_base_unet(base_dir: str | Path = BASE_MODEL_DIR, dtype: torch.dtype = torch.float32):
    """The base model's UNet alone (generation's guidance against the base model), from safetensors only."""
    from diffusers import UNet2DConditionModel

    return _from_pretrained(UNet2DConditionModel, "the UNet", base_dir, dtype, subfolder="unet")
