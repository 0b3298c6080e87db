"""diffusion.method hypernetwork, both kinds, on the tiny random SD base at 32 px.

Single-threaded for the reason given in test_finetune.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_workspace import make_workspace, micro_params, pixels, trained_workspace, unet_probe
from pipeline.diffusion import pretrain
from pipeline.diffusion.base import load_base_pipeline
from pipeline.diffusion.finetune import finetune_class, validation_grid
from pipeline.diffusion.generate import generate_class, load_class_pipeline
from pipeline.diffusion.hypernetwork import (
    CONFIG_KEY,
    HYPERNETWORK_FILE,
    add_hypernetwork,
    load_hypernetwork,
    save_hypernetwork,
)
from pipeline.diffusion.tiny import build_tiny_pipeline
from pipeline.core.digest import sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.params import HypernetworkParams, parse_params
from pipeline.core.paths import WORKSPACE_ENV

KINDS = ["encoder_copy", "context_mlp"]
# The parameters that start at zero, so that training must move them: encoder_copy's 1x1 output convolutions,
# context_mlp's last layers.
ZERO_AT_START = {"encoder_copy": ("controlnet_down_blocks.", "controlnet_mid_block."), "context_mlp": (".mlp.1.",)}

pytestmark = pytest.mark.usefixtures("one_thread")


def hyper_params(kind: str, diffusion: dict | None = None):
    return micro_params("hypernetwork", {"hypernetwork": {"kind": kind}, **(diffusion or {})})


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory, tiny_base):
    params = hyper_params(request.param)
    return trained_workspace(tmp_path_factory.mktemp(request.param) / "ws", tiny_base, params), params, request.param


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_hypernetwork_leaves_the_output_exactly_the_base_models(kind):
    pipe = build_tiny_pipeline(32, seed=0)
    reference = unet_probe(pipe.unet)
    trainable = add_hypernetwork(pipe.unet, HypernetworkParams(kind=kind))
    assert trainable and all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for name, p in pipe.unet.named_parameters() if not name.startswith("hypernetwork."))
    assert torch.equal(unet_probe(pipe.unet), reference)

    with torch.no_grad():  # any change to the hypernetwork's weights shows in the output
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    steered = unet_probe(pipe.unet)
    assert (steered - reference).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_the_file_round_trips_through_safetensors(kind, tmp_path):
    pipe = build_tiny_pipeline(32, seed=0)
    trainable = add_hypernetwork(pipe.unet, HypernetworkParams(kind=kind, activation="gelu"))
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    expected = unet_probe(pipe.unet)
    path = save_hypernetwork(pipe.unet, tmp_path)

    fresh = build_tiny_pipeline(32, seed=0)
    reference = unet_probe(fresh.unet)
    assert load_hypernetwork(fresh, tmp_path) == path
    assert torch.equal(unet_probe(fresh.unet), expected)
    assert not torch.equal(expected, reference)
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()[CONFIG_KEY])
    assert config["kind"] == kind and config["activation"] == "gelu" and config["unet"]["cross_attention_dim"] == 64
    with pytest.raises(PipelineError, match="already has a hypernetwork"):
        load_hypernetwork(fresh, tmp_path)


def test_context_mlp_has_the_configured_layer_structure(tmp_path):
    pipe = build_tiny_pipeline(32, seed=0)
    add_hypernetwork(pipe.unet, HypernetworkParams(kind="context_mlp", layer_structure=[1, 0.5, 3, 1]))
    shapes = {k: list(v.shape) for k, v in load_file(save_hypernetwork(pipe.unet, tmp_path)).items()}
    widths = [(64, 32), (32, 192), (192, 64)]  # 64-wide context, webui structure "1, 0.5, 3, 1"
    for which in "kv":
        assert [shapes[f"mlps.{which}64.mlp.{i}.weight"] for i in range(3)] == [[o, i] for i, o in widths]


def test_layer_structure_must_start_and_end_at_one():
    with pytest.raises(PipelineError, match=r"diffusion\.hypernetwork\.layer_structure: layer_structure must start and end with 1"):
        parse_params({"diffusion": {"method": "hypernetwork", "hypernetwork": {"layer_structure": [2, 1]}}})
    with pytest.raises(PipelineError, match=r"diffusion\.hypernetwork\.kind: "):
        parse_params({"diffusion": {"hypernetwork": {"kind": "attention"}}})


def test_a_trained_hypernetwork_steers_the_unet_only_when_loaded(trained, monkeypatch):
    root, params, kind = trained
    monkeypatch.chdir(root)
    folder = root / "models/diffusion/df"
    assert sorted(p.name for p in folder.iterdir()) == [HYPERNETWORK_FILE, "meta.json", "samples.png"]
    assert not (root / "checkpoints/df").exists()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == "hypernetwork" and meta["weights_sha256"] == sha256_file(folder / HYPERNETWORK_FILE)

    weights = load_file(folder / HYPERNETWORK_FILE)
    trained_at_zero = [k for k in weights if any(part in k for part in ZERO_AT_START[kind]) and k.endswith("weight")]
    assert trained_at_zero and all(weights[k].abs().max() > 0 for k in trained_at_zero)  # training moved them

    reference = unet_probe(load_base_pipeline(root / "models/base").unet)
    pipe, path, _ = load_class_pipeline(params, "df")
    assert path == folder / HYPERNETWORK_FILE
    assert (unet_probe(pipe.unet) - reference).abs().max() > 1e-4
    assert torch.equal(unet_probe(load_base_pipeline(root / "models/base").unet), reference)

    redrawn = folder.parent / "redrawn.png"  # the reloaded model draws the trained model's validation grid
    validation_grid(pipe, params, "df").save(redrawn)
    assert (pixels(redrawn) == pixels(folder / "samples.png")).all()
    redrawn.unlink()


def test_generate_samples_with_the_hypernetwork(trained, monkeypatch):
    root, params, _ = trained
    monkeypatch.chdir(root)
    target = generate_class(params, "df")
    rows = (target / "manifest.csv").read_text().splitlines()[1:]
    assert len(rows) == params.generate.per_class
    assert all(row.endswith(sha256_file(root / "models/diffusion/df" / HYPERNETWORK_FILE)) for row in rows)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_a_kill_reaches_the_same_weights_bitwise(tmp_path, tiny_base, monkeypatch, kind):
    workspace = make_workspace(tmp_path / "ws", tiny_base)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    params = hyper_params(kind, {"steps": 5, "checkpoint_every": 2})
    uninterrupted = load_file(finetune_class(params, "df") / HYPERNETWORK_FILE)

    real_target, calls = pretrain.diffusion_target, []

    def killed_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_target(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "diffusion_target", killed_in_step_4)
        with pytest.raises(KeyboardInterrupt):
            finetune_class(params, "df")
    assert json.loads((workspace / "checkpoints/df/state.json").read_text())["step"] == 2

    folder = finetune_class(params, "df")
    resumed = load_file(folder / HYPERNETWORK_FILE)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert json.loads((folder / "meta.json").read_text())["resumed_from_step"] == 2


def _drop_a_tensor(path):
    weights = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    weights.pop(sorted(weights)[0])
    save_file(weights, str(path), metadata=metadata)


def _other_base(path):
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata[CONFIG_KEY])
    config["unet"]["cross_attention_dim"] = 768
    save_file(load_file(path), str(path), metadata={CONFIG_KEY: json.dumps(config)})


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda path: path.unlink(), "hypernetwork weights not found; run the finetune stage first"),
        (lambda path: path.write_bytes(b"not safetensors"), "not a readable safetensors hypernetwork file"),
        (lambda path: save_file(load_file(path), str(path)), "no 'hypernetwork_config' in the file's metadata"),
        (lambda path: save_file(load_file(path), str(path), metadata={CONFIG_KEY: "{"}), "malformed hypernetwork config"),
        (_drop_a_tensor, r"tensors of a \w+ hypernetwork missing, e\.g\. '"),
        (_other_base, r"cross_attention_dim=768 but the base model has 64: it was trained for another base model"),
    ],
)
def test_a_bad_hypernetwork_file_is_one_line_naming_it(trained, monkeypatch, corrupt, message):
    root, params, _ = trained
    monkeypatch.chdir(root)
    path = root / "models/diffusion/df" / HYPERNETWORK_FILE
    original = path.read_bytes()
    try:
        corrupt(path)
        with pytest.raises(PipelineError, match=message) as error:
            load_class_pipeline(params, "df")
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    finally:
        path.write_bytes(original)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_a_fine_tuning_step_runs_on_a_fake_cuda_device(kind, dtype):
    """The stage's set-up and step up to the loss on fake CUDA (test_device_sim_diffusion.py says how), frozen
    weights in ``dtype``: a CPU tensor in the hooks, or a dtype clash without autocast, would raise here."""
    from diffusers import DDPMScheduler
    from test_device_sim_diffusion import BATCH, RESOLUTION, fake_images, on_fake_cuda

    from pipeline.diffusion.finetune import attach_method, cast_frozen, diffusion_loss, draw_batch
    from pipeline.diffusion.training_data import encode_images, encode_prompts

    params = hyper_params(kind)
    pipe = build_tiny_pipeline(RESOLUTION)
    part = attach_method(pipe, params, "df")
    cast_frozen(pipe, part, dtype)
    with on_fake_cuda(pipe):
        trainable = part.named_trainable()
        assert trainable and all(name.startswith("hypernetwork.") for name in trainable)
        assert {p.dtype for p in trainable.values()} == {torch.float32} and pipe.unet.conv_in.weight.dtype == dtype
        states = encode_prompts(pipe, [params.class_prompt("df")])
        generator = torch.Generator().manual_seed(0)
        batch = draw_batch(encode_images(pipe.vae, fake_images(3)), None, states, BATCH, generator)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        loss = diffusion_loss(pipe.unet, scheduler, batch, generator, dtype=dtype)
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.requires_grad
