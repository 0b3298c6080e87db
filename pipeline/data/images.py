"""Decoding images the one safe way: fully loaded, RGB, and a one-line error naming the file when broken. Every reader
(reader checks, classifier, diffusion) goes through here, so a truncated JPEG fails at the file, not epochs later."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.core.errors import PipelineError, first_line

# Refuse half-decoded images instead of silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """A missing or empty file, then any decoding error inside the block, as one PipelineError line naming the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PipelineError(f"{path}: image file not found") from None
    if size == 0:
        raise PipelineError(f"{path}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: not a readable image (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        text = first_line(exc)
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        raise PipelineError(f"{path}: {kind} image ({text})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, 16-bit, palette, CMYK and alpha images all become plain 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("P", "PA", "RGBA", "LA", "La", "RGBa"):
        # Transparent pixels become white, the usual background of a cut-out lesion photo.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Open, verify and fully decode an image as RGB; PipelineError naming the file if it is empty or broken."""
    path = Path(path)
    with _decoding(path):
        with Image.open(path) as probe:
            probe.verify()  # cheap structural check (PNG CRCs etc.) before the real decode
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
            return rgb.copy() if rgb is img else rgb  # closing the file would drop img's pixels


def check_image(path: str | Path) -> None:
    """Decode the whole file cheaply (JPEGs at 1/8 scale: every byte is still read) or raise PipelineError:
    the reader validates thousands of files without paying for full-size decodes."""
    path = Path(path)
    with _decoding(path), Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        else:
            with Image.open(path) as probe:
                probe.verify()
        img.load()


def load_square(paths: list[Path], size: int) -> torch.Tensor:
    """Decode images into one uint8 tensor [N, 3, size, size] (centre-cropped, one resize): every loader's core."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        out[i] = torch.from_numpy(np.array(resize_square(open_rgb(path), size))).permute(2, 0, 1)  # a writable copy
    return out


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size``×``size`` (one resampling pass, no distortion)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return _to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)
