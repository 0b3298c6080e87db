"""The base stage: the embedded tiny model is pre-trained and saved as a real diffusers folder, and a
checkpoint the project did not build (other sizes, PNDM scheduler, safety checker entries) is
validated, referenced and loaded through the same ``load_base_pipeline`` every later stage uses.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline.diffusion import pretrain as pt
from pipeline.diffusion.base import load_base_pipeline, prepare_base
from pipeline.diffusion.tiny import build_tiny_pipeline, build_tokenizer, vocab_and_merges
from pipeline.diffusion.training_data import encode_images, encode_prompts, to_model_range
from pipeline.core.errors import PipelineError
from pipeline.core.params import parse_params

REPO = Path(__file__).resolve().parents[1]
MICRO = {"diffusion": {"resolution": 32, "pretrain": {"vae_steps": 3, "unet_steps": 3, "batch": 4}}}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


pytestmark = pytest.mark.usefixtures("one_thread")


def micro_params(**diffusion) -> object:
    return parse_params({"diffusion": {**MICRO["diffusion"], **diffusion}})


def lesion_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A skin-coloured background with a dark blob: enough structure for a loss to fall."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w, rng.uniform(0.15, 0.3) * min(h, w)
    blob = (np.hypot(yy - cy, xx - cx) < r)[..., None]
    skin = np.array([rng.uniform(190, 230), rng.uniform(140, 170), rng.uniform(120, 150)])
    img = np.where(blob, skin * 0.4, skin) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_workspace(root: Path, train: int = 12) -> Path:
    """dvc.yaml + data/prepared/split.csv whose val/test rows name files that do not exist (only train may be read)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(train):
        name = f"ISIC_{i:07d}.jpg"
        lesion_image(rng, (40, 48)).save(images / name, quality=95)
        path = f"data/images/{name}" if i % 2 else str(images / name)  # relative and absolute paths both occur
        rows.append({"image_id": name[:-4], "lesion_id": f"HAM_{i}", "dx": ["mel", "df"][i % 2], "split": "train", "path": path})
    for i, split in enumerate(["val", "test"]):
        rows.append({"image_id": f"X{i}", "lesion_id": f"HAM_x{i}", "dx": "mel", "split": split, "path": f"data/images/missing_{split}.jpg"})
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    with (prepared / "split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("LESION_SYNTH_WORKSPACE", str(root))
    monkeypatch.chdir(root)
    return root


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One micro run of the embedded base stage, shared by the tests that inspect its output."""
    root = make_workspace(tmp_path_factory.mktemp("embedded") / "ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LESION_SYNTH_WORKSPACE", str(root))
        mp.chdir(root)
        prepare_base(micro_params())
    return root


def build_foreign_checkpoint(folder: Path) -> Path:
    """An SD pipeline shaped unlike the embedded one (2-level UNet, 8x VAE... as in hf-internal-testing's tiny pipe)."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64,
    )
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # As in real SD repos: a safety checker entry (here only a pickle that must never be opened) and a feature extractor.
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"not a pickle: loading this would fail")
    # Hub SD repos ship the slow-tokenizer files (vocab.json + merges.txt), not tokenizer.json.
    (folder / "tokenizer" / "tokenizer.json").unlink()
    vocab, merges = vocab_and_merges()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def foreign_template(tmp_path_factory) -> Path:
    return build_foreign_checkpoint(tmp_path_factory.mktemp("foreign") / "sd")


@pytest.fixture
def foreign(foreign_template, workspace) -> Path:
    """A fresh copy of the foreign checkpoint inside the workspace's data folder (tests may break it)."""
    return Path(shutil.copytree(foreign_template, workspace / "data" / "foreign-sd"))


