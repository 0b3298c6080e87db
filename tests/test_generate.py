"""generate@<class> from a LoRA fine-tuned on a tiny random SD base at 32 px: determinism, manifest, bad adapters.

Single-threaded for the reason given in test_finetune.py.
"""

from __future__ import annotations

import csv
import hashlib
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusion_workspace import build_base, micro_params, pixels, trained_workspace
from pipeline.core.cli import run_stage
from pipeline.diffusion.generate import (
    MANIFEST_COLUMNS,
    SCHEDULERS,
    Sampling,
    generate_class,
    generate_images,
    image_seed,
    load_class_pipeline,
    make_scheduler,
    padded_grid,
    png_writer,
    sample_images,
)
from pipeline.diffusion.base import load_base_pipeline, load_base_unet
from pipeline.diffusion.lora import LORA_FILE
from pipeline.core.digest import sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.paths import WORKSPACE_ENV


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with a LoRA for df, trained once for this module."""
    base = build_base(tmp_path_factory.mktemp("tiny") / "base")
    params = micro_params("lora")
    return trained_workspace(tmp_path_factory.mktemp("gen") / "ws", base, params), params


@pytest.fixture
def workspace(trained, monkeypatch):
    root, params = trained
    monkeypatch.chdir(root)
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    shutil.rmtree(root / "data/synthetic", ignore_errors=True)
    return root, params


def read_manifest(folder):
    with (folder / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def pixel_hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(pixels(p).tobytes()).hexdigest() for p in sorted(folder.glob("df_*.png"))}


def test_manifest_lists_exactly_the_images_and_the_weights_used(workspace):
    root, params = workspace
    folder = generate_class(params, "df")
    columns, rows = read_manifest(folder)
    assert tuple(columns) == MANIFEST_COLUMNS
    assert [r["file"] for r in rows] == ["df_00000.png", "df_00001.png", "df_00002.png"]
    assert sorted(p.name for p in folder.glob("*.png")) == ["df_00000.png", "df_00001.png", "df_00002.png", "grid.png"]
    weights_sha = sha256_file(root / "models/diffusion/df" / LORA_FILE)
    for k, row in enumerate(rows):
        assert row["class"] == "df" and row["prompt"] == "a dermoscopic image of sks dermatofibroma"
        assert row["negative_prompt"] == "" and row["scheduler"] == "dpmsolver++"
        assert (row["steps"], row["guidance"], row["unconditional"]) == ("2", "5.0", "base")
        assert int(row["seed"]) == image_seed(params.seed, "df", k)
        assert row["weights_sha256"] == weights_sha
        assert pixels(folder / row["file"]).shape == (32, 32, 3)
    assert pixels(folder / "grid.png").shape == (32, 3 * 32, 3)  # up to 16 samples, 4 per row
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temporaries left


def test_each_classifier_seed_gets_its_own_draw(workspace):
    _, params = workspace
    two = params.model_copy(update={"classifier": params.classifier.model_copy(update={"seeds": [0, 5]})})
    folder = generate_class(two, "df")
    _, rows = read_manifest(folder)
    assert [r["draw"] for r in rows] == ["0"] * 3 + ["5"] * 3  # generate.per_class images for each seed
    assert len({r["seed"] for r in rows}) == 6 and len(set(pixel_hashes(folder).values())) == 6
    first = pixel_hashes(generate_class(params, "df"))  # seeds [0]: the first draw, unchanged
    assert first == {name: digest for name, digest in pixel_hashes(folder).items() if name in first}


def test_generation_is_deterministic_for_a_fixed_seed(workspace):
    _, params = workspace
    first = pixel_hashes(generate_class(params, "df"))
    second = pixel_hashes(generate_class(params, "df"))
    assert len(first) == 3 and first == second
    reseeded = pixel_hashes(generate_class(params.model_copy(update={"seed": 1}), "df"))
    assert reseeded.keys() == first.keys() and all(reseeded[k] != first[k] for k in first)


def test_any_image_regenerates_alone_from_its_manifest_row(workspace):
    """Image 1 was drawn in a batch of two; drawn alone from its manifest seed (guided by the base UNet, as the row
    says) it is the same image.

    Same noise and same denoising, but a different batch may round floats differently: at most one
    8-bit level in a few pixels (usually none; bitwise here on 1 thread, not promised elsewhere).
    """
    root, params = workspace
    folder = generate_class(params, "df")
    _, rows = read_manifest(folder)
    row = rows[1]
    assert row["unconditional"] == "base"
    pipe, _, _ = load_class_pipeline(params, "df")
    pipe.scheduler = make_scheduler(row["scheduler"], pipe.scheduler.config)
    guide = load_base_unet(root / "models/base")
    sampling = Sampling(int(row["steps"]), float(row["guidance"]), resolution=32, guide_unet=guide)
    alone = generate_images(pipe, row["prompt"], row["negative_prompt"], [int(row["seed"])], sampling)[0]
    alone.save(root / "alone.png")
    difference = abs(pixels(root / "alone.png") - pixels(folder / row["file"]))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_sampling_with_one_unet_draws_the_diffusers_pipelines_images(workspace):
    """sample_images is diffusers' guided denoising loop, with the unconditional UNet as a choice: with one UNet it
    draws what the pipeline draws from the same generators (up to float rounding), DPM-Solver++ and DDPM alike."""
    _, params = workspace
    pipe, _, _ = load_class_pipeline(params, "df")
    prompt, seeds = params.class_prompt("df"), [3, 4]
    for scheduler in ("dpmsolver++", "ddpm"):  # DDPM draws noise in every step, from the same generators
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        ours = sample_images(pipe, prompt, "blurry", [torch.Generator().manual_seed(s) for s in seeds], Sampling(3, 4.0, 32))
        theirs = pipe([prompt] * 2, negative_prompt=["blurry"] * 2, generator=[torch.Generator().manual_seed(s) for s in seeds],
                      num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="pt").images
        assert ours.shape == theirs.shape == (2, 3, 32, 32)
        assert (ours - theirs).abs().max() < 1e-4


def test_guidance_against_the_base_unet_changes_only_the_unconditional_branch(workspace):
    """With the base UNet as the unconditional branch the images change; at guidance 1 that branch is not used,
    so they are the fine-tuned model's own; and the base UNet guiding the base model is plain guidance."""
    root, params = workspace
    pipe, _, _ = load_class_pipeline(params, "df")
    guide = load_base_unet(root / "models/base")
    prompt = params.class_prompt("df")

    def draw(guidance, guide_unet, on=pipe):
        return sample_images(on, prompt, "", [torch.Generator().manual_seed(9)], Sampling(3, guidance, 32, guide_unet))

    assert (draw(4.0, guide) - draw(4.0, None)).abs().max() > 0.01
    assert torch.equal(draw(1.0, guide), draw(1.0, None))
    base = load_base_pipeline(root / "models/base")
    assert torch.allclose(draw(4.0, guide, on=base), draw(4.0, None, on=base), atol=1e-6)


