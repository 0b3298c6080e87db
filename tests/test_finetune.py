"""finetune@<class> on a tiny random SD base at 32 px: real diffusers/peft code paths, a few steps each.

Runs single-threaded: these tests share 2 cores with other processes, where two OpenMP threads
per process slow every step down tenfold or more. Bitwise claims hold for a fixed thread count.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_workspace import killed_during_step, make_workspace, micro_params, pixels, trained_workspace, unet_probe
from pipeline.core.cli import run_stage
from pipeline.diffusion.base import load_base_pipeline
from pipeline.diffusion import finetune
from pipeline.diffusion.finetune import base_sha256, finetune_class, validation_grid
from pipeline.diffusion.generate import load_class_pipeline
from pipeline.diffusion.lora import LORA_FILE, add_lora, load_lora, save_lora
from pipeline.diffusion.tiny import build_tiny_pipeline
from pipeline.core.digest import sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.params import ComputeParams, LoraParams
from pipeline.core.paths import WORKSPACE_ENV

WEIGHTS = {
    "lora": "pytorch_lora_weights.safetensors",
    "dreambooth": "unet/diffusion_pytorch_model.safetensors",
    "textual_inversion": "learned_embeds.safetensors",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workspace(tmp_path, tiny_base, monkeypatch):
    root = make_workspace(tmp_path / "ws", tiny_base)
    monkeypatch.chdir(root)
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    return root


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base):
    params = micro_params("lora")
    return trained_workspace(tmp_path_factory.mktemp("lora") / "ws", tiny_base, params), params


def regenerate_samples_matches(pipe, params, folder) -> None:
    """The validation grid redrawn by a *reloaded* model equals samples.png drawn by the in-memory trained one."""
    path = folder / "redrawn.png"
    validation_grid(pipe, params, "df").save(path)
    assert (pixels(path) == pixels(folder / "samples.png")).all()


def test_lora_changes_the_unet_only_when_loaded(lora_run, monkeypatch):
    root, params = lora_run
    monkeypatch.chdir(root)
    folder = root / "models/diffusion/df"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", LORA_FILE, "samples.png"]
    assert not (root / "checkpoints/df").exists()  # deleted after the successful save

    reference = unet_probe(load_base_pipeline(root / "models/base").unet)
    unfused = load_base_pipeline(root / "models/base")
    unfused.load_lora_weights(str(folder))  # the plain diffusers call: the adapter beside the base weights
    with_lora = unet_probe(unfused.unet)
    assert (with_lora - reference).abs().max() > 1e-3
    unfused.unet.disable_adapters()
    assert torch.equal(unet_probe(unfused.unet), reference)  # the base weights under the adapter are untouched
    assert torch.equal(unet_probe(load_base_pipeline(root / "models/base").unet), reference)

    fused = load_base_pipeline(root / "models/base")
    load_lora(fused, folder)
    torch.testing.assert_close(unet_probe(fused.unet), with_lora, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in fused.unet.named_modules())  # baked in, no adapter left behind

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == "lora" and meta["token"] == "sks" and meta["steps"] == 4
    assert meta["prompt"] == "a dermoscopic image of sks dermatofibroma"
    assert meta["weights_sha256"] == sha256_file(folder / LORA_FILE)
    assert meta["base"]["sha256"] == base_sha256(root / "models/base")


def test_lora_file_reloads_with_diffusers_and_reproduces_the_trained_model(lora_run, monkeypatch):
    root, params = lora_run
    monkeypatch.chdir(root)
    folder = root / "models/diffusion/df"
    pipe = load_base_pipeline(root / "models/base")
    pipe.load_lora_weights(str(folder))  # the plain diffusers call, rank 4 / alpha 8 read from the file's metadata
    regenerate_samples_matches(pipe, params, folder)


CONV_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


def test_lora_on_resnet_convs_round_trips(workspace):
    """Conv2d LoRA (the ResNets' 3x3 convs) saves, passes the shape check, and reloads to the trained model."""
    params = micro_params("lora", {"lora": {"rank": 4, "alpha": 8, "target_modules": CONV_TARGETS}})
    folder = finetune_class(params, "df")
    shapes = {k: v.shape for k, v in load_file(folder / LORA_FILE).items()}
    conv_down = [k for k in shapes if re.search(r"\.resnets\.\d+\.conv1\.(lora\.down|lora_A)\.weight$", k)]
    assert conv_down and all(shapes[k][0] == 4 and shapes[k][2:] == (3, 3) for k in conv_down)
    assert any("time_emb_proj" in k for k in shapes)

    reference = unet_probe(load_base_pipeline(workspace / "models/base").unet)
    pipe = load_base_pipeline(workspace / "models/base")
    pipe.load_lora_weights(str(folder))  # unfused: the adapter beside the base weights
    with_lora = unet_probe(pipe.unet)
    assert (with_lora - reference).abs().max() > 1e-3
    regenerate_samples_matches(pipe, params, folder)  # pixel-equal to the grid the trained in-memory model drew

    fused = load_base_pipeline(workspace / "models/base")
    load_lora(fused, folder)
    torch.testing.assert_close(unet_probe(fused.unet), with_lora, rtol=1e-4, atol=1e-5)


def test_lora_file_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """peft holds target_modules as a set; saved in its iteration order, the same weights would give other bytes
    (and another DVC hash) in every process."""
    unet = build_tiny_pipeline(32, seed=0).unet
    add_lora(unet, LoraParams(target_modules=CONV_TARGETS))
    with safe_open(str(save_lora(unet, tmp_path)), framework="pt") as handle:
        saved = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert saved["unet.target_modules"] == sorted(CONV_TARGETS)


def test_dreambooth_fine_tunes_the_whole_unet_with_prior_preservation(workspace):
    params = micro_params("dreambooth", {"prior_preservation": True})
    folder = finetune_class(params, "df")
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    tuned = load_file(folder / WEIGHTS["dreambooth"])
    base = load_file(workspace / "models/base/unet/diffusion_pytorch_model.safetensors")
    assert tuned.keys() == base.keys()
    changed = sum(not torch.equal(tuned[k], base[k]) for k in base)
    assert changed > 0.9 * len(base)
    pipe, weights, meta = load_class_pipeline(params, "df")
    assert weights == folder / WEIGHTS["dreambooth"] and meta["method"] == "dreambooth"
    regenerate_samples_matches(pipe, params, folder)


def test_textual_inversion_changes_only_the_new_embedding_row(workspace):
    params = micro_params("textual_inversion")
    folder = finetune_class(params, "df")
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.safetensors", "meta.json", "samples.png"]
    learned = load_file(folder / WEIGHTS["textual_inversion"])
    assert list(learned) == ["sks"] and learned["sks"].shape == (1, 64)

    pipe = load_base_pipeline(workspace / "models/base")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    init = table[pipe.tokenizer("dermatofibroma", add_special_tokens=False).input_ids].mean(0)
    pipe.load_textual_inversion(str(folder / WEIGHTS["textual_inversion"]), token="sks")  # diffusers reads the file as is
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == table.shape[0] + 1
    assert torch.equal(after[:-1], table)
    assert torch.equal(after[-1], learned["sks"][0])
    assert not torch.allclose(after[-1], init)  # the row trained away from its initialisation

    pipe, _, _ = load_class_pipeline(params, "df")
    regenerate_samples_matches(pipe, params, folder)


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "dreambooth"])
def test_resume_after_a_kill_reaches_the_same_weights_bitwise(workspace, method):
    params = micro_params(method, {"steps": 5, "checkpoint_every": 2, "noise_offset": 0.2})  # its draws resume too
    folder = finetune_class(params, "df")
    uninterrupted = load_file(folder / WEIGHTS[method])

    with killed_during_step(4):  # after the checkpoint at step 2
        finetune_class(params, "df")
    checkpoint = workspace / "checkpoints/df"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json", "state.safetensors"]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2

    folder = finetune_class(params, "df")
    resumed = load_file(folder / WEIGHTS[method])
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert json.loads((folder / "meta.json").read_text())["resumed_from_step"] == 2
    assert not checkpoint.exists()


