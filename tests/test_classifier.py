"""train@<variant>: which images each variant trains on, the leakage guards, class balancing, resumable checkpoints."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from classifier_workspace import CLASSES, make_workspace, micro_params
from safetensors.torch import load_file

from pipeline.classifier.dataset import (
    Sample,
    assert_no_leakage,
    assert_real_heldout,
    load_images,
    read_split,
    real_samples,
)
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.classifier import train
from pipeline.classifier.model import create_classifier
from pipeline.classifier.train import epoch_batches, make_sampler, train_variant, training_samples
from pipeline.core.cli import run_stage
from pipeline.core.digest import sha256_file
from pipeline.core.errors import PipelineError
from pipeline.core.params import ComputeParams


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    return root


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, when):
    """Make the training loop raise after epoch ``(seed, epoch)`` is logged (its checkpoint, if one was due, is written):
    what a kill between two epochs leaves behind. ``when`` None: after the first epoch logged."""
    real = train.log_epoch

    def log_then_maybe_stop(accelerator, label, epochs, entry, meta, suffix):
        real(accelerator, label, epochs, entry, meta, suffix)
        seed = int(label.rsplit(" ", 1)[1])
        if when is None or (seed, entry["epoch"]) == when:
            raise Interrupt

    monkeypatch.setattr(train, "log_epoch", log_then_maybe_stop)


def test_synthetic_images_only_in_augmented_training_list(workspace):
    params = micro_params()
    split = read_split(params, workspace)
    baseline = training_samples(params, "baseline", split, workspace)
    augmented = training_samples(params, "augmented", split, workspace)
    held_out = real_samples(split, "val") + real_samples(split, "test")

    assert {s.origin for s in baseline} == {"real"}
    assert len(baseline) == 6 * len(CLASSES)  # nv rows exist in split.csv but are not a selected class
    synthetic = [s for s in augmented if s.origin == "synthetic"]
    assert len(synthetic) == 3 * len(CLASSES)  # 4 generated per class, the screen stage flagged one as memorized
    assert not [s for s in synthetic if s.path.name.endswith("_0003.png")]
    assert all("data/synthetic" in s.path.as_posix() for s in synthetic)
    assert [s for s in augmented if s.origin == "real"] == baseline  # same real images, same order
    assert {s.origin for s in held_out} == {"real"}
    assert not {s.path for s in held_out} & {s.path for s in augmented}
    assert {CLASSES[s.label] for s in synthetic} == set(CLASSES)
    for bad in (baseline, augmented):  # the guards accept the lists the stage builds
        assert_no_leakage(bad, split, allow_synthetic=bad is augmented, synthetic_root=workspace / "data/synthetic")
    assert_real_heldout(real_samples(split, "test"), split, "test", workspace / "data/synthetic")


def test_leakage_guard_raises_on_bad_lists(workspace):
    params = micro_params()
    split = read_split(params, workspace)
    train = training_samples(params, "baseline", split, workspace)
    augmented = training_samples(params, "augmented", split, workspace)
    test = real_samples(split, "test")
    synthetic_root = workspace / "data/synthetic"

    with pytest.raises(PipelineError, match=r"leakage guard: test image .* is in the training list"):
        assert_no_leakage(train + test[:1], split, allow_synthetic=False, synthetic_root=synthetic_root)
    relabelled = Sample(test[0].path, test[0].label, "real", "ISIC_9999999")  # a test file under another id
    with pytest.raises(PipelineError, match="leakage guard: test image"):
        assert_no_leakage([*train, relabelled], split, allow_synthetic=False, synthetic_root=synthetic_root)
    with pytest.raises(PipelineError, match="synthetic image .* baseline training list"):
        assert_no_leakage(augmented, split, allow_synthetic=False, synthetic_root=synthetic_root)

    # A byte-identical copy of a test image, entered in split.csv as a train row: caught by content hash.
    copy = workspace / "data/raw/copy.jpg"
    shutil.copyfile(test[0].path, copy)
    frame = pd.read_csv(workspace / "data/prepared/split.csv")
    frame.loc[len(frame)] = ["ISIC_0999999", "HAM_0999999", CLASSES[test[0].label], "train", "data/raw/copy.jpg"]
    frame.to_csv(workspace / "data/prepared/split.csv", index=False)
    split = read_split(params, workspace)
    train = training_samples(params, "baseline", split, workspace)
    digests = {s.path: sha256_file(s.path) for s in train + real_samples(split, "test")}
    with pytest.raises(PipelineError, match="byte-identical to held-out image"):
        assert_no_leakage(train, split, allow_synthetic=False, synthetic_root=synthetic_root, digests=digests)

    with pytest.raises(PipelineError, match="synthetic image .* in the test list"):
        assert_real_heldout([*test, augmented[-1]], split, "test", synthetic_root)
    with pytest.raises(PipelineError, match="is not a test row of split.csv"):
        assert_real_heldout([*test, train[0]], split, "test", synthetic_root)


def test_weighted_sampler_balances_class_draws():
    """Statistical: 1000 draws from a 90/9/1 % data set; each class near 1/3 (fails with p << 1e-6 by chance)."""
    labels = [0] * 900 + [1] * 90 + [2] * 10
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor(labels)[list(make_sampler(labels, "weighted_sampler", generator, len(labels)))]
    assert len(draws) == len(labels)
    shares = torch.bincount(draws, minlength=3).double() / len(draws)
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.06), shares
    plain = torch.tensor(labels)[list(make_sampler(labels, "none", generator, len(labels)))]
    assert torch.bincount(plain, minlength=3).tolist() == [900, 90, 10]  # a shuffle keeps the imbalance


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_each_drawn_image_is_seen_once_per_epoch_across_processes(processes):
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    shares = [epoch_batches(order, 16, rank, processes) for rank in range(processes)]
    assert {len(s) for s in shares} == {4}  # ceil(50 / 16) steps on every process: classifier.batch is the global batch
    for step in range(4):
        step_images = torch.cat([s[step] for s in shares])
        assert 12 <= len(step_images) <= 13  # 50 images in 4 nearly equal steps
        assert max(len(s[step]) for s in shares) - min(len(s[step]) for s in shares) <= 1
    seen = torch.cat([b for s in shares for b in s])
    assert sorted(seen.tolist()) == sorted(order.tolist())  # each image once, none dropped
    with pytest.raises(PipelineError, match="classifier.batch: 5 images per epoch .* BatchNorm needs at least 2"):
        epoch_batches(order[:5], 16, 0, 3)


def test_image_cache_decodes_once(workspace):
    paths = [p for p in sorted((workspace / "data/raw").glob("*.jpg"))[:3]]
    first = load_images(paths, 24)
    assert first.shape == (3, 3, 24, 24) and first.dtype == torch.uint8
    cached = sorted((workspace / ".cache/classifier").rglob("*.npy"))
    assert len(cached) == 3
    for path in paths:  # the cache is keyed by content: changing the files does not matter, the hash does
        assert any(sha256_file(path) in c.name for c in cached)
    assert torch.equal(load_images(paths, 24), first)


def test_resume_after_checkpoint_equals_uninterrupted_run(workspace, monkeypatch):
    params = micro_params(epochs=2, patience=5, checkpoint_minutes=0)
    with monkeypatch.context() as patch, pytest.raises(Interrupt):
        interrupt_after(patch, (0, 1))
        train_variant(params, "baseline")
    checkpoint = workspace / "checkpoints/classifier/baseline/seed0"
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] == 1
    stored = load_file(str(checkpoint / "state.safetensors"))
    assert not any(k.startswith("best.") for k in stored)  # epoch 1 is the best so far: the model, stored once
    assert any(k.startswith("model.") for k in stored) and any(k.startswith("optimizer.") for k in stored)
    assert not (workspace / "models/classifier/baseline").exists()

    resumed = train_variant(params, "baseline")
    assert resumed["seeds"]["0"]["resumed_from_epoch"] == 1
    assert not checkpoint.exists()  # finished models replace the resumable state
    resumed_weights = load_file(str(workspace / "models/classifier/baseline/seed0.safetensors"))

    shutil.rmtree(workspace / "models")
    fresh = train_variant(params, "baseline")
    assert fresh["seeds"]["0"]["resumed_from_epoch"] is None
    fresh_weights = load_file(str(workspace / "models/classifier/baseline/seed0.safetensors"))
    assert fresh_weights.keys() == resumed_weights.keys()
    for key in fresh_weights:
        assert torch.equal(fresh_weights[key], resumed_weights[key]), key
    assert fresh["seeds"]["0"]["history"] == resumed["seeds"]["0"]["history"]


def test_checkpoints_wait_for_checkpoint_minutes_but_keep_finished_seeds(workspace, monkeypatch):
    params = micro_params(epochs=2, patience=5, seeds=[0, 1], checkpoint_minutes=60)
    checkpoints = workspace / "checkpoints/classifier/baseline"

    with monkeypatch.context() as patch, pytest.raises(Interrupt):
        interrupt_after(patch, (0, 1))  # an hour has not passed: epoch 1 of seed 0 is not worth a checkpoint yet
        train_variant(params, "baseline")
    assert not (checkpoints / "seed0").exists()
    with monkeypatch.context() as patch, pytest.raises(Interrupt):
        interrupt_after(patch, (1, 1))  # a finished seed is always kept
        train_variant(params, "baseline")
    assert json.loads((checkpoints / "seed0/state.json").read_text())["epoch"] == 2
    assert not (checkpoints / "seed1").exists()
    report = train_variant(params, "baseline")
    assert report["seeds"]["0"]["resumed_from_epoch"] == 2
    assert report["seeds"]["1"]["resumed_from_epoch"] is None


def test_checkpoint_round_trip_key_check_and_atomic_replace(tmp_path, monkeypatch, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, "k", {"model": model.state_dict(), "extra": {"x": torch.arange(3)}}, {"epoch": 3}, optimizer)
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "state.safetensors"]

    found = load_checkpoint(folder, "k")
    assert found.meta["epoch"] == 3 and torch.equal(found.group("extra")["x"], torch.arange(3))
    assert found.group("model").keys() == model.state_dict().keys()
    assert all(torch.equal(found.group("model")[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.AdamW(model.parameters())
    found.restore_optimizer(fresh)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value), key

    assert load_checkpoint(folder, "other") is None
    assert "checkpoint was written for other params, data or base model; starting fresh" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "none", "k") is None

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.checkpoint.save_file", killed)
    with pytest.raises(KeyboardInterrupt):  # killed mid-write: the previous checkpoint stays whole
        save_checkpoint(folder, "k", {"model": {}}, {"epoch": 4})
    assert load_checkpoint(folder, "k").meta["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_train_outputs_and_stale_checkpoint_ignored(workspace, monkeypatch):
    params = micro_params(seeds=[0, 1])
    # A checkpoint left by other params (2 epochs) must not be resumed: its run key differs.
    with monkeypatch.context() as patch, pytest.raises(Interrupt):
        interrupt_after(patch, None)
        train_variant(micro_params(epochs=2, checkpoint_minutes=0), "augmented")
    assert (workspace / "checkpoints/classifier/augmented/seed0/state.json").is_file()
    report = train_variant(params, "augmented")
    assert report["seeds"]["0"]["resumed_from_epoch"] is None
    folder = workspace / "models/classifier/augmented"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "seed0.safetensors", "seed1.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["classes"] == CLASSES and config["image_size"] == 32 and config["seeds"] == [0, 1]
    assert set(config["best_epochs"]) == {"0", "1"}
    written = json.loads((workspace / "reports/train/augmented.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["train_counts"]["synthetic"] == {c: 3 for c in CLASSES}  # one per class screened out
    assert written["train_counts"]["real"] == {c: 6 for c in CLASSES}
    assert written["train_synthetic"] == 9 and written["train_real"] == 18
    assert written["epoch_size"] == 18  # equal_steps: augmented takes as many steps per epoch as baseline
    assert train_variant(micro_params(equal_steps=False), "augmented")["epoch_size"] == 27


def test_seeds_share_one_image_tensor_and_each_trains_on_its_own_draw(workspace, monkeypatch):
    """Each image is loaded once for all seeds, and a seed's model is the one it gets when trained alone."""
    loaded = []

    def recording_load_images(paths, size, digests=None):
        loaded.append(list(paths))
        return load_images(paths, size, digests)

    monkeypatch.setattr(train, "load_images", recording_load_images)
    both = train_variant(micro_params(seeds=[0, 1]), "augmented")
    split = read_split(micro_params(), workspace)
    lists = [training_samples(micro_params(), "augmented", split, workspace, draw) for draw in (0, 1)]
    assert {s.path for s in lists[0]} != {s.path for s in lists[1]}  # each seed draws its own synthetic images
    union = {s.path.resolve() for samples in lists for s in samples}
    assert sorted(loaded[0]) == sorted(union) and len(loaded[0]) < sum(map(len, lists))  # train: loaded once
    together = load_file(str(workspace / "models/classifier/augmented/seed1.safetensors"))

    shutil.rmtree(workspace / "models")
    alone = train_variant(micro_params(seeds=[1]), "augmented")
    assert alone["seeds"]["1"]["history"] == both["seeds"]["1"]["history"]
    weights = load_file(str(workspace / "models/classifier/augmented/seed1.safetensors"))
    assert all(torch.equal(weights[k], together[k]) for k in weights)


