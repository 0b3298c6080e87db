"""Write-then-rename helpers: a stage killed mid-way leaves the old complete output or none, never half of one; and
the readers of what earlier stages wrote, with one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import PipelineError, first_line, require_file


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target`` in one rename. What a killed
    earlier write of ``target`` left behind is removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent, target.name)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if target.is_dir() and not target.is_symlink():
        # Directories cannot be swapped atomically; move the old one aside first, then drop it.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(temp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, target)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.chmod(temp, 0o644)
    os.replace(temp, target)


def write_text(target: str | Path, text: str) -> None:
    with atomic_file(target) as temp:
        temp.write_text(text)


def write_json(target: str | Path, payload: object) -> None:
    write_text(target, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_figure(target: str | Path, fig, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, laid out tight."""
    fig.tight_layout()
    with atomic_file(target) as temp:
        fig.savefig(temp, format="png", dpi=dpi, bbox_inches="tight")


def read_json(path: str | Path, missing: str) -> dict:
    """A JSON object, as write_json writes them and diffusers' configs are; a missing file (``missing`` says what to
    run), broken JSON or another JSON value is one PipelineError line."""
    path = require_file(path, missing)
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise PipelineError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def read_table(path: str | Path, columns: Sequence[str], missing: str):
    """A CSV an earlier stage wrote, every cell a string ("" when empty); a missing file (``missing`` says what to
    run), an unreadable one or an absent column is one PipelineError line."""
    import pandas as pd  # imported here: not every stage reads a table

    path = require_file(path, missing)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable CSV ({first_line(exc)})") from None
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise PipelineError(f"{path}: lacks column {absent[0]!r} (has {', '.join(frame.columns) or 'none'})")
    return frame


def clean_stale_temps(folder: str | Path, name: str) -> None:
    """Remove the temporaries a killed write of target ``name`` left behind (``.name.tmp-*`` / ``.name.old-*``), and
    only those: the folder's other targets may be being written right now (by another stage or experiment)."""
    stale = {path for kind in ("tmp", "old") for path in Path(folder).glob(f".{name}.{kind}-*")}
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