def weights_hash(pipe: StableDiffusionPipeline) -> str:
    digest = hashlib.sha256()
    for name in ("vae", "unet"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ embedded


def test_embedded_stage_writes_a_diffusers_folder_with_safetensors(embedded):
    base = embedded / "models" / "base"
    index = json.loads((base / "model_index.json").read_text())
    for component in COMPONENTS:
        assert index[component][0] is not None, component
        assert (base / component).is_dir(), component
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (base / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (base / "text_encoder" / "model.safetensors").is_file()
    tokenizer = base / "tokenizer"
    assert (tokenizer / "tokenizer.json").is_file() or (tokenizer / "vocab.json").is_file()
    assert (base / "scheduler" / "scheduler_config.json").is_file()
    assert not list(base.rglob("*.bin")), "no pickle weights"
    assert Image.open(base / "samples.png").size[0] >= 32 * 8
    report = json.loads((base / "pretrain.json").read_text())
    assert report["train_images"] == 12 and report["vae_steps"] == 3 and report["unet_steps"] == 3
    assert not list((embedded / "models").glob(".base.*")), "no temporaries left behind"


def test_embedded_folder_reloads_with_plain_diffusers_and_generates(embedded):
    base = embedded / "models" / "base"
    plain = StableDiffusionPipeline.from_pretrained(str(base), use_safetensors=True, local_files_only=True)
    ours = load_base_pipeline(base)
    assert plain.vae.config.scaling_factor == ours.vae.config.scaling_factor != 0.18215  # fitted to our latents
    ours.set_progress_bar_config(disable=True)
    image = ours(
        "a dermoscopic image of a skin lesion", height=32, width=32, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_pretraining_changes_weights_and_lowers_loss_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(32, seed=0)
    rng = np.random.default_rng(1)
    images = torch.stack(
        [torch.from_numpy(np.array(lesion_image(rng, (32, 32)))).permute(2, 0, 1) for _ in range(8)]
    )
    cfg = micro_params(pretrain={"vae_steps": 25, "unet_steps": 25, "batch": 8, "vae_lr": 2e-3, "unet_lr": 2e-3}).diffusion.pretrain
    x = to_model_range(images)
    before = weights_hash(pipe)

    def vae_eval() -> float:
        torch.manual_seed(123)  # the same posterior sample before and after
        with torch.no_grad():
            return pt.vae_loss(pipe.vae, x).item()

    vae_before = vae_eval()
    pt.train_vae(pipe.vae, images, torch.ones(len(images)), cfg, torch.Generator().manual_seed(0))
    vae_after = vae_eval()
    assert vae_after < 0.7 * vae_before, (vae_before, vae_after)

    cache = encode_images(pipe.vae, images)
    cache.scaling_factor = float(1 / cache.mean.std())
    pipe.vae.register_to_config(scaling_factor=cache.scaling_factor)
    latents = cache.mean * cache.scaling_factor
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=gen)
    text = encode_prompts(pipe, [cfg.prompt]).expand(len(latents), -1, -1)

    def unet_eval() -> float:
        with torch.no_grad():
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            return torch.nn.functional.mse_loss(pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample, noise).item()

    unet_before = unet_eval()
    pt.train_unet(pipe, cache, torch.ones(len(images)), cfg, torch.Generator().manual_seed(0))
    unet_after = unet_eval()
    assert unet_after < unet_before, (unet_before, unet_after)
    assert weights_hash(pipe) != before


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    rng = np.random.default_rng(2)
    images = torch.stack([torch.from_numpy(np.array(lesion_image(rng, (32, 32)))).permute(2, 0, 1) for _ in range(6)])
    cfg = micro_params().diffusion.pretrain

    def run(seed: int) -> str:
        pipe = build_tiny_pipeline(32, seed=seed)
        pt.pretrain(pipe, images, torch.ones(len(images)), cfg, seed)
        return weights_hash(pipe)

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_only_train_rows_are_read(workspace):
    paths, diagnoses = pt.train_images(workspace / "data" / "prepared" / "split.csv")
    assert len(paths) == len(diagnoses) == 12 and all(p.is_absolute() and p.is_file() for p in paths)


def test_the_vae_loss_weighs_lesion_pixels_above_skin():
    skin = torch.tensor([0.4, 0.0, -0.2])[None, :, None, None].expand(2, 3, 8, 8).clone()
    skin[1, :, 2:4, 2:4] = torch.tensor([-0.5, -0.8, 0.3])[:, None, None]  # a purple clod on the second image
    weights = pt.lesion_weights(skin)
    assert weights.shape == (2, 1, 8, 8)
    assert torch.allclose(weights[0], torch.ones(1, 8, 8))  # plain skin: every pixel counts the same
    assert weights[1].mean().item() == pytest.approx(1.0)
    assert weights[1, 0, 2, 2].item() > 5 * weights[1, 0, 6, 6].item()


def test_every_diagnosis_is_drawn_equally_often(workspace, monkeypatch):
    """The base stage hands pre-training weights under which a rare diagnosis is drawn as often as a common one."""
    split_csv = workspace / "data" / "prepared" / "split.csv"
    rows = list(csv.DictReader(split_csv.open(newline="")))
    for i, row in enumerate(rows[:12]):  # 8 mel, 3 df, 1 vasc
        row["dx"] = "mel" if i < 8 else "df" if i < 11 else "vasc"
    with split_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    class Captured(Exception):
        pass

    def capture(pipe, images, weights, cfg, seed):
        raise Captured(weights)

    monkeypatch.setattr(pt, "pretrain", capture)
    with pytest.raises(Captured) as caught:
        prepare_base(micro_params())
    weights, labels = caught.value.args[0], [row["dx"] for row in rows[:12]]
    draws = torch.multinomial(weights, 3000, replacement=True, generator=torch.Generator().manual_seed(0))  # as pretraining
    shares = torch.bincount(torch.tensor([["mel", "df", "vasc"].index(labels[i]) for i in draws]), minlength=3) / len(draws)
    assert shares.tolist() == pytest.approx([1 / 3] * 3, abs=0.03)


def test_missing_split_is_a_one_line_error(workspace):
    (workspace / "data" / "prepared" / "split.csv").unlink()
    with pytest.raises(PipelineError, match=r"split\.csv: split file not found"):
        prepare_base(micro_params())
    assert not (workspace / "models" / "base").exists()


# ------------------------------------------------------------------------------------- foreign


def test_foreign_local_checkpoint_is_referenced_and_loads(foreign, workspace):
    prepare_base(micro_params(base_model="data/foreign-sd"))  # relative to the workspace
    base = workspace / "models" / "base"
    assert sorted(p.name for p in base.iterdir()) == ["base_model.json"], "weights are referenced, never copied"
    record = json.loads((base / "base_model.json").read_text())
    assert record["source"] == "data/foreign-sd"
    assert record["path"] == str(foreign.resolve())
    assert len(record["sha256"]) == 64
    pipe = load_base_pipeline()  # default: models/base of the workspace
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None and pipe.unet.config.block_out_channels == [32, 64]
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)


def test_changed_checkpoint_is_detected_at_load(foreign, workspace):
    prepare_base(micro_params(base_model=str(foreign)))
    (foreign / "unet" / "config.json").write_text((foreign / "unet" / "config.json").read_text() + " ")
    with pytest.raises(PipelineError, match="changed since the base stage"):
        load_base_pipeline()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "model_index.json").unlink(), r"foreign-sd/model_index\.json is missing"),
        (lambda f: shutil.rmtree(f / "vae"), r"component folder .*foreign-sd/vae is missing"),
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), r"unet/diffusion_pytorch_model\.safetensors is missing"),
        (lambda f: (f / "tokenizer" / "merges.txt").unlink(), r"tokenizer/merges\.txt is missing"),
    ],
    ids=["no-model-index", "no-vae-folder", "no-unet-weights", "no-merges"],
)
def test_incomplete_checkpoint_names_the_missing_file(foreign, workspace, breakage, message):
    breakage(foreign)
    with pytest.raises(PipelineError, match=message) as info:
        prepare_base(micro_params(base_model=str(foreign)))
    assert "\n" not in str(info.value)
    assert not (workspace / "models" / "base").exists()


