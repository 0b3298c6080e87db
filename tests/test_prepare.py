"""The prepare stage: lesion-grouped stratified split, fine-tune samples from train only, leakage guard, stability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from fixtures_data import ham_table, image_path, make_ham_folder, make_workspace, write_masks, write_params

from pipeline.data.split import assign_splits, cap_train, check_no_leakage, prepare, sample_finetune
from pipeline.core.errors import PipelineError
from pipeline.core.params import parse_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A tmp repository root holding a HAM10000 folder under data/ham (8 lesions, 14 images per class)."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = make_workspace(tmp_path / "ws")
    make_ham_folder(root / "data/ham", lesions_per_class=8)
    monkeypatch.chdir(root)
    return root


def _params(**data):
    return parse_params({"seed": 0, "data": {"source": "data/ham", "finetune_images": 3, **data}})


def _outputs(root: Path) -> dict[str, bytes]:
    folder = root / "data/prepared"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_split_is_grouped_stratified_and_finetune_is_train_only(workspace):
    report = prepare(_params(classes=["akiec", "df", "mel"]))
    split = pd.read_csv(workspace / "data/prepared/split.csv", dtype=str, keep_default_na=False)
    assert list(split.columns) == ["image_id", "lesion_id", "dx", "split", "path", "mask_path"]
    assert (split["mask_path"] == "").all()  # the folder has no segmentation release
    assert split["image_id"].is_monotonic_increasing and len(split) == len(ham_table(lesions_per_class=8))
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all()
    assert set(split["dx"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}  # all classes, not only selected
    assert (split.groupby("dx")["split"].nunique() == 3).all()
    assert split["path"].str.startswith("data/ham/HAM10000_images_part_").all()  # relative inside the workspace
    train = set(split.loc[split["split"] == "train", "image_id"])
    for class_code in ("akiec", "df", "mel"):
        sample = pd.read_csv(workspace / f"data/prepared/finetune/{class_code}.csv", dtype=str)
        assert list(sample.columns) == ["image_id", "lesion_id", "dx", "path", "mask_path"]
        assert len(sample) == 3 and set(sample["image_id"]) <= train and (sample["dx"] == class_code).all()
        assert sample["lesion_id"].is_unique  # distinct lesions first
    assert sorted(p.name for p in (workspace / "data/prepared/finetune").iterdir()) == ["akiec.csv", "df.csv", "mel.csv"]
    written = json.loads((workspace / "reports/data.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["classes"]["df"]["images"] == 14 and written["skipped_images"] == 0
    assert sum(written["classes"]["df"][s] for s in ("train", "val", "test")) == 14
    assert written["totals"]["images"] == 3 * 14
    assert written["images_with_masks"] == 0 and written["masks"].startswith("no lesion masks found")


def test_fractions_close_to_requested(tmp_path):
    table = ham_table(lesions_per_class=60)
    table["path"] = "x"
    split = assign_splits(table, val=0.15, test=0.2, seed=5)
    shares = split.groupby("dx")["split"].value_counts(normalize=True).unstack()
    assert ((shares["test"] - 0.2).abs() < 0.05).all() and ((shares["val"] - 0.15).abs() < 0.05).all()


def test_deterministic_and_seed_dependent(workspace):
    prepare(_params())
    first = _outputs(workspace)
    prepare(_params())
    assert _outputs(workspace) == first
    prepare(parse_params({"seed": 1, "data": {"source": "data/ham", "finetune_images": 3}}))
    assert _outputs(workspace)["split.csv"] != first["split.csv"]


def test_changing_classes_keeps_split_and_other_samples(workspace):
    prepare(_params(classes=["mel", "nv"]))
    before = _outputs(workspace)
    prepare(_params(classes=["df", "mel", "nv"]))
    after = _outputs(workspace)
    assert after["split.csv"] == before["split.csv"]
    assert after["finetune/mel.csv"] == before["finetune/mel.csv"]
    assert after["finetune/nv.csv"] == before["finetune/nv.csv"]
    prepare(_params(classes=["bcc", "vasc"]))
    assert _outputs(workspace)["split.csv"] == before["split.csv"]
    assert "finetune/mel.csv" not in _outputs(workspace)


def test_leakage_guard_fires_on_corrupted_frames():
    table = ham_table(lesions_per_class=6)
    table["path"], table["mask_path"] = "x", ""
    split = assign_splits(table, val=0.15, test=0.2, seed=0)
    sample = {"mel": sample_finetune(split, "mel", 3, seed=0)}
    check_no_leakage(split, sample)  # the real thing passes

    multi = split.groupby("lesion_id").size()
    lesion = multi[multi > 1].index[0]
    crossed = split.copy()
    rows = crossed.index[crossed["lesion_id"] == lesion]
    crossed.loc[rows[0], "split"] = "test" if crossed.loc[rows[1], "split"] != "test" else "train"
    with pytest.raises(PipelineError, match=f"leakage: lesion '{lesion}' is in several splits"):
        check_no_leakage(crossed, sample)

    val_image = split.loc[(split["split"] == "val") & (split["dx"] == "mel")].iloc[[0]]
    bad_sample = {"mel": pd.concat([sample["mel"], val_image[sample["mel"].columns]])}
    with pytest.raises(PipelineError, match=f"fine-tune image '{val_image['image_id'].iloc[0]}' of class 'mel'"):
        check_no_leakage(split, bad_sample)


def _split_of(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "data/prepared/split.csv", dtype=str).set_index("image_id")


def test_cap_keeps_whole_lesions_moves_the_rest_to_reserve_and_leaves_val_test_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = make_workspace(tmp_path / "ws")
    make_ham_folder(root / "data/ham", lesions_per_class=12)  # 21 images per class, lesions of 1, 2, 1 and 3 images
    monkeypatch.chdir(root)
    classes = ["df", "mel"]
    prepare(_params(classes=classes))
    full = _split_of(root)
    report = prepare(_params(classes=classes, real_per_class=6))
    capped = _split_of(root)

    assert list(capped.index) == list(full.index)
    for name in ("val", "test"):
        assert set(capped.index[capped["split"] == name]) == set(full.index[full["split"] == name])
    moved = capped["split"] != full["split"]
    assert (full.loc[moved, "split"] == "train").all() and (capped.loc[moved, "split"] == "reserve").all()
    assert set(capped.loc[moved, "dx"]) == set(classes)  # only the selected classes are capped
    assert (capped.groupby("lesion_id")["split"].nunique() == 1).all()  # no lesion split between train and reserve
    written = json.loads((root / "reports/data.json").read_text())
    assert written["real_per_class"] == 6
    for class_code in classes:
        rows = capped[capped["dx"] == class_code]
        train, reserve = rows.index[rows["split"] == "train"], rows.index[rows["split"] == "reserve"]
        assert len(train) == 6  # single-image lesions exist, so first-fit reaches the cap exactly
        assert len(train) + len(reserve) == int((full.loc[full["dx"] == class_code, "split"] == "train").sum())
        assert written["classes"][class_code]["reserve"] == len(reserve) > 0
        assert written["classes"][class_code]["train"] == 6
        sample = pd.read_csv(root / f"data/prepared/finetune/{class_code}.csv", dtype=str)
        assert len(sample) == 3 and set(sample["image_id"]) <= set(train)  # fine-tune images come from the K
    assert written["totals"]["reserve"] == sum(written["classes"][c]["reserve"] for c in classes)
    assert report["classes"]["mel"] == written["classes"]["mel"]


def test_cap_rounds_down_when_no_lesion_fits():
    table = ham_table(lesions_per_class=6, classes=("mel", "nv"), images_per_lesion=(3,))
    table["path"] = "x"
    split = assign_splits(table, val=0.2, test=0.2, seed=0)
    capped = cap_train(split, ["mel"], 5, seed=0)
    mel = capped[capped["dx"] == "mel"]
    assert (mel["split"] == "train").sum() == 3  # lesions of 3: one fits under 5, two would overshoot
    assert (mel["split"] == "reserve").sum() == (split[split["dx"] == "mel"]["split"] == "train").sum() - 3
    assert cap_train(split, ["mel"], 5, seed=0).equals(capped)  # deterministic


def test_cap_moves_a_lesion_of_two_diagnoses_whole():
    """Lesion L has 1 mel and 3 nv images: capped at 2 it never fits nv, so it must leave mel's train images too."""
    rows = [("L", "mel"), ("L", "nv"), ("L", "nv"), ("L", "nv"), ("M1", "mel"), ("N1", "nv"), ("N2", "nv")]
    split = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(len(rows))], "lesion_id": [r[0] for r in rows],
                          "dx": [r[1] for r in rows], "split": "train"})
    capped = cap_train(split, ["mel", "nv"], 2, seed=0)
    assert set(capped.loc[capped["lesion_id"] == "L", "split"]) == {"reserve"}
    assert set(capped.loc[capped["lesion_id"] != "L", "split"]) == {"train"}  # mel rounds down to 1, nv keeps 2
    check_no_leakage(capped, {})