def test_every_scheduler_builds_from_the_base_config_and_samples(workspace):
    _, params = workspace
    pipe, _, _ = load_class_pipeline(params, "df")
    config = pipe.scheduler.config
    for name, (cls, _) in SCHEDULERS.items():
        pipe.scheduler = make_scheduler(name, config)
        assert type(pipe.scheduler) is cls
        assert pipe.scheduler.config.num_train_timesteps == config.num_train_timesteps
        assert pipe.scheduler.config.prediction_type == config.prediction_type
        image = generate_images(pipe, "a dermoscopic image of sks dermatofibroma", "", [7], Sampling(2, 3.0, 32))
        assert image[0].size == (32, 32)
    assert make_scheduler("dpmsolver++", config).config.algorithm_type == "dpmsolver++"


def _wrong_shape(tensors):
    return {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v for k, v in tensors.items()}


def _mixed_naming(tensors):
    """Attention keys in diffusers' naming beside the rest in peft's: diffusers would silently drop one half."""
    first = sorted(tensors)[:2]
    renamed = {k.replace("lora_A", "lora.down").replace("lora_B", "lora.up"): tensors[k] for k in first}
    return {**{k: v for k, v in tensors.items() if k not in first}, **renamed}


def _other_modules(tensors):
    return {k.replace("attn1.to_q", "attn1.proj_zz"): v for k, v in tensors.items()}


