"""diffusion.control mask: the lesion-mask ControlNet, trained and used on the tiny random SD base at 32 px."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_workspace import CLASSES, killed_during_step, make_workspace, micro_params, pixels
from pipeline.diffusion.controlnet import conditioning_mask, controlled, load_controlnet, make_controlnet, train_controlnet
from pipeline.diffusion.finetune import finetune_class
from pipeline.diffusion.generate import generate_class
from pipeline.diffusion.tiny import build_tiny_pipeline
from pipeline.core.errors import PipelineError
from pipeline.core.params import ControlNetParams
from pipeline.core.paths import WORKSPACE_ENV

pytestmark = pytest.mark.usefixtures("one_thread")

SKIN = np.array((225, 185, 160))


def control_params(method: str = "lora", **controlnet):
    return micro_params(method, {"control": "mask", "controlnet": {"steps": 4, "batch": 2, "lr": 1e-2, **controlnet}})


def add_split_with_masks(root, masked: bool = True) -> None:
    """split.csv of the fine-tuning images as train rows, each with a mask of where its lesion differs from the
    skin, and that mask_path in the fine-tuning lists too (as prepare writes both)."""
    rows = []
    for dx in CLASSES:
        listed = root / "data" / "prepared" / "finetune" / f"{dx}.csv"
        with listed.open() as handle:
            own = list(csv.DictReader(handle))
        for row in own:
            mask_path = f"data/raw/{row['image_id']}_segmentation.png"
            lesion = np.linalg.norm(pixels(root / row["path"]) - SKIN, axis=-1) > 60
            Image.fromarray((lesion * 255).astype(np.uint8)).save(root / mask_path)
            row["mask_path"] = mask_path if masked else ""
        write_csv(listed, own, ["image_id", "lesion_id", "dx", "path", "mask_path"])
        rows += [{**row, "split": "train"} for row in own]
    write_csv(root / "data" / "prepared" / "split.csv", rows, ["image_id", "lesion_id", "dx", "split", "path", "mask_path"])


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def workspace(tmp_path, tiny_base, monkeypatch):
    """finetune's workspace (diffusion_workspace.py) plus split.csv and a lesion mask per image."""
    monkeypatch.chdir(make_workspace(tmp_path / "ws", tiny_base))
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    add_split_with_masks(Path.cwd())
    return Path.cwd()


def test_the_controlnet_starts_silent_and_then_changes_the_output_with_the_mask():
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(32, seed=0)
    unet, net = pipe.unet, make_controlnet(pipe.unet, pipe.vae_scale_factor)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    disc, square = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    disc[..., 10:22, 12:20], square[..., 4:28, 4:28] = 1, 1

    def out(mask):
        with torch.no_grad():
            return controlled(unet, net, mask)(noisy, t, states).sample

    with torch.no_grad():
        plain = unet(noisy, t, states).sample
    torch.testing.assert_close(out(disc), plain, rtol=0, atol=0)  # zero-initialised outputs: the base model exactly
    with torch.no_grad():
        # Training moves the zero-initialised convolutions: the outputs and the condition branch's last one.
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.1)
    assert (out(disc) - plain).abs().max() > 1e-3
    assert (out(disc) - out(square)).abs().max() > 1e-3  # the mask, not only the ControlNet, moves the output


def test_conditioning_masks_are_new_binary_shapes_drawn_from_the_seed():
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask = (((yy - 16) ** 2 + ((xx - 16) * 1.5) ** 2) < 100).float().expand(3, -1, -1)
    cfg = ControlNetParams()
    shapes = [conditioning_mask(mask, seed, cfg) for seed in range(4)]
    assert all(set(s.unique().tolist()) <= {0.0, 1.0} and s.shape == mask.shape for s in shapes)
    assert torch.equal(shapes[1], conditioning_mask(mask, 1, cfg))
    assert len({s.numpy().tobytes() for s in shapes}) == 4
    assert all(0 < s[0].sum() < 32 * 32 for s in shapes)  # the lesion stays in frame, the skin too
    still = conditioning_mask(mask, 0, ControlNetParams(shift=0, scale=0, elastic=0))
    assert float(still[0].sum()) == pytest.approx(float(mask[0].sum()), rel=0.15)  # a rotation alone keeps the area