def test_pickle_only_weights_are_refused(foreign, workspace):
    weights = foreign / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    with pytest.raises(PipelineError, match=r"text_encoder has only pickle weights \(pytorch_model\.bin\).*safetensors"):
        prepare_base(micro_params(base_model=str(foreign)))


def offline_with_empty_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub  # read once at import: HF_HUB_OFFLINE / HF_HOME set now would not count

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))


def test_uncached_hub_id_offline_is_a_clear_error(workspace, tmp_path, monkeypatch):
    offline_with_empty_cache(monkeypatch, tmp_path)
    with pytest.raises(PipelineError) as info:
        prepare_base(micro_params(base_model="runwayml/stable-diffusion-v1-5"))
    assert str(info.value) == (
        "diffusion.base_model: 'runwayml/stable-diffusion-v1-5' is not in the local Hugging Face cache and the Hub "
        "cannot be reached; download it once with `huggingface-cli download runwayml/stable-diffusion-v1-5` "
        "or set base_model to a local diffusers folder"
    )
    assert not (workspace / "models" / "base").exists()


def test_in_repo_path_that_is_missing_is_named_when_the_hub_fails_too(workspace, tmp_path, monkeypatch):
    offline_with_empty_cache(monkeypatch, tmp_path)
    with pytest.raises(PipelineError, match=r"not in the local Hugging Face cache.*\(no folder .*/data/sd15 exists either\)$"):
        prepare_base(micro_params(base_model="data/sd15"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not a model!", r"neither 'embedded-tiny', an existing diffusers folder, nor a Hub id"),
        ("/nonexistent/sd-folder", r"folder /nonexistent/sd-folder does not exist"),
        ("../outside", r"leaves the repository"),
        ("data/prepared/split.csv", r"is a file; expected a diffusers pipeline folder"),
    ],
)
def test_nonsense_base_model_is_a_clear_error(workspace, value, message):
    with pytest.raises(PipelineError, match=message):
        prepare_base(micro_params(base_model=value))


def test_stage_script_with_bad_params_exits_1_with_one_line(workspace):
    (workspace / "params.yaml").write_text(json.dumps({"diffusion": {"base_model": "/nonexistent/sd-folder"}}))
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / "base.py")], cwd=workspace, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: base: diffusion.base_model: folder /nonexistent/sd-folder does not exist"], done.stderr
    assert "Traceback" not in done.stderr
    assert not (workspace / "models" / "base").exists()