def _text_encoder_keys(tensors):
    return {k.replace("unet.", "text_encoder.", 1): v for k, v in tensors.items()}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_wrong_shape, r"has shape \[4, \d+\] but .* takes \[4, \d+\]: the LoRA was trained for another base model"),
        (_other_modules, r"targets '.*attn1\.proj_zz', which is not a linear or conv layer of this UNet"),
        (_text_encoder_keys, r"key 'text_encoder\..*' is not a UNet LoRA weight of this pipeline"),
        (_mixed_naming, r"mixes peft \(lora_A/lora_B\) and diffusers \(lora.down/lora.up\) key names"),
    ],
)
def test_a_lora_for_another_architecture_is_one_clear_error(workspace, capsys, corrupt, message):
    root, params = workspace
    file = root / "models/diffusion/df" / LORA_FILE
    original = file.read_bytes()
    try:
        save_file(corrupt(load_file(file)), str(file))
        with pytest.raises(PipelineError, match=message):
            load_class_pipeline(params, "df")
        (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
        assert run_stage("generate", generate_class, item="class_code", track=False, argv=["df"]) == 1
        err = capsys.readouterr().err  # also holds diffusers' loading progress bars
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: generate@df: ") and "Traceback" not in err
        assert not (root / "data/synthetic/df").exists()
    finally:
        file.write_bytes(original)


def test_generate_input_errors_name_the_problem(workspace):
    root, params = workspace
    with pytest.raises(PipelineError, match=r"class 'mel' is not in data.classes \(df, vasc\)"):
        generate_class(params, "mel")
    with pytest.raises(PipelineError, match=r"models/diffusion/vasc/meta\.json: no fine-tuned class model .*run the finetune stage first"):
        generate_class(params, "vasc")
    renamed = micro_params("lora", {"instance_tokens": {"df": "zzq"}})
    with pytest.raises(PipelineError, match=r"trained with instance token 'sks' but params give 'zzq'; rerun finetune@df"):
        generate_class(renamed, "df")


def test_stages_log_loss_samples_and_grid_to_mlflow(workspace, isolated_mlflow):
    import mlflow

    from pipeline.diffusion.finetune import finetune_class

    root, _ = workspace
    params = micro_params("lora", {"steps": 3}, {"per_class": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    assert run_stage("finetune", finetune_class, item="class_code", argv=["df"]) == 0
    assert run_stage("generate", generate_class, item="class_code", argv=["df"]) == 0

    client = mlflow.MlflowClient()
    runs = {r.info.run_name: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    finetune, generate = runs["finetune@df"], runs["generate@df"]
    assert [m.step for m in client.get_metric_history(finetune.info.run_id, "finetune/df/loss")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(finetune.info.run_id, "finetune/df")] == ["finetune/df/samples.png"]
    assert [a.path for a in client.list_artifacts(generate.info.run_id, "generate/df")] == ["generate/df/grid.png"]


def test_a_killed_runs_leftovers_are_removed_but_not_another_class_in_progress(workspace):
    root, params = workspace
    synthetic = root / "data/synthetic"
    (synthetic / ".df.tmp-killed").mkdir(parents=True)
    (synthetic / ".vasc.tmp-running").mkdir()
    generate_class(params, "df")
    assert not (synthetic / ".df.tmp-killed").exists()
    assert (synthetic / ".vasc.tmp-running").is_dir()


def test_mixed_precision_on_cpu_generates_in_fp32_with_a_warning(workspace, capsys):
    from pipeline.core.params import ComputeParams

    _, params = workspace
    plain = pixel_hashes(generate_class(params, "df"))
    half = params.model_copy(update={"compute": ComputeParams(mixed_precision="fp16")})
    assert pixel_hashes(generate_class(half, "df")) == plain
    assert "warning: compute.mixed_precision=fp16 needs a GPU; generating in fp32 on CPU" in capsys.readouterr().err


def test_the_png_writer_thread_writes_the_same_bytes_and_raises_the_first_error(tmp_path):
    from PIL import Image

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(5)]
    with png_writer(max_pending=2) as save:
        for i, image in enumerate(images):
            save(image, tmp_path / f"threaded_{i}.png")
    for i, image in enumerate(images):
        image.save(tmp_path / f"direct_{i}.png", format="PNG")
        assert (tmp_path / f"threaded_{i}.png").read_bytes() == (tmp_path / f"direct_{i}.png").read_bytes()
    with pytest.raises(FileNotFoundError), png_writer() as save:
        save(images[0], tmp_path / "missing-folder" / "x.png")


def test_the_grid_fills_its_last_row_with_white():
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(6)]
    grid = np.asarray(padded_grid(images, cols=4))
    assert grid.shape == (16, 32, 3)
    assert (grid[8:, 16:] == 255).all() and (grid[8:, :16, 0] == [[40] * 8 + [50] * 8] * 8).all()
    assert np.asarray(padded_grid(images[:3], cols=4)).shape == (8, 24, 3)
