"""Stable digests: file contents, derived seeds and run fingerprints (Python's hash() is salted per process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def derive_seed(*parts: object) -> int:
    """A 60-bit seed that depends only on ``parts``: stable across processes, machines and other classes."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def json_digest(payload) -> str:
    """Short sha256 of a JSON-able payload: what a checkpoint or an MLflow run must match."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
