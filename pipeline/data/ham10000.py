"""Read a HAM10000 release folder (or the ISIC 2018 Task 3 layout of the same images) into one table. Everything a
user can get wrong is checked here, once, in one line naming the file, column, row or value: later stages trust it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.data.images import check_image
from pipeline.data.masks import MASK_FOLDER, checked_mask
from pipeline.core.errors import PipelineError, first_line
from pipeline.core.params import CLASS_NAMES

HAM_METADATA = "HAM10000_metadata.csv"
ISIC_GROUND_TRUTH = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"
HAM_REQUIRED = ("lesion_id", "image_id", "dx")
ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
COLUMNS = ["image_id", "lesion_id", "dx", "path", "mask_path"]


@dataclass
class SourceReport:
    """What the reader found besides the table: layout, mask folder, skipped images and warnings (for reports/data.json)."""

    layout: str
    metadata: Path
    masks: Path | None = None  # the segmentation folder; None when the release has no masks
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _find(folder: Path, name: str, exists=Path.is_file) -> Path | None:
    """The file (or folder) at the top level, else one level down (the zips unpack into a same-named folder)."""
    return next((p for p in [folder / name, *sorted(folder.glob(f"*/{name}"))] if exists(p)), None)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable CSV file ({first_line(exc)})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise PipelineError(f"{path}: has a header but no rows")
    return frame.apply(lambda col: col.str.strip())


def _require(path: Path, frame: pd.DataFrame, columns: tuple[str, ...], filled: tuple[str, ...]) -> None:
    """The ``columns`` exist, and the ``filled`` ones hold a value in every row."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns))
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)} (found: {found})")
    for column in filled:
        empty = frame.index[frame[column] == ""]
        if len(empty):
            raise PipelineError(f"{path}: row {empty[0] + 2}: empty {column}")


def _no_duplicates(path: Path, frame: pd.DataFrame, column: str) -> None:
    dupes = frame[frame[column].duplicated(keep=False)]
    if not dupes.empty:
        rows = [str(i + 2) for i in dupes.index[:2]]
        raise PipelineError(
            f"{path}: duplicated {column} {dupes[column].iloc[0]!r} (rows {' and '.join(rows)}; "
            f"{dupes[column].nunique()} duplicated value(s) in all)"
        )


def _read_ham(path: Path) -> pd.DataFrame:
    frame = _read_csv(path)
    _require(path, frame, HAM_REQUIRED, filled=HAM_REQUIRED)
    frame["dx"] = frame["dx"].str.lower()
    bad = frame.index[~frame["dx"].isin(list(CLASS_NAMES))]
    if len(bad):
        row = bad[0]
        raise PipelineError(
            f"{path}: row {row + 2}: unknown dx {frame.at[row, 'dx']!r} for image {frame.at[row, 'image_id']!r}; "
            f"expected one of {', '.join(CLASS_NAMES)}"
        )
    _no_duplicates(path, frame, "image_id")
    return frame[["image_id", "lesion_id", "dx"]].copy()


def _read_isic(path: Path, groupings: Path | None, report: SourceReport) -> pd.DataFrame:
    frame = _read_csv(path)
    _require(path, frame, ("image", *ISIC_CLASSES), filled=("image",))
    onehot = frame[list(ISIC_CLASSES)].apply(pd.to_numeric, errors="coerce")
    for code in ISIC_CLASSES:
        if onehot[code].isna().any():
            row = onehot.index[onehot[code].isna()][0]
            raise PipelineError(
                f"{path}: row {row + 2}: column {code} of image {frame.at[row, 'image']!r} is "
                f"{frame.at[row, code]!r}, expected 0.0 or 1.0"
            )
    ones = (onehot == 1.0).sum(axis=1)
    if (ones != 1).any():
        row = (ones != 1).idxmax()
        hits = [c for c in ISIC_CLASSES if onehot.at[row, c] == 1.0]
        raise PipelineError(
            f"{path}: row {row + 2}: image {frame.at[row, 'image']!r} has {ones[row]} diagnosis columns set to 1.0 "
            f"({', '.join(hits) or 'none'}); exactly one is expected"
        )
    _no_duplicates(path, frame, "image")
    table = pd.DataFrame({"image_id": frame["image"], "dx": onehot.idxmax(axis=1).str.lower()})
    if groupings is None:
        lesions = {}
        message = (
            f"{ISIC_GROUPINGS} not found beside {path.name}: every image is treated as its own lesion, "
            "so images of one lesion may land in different splits"
        )
    else:
        groups = _read_csv(groupings)
        _require(groupings, groups, ("image", "lesion_id"), filled=("image", "lesion_id"))
        _no_duplicates(groupings, groups, "image")
        lesions = dict(zip(groups["image"], groups["lesion_id"]))
        unmatched = ~table["image_id"].isin(list(lesions))
        message = "" if not unmatched.any() else (
            f"{groupings}: {int(unmatched.sum())} image(s) have no lesion_id (first: {table['image_id'][unmatched].iloc[0]}); "
            "each is treated as its own lesion"
        )
    if message:
        warnings.warn(message, UserWarning, stacklevel=3)
        report.warnings.append(message)
    table["lesion_id"] = table["image_id"].map(lambda image: lesions.get(image, image))  # unmatched: its own lesion
    return table[["image_id", "lesion_id", "dx"]]


