"""Synthetic-image screening: the metric maths, the memorization gate, the confidence filter and the `screen` stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from pipeline.core.cli import run_stage
from pipeline.data.images import open_rgb, resize_square
from pipeline.core.errors import PipelineError
from pipeline.core.params import MemorizationParams, parse_params
from pipeline.quality.features import feature_space
from pipeline.quality.memorization import check_memorization, cosine_matrix, flag, pair_ssim
from pipeline.quality.metrics import frechet_distance, kernel_inception_distance, knn_radii, precision_recall
from pipeline.quality.screen import load_kept_synthetic, out_of_range, screen

SIZE = 32  # classifier input and synthetic resolution in the toy workspace
CLASSES = ["df", "vasc"]


# ---------------------------------------------------------------- metrics on hand-made arrays


def nuclear_norm_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """The hand-written FID the stage used before torchmetrics: tr sqrt(S_r S_f) as the nuclear norm of A_r A_f^T."""
    def factor(x):
        a = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
        return np.linalg.qr(a, mode="r") if a.shape[0] > a.shape[1] else a

    a, b = factor(real), factor(fake)
    diff = real.mean(axis=0) - fake.mean(axis=0)
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * np.linalg.svd(a @ b.T, compute_uv=False).sum())


def hand_written_kid(real: np.ndarray, fake: np.ndarray) -> float:
    """The hand-written unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, on whole sets of equal size."""
    m, d = len(real), real.shape[1]
    kxx, kyy, kxy = ((real @ real.T / d + 1) ** 3, (fake @ fake.T / d + 1) ** 3, (real @ fake.T / d + 1) ** 3)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_fid_is_about_zero_for_a_set_with_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(real, real + s) for s in (0.5, 1.0, 2.0)]
    # A pure mean shift of s in 16 dims adds exactly 16 s^2.
    assert shifts == pytest.approx([16 * 0.25, 16 * 1.0, 16 * 4.0], rel=1e-6)
    assert frechet_distance(real, rng.normal(size=(300, 16))) < shifts[0]


def test_fid_rises_monotonically_as_noise_is_added_to_the_images():
    rng = np.random.default_rng(7)
    images = torch.from_numpy(np.stack([np.asarray(lesion_image(rng, SIZE)) for _ in range(40)])).permute(0, 3, 1, 2)
    noisy = [images.double() + torch.from_numpy(rng.normal(0, sigma, size=images.shape)) for sigma in (0, 8, 16, 32, 64)]
    flat = [x.clamp(0, 255).reshape(len(x), -1) for x in noisy]  # pixels as features: nothing else to get wrong
    first, second = flat[0][:20], [x[20:] for x in flat]
    fids = [frechet_distance(first, other) for other in second]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert frechet_distance(flat[0], flat[0]) == pytest.approx(0.0, abs=1e-6 * fids[-1])


def test_torchmetrics_fid_and_kid_agree_with_the_hand_written_formulas():
    """Tolerance: 1e-6 relative (float64 eigen-solve vs SVD), on shapes like the stage's (fewer samples than features)."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    for n_real, n_fake, dims in ((40, 30, 24), (120, 100, 1280), (300, 200, 16)):
        a, b = rng.normal(size=(n_real, dims)), rng.normal(0.2, 1.3, size=(n_fake, dims))
        assert frechet_distance(a, b) == pytest.approx(nuclear_norm_fid(a, b), rel=1e-6)
    a, b = rng.normal(size=(40, 24)), rng.normal(0.2, 1.3, size=(30, 24))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    textbook = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(textbook, rel=1e-5)
    # KID on whole sets (one subset of every sample) is the hand-written MMD exactly, whatever the subset draw.
    x, y = rng.normal(size=(60, 32)), rng.normal(0.3, 1.0, size=(60, 32))
    mean, std = kernel_inception_distance(x, y, subset_size=60, subsets=3)
    assert mean == pytest.approx(hand_written_kid(x, y), rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)
    assert kernel_inception_distance(x, y, 20, 10, seed=4) == kernel_inception_distance(x, y, 20, 10, seed=4)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_another():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    mean, std = kernel_inception_distance(x, y, subset_size=100, subsets=50)
    assert abs(mean) < 3 * std + 1e-3
    shifted, _ = kernel_inception_distance(x, y + 1.0, subset_size=100, subsets=50)
    assert shifted > 10 * max(abs(mean), std)


