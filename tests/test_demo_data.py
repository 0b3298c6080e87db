"""The embedded demo set: HAM10000's exact layout, class frequencies, lesion grouping, determinism from the seed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_data import make_workspace
from PIL import Image, ImageFilter

from pipeline.data.demo import HAM_COUNTS, METADATA_COLUMNS, class_counts, make_demo, plan, write_demo
from pipeline.data.ham10000 import read_source
from pipeline.data.masks import MASK_FOLDER
from pipeline.data.split import assign_splits, cap_train
from pipeline.core.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]

PARTS = {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "HAM10000"
    write_demo(folder, seed=3, images=140, size=48, min_per_class=12)
    return folder


def test_class_counts_follow_ham10000_with_a_floor():
    counts = class_counts(1500, 40)
    assert sum(counts.values()) == 1500
    assert min(counts.values()) >= 40
    assert counts["nv"] > counts["mel"] >= counts["bkl"] > counts["bcc"] > counts["akiec"] > counts["df"] - 1
    big = class_counts(10015, 1)
    assert big == HAM_COUNTS
    tiny = class_counts(70, 40)
    assert sum(tiny.values()) == 70 and min(tiny.values()) == 10


def test_default_demo_fills_val_test_and_a_reserve_for_every_cap_of_the_sweep():
    """At the repository's params: >= 40 val and test images per selected class (recall in steps of <= 0.025), and a
    reserve of >= generate.per_class images per class at data.real_per_class and at every cap the sweep tries."""
    params = load_params(REPO / "params.yaml")
    table = plan(params.seed, params.demo.images, params.demo.min_per_class)  # the metadata only: nothing drawn
    table["path"] = "x"
    split = assign_splits(table, params.data.split.val, params.data.split.test, params.seed)
    selected = split[split["dx"].isin(params.data.classes)]
    counts = selected.groupby(["dx", "split"]).size().unstack(fill_value=0)
    assert (counts["val"] >= 40).all() and (counts["test"] >= 40).all(), counts
    assert params.data.real_per_class is not None  # the embedded default is the scarce setting
    for cap in {params.data.real_per_class, *params.sweep.real_per_class}:
        capped = cap_train(split, params.data.classes, cap, params.seed)
        kept = capped[capped["dx"].isin(params.data.classes)].groupby(["dx", "split"]).size().unstack(fill_value=0)
        assert (kept["reserve"] >= params.generate.per_class).all(), (cap, kept)
        assert (kept["train"] == cap).all() and kept[["val", "test"]].equals(counts[["val", "test"]])


def test_exact_release_layout_and_schema(demo):
    assert sorted(p.name for p in demo.iterdir()) == sorted([*PARTS, MASK_FOLDER, "HAM10000_metadata.csv"])
    meta = pd.read_csv(demo / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    assert list(meta.columns) == METADATA_COLUMNS
    assert len(meta) == 140 and meta["image_id"].is_unique
    assert meta["lesion_id"].str.fullmatch(r"HAM_\d{7}").all()
    assert meta["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    assert set(meta["dx_type"]) <= {"histo", "follow_up", "consensus", "confocal"}
    assert set(meta["sex"]) <= {"male", "female", "unknown"}
    assert meta["age"].map(lambda a: a == "" or re.fullmatch(r"\d+\.0", a) is not None).all()
    files = {p.name: p.parent.name for p in demo.rglob("*.jpg")}
    assert set(files) == {f"{i}.jpg" for i in meta["image_id"]}
    assert set(files.values()) == PARTS
    with Image.open(next(demo.rglob("*.jpg"))) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 48)


def test_frequencies_and_lesions(demo):
    meta = pd.read_csv(demo / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    counts = meta["dx"].value_counts()
    assert counts.to_dict() == class_counts(140, 12)
    assert counts.idxmax() == "nv"
    per_lesion = meta.groupby("lesion_id").size()
    assert per_lesion.max() <= 4 and (per_lesion >= 2).sum() >= 5
    assert (meta.groupby("lesion_id")["dx"].nunique() == 1).all()
    assert (meta.groupby("lesion_id")[["sex", "age", "localization"]].nunique() == 1).all().all()


def test_reader_accepts_demo(demo):
    table, _ = read_source(demo)
    assert len(table) == 140 and set(table["dx"]) == set(HAM_COUNTS)
    assert table["mask_path"].map(lambda m: Path(m).name).tolist() == [f"{i}_segmentation.png" for i in table["image_id"]]


def _grow(mask: np.ndarray, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(width))) > 0


def _edge_contrast(photo: np.ndarray, mask: np.ndarray) -> float:
    """Colour step from the mask to the band just outside it, relative to the step between the next two bands out:
    large when the mask's border is the lesion's border, about 1 when the mask sits elsewhere."""
    inner, outer = _grow(mask, 5) & ~mask, _grow(mask, 9) & ~_grow(mask, 5)
    step = np.linalg.norm(photo[mask].mean(0) - photo[inner].mean(0))
    return float(step / (np.linalg.norm(photo[inner].mean(0) - photo[outer].mean(0)) + 1e-6))


def test_one_binary_mask_per_image_on_the_lesion(demo):
    meta = pd.read_csv(demo / "HAM10000_metadata.csv", dtype=str)
    masks = sorted(p.name for p in (demo / MASK_FOLDER).iterdir())
    assert masks == sorted(f"{i}_segmentation.png" for i in meta["image_id"])
    aligned, shifted = [], []
    for image_id in meta["image_id"]:
        with Image.open(demo / MASK_FOLDER / f"{image_id}_segmentation.png") as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (48, 48)
            mask = np.asarray(img)
        assert set(np.unique(mask)) <= {0, 255} and 0.02 < (mask == 255).mean() < 0.6, image_id
        photo = np.asarray(Image.open(next(demo.glob(f"HAM10000_images_part_*/{image_id}.jpg"))), dtype=np.float32)
        aligned.append(_edge_contrast(photo, mask == 255))
        shifted.append(_edge_contrast(photo, np.roll(mask == 255, 8, axis=1)))
    assert np.median(aligned) > 5 and np.median(aligned) > 3 * np.median(shifted), (np.median(aligned), np.median(shifted))
    assert np.mean(np.array(aligned) > 1) > 0.9


def test_same_seed_is_byte_identical_other_seed_differs(demo, tmp_path):
    again = tmp_path / "again"
    write_demo(again, seed=3, images=140, size=48, min_per_class=12)
    assert _digest(again) == _digest(demo)
    other = tmp_path / "other"
    write_demo(other, seed=4, images=140, size=48, min_per_class=12)
    assert _digest(other)["HAM10000_metadata.csv"] != _digest(demo)["HAM10000_metadata.csv"]
    shared = set(_digest(other)) & set(_digest(demo))
    assert any(_digest(other)[k] != _digest(demo)[k] for k in shared if k.endswith(".jpg"))


def test_stage_writes_demo_and_grid(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(workspace)
    params = parse_params({"seed": 1, "demo": {"images": 80, "size": 32, "min_per_class": 8}})
    summary = make_demo(params)
    assert summary["images"] == 80
    assert (workspace / "data/demo/HAM10000/HAM10000_metadata.csv").is_file()
    assert len(list((workspace / f"data/demo/HAM10000/{MASK_FOLDER}").glob("*_segmentation.png"))) == 80
    with Image.open(workspace / "reports/demo_grid.png") as grid:
        assert grid.width > 200 and grid.height > 7 * 32
    assert not any(p.name.startswith(".") for p in (workspace / "data").iterdir())  # no temporaries left


def test_stage_with_real_source_writes_only_a_marker(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(workspace)
    (workspace / "data/demo/HAM10000").mkdir(parents=True)  # an older demo set is replaced by the marker
    make_demo(parse_params({"data": {"source": "/data/HAM10000"}}))
    assert [p.name for p in (workspace / "data/demo").iterdir()] == ["SKIPPED"]
    assert "/data/HAM10000" in (workspace / "data/demo/SKIPPED").read_text()
    assert (workspace / "reports/demo_grid.png").is_file()