def index_images(folder: Path) -> dict[str, Path]:
    """Every image file under ``folder`` by stem, found in one recursive walk (first in sorted order wins);
    hidden folders and the segmentation release (masks, not photos) are left out."""
    index: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        left_out = any(p.startswith(".") or p == MASK_FOLDER for p in path.relative_to(folder).parts)
        if path.suffix.lower() in IMAGE_SUFFIXES and not left_out and path.is_file():
            index.setdefault(path.stem, path)
    return index


def _drop_bad(table: pd.DataFrame, check, report: SourceReport, on_bad_image: str, desc: str, unit: str
              ) -> pd.DataFrame:
    """``check(row)`` on every row: its PipelineError stops the reader, or in skip mode drops the row as a skip."""
    bad: list[int] = []
    for row in tqdm(table.index, desc=desc, unit=unit, disable=None, mininterval=2):
        try:
            check(row)
        except PipelineError as exc:
            if on_bad_image == "error":
                raise
            bad.append(row)
            report.skipped.append({"image_id": table.at[row, "image_id"], "reason": str(exc).split(": ", 1)[-1]})
    return table.drop(index=bad)


def read_source(folder: str | Path, on_bad_image: str = "error") -> tuple[pd.DataFrame, SourceReport]:
    """Validate ``folder`` and return (table, report): image_id, lesion_id, dx, path, mask_path (empty without the
    segmentation release). Every image is decoded (JPEGs at reduced scale) to catch broken files up front;
    on_bad_image "error" stops at the first missing/broken image or mask, "skip" drops and records them."""
    folder = Path(folder)
    if not folder.exists():
        raise PipelineError(f"{folder}: data folder not found")
    if not folder.is_dir():
        raise PipelineError(f"{folder}: expected a folder holding {HAM_METADATA}, got a file")
    folder = folder.resolve()
    ham, isic = _find(folder, HAM_METADATA), _find(folder, ISIC_GROUND_TRUTH)
    if ham is not None:
        report = SourceReport("ham10000", ham)
        table = _read_ham(ham)
    elif isic is not None:
        report = SourceReport("isic2018_task3", isic)
        table = _read_isic(isic, _find(folder, ISIC_GROUPINGS), report)
    else:
        raise PipelineError(
            f"{folder}: no metadata file found; looked for {HAM_METADATA} (HAM10000 release) or "
            f"{ISIC_GROUND_TRUTH} (ISIC 2018 Task 3), at the top level and one folder down"
        )

    images = index_images(folder)
    table["path"] = table["image_id"].map(lambda stem: str(images[stem]) if stem in images else "")
    missing = table["image_id"][table["path"] == ""]
    if len(missing):
        if on_bad_image == "error":
            raise PipelineError(
                f"{report.metadata}: {len(missing)} listed image(s) not found under {folder} "
                f"(first: {missing.iloc[0]}; looked for <image_id>.jpg/.jpeg/.png in every subfolder)"
            )
        report.skipped += [{"image_id": m, "reason": "missing"} for m in missing]
        table = table[table["path"] != ""]

    check = lambda row: check_image(table.at[row, "path"])  # noqa: E731
    table = _drop_bad(table, check, report, on_bad_image, "checking images", "img")
    masks = _find(folder, MASK_FOLDER, Path.is_dir)
    if masks is not None and (masks / MASK_FOLDER).is_dir():  # the segmentation zip unpacks into a same-named folder
        masks = masks / MASK_FOLDER
    report.masks = masks
    table = table.assign(mask_path="")
    if masks is not None:  # every image then needs a valid mask, like a valid image

        def attach_mask(row: int) -> None:
            table.at[row, "mask_path"] = str(checked_mask(masks, table.at[row, "image_id"], table.at[row, "path"]))

        table = _drop_bad(table, attach_mask, report, on_bad_image, "checking masks", "mask")
    if table.empty:
        raise PipelineError(f"{report.metadata}: no usable images left after skipping {len(report.skipped)} bad one(s)")
    return table[COLUMNS].reset_index(drop=True), report