def test_a_checkpoint_of_other_params_is_not_resumed(workspace, capsys):
    with killed_during_step(3):
        finetune_class(micro_params("lora"), "df")
    state = workspace / "checkpoints/df/state.json"
    assert json.loads(state.read_text())["step"] == 2
    capsys.readouterr()

    with killed_during_step(2):
        finetune_class(micro_params("lora", {"lr": 5e-3}), "df")
    assert "checkpoint was written for other params, data or base model; starting fresh" in capsys.readouterr().err
    with killed_during_step(2):
        finetune_class(micro_params("lora", {"resume": False}), "df")
    assert "diffusion.resume is false; ignoring the checkpoint" in capsys.readouterr().err
    assert json.loads(state.read_text())["step"] == 2


def test_gradient_checkpointing_changes_memory_not_results(workspace, lora_run):
    folder = finetune_class(micro_params("lora", {"gradient_checkpointing": True}), "df")
    plain = load_file(lora_run[0] / "models/diffusion/df" / LORA_FILE)
    checkpointed = load_file(folder / LORA_FILE)
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_mixed_precision_on_cpu_falls_back_to_fp32_with_a_warning(workspace, capsys):
    params = micro_params("lora").model_copy(update={"compute": ComputeParams(mixed_precision="bf16")})
    with killed_during_step(1):
        finetune_class(params, "df")
    assert "warning: compute.mixed_precision=bf16 needs a GPU; training in fp32 on CPU" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_frozen_weights_are_cast_only_where_the_dtype_changes(method, monkeypatch):
    """diffusers warns on every dtype cast of a model, a no-op one included: fp32 on a CPU casts nothing."""
    pipe = build_tiny_pipeline(16)
    part = finetune.attach_method(pipe, micro_params(method), "df")
    cast = []
    for name in ("vae", "text_encoder", "unet"):
        module = getattr(pipe, name)
        monkeypatch.setattr(module, "to", lambda *a, _to=module.to, _name=name, **k: cast.append(_name) or _to(*a, **k))
    finetune.cast_frozen(pipe, part, torch.float32)
    assert cast == []
    finetune.cast_frozen(pipe, part, torch.float16)
    assert cast == (["vae", "text_encoder", "unet"] if method == "lora" else ["vae", "text_encoder"])
    assert pipe.vae.dtype == torch.float16 and pipe.unet.conv_in.weight.dtype == (
        torch.float16 if method == "lora" else torch.float32)


