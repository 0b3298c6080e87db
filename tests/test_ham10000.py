"""The HAM10000 / ISIC 2018 reader and image decoding: both layouts read, every bad input named in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_data import ham_table, image_path, make_ham_folder, make_isic_folder, write_jpeg, write_masks
from PIL import Image

from pipeline.data.ham10000 import read_source
from pipeline.data.images import check_image, open_rgb, resize_square
from pipeline.data.masks import MASK_FOLDER
from pipeline.core.errors import PipelineError


@pytest.fixture
def ham(tmp_path) -> Path:
    return make_ham_folder(tmp_path / "HAM10000", lesions_per_class=2)


def _rewrite_csv(folder: Path, edit) -> Path:
    csv = folder / "HAM10000_metadata.csv"
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    edit(table).to_csv(csv, index=False)
    return csv


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- reading both layouts ---------------------------------------------------------------------------


def test_reads_ham_release_layout(ham):
    table, report = read_source(ham)
    expected = ham_table(lesions_per_class=2)
    assert list(table.columns[:4]) == ["image_id", "lesion_id", "dx", "path"]
    assert list(table.columns) == ["image_id", "lesion_id", "dx", "path", "mask_path"]
    assert sorted(table["image_id"]) == sorted(expected["image_id"])
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["path"])
    parts = {Path(p).parent.name for p in table["path"]}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert report.skipped == [] and report.layout == "ham10000"
    assert (table["mask_path"] == "").all() and report.masks is None  # no segmentation release here


def test_images_found_in_any_subfolder_and_extra_columns_ignored(tmp_path):
    table = ham_table(lesions_per_class=1)
    table["dataset"] = "vidir_modern"
    folder = make_ham_folder(tmp_path / "kaggle", table, image_folders=("nested/deeper/images", "other"))
    read, _ = read_source(folder)
    assert len(read) == len(table)
    assert "dataset" not in read.columns


def test_reads_isic_2018_layout_with_groupings(tmp_path):
    source = ham_table(lesions_per_class=2)
    folder = make_isic_folder(tmp_path / "isic", source)
    table, report = read_source(folder)
    assert report.layout == "isic2018_task3" and report.warnings == []
    merged = table.merge(source, on="image_id", suffixes=("", "_truth"))
    assert (merged["dx"] == merged["dx_truth"]).all()
    assert (merged["lesion_id"] == merged["lesion_id_truth"]).all()


def test_isic_without_groupings_warns_and_uses_one_lesion_per_image(tmp_path):
    folder = make_isic_folder(tmp_path / "isic", lesions_per_class=1, groupings=False)
    with pytest.warns(UserWarning, match="LesionGroupings.csv not found"):
        table, _ = read_source(folder)
    assert (table["lesion_id"] == table["image_id"]).all()


def test_isic_images_missing_from_groupings_warn_and_are_their_own_lesions(tmp_path):
    source = ham_table(lesions_per_class=2)
    folder = make_isic_folder(tmp_path / "isic", source)
    groupings = folder / "ISIC2018_Task3_Training_LesionGroupings.csv"
    pd.read_csv(groupings).iloc[:3].to_csv(groupings, index=False)
    with pytest.warns(UserWarning, match=rf"{len(source) - 3} image\(s\) have no lesion_id \(first: "):
        table, report = read_source(folder)
    assert len(report.warnings) == 1
    truth = table.merge(source, on="image_id", suffixes=("", "_truth")).set_index("image_id")
    grouped = list(source["image_id"][:3])
    assert (truth.loc[grouped, "lesion_id"] == truth.loc[grouped, "lesion_id_truth"]).all()
    rest = truth.drop(index=grouped)
    assert (rest["lesion_id"] == rest.index).all()


def test_isic_ground_truth_one_folder_down(tmp_path):
    folder = make_isic_folder(tmp_path / "isic", lesions_per_class=1)
    nested = folder / "ISIC2018_Task3_Training_GroundTruth"
    nested.mkdir()
    shutil.move(folder / "ISIC2018_Task3_Training_GroundTruth.csv", nested)
    assert len(read_source(folder)[0]) == len(ham_table(lesions_per_class=1))


# --- errors: each names the file / column / value ---------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(PipelineError) as exc:
        read_source(tmp_path / "nowhere")
    assert "nowhere" in _one_line(exc) and "not found" in str(exc.value)


def test_missing_metadata_names_both_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError) as exc:
        read_source(tmp_path / "empty")
    message = _one_line(exc)
    assert "HAM10000_metadata.csv" in message and "ISIC2018_Task3_Training_GroundTruth.csv" in message


def test_empty_csv(ham):
    (ham / "HAM10000_metadata.csv").write_text("")
    with pytest.raises(PipelineError, match=r"HAM10000_metadata\.csv: file is empty"):
        read_source(ham)


def test_header_only_csv(ham):
    (ham / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    with pytest.raises(PipelineError, match="no rows"):
        read_source(ham)


def test_missing_column_is_named(ham):
    _rewrite_csv(ham, lambda t: t.drop(columns=["dx"]))
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    assert "missing column(s) dx" in _one_line(exc)


def test_duplicate_image_id_is_named(ham):
    def dup(t):
        t.loc[3, "image_id"] = t.loc[1, "image_id"]
        return t

    _rewrite_csv(ham, dup)
    first = ham_table(lesions_per_class=2)["image_id"][1]
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    assert f"duplicated image_id '{first}'" in _one_line(exc) and "rows 3 and 5" in str(exc.value)


def test_unknown_dx_names_value_and_row(ham):
    def bad(t):
        t.loc[4, "dx"] = "scc"
        return t

    _rewrite_csv(ham, bad)
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    assert "row 6" in _one_line(exc) and "'scc'" in str(exc.value)


def test_empty_lesion_id_is_named(ham):
    def bad(t):
        t.loc[2, "lesion_id"] = ""
        return t

    _rewrite_csv(ham, bad)
    with pytest.raises(PipelineError, match="row 4: empty lesion_id"):
        read_source(ham)


def test_missing_image_names_first_and_count(ham):
    table = ham_table(lesions_per_class=2)
    for image_id in table["image_id"][[2, 5]]:
        image_path(ham, image_id).unlink()
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    message = _one_line(exc)
    assert "2 listed image(s) not found" in message and table["image_id"][2] in message


def test_zero_byte_image_is_named(ham):
    target = image_path(ham, ham_table(lesions_per_class=2)["image_id"][0])
    target.write_bytes(b"")
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    assert str(target) in _one_line(exc) and "0 bytes" in str(exc.value)


def test_truncated_jpeg_is_named(ham):
    target = image_path(ham, ham_table(lesions_per_class=2)["image_id"][1])
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    assert str(target) in _one_line(exc) and "truncated" in str(exc.value)


def test_corrupt_bytes_are_named(ham):
    target = image_path(ham, ham_table(lesions_per_class=2)["image_id"][2])
    target.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(PipelineError) as exc:
        read_source(ham)
    assert str(target) in _one_line(exc)


def test_isic_row_with_two_diagnoses(tmp_path):
    folder = make_isic_folder(tmp_path / "isic", lesions_per_class=1)
    csv = folder / "ISIC2018_Task3_Training_GroundTruth.csv"
    truth = pd.read_csv(csv)
    assert truth.loc[0, "AKIEC"] == 1.0
    truth.loc[0, "MEL"] = 1.0
    truth.to_csv(csv, index=False)
    with pytest.raises(PipelineError) as exc:
        read_source(folder)
    assert truth.loc[0, "image"] in _one_line(exc) and "2 diagnosis columns set to 1.0 (MEL, AKIEC)" in str(exc.value)


def test_isic_row_with_no_diagnosis(tmp_path):
    folder = make_isic_folder(tmp_path / "isic", lesions_per_class=1)
    csv = folder / "ISIC2018_Task3_Training_GroundTruth.csv"
    truth = pd.read_csv(csv)
    truth.loc[0, list("MEL NV BCC AKIEC BKL DF VASC".split())] = 0.0
    truth.to_csv(csv, index=False)
    with pytest.raises(PipelineError, match=f"{truth.loc[0, 'image']}' has 0 diagnosis columns"):
        read_source(folder)


def test_isic_missing_onehot_column(tmp_path):
    folder = make_isic_folder(tmp_path / "isic", lesions_per_class=1)
    csv = folder / "ISIC2018_Task3_Training_GroundTruth.csv"
    pd.read_csv(csv).drop(columns=["VASC"]).to_csv(csv, index=False)
    with pytest.raises(PipelineError, match="missing column.s. VASC"):
        read_source(folder)


# --- skip mode --------------------------------------------------------------------------------------


def test_skip_mode_drops_and_counts_bad_images(ham):
    ids = ham_table(lesions_per_class=2)["image_id"]
    image_path(ham, ids[0]).unlink()
    image_path(ham, ids[1]).write_bytes(b"")
    truncated = image_path(ham, ids[2])
    truncated.write_bytes(truncated.read_bytes()[:100])
    table, report = read_source(ham, on_bad_image="skip")
    assert len(table) == len(ids) - 3
    skipped = {s["image_id"]: s["reason"] for s in report.skipped}
    assert set(skipped) == set(ids[:3])
    assert skipped[ids[0]] == "missing" and "0 bytes" in skipped[ids[1]]


# --- open_rgb / resize_square -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16", "1"])
def test_open_rgb_converts_modes(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    img = base.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    check_image(path)


def test_open_rgb_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty\.jpg: image file is empty"):
        open_rgb(empty)
    good = write_jpeg(tmp_path / "good.jpg", size=(64, 48))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(PipelineError, match=r"cut\.jpg: truncated"):
        open_rgb(cut)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(PipelineError, match=r"junk\.png"):
        open_rgb(junk)
    with pytest.raises(PipelineError, match=r"absent\.jpg: image file not found"):
        open_rgb(tmp_path / "absent.jpg")


def test_resize_square_centre_crops(tmp_path):
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 40))  # a blue band outside the centred 40x40 square
    out = resize_square(img, 16)
    assert out.size == (16, 16) and out.mode == "RGB"
    assert np.asarray(out)[..., 2].max() < 20
    assert resize_square(Image.new("L", (10, 30)), 8).mode == "RGB"


# --- lesion masks (HAM10000_segmentations_lesion_tschandl) -----------------------------------------------


def test_masks_are_read_when_the_segmentation_folder_is_present(ham):
    folder = write_masks(ham)
    table, report = read_source(ham)
    assert report.masks == folder.resolve()
    assert len(table) == len(ham_table(lesions_per_class=2))  # the mask PNGs are not taken for photos
    for image_id, mask in zip(table["image_id"], table["mask_path"]):
        assert Path(mask) == folder.resolve() / f"{image_id}_segmentation.png"


@pytest.mark.parametrize("parent", ["segmentations", MASK_FOLDER])  # a folder of its own, or unzipped into its name
def test_mask_folder_found_one_level_down(ham, parent):
    folder = write_masks(ham, folder=f"{parent}/{MASK_FOLDER}")
    table, report = read_source(ham)
    assert report.masks == folder.resolve()
    assert table["mask_path"].map(lambda m: Path(m).parent == folder.resolve()).all()


def test_zero_one_and_one_bit_masks_are_binary(ham):
    folder = write_masks(ham)
    ids = ham_table(lesions_per_class=2)["image_id"]
    ones = (np.asarray(Image.open(folder / f"{ids[0]}_segmentation.png")) > 0).astype(np.uint8)
    Image.fromarray(ones, "L").save(folder / f"{ids[0]}_segmentation.png")  # 0/1
    Image.fromarray(ones * 255, "L").convert("1").save(folder / f"{ids[1]}_segmentation.png")  # 1-bit PNG
    Image.fromarray(np.zeros_like(ones), "L").save(folder / f"{ids[2]}_segmentation.png")  # all background
    assert len(read_source(ham)[0]) == len(ids)


def _break_mask(folder: Path, image_id: str, case: str) -> None:
    mask = folder / f"{image_id}_segmentation.png"
    if case == "missing":
        mask.unlink()
    elif case == "wrong size":
        Image.new("L", (24, 32), 255).save(mask)
    elif case == "not binary":
        Image.fromarray(np.full((24, 32), 128, np.uint8), "L").save(mask)
    elif case == "corrupt":
        mask.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


BAD_MASKS = {
    "missing": r"lesion mask \S+_segmentation\.png not found; expected ISIC_\d+_segmentation\.png in ",
    "wrong size": r"lesion mask \S+_segmentation\.png is 24x32 pixels; expected the image's 32x24",
    "not binary": r"lesion mask \S+_segmentation\.png is not binary \(1 distinct values, e\.g\. 128\); expected only 0 and 255",
    "corrupt": r"_segmentation\.png: (corrupt|truncated|not a readable) image",
}


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_bad_mask_is_a_one_line_error_naming_the_image(ham, case):
    folder = write_masks(ham)
    image_id = ham_table(lesions_per_class=2)["image_id"][3]
    _break_mask(folder, image_id, case)
    with pytest.raises(PipelineError, match=BAD_MASKS[case]) as exc:
        read_source(ham)
    message = _one_line(exc)
    assert message.startswith(f"image {image_id}: ") and f"{image_id}_segmentation.png" in message


def test_bad_masks_are_counted_skips_in_skip_mode(ham):
    folder = write_masks(ham)
    ids = ham_table(lesions_per_class=2)["image_id"]
    cases = ["missing", "wrong size", "not binary", "corrupt"]
    for image_id, case in zip(ids, cases):
        _break_mask(folder, image_id, case)
    table, report = read_source(ham, on_bad_image="skip")
    assert sorted(table["image_id"]) == sorted(ids[len(cases):])
    skipped = {s["image_id"]: s["reason"] for s in report.skipped}
    assert list(skipped) == list(ids[: len(cases)])
    assert "not found" in skipped[ids[0]] and "24x32" in skipped[ids[1]] and "not binary" in skipped[ids[2]]
    assert table["mask_path"].map(lambda m: Path(m).is_file()).all()