def test_precision_recall_on_point_clouds():
    rng = np.random.default_rng(3)
    cluster_a = rng.normal(0, 1, size=(200, 2))
    cluster_b = rng.normal(50, 1, size=(200, 2))
    real = np.concatenate([cluster_a, cluster_b])
    half = rng.normal(0, 1, size=(200, 2))  # covers only cluster A
    pr = precision_recall(real, half, k=3)
    assert pr["precision"] > 0.9
    assert pr["recall"] == pytest.approx(0.5, abs=0.05)
    # Coverage of a matching cloud is ~1 - e^-k (Naeem et al.), so half of that here.
    assert 0.5 * 0.8 < pr["coverage"] <= 0.5
    full = precision_recall(real, np.concatenate([half, rng.normal(50, 1, size=(200, 2))]), k=3)
    assert full["recall"] > 0.9 and full["precision"] > 0.9
    far = precision_recall(real, rng.normal(200, 1, size=(100, 2)), k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "coverage": 0.0}


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError):
        precision_recall(points, points[:2], k=3)


# ---------------------------------------------------------------- memorization maths


def test_memorization_rule_both_needs_both_scores_either_needs_one():
    cos, ssim = np.array([0.99, 0.99, 0.5, 0.5]), np.array([0.95, 0.5, 0.95, 0.5])
    both = MemorizationParams(cosine=0.97, ssim=0.9, rule="both")
    either = MemorizationParams(cosine=0.97, ssim=0.9, rule="either")
    assert flag(cos, ssim, both).tolist() == [True, False, False, False]
    assert flag(cos, ssim, either).tolist() == [True, True, True, False]


def test_feature_space_lets_the_cosine_tell_a_copy_from_a_sibling_despite_heavy_tailed_norms():
    """The stage's failure: pooled features of a from-scratch classifier, a few images 100x the usual norm."""
    rng = np.random.default_rng(4)
    real = torch.from_numpy(np.abs(rng.normal(size=(60, 64))))  # non-negative, like pooled activations
    real[:3] *= 100.0  # three real images with outsized activations
    fine_tune, synthetic = real[10:30], torch.from_numpy(np.abs(rng.normal(size=(10, 64))))
    synthetic[0] = fine_tune[5]  # a planted copy
    centre = real.mean(0)
    naive = cosine_matrix(synthetic - centre, fine_tune - centre).max(dim=1).values
    assert naive.min() > MemorizationParams().cosine  # centred on an outlier-dragged mean, every image passes
    real_s, ft_s, syn_s = feature_space(real, fine_tune, synthetic)
    nearest = cosine_matrix(syn_s, ft_s).max(dim=1).values
    assert nearest[0] == pytest.approx(1.0)
    assert nearest[1:].max() < 0.8
    assert real_s[3:].pow(2).sum(1).mean() == pytest.approx(64, rel=0.3)  # unit scale per feature on average


def test_ssim_is_one_for_identical_images_and_low_for_unrelated_ones():
    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.integers(0, 256, size=(2, 3, SIZE, SIZE), dtype=np.uint8))
    b = torch.from_numpy(rng.integers(0, 256, size=(2, 3, SIZE, SIZE), dtype=np.uint8))
    assert pair_ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert (pair_ssim(a, b) < 0.2).all()


# ---------------------------------------------------------------- toy workspace