def test_missing_finetune_list_is_named(workspace):
    (workspace / "data/prepared/finetune/df.csv").unlink()
    with pytest.raises(PipelineError, match=r"data/prepared/finetune/df\.csv: fine-tuning list of class 'df' not found"):
        finetune_class(micro_params(), "df")


def test_finetune_list_with_a_missing_image_is_named(workspace):
    (workspace / "data/raw/ISIC_df0002.png").unlink()
    with pytest.raises(PipelineError, match=r"df\.csv: image ISIC_df0002 not found at .*ISIC_df0002\.png"):
        finetune_class(micro_params(), "df")


def test_class_not_selected_is_one_line_from_the_stage(workspace, capsys):
    import yaml

    (workspace / "params.yaml").write_text(yaml.safe_dump(micro_params().model_dump(mode="json")))
    assert run_stage("finetune", finetune_class, item="class_code", track=False, argv=["mel"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: finetune@mel: class 'mel' is not in data.classes (df, vasc)"]


@pytest.mark.parametrize("noise_offset", [0.0, 0.3])
def test_the_loss_weights_each_sample_by_min_snr_and_adds_the_prior_rows_by_their_weight(noise_offset):
    """Hand-made: a UNet that predicts zeros against noise drawn from the same generator gives each row's MSE; the
    loss is the Min-SNR-weighted mean of the instance rows plus prior_weight times that of the prior rows. A noise
    offset adds one constant per image and channel to that noise."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from pipeline.diffusion.pretrain import MIN_SNR_GAMMA, min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([1, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    assert snr[0] > MIN_SNR_GAMMA > snr[2]  # t=1 is nearly noise-free, t=999 nearly all noise
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps)[[0, 2]], torch.stack([MIN_SNR_GAMMA / snr[0], torch.tensor(1.0)]))

    class Zeros(torch.nn.Module):
        def forward(self, x, t, states):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    latents = torch.zeros(4, 4, 2, 2)
    batch = finetune.Batch(latents, torch.zeros(4, 77, 8), priors=2, prior_weight=0.5)
    loss = finetune.diffusion_loss(Zeros(), scheduler, batch, torch.Generator().manual_seed(0), noise_offset)

    again = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=again)
    if noise_offset:
        noise += noise_offset * torch.randn(4, 4, 1, 1, generator=again)
    t = torch.randint(0, 1000, (4,), generator=again)
    per_row = noise.pow(2).mean((1, 2, 3)) * min_snr_weights(scheduler, t)
    torch.testing.assert_close(loss, per_row[:2].mean() + 0.5 * per_row[2:].mean())