def test_train_then_generate_writes_each_image_beside_its_mask(workspace):
    params = control_params()
    train_controlnet(params)
    folder = workspace / "models" / "controlnet"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["control"] == "mask" and meta["pairs"] == 10 and meta["steps"] == 4
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    trained = load_controlnet(params)
    assert any(p.abs().sum() > 0 for p in trained.controlnet_down_blocks.parameters())  # training moved them

    finetune_class(params, "df")
    out = generate_class(params, "df")
    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == params.generate.per_class
    for row in rows:
        assert row["mask"] == f"masks/{row['file']}"
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255} and mask.any()
        assert Image.open(out / row["file"]).size == (32, 32)
    assert len({np.asarray(Image.open(out / r["mask"])).tobytes() for r in rows}) == len(rows)

    # The same seeds with the ControlNet switched off: the masks stay, the images change.
    first = {r["file"]: (pixels(out / r["file"]), pixels(out / r["mask"])) for r in rows}
    again = generate_class(control_params(conditioning_scale=0.0), "df")
    assert all(np.array_equal(pixels(again / r["mask"]), first[r["file"]][1]) for r in rows)
    assert not all(np.array_equal(pixels(again / r["file"]), first[r["file"]][0]) for r in rows)


def test_control_none_writes_a_marker_and_generation_stays_unconditioned(workspace, monkeypatch):
    from stages.controlnet import controlnet

    params = micro_params()
    monkeypatch.setenv("RANK", "1")  # a launched stage's other ranks leave the marker to rank 0
    controlnet(params)
    assert not (workspace / "models" / "controlnet").exists()
    monkeypatch.delenv("RANK")
    controlnet(params)
    assert json.loads((workspace / "models" / "controlnet" / "meta.json").read_text()) == {"control": "none"}
    assert load_controlnet(params) is None
    with pytest.raises(PipelineError, match=r"made for diffusion.control 'none', params give 'mask'; rerun `dvc repro controlnet`"):
        load_controlnet(control_params())


def test_control_mask_without_masks_is_one_line_naming_the_image(workspace):
    add_split_with_masks(workspace, masked=False)
    with pytest.raises(PipelineError, match=r"split.csv: image ISIC_df0000 has no lesion mask; diffusion.control: mask needs"):
        train_controlnet(control_params())


def test_iou_on_hand_made_masks():
    from pipeline.quality.mask_fidelity import iou

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2, :2], b[:2, 1:3] = True, True  # 2 shared pixels of 6
    assert iou(a, b) == pytest.approx(2 / 6)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0 and iou(a & ~a, b & ~b) == 1.0


def test_the_segmenter_finds_a_lesion_where_its_mask_is_and_not_elsewhere(tmp_path):
    from pipeline.quality.mask_fidelity import mask_ious, segment_lesion

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 < 15**2
    corners = np.hypot(yy - 31.5, xx - 31.5) > 32  # a dermoscope's dark corners: neither skin nor lesion
    image = np.where(disc[..., None], (150, 70, 60), np.where(corners[..., None], 5, SKIN)) + rng.normal(0, 8, (64, 64, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    found = segment_lesion(image)
    assert (found & disc).sum() / (found | disc).sum() > 0.9
    assert not segment_lesion(np.full((16, 16, 3), 200, np.uint8)).any()  # plain skin: no lesion

    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray((disc * 255).astype(np.uint8)).save(tmp_path / "right.png")
    Image.fromarray((np.roll(disc, 24, axis=1) * 255).astype(np.uint8)).save(tmp_path / "moved.png")
    right, moved = mask_ious([tmp_path / "image.png"] * 2, [tmp_path / "right.png", tmp_path / "moved.png"], 32)
    assert right > 0.85 and moved < 0.3


def test_generating_with_control_mask_needs_the_class_fine_tuning_masks(workspace):
    params = control_params()
    train_controlnet(params)
    finetune_class(params, "df")
    listed = workspace / "data" / "prepared" / "finetune" / "df.csv"
    with listed.open() as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["mask_path"] = ""
    write_csv(listed, rows, list(rows[0]))
    with pytest.raises(PipelineError, match=r"finetune/df.csv: image ISIC_df0000 has no lesion mask"):
        generate_class(params, "df")


def test_controlnet_resume_after_a_kill_reaches_the_same_weights_bitwise(workspace):
    from safetensors.torch import load_file

    params = control_params(steps=5)  # diffusion.checkpoint_every is 2 in the micro settings
    weights = workspace / "models" / "controlnet" / "diffusion_pytorch_model.safetensors"
    train_controlnet(params)
    uninterrupted = load_file(weights)

    with killed_during_step(4):  # after the checkpoint at step 2
        train_controlnet(params)
    assert json.loads((workspace / "checkpoints" / "controlnet" / "state.json").read_text())["step"] == 2

    train_controlnet(params)
    resumed = load_file(weights)
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert json.loads((weights.parent / "meta.json").read_text())["resumed_from_step"] == 2
    assert not (workspace / "checkpoints" / "controlnet").exists()