def test_cap_above_a_class_train_split_is_a_one_line_error(workspace):
    with pytest.raises(PipelineError) as exc:
        prepare(_params(classes=["df", "mel"], real_per_class=40))
    message = str(exc.value)
    assert message.startswith("data.real_per_class is 40 but class 'df' has only") and "\n" not in message
    assert not (workspace / "data/prepared").exists() and not (workspace / "reports/data.json").exists()


def test_finetune_images_above_the_cap_is_refused(workspace):
    with pytest.raises(PipelineError, match=r"^data.finetune_images \(3\) exceeds data.real_per_class \(2\)"):
        prepare(_params(real_per_class=2))
    assert not (workspace / "data/prepared").exists()


def test_unknown_class_in_params():
    with pytest.raises(PipelineError, match="data.classes.0: Input should be 'akiec'"):
        _params(classes=["melanoma", "nv"])


def test_class_absent_from_data(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = make_workspace(tmp_path / "ws")
    make_ham_folder(root / "data/ham", lesions_per_class={"mel": 6, "nv": 6})
    monkeypatch.chdir(root)
    with pytest.raises(PipelineError) as exc:
        prepare(_params(classes=["mel", "vasc"]))
    assert "class 'vasc'" in str(exc.value) and "classes present: mel, nv" in str(exc.value)
    assert not (root / "data/prepared").exists()


def test_too_few_train_images_gives_counts(workspace):
    with pytest.raises(PipelineError) as exc:
        prepare(_params(classes=["df", "mel"], finetune_images=12))
    message = str(exc.value)
    assert "class 'df' has only" in message and "data.finetune_images is 12" in message
    assert not (workspace / "data/prepared").exists()


def test_class_without_val_or_test(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = make_workspace(tmp_path / "ws")
    make_ham_folder(root / "data/ham", lesions_per_class={"mel": 8, "df": 2}, images_per_lesion=(3,))
    monkeypatch.chdir(root)
    with pytest.raises(PipelineError, match="class 'df' gets no (val|test) image: only 6 image.s. in 2 lesion"):
        prepare(_params(classes=["df", "mel"], finetune_images=1))


def test_skip_mode_reports_count(workspace):
    ids = ham_table(lesions_per_class=8)["image_id"]
    image_path(workspace / "data/ham", ids[0]).write_bytes(b"")
    image_path(workspace / "data/ham", ids[5]).unlink()
    with pytest.raises(PipelineError, match="not found|0 bytes"):
        prepare(_params(on_bad_image="error"))
    report = prepare(_params(on_bad_image="skip"))
    assert report["skipped_images"] == 2
    assert json.loads((workspace / "reports/data.json").read_text())["skipped_images"] == 2
    skipped = pd.read_csv(workspace / "data/prepared/skipped.csv")
    assert sorted(skipped["image_id"]) == sorted(ids[[0, 5]])
    split = pd.read_csv(workspace / "data/prepared/split.csv")
    assert not split["image_id"].isin(ids[[0, 5]]).any()


def test_masks_follow_their_images_into_the_split_and_finetune_samples(workspace):
    write_masks(workspace / "data/ham")
    report = prepare(_params(classes=["df", "mel"], real_per_class=6))
    split = pd.read_csv(workspace / "data/prepared/split.csv", dtype=str)
    expected = "data/ham/HAM10000_segmentations_lesion_tschandl/" + split["image_id"] + "_segmentation.png"
    assert (split["mask_path"] == expected).all() and (workspace / split["mask_path"].iloc[0]).is_file()
    for class_code in ("df", "mel"):
        sample = pd.read_csv(workspace / f"data/prepared/finetune/{class_code}.csv", dtype=str)
        assert (sample["mask_path"] == sample["image_id"].map(split.set_index("image_id")["mask_path"])).all()
    assert report["images_with_masks"] == len(split) == len(ham_table(lesions_per_class=8))
    assert report["masks"] == "lesion masks read from HAM10000_segmentations_lesion_tschandl"


def test_bad_mask_stops_prepare_or_is_a_counted_skip(workspace):
    masks = write_masks(workspace / "data/ham")
    ids = ham_table(lesions_per_class=8)["image_id"]
    (masks / f"{ids[2]}_segmentation.png").unlink()
    Image.new("L", (10, 10)).save(masks / f"{ids[7]}_segmentation.png")
    with pytest.raises(PipelineError, match=f"^image {ids[2]}: lesion mask .*{ids[2]}_segmentation.png not found"):
        prepare(_params(on_bad_image="error"))
    assert not (workspace / "data/prepared").exists() and not (workspace / "reports/data.json").exists()
    report = prepare(_params(on_bad_image="skip"))
    assert report["skipped_images"] == 2 and report["images_with_masks"] == len(ids) - 2
    skipped = pd.read_csv(workspace / "data/prepared/skipped.csv")
    assert skipped["image_id"].tolist() == [ids[2], ids[7]]
    assert "not found" in skipped["reason"][0] and "10x10 pixels" in skipped["reason"][1]
    split = pd.read_csv(workspace / "data/prepared/split.csv")
    assert not split["image_id"].isin(ids[[2, 7]]).any() and split["mask_path"].notna().all()


def test_source_outside_workspace_keeps_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    outside = make_ham_folder(tmp_path / "elsewhere", lesions_per_class=6)
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    prepare(parse_params({"data": {"source": str(outside), "finetune_images": 2}}))
    split = pd.read_csv(root / "data/prepared/split.csv")
    assert split["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()


def test_relative_source_outside_data_folders_is_refused(workspace):
    with pytest.raises(PipelineError, match="data.source: relative path '../x'"):
        prepare(_params(source="../x"))


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One MLflow store for this module's stage subprocesses: creating a fresh SQLite schema costs seconds each time."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-stages') / 'mlflow.db'}"


def _run(stage: str, root: Path, store: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    env["MLFLOW_TRACKING_URI"] = store
    return subprocess.run([sys.executable, str(REPO / f"stages/{stage}.py"), "--params", "params.yaml"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_stage_script_fails_with_one_line_and_writes_nothing(workspace, shared_store):
    image_path(workspace / "data/ham", ham_table(lesions_per_class=8)["image_id"][3]).write_bytes(b"\xff\xd8junk")
    write_params(workspace, {"data": {"source": "data/ham", "finetune_images": 3}})
    result = _run("prepare", workspace, shared_store)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: prepare: ") and "ISIC_0024309" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (workspace / "data/prepared").exists() and not (workspace / "reports/data.json").exists()
    assert not [p for p in (workspace / "data").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_demo_then_prepare_as_stage_scripts(tmp_path, monkeypatch, shared_store):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = make_workspace(tmp_path / "ws")
    write_params(root, {"data": {"finetune_images": 4}, "demo": {"images": 120, "size": 32, "min_per_class": 14}})
    for stage in ("demo_data", "prepare"):
        result = _run(stage, root, shared_store)
        assert result.returncode == 0, result.stderr
    split = pd.read_csv(root / "data/prepared/split.csv")
    assert len(split) == 120 and split["path"].str.startswith("data/demo/HAM10000/HAM10000_images_part_").all()
    assert split["mask_path"].str.fullmatch(r"data/demo/HAM10000/HAM10000_segmentations_lesion_tschandl/ISIC_\d{7}_segmentation\.png").all()
    assert (root / "reports/demo_grid.png").is_file()
    data = json.loads((root / "reports/data.json").read_text())
    assert set(data["classes"]) == {"akiec", "bcc", "df", "mel", "vasc"}
    assert all(c["finetune"] == 4 and c["val"] > 0 and c["test"] > 0 for c in data["classes"].values())
    assert data["images_with_masks"] == 120