def lesion_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A skin-coloured square with a randomly placed, coloured, textured blob: each call a different image."""
    skin = tuple(int(v) for v in rng.integers(150, 230, size=3))
    img = Image.new("RGB", (size, size), skin)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        rx, ry = rng.uniform(0.08, 0.3, size=2) * size
        colour = tuple(int(v) for v in rng.integers(20, 200, size=3))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    noise = rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def save_classifier(folder: Path, classes: list[str], bias: list[float] | None = None, seed: int = 0) -> torch.nn.Module:
    """A random tiny-input efficientnet_b0 in the layout train@baseline writes; ``bias`` pins its head for control."""
    torch.manual_seed(seed)
    model = timm.create_model("efficientnet_b0", num_classes=len(classes), pretrained=False).eval()
    if bias is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(0.05)
            model.get_classifier().bias.copy_(torch.tensor(bias))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"seed{seed}.safetensors"))
    config = {"arch": "efficientnet_b0", "classes": classes, "image_size": SIZE, "seeds": [seed],
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A workspace with split, fine-tune lists, manifests, images and a baseline classifier, as the stages leave it.

    Per class: 12 real train images (48 px JPEG, 5 of them the fine-tune set), 2 test images,
    10 synthetic 32 px PNGs; synthetic image 0 of 'df' is an exact copy of its fine-tune image 2, and
    synthetic image 1 of 'vasc' a near-duplicate of that same df image (another class's: not a copy for vasc).
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    rng = np.random.default_rng(0)
    rows, n = [], 0
    for code in CLASSES:
        images = tmp_path / "data/raw"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(14):
            image_id = f"ISIC_{n:07d}"
            n += 1
            path = images / f"{image_id}.jpg"
            lesion_image(rng, 48).save(path, quality=95)
            split = "train" if i < 12 else "test"
            rows.append({"image_id": image_id, "lesion_id": f"HAM_{n:07d}", "dx": code, "split": split,
                         "path": path.relative_to(tmp_path).as_posix()})
    split = pd.DataFrame(rows)
    (tmp_path / "data/prepared/finetune").mkdir(parents=True)
    split.to_csv(tmp_path / "data/prepared/split.csv", index=False)
    for code in CLASSES:
        ft = split[(split.dx == code) & (split.split == "train")].iloc[:5]
        ft.drop(columns="split").to_csv(tmp_path / f"data/prepared/finetune/{code}.csv", index=False)
        folder = tmp_path / "data/synthetic" / code
        folder.mkdir(parents=True)
        files = []
        for i in range(10):
            name = f"{code}_{i:04d}.png"
            if code == "df" and i == 0:  # the generator regurgitated fine-tune image 2, at its own resolution
                resize_square(open_rgb(tmp_path / ft.iloc[2]["path"]), SIZE).save(folder / name)
            elif code == "vasc" and i == 1:  # a near-duplicate of df's fine-tune image 2
                df_image = split[(split.dx == "df") & (split.split == "train")].iloc[2]["path"]
                pixels = np.asarray(resize_square(open_rgb(tmp_path / df_image), SIZE)).astype(int)
                Image.fromarray(np.clip(pixels + rng.integers(-2, 3, pixels.shape), 0, 255).astype(np.uint8)).save(folder / name)
            else:
                lesion_image(rng, SIZE).save(folder / name)
            files.append(name)
        pd.DataFrame({"file": files, "class": code, "prompt": f"a dermoscopic image of {code}",
                      "negative_prompt": "", "seed": range(10), "scheduler": "ddim", "steps": 2,
                      "guidance": 5.0, "weights_sha256": "0" * 64}).to_csv(folder / "manifest.csv", index=False)
    save_classifier(tmp_path / "models/classifier/baseline", CLASSES)
    return tmp_path


def toy_params(**quality):
    base = {"kid_subset_size": 5, "kid_subsets": 10, "pr_neighbours": 2, "closest_pairs": 3, "batch": 8}
    return parse_params({"data": {"classes": CLASSES}, "quality": {**base, **quality}})


def test_screen_end_to_end_flags_the_planted_copy_and_writes_everything(workspace):
    report = screen(toy_params())

    table = pd.read_csv(workspace / "data/screened/synthetic.csv")
    assert list(table.columns) == ["class", "path", "kept", "memorized", "nn_image_id", "nn_cosine", "nn_ssim",
                                   "confidence", "reason"]
    assert len(table) == 20 and table["kept"].dtype == bool
    assert all((workspace / p).is_file() for p in table["path"])
    copy = table.iloc[0]
    assert copy["path"] == "data/synthetic/df/df_0000.png"
    ft = pd.read_csv(workspace / "data/prepared/finetune/df.csv")
    assert copy["memorized"] and not copy["kept"] and copy["reason"] == "memorized"
    assert copy["nn_image_id"] == ft.iloc[2]["image_id"]
    assert copy["nn_cosine"] == pytest.approx(1.0, abs=1e-4) and copy["nn_ssim"] == pytest.approx(1.0, abs=1e-4)
    others = table.iloc[1:]
    assert not others["memorized"].any() and others["kept"].all()
    assert (others["nn_ssim"] < 0.9).all()
    # The near-duplicate of a df image sits in vasc's folder: the gate compares it with vasc's own fine-tuning images.
    near_duplicate = table.set_index("path").loc["data/synthetic/vasc/vasc_0001.png"]
    vasc_ft = pd.read_csv(workspace / "data/prepared/finetune/vasc.csv")
    assert not near_duplicate["memorized"] and near_duplicate["nn_image_id"] in set(vasc_ft["image_id"])
    assert table["confidence"].between(0, 1).all()

    saved = json.loads((workspace / "reports/quality.json").read_text())
    assert saved == json.loads(json.dumps(report))
    df, vasc = saved["classes"]["df"], saved["classes"]["vasc"]
    assert (df["n_synthetic"], df["n_memorized"], df["n_filtered"], df["n_kept"]) == (10, 1, 0, 9)
    assert (vasc["n_synthetic"], vasc["n_memorized"], vasc["n_kept"], vasc["n_real_train"]) == (10, 0, 10, 12)
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "coverage", "fid_kept"):
        assert isinstance(df[key], float) and np.isfinite(df[key]), key
    assert df["fid"] > 0 and df["fid_real_vs_real"] > 0 and df["median_nn_cosine"] < 0.97
    assert df["flags"] == {} and vasc["flags"] == {} and saved["totals"]["flagged"] == []
    assert saved["totals"]["n_synthetic"] == 20 and saved["totals"]["n_kept"] == 19
    assert saved["extractor"] == "baseline_classifier"
    for code in CLASSES:
        with Image.open(workspace / f"reports/quality/closest_{code}.png") as fig:
            assert fig.format == "PNG" and fig.width > 100

    kept = load_kept_synthetic(classes=CLASSES)
    assert list(kept.columns) == ["class", "path"] and len(kept) == 19
    assert "data/synthetic/df/df_0000.png" not in set(kept["path"])


def test_a_figure_out_of_range_is_flagged_in_quality_json_and_named_in_the_log(workspace, capsys):
    report = screen(toy_params(kid_subset_size=50))  # 10 synthetic images per class: KID rests on fewer

    logged = [line for line in capsys.readouterr().err.splitlines() if "flagged" in line]
    for code in CLASSES:
        flags = report["classes"][code]["flags"]
        assert list(flags) == ["kid_mean"] and "subsets of 10 images" in flags["kid_mean"]
        assert any(f"screen: {code}: kid_mean flagged: " in line and "subsets of 10 images" in line for line in logged)
    assert report["totals"]["flagged"] == ["df.kid_mean", "vasc.kid_mean"]
    assert report["totals"]["kid_mean_macro"] is None  # flagged figures stay out of the macro mean
    assert json.loads((workspace / "reports/quality.json").read_text())["classes"]["df"]["flags"] == report["classes"]["df"]["flags"]


def test_out_of_range_names_each_figure_that_cannot_be_read_as_a_number():
    q = toy_params(kid_subset_size=50, sanity_factor=50.0).quality
    sane = {"fid": 40.0, "fid_kept": 41.0, "kid_mean": 0.5, "kid_std": 0.1, "precision": 0.5, "recall": 0.4,
            "coverage": 0.3, "median_nn_cosine": 0.6, "n_kept": 90, "fid_real_vs_real": 10.0, "kid_real_vs_real": 0.01,
            "n_real_train": 60, "n_synthetic": 100}
    assert out_of_range(sane, q) == {}
    flags = out_of_range({**sane, "fid": 22784.0, "fid_kept": float("nan"), "kid_mean": -0.5, "recall": None,
                          "median_nn_cosine": 0.996}, q)
    assert set(flags) == {"fid", "fid_kept", "kid_mean", "recall", "median_nn_cosine"}
    assert "2278x the real-vs-real FID 10" in flags["fid"] and "not finite" in flags["fid_kept"]
    assert "negative beyond sampling noise" in flags["kid_mean"] and "not computed" in flags["recall"]
    assert "cannot tell a copy from a sibling" in flags["median_nn_cosine"]
    assert out_of_range({**sane, "kid_mean": -0.15}, q) == {}  # within 2 std of zero: noise
    assert out_of_range({**sane, "kid_mean": -0.5, "kid_real_vs_real": -0.3}, q) == {}  # real-vs-real noise as large
    assert "negative beyond round-off" in out_of_range({**sane, "fid": -1.0}, q)["fid"]
    assert out_of_range({**sane, "fid_kept": None, "n_kept": 0}, q) == {}  # nothing kept: nothing to measure
    assert out_of_range({**sane, "fid": 22784.0, "fid_real_vs_real": None}, q) == {}  # no real-vs-real: no ratio
    assert "subsets of 40 images" in out_of_range({**sane, "n_real_train": 40}, q)["kid_mean"]


def test_confidence_filter_keeps_exactly_the_images_at_or_above_tau_and_exclude_false_keeps_copies(workspace):
    folder = workspace / "models/classifier/baseline"
    # A head that leans to 'df' but still varies per image, so tau splits both classes.
    model = save_classifier(folder, CLASSES, bias=[0.3, -0.3])
    paths = sorted((workspace / "data/synthetic").glob("*/*.png"))
    x = torch.stack([torch.from_numpy(np.array(open_rgb(p))).permute(2, 0, 1).float() / 255 for p in paths])
    with torch.no_grad():
        probs = torch.softmax(model((x - 0.5) / 0.5), dim=1).numpy()
    expected = {p.relative_to(workspace).as_posix(): probs[i, CLASSES.index(p.parent.name)] for i, p in enumerate(paths)}
    tau = float(np.median(list(expected.values())))

    report = screen(toy_params(filter_confidence=tau, memorization={"exclude": False}))

    table = pd.read_csv(workspace / "data/screened/synthetic.csv").set_index("path")
    for path, p in expected.items():
        assert table.loc[path, "confidence"] == pytest.approx(p, abs=1e-5)
        assert table.loc[path, "kept"] == (p >= tau), path
        if p < tau:
            assert "low_confidence" in table.loc[path, "reason"]
    # With exclude: false the planted copy is still flagged, and only the confidence filter decides on it.
    copy = table.loc["data/synthetic/df/df_0000.png"]
    assert copy["memorized"] and "memorized (kept: quality.memorization.exclude is false)" in copy["reason"]
    assert report["classes"]["df"]["n_memorized"] == 1
    n_low = sum(p < tau for p in expected.values())
    assert 0 < n_low < len(expected)
    assert report["totals"]["n_filtered"] == n_low and report["totals"]["n_kept"] == len(expected) - n_low


def test_missing_manifest_is_a_one_line_error_naming_it(workspace, capsys):
    (workspace / "data/synthetic/vasc/manifest.csv").unlink()
    with pytest.raises(PipelineError, match=r"data/synthetic/vasc/manifest\.csv: synthetic manifest not found") as err:
        screen(toy_params())
    assert "\n" not in str(err.value)
    assert not (workspace / "data/screened").exists()

    (workspace / "params.yaml").write_text(json.dumps({"data": {"classes": CLASSES}}))
    assert run_stage("screen", screen, track=False, argv=[]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: screen: ") and "manifest.csv" in err_lines[0]


def test_missing_or_mismatched_classifier_is_a_one_line_error_naming_it(workspace):
    baseline = workspace / "models/classifier/baseline"
    (baseline / "seed0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PipelineError, match=r"seed0\.safetensors: cannot load into efficientnet_b0 with 2 classes") as err:
        screen(toy_params())
    assert "\n" not in str(err.value)
    (baseline / "seed0.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"models/classifier/baseline/seed0\.safetensors: weights of seed 0 not found"):
        screen(toy_params())
    shutil.rmtree(baseline)
    with pytest.raises(PipelineError, match=r"models/classifier/baseline/config\.json: baseline classifier config not found"):
        screen(toy_params())
    save_classifier(baseline, ["df", "mel"])
    with pytest.raises(PipelineError, match=r"has no class 'vasc'"):
        screen(toy_params())


def test_inception_without_local_weights_is_a_one_line_error(workspace):
    with pytest.raises(PipelineError, match=r"Inception weights not found") as err:
        screen(toy_params(extractor="inception", inception_weights="models/inception.pth"))
    assert "\n" not in str(err.value)


def test_load_kept_synthetic_rejects_missing_malformed_and_stale_files(workspace):
    with pytest.raises(PipelineError, match=r"data/screened/synthetic\.csv: screened synthetic list not found"):
        load_kept_synthetic()
    target = workspace / "data/screened/synthetic.csv"
    target.parent.mkdir(parents=True)
    target.write_text("class,path\ndf,data/synthetic/df/df_0001.png\n")
    with pytest.raises(PipelineError, match=r"lacks column 'kept'"):
        load_kept_synthetic()
    target.write_text("class,path,kept\ndf,data/synthetic/df/df_0001.png,maybe\n")
    with pytest.raises(PipelineError, match=r"'kept' must be True/False"):
        load_kept_synthetic()
    target.write_text("class,path,kept\nmel,data/synthetic/df/df_0001.png,True\n")
    with pytest.raises(PipelineError, match=r"class 'mel' which is not in data.classes"):
        load_kept_synthetic(classes=CLASSES)
    target.write_text("class,path,kept\ndf,data/synthetic/df/gone.png,True\ndf,data/synthetic/df/df_0001.png,False\n")
    with pytest.raises(PipelineError, match=r"kept image data/synthetic/df/gone\.png does not exist"):
        load_kept_synthetic(classes=CLASSES)


def test_check_memorization_on_controlled_features():
    rng = np.random.default_rng(6)
    ref_feats = torch.from_numpy(rng.normal(size=(4, 32)))
    ref_px = torch.from_numpy(rng.integers(0, 256, size=(4, 3, 16, 16), dtype=np.uint8))
    syn_feats = torch.cat([ref_feats[[3]], torch.from_numpy(rng.normal(size=(3, 32)))])
    syn_px = torch.cat([ref_px[[3]], torch.from_numpy(rng.integers(0, 256, size=(3, 3, 16, 16), dtype=np.uint8))])
    result = check_memorization(syn_feats, syn_px, ref_feats, ref_px, MemorizationParams())
    assert result.nn_index[0] == 3 and result.memorized.tolist() == [True, False, False, False]
    assert result.nn_cosine[0] == pytest.approx(1.0) and result.nn_ssim[0] == pytest.approx(1.0)


def test_mask_conditioned_images_get_a_mask_iou_beside_the_segmenters_on_real_images(workspace):
    """df's conditioning masks are where its lesions are, vasc's are moved off them; the real train masks are
    where theirs are. The screen measures both classes against the same real reference."""
    from pipeline.quality.mask_fidelity import segment_lesion
    from pipeline.report import quality_table

    def write_mask(lesion: np.ndarray, path) -> str:
        Image.fromarray((lesion * 255).astype(np.uint8)).save(path)
        return path.name

    split = pd.read_csv(workspace / "data/prepared/split.csv", dtype=str)
    split["mask_path"] = [
        f"data/raw/{write_mask(segment_lesion(np.asarray(open_rgb(workspace / p))), workspace / 'data/raw' / (i + '_segmentation.png'))}"
        for i, p in zip(split["image_id"], split["path"])
    ]
    split.to_csv(workspace / "data/prepared/split.csv", index=False)
    for code, shift in (("df", 0), ("vasc", 12)):
        folder = workspace / "data/synthetic" / code
        (folder / "masks").mkdir()
        manifest = pd.read_csv(folder / "manifest.csv")
        manifest["mask"] = [
            "masks/" + write_mask(np.roll(segment_lesion(np.asarray(open_rgb(folder / f))), shift, axis=(0, 1)), folder / "masks" / f)
            for f in manifest["file"]
        ]
        manifest.to_csv(folder / "manifest.csv", index=False)

    classes = screen(toy_params())["classes"]
    assert classes["df"]["mask_iou"] > 0.95 and classes["vasc"]["mask_iou"] < 0.5
    assert classes["df"]["mask_iou_real"] > 0.9 and classes["vasc"]["mask_iou_real"] > 0.9  # resized to 32 px
    table = quality_table({"classes": classes}, CLASSES)
    assert "mask IoU (real)" in table.splitlines()[0]
    assert f"{classes['df']['mask_iou']:.3f} ({classes['df']['mask_iou_real']:.3f})" in table