def test_bad_variant_and_missing_manifest_are_one_line_errors(workspace, capsys):
    params = micro_params()
    with pytest.raises(PipelineError, match="unknown variant 'fancy'; expected one of baseline, augmented"):
        train_variant(params, "fancy")
    (workspace / "data/synthetic/mel/manifest.csv").unlink()
    with pytest.raises(PipelineError, match=r"data/synthetic/mel/manifest.csv: synthetic manifest missing; run `dvc repro generate@mel`"):
        train_variant(params, "augmented")

    from classifier_workspace import write_params

    write_params(workspace, params)
    assert run_stage("train", train_variant, item="variant", track=False, argv=["fancy"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: train@fancy: unknown variant 'fancy'; expected one of baseline, augmented, base_only, real_ceiling, oracle"
    assert run_stage("train", train_variant, item="variant", track=False, argv=["augmented"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generate@mel" in err


def test_pretrained_weights_offline_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to load offline
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(PipelineError, match=r"classifier.pretrained: .*set `classifier.pretrained: false`.*pre-download") as info:
        create_classifier("efficientnet_b0", 3, pretrained=True)
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match="unknown timm architecture 'efficientnet_b99'"):
        create_classifier("efficientnet_b99", 3, pretrained=False)


@pytest.mark.parametrize("balance", ["class_weighted_loss", "none"])
def test_other_balancing_modes_train(workspace, balance):
    report = train_variant(micro_params(balance=balance), "baseline")
    assert report["seeds"]["0"]["epochs_run"] == 1
    assert (workspace / "models/classifier/baseline/seed0.safetensors").is_file()


def test_mixed_precision_on_cpu_falls_back_to_fp32_with_a_warning(workspace, capsys):
    params = micro_params().model_copy(update={"compute": ComputeParams(mixed_precision="bf16")})
    train_variant(params, "baseline")
    assert "warning: compute.mixed_precision=bf16 needs a GPU; training in fp32 on CPU" in capsys.readouterr().err
