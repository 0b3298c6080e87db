"""The one exception type a user is meant to read."""

from pathlib import Path


class PipelineError(Exception):
    """Bad input or a broken invariant in one line naming the file, key or value: stages print it, exit 1."""


def require_file(path: str | Path, missing: str) -> Path:
    """``path`` as a Path if it is a file, else a PipelineError naming it (``missing``: what it is, what to run)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: {missing}")
    return Path(path)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What a library's exception says, for a PipelineError: its first non-empty line, else its type's name."""
    return next((line.strip()[:limit] for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
