"""The embedded demo data set: dermoscopy-like drawings in HAM10000's release layout, so the whole pipeline runs offline
through the real reader and split. Classes look different yet overlap; the same ``seed`` gives byte-identical files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from pipeline.core import tracking
from pipeline.core.atomic import atomic_dir, atomic_file
from pipeline.data.masks import MASK_FOLDER, MASK_SUFFIX
from pipeline.core.errors import PipelineError
from pipeline.core.params import CLASS_NAMES, Params
from pipeline.core.paths import DEMO_DIR, REPORTS_DIR, workspace_root

# HAM10000's image counts per diagnosis (10015 images in all).
HAM_COUNTS: dict[str, int] = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
METADATA_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
FIRST_IMAGE_NUMBER = 24306  # HAM10000's image ids run from ISIC_0024306 upwards

# Images per lesion, 1..4: HAM10000 has ~1.34 images per lesion.
_IMAGES_PER_LESION_P = (0.72, 0.17, 0.07, 0.04)
# Metadata no stage reads, for the release's columns: HAM10000 confirms most nevi by follow-up and the other classes
# by histopathology, and gives ages in steps of 5.
_LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "neck")

def class_counts(total: int, min_per_class: int) -> dict[str, int]:
    """HAM10000's class frequencies scaled to ``total`` images, each class raised to a floor so rare ones stay usable.
    The floor is ``min_per_class``, at most total // 7, so nv (absorbing the difference) never drops below it."""
    floor = min(min_per_class, total // len(HAM_COUNTS))
    all_images = sum(HAM_COUNTS.values())
    counts = {c: max(floor, round(total * n / all_images)) for c, n in HAM_COUNTS.items()}
    counts["nv"] += total - sum(counts.values())
    return counts


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    """A colour varied in brightness and per channel, so one class never has a single exact colour."""
    return np.clip(np.array(rgb, np.float32) * rng.normal(1.0, amount) * rng.normal(1.0, amount * 0.35, 3), 0, 255)


def _noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Smooth value noise in about [-1, 1]: a cells×cells random grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, "F").resize((side, side), Image.Resampling.BICUBIC))
    return field / (np.abs(field).max() + 1e-6)


_ANGLES = 2048
_EXTENT = 1.5  # the canvas's half-width in units of the image's: every shifted, rotated view stays filled
# Each class's outline: uniform ranges of radius, irregular (lobes), asym (one-sided bulge), jag (fine notches) and
# edge (soft border width), drawn in that order; a bare 0.0 is fixed, not drawn.
_OUTLINES = {
    "nv": ((0.3, 0.6), (0.0, 0.08), (0, 0.05), 0.0, (0.04, 0.15)),
    "mel": ((0.4, 0.75), (0.1, 0.25), (0.05, 0.2), (0.0, 0.04), (0.03, 0.12)),
    "bkl": ((0.35, 0.7), (0.03, 0.12), (0, 0.08), (0.0, 0.015), (0.02, 0.06)),
    "bcc": ((0.3, 0.6), (0.04, 0.14), (0, 0.1), 0.0, (0.05, 0.15)),
    "akiec": ((0.35, 0.7), (0.06, 0.16), (0.02, 0.1), (0.01, 0.03), (0.12, 0.3)),
    "df": ((0.28, 0.5), (0.02, 0.08), (0, 0.06), 0.0, (0.25, 0.45)),
    "vasc": ((0.28, 0.55), (0.03, 0.12), (0, 0.08), 0.0, (0.02, 0.06)),
}


def _outline(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, class_code: str
             ) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
    """The lesion's radial coordinate t (0 centre, 1 border) on canvas coordinates (u, v), soft mask, radius, centre."""
    *ranges, edge = _OUTLINES[class_code]
    radius, irregular, asym, jag = (rng.uniform(*r) if isinstance(r, tuple) else r for r in ranges)
    cx, cy = rng.uniform(-0.18, 0.18, 2)
    angle, aspect = rng.uniform(0, math.pi), rng.uniform(1.0, 1.35)
    dx, dy = u - cx, v - cy
    x = dx * math.cos(angle) + dy * math.sin(angle)
    y = (-dx * math.sin(angle) + dy * math.cos(angle)) * aspect
    rho = np.sqrt(x * x + y * y)
    theta = np.arctan2(y, x)
    # The border radius is a function of the angle only: evaluate it on a fine 1-D grid, then look it up per pixel.
    grid = np.linspace(-math.pi, math.pi, _ANGLES, endpoint=False, dtype=np.float32)
    border = np.ones_like(grid)
    border += asym * np.cos(grid + rng.uniform(0, 2 * math.pi))
    for k in range(2, 7):
        border += irregular * rng.uniform(0.3, 1.0) / (k - 1) ** 0.6 * np.cos(k * grid + rng.uniform(0, 2 * math.pi))
    for k in (9, 13, 17):
        border += jag * rng.uniform(0.5, 1.0) * np.cos(k * grid + rng.uniform(0, 2 * math.pi))
    border = radius * np.clip(border, 0.35, None)
    index = ((theta + math.pi) * (_ANGLES / (2 * math.pi))).astype(np.int32) % _ANGLES
    t = rho / border[index]
    mask = np.clip((1.0 - t) / max(rng.uniform(*edge), 1e-3) + 0.5, 0.0, 1.0)
    return t, mask, radius, (cx, cy)


def _network(rng: np.random.Generator, side: int, cells: int, width: float) -> np.ndarray:
    """A reticular pigment network: the zero lines of smooth noise, 1 on the lines, 0 in the holes."""
    return np.clip(1.0 - np.abs(_noise(rng, side, cells)) / width, 0.0, 1.0)


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a + (b - a) * w[..., None]


def _skin(rng: np.random.Generator, side: int) -> np.ndarray:
    tone = rng.uniform(0, 1)
    base = np.array([232, 192, 172], np.float32) * (1 - tone) + np.array([190, 135, 105], np.float32) * tone
    base = base + rng.normal(0, 6, 3)
    skin = np.broadcast_to(base, (side, side, 3)).astype(np.float32)  # astype copies: skin is writable
    skin += _noise(rng, side, 5)[..., None] * rng.uniform(4, 12)
    skin[..., 1:] -= np.clip(_noise(rng, side, 4), 0, None)[..., None] * rng.uniform(0, 18)  # patchy redness
    return skin


def _draw_vessels(rng: np.random.Generator, side: int, centre: tuple[float, float], radius: float, width: float
                  ) -> np.ndarray:
    """bcc's branching (arborizing) vessels, 2 to 5 trees, as a 0..1 mask."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    scale = side / (2 * _EXTENT)

    def to_px(px: float, py: float) -> tuple[float, float]:
        return ((px + _EXTENT) * scale, (py + _EXTENT) * scale)

    for _ in range(int(rng.integers(2, 6))):
        a = rng.uniform(0, 2 * math.pi)
        r0 = radius * rng.uniform(0.2, 0.9)
        stack = [(centre[0] + r0 * math.cos(a), centre[1] + r0 * math.sin(a), rng.uniform(0, 2 * math.pi), width, 0)]
        while stack:
            x, y, heading, w, depth = stack.pop()
            for _step in range(int(rng.integers(3, 7))):
                heading += rng.normal(0, 0.45)
                step = radius * rng.uniform(0.06, 0.13)
                nx, ny = x + step * math.cos(heading), y + step * math.sin(heading)
                draw.line([to_px(x, y), to_px(nx, ny)], fill=255, width=max(1, int(round(w))))
                x, y = nx, ny
                if depth < 3 and rng.random() < 0.35:
                    stack.append((x, y, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), w * 0.7, depth + 1))
            w *= 0.8
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32) / 255.0


def _draw_hair(rng: np.random.Generator, img: Image.Image, size: int) -> None:
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in _jitter(rng, (45, 32, 28), 0.12))
    for _ in range(int(rng.integers(1, 9))):
        x, y = rng.uniform(0, img.size[0], 2)
        heading, curve = rng.uniform(0, 2 * math.pi), rng.normal(0, 0.02)
        points = []
        for _step in range(int(rng.integers(20, 60))):
            points.append((x, y))
            heading += curve
            x, y = x + 2.5 * math.cos(heading), y + 2.5 * math.sin(heading)
        draw.line(points, fill=colour, width=max(1, int(round(size / 110 * rng.uniform(0.7, 1.4)))))


def draw_lesion(rng: np.random.Generator, dx: str, size: int) -> tuple[Image.Image, np.ndarray]:
    """One lesion on skin, on a canvas 1.5× the image so every view of it (shifted, rotated) stays filled, and the
    lesion's soft mask (0..1, float32) on the same canvas: its views become the segmentation masks."""
    side = int(round(size * _EXTENT))
    axis = np.linspace(-_EXTENT, _EXTENT, side, dtype=np.float32)  # in units of the image's half-width
    u, v = np.meshgrid(axis, axis)
    colour = _skin(rng, side)
    hue = lambda rgb, amount=0.08: _jitter(rng, rgb, amount)  # noqa: E731
    fine = _noise(rng, side, max(8, side // 4))
    t, mask, radius, (cx, cy) = _outline(rng, u, v, dx)

    if dx == "nv":
        base = hue((140, 92, 62), 0.12)
        centre = np.clip(1 - t, 0, 1) * rng.uniform(0.0, 0.25)
        lesion = np.broadcast_to(base, colour.shape) * (1 - centre[..., None])
        net = _network(rng, side, max(6, side // 10), 0.12) * rng.uniform(0.0, 0.3) * np.clip(1.2 - t, 0, 1)
        lesion = lesion * (1 - net[..., None] * 0.6)
        alpha = 0.92
    elif dx == "mel":
        palette = [hue((38, 28, 26)), hue((88, 52, 36)), hue((140, 92, 62)), hue((112, 118, 140)), hue((190, 105, 100)),
                   hue((205, 192, 190), 0.04)]
        picks = rng.choice(len(palette), size=int(rng.integers(2, 5)), replace=False, p=[0.26, 0.26, 0.2, 0.1, 0.1, 0.08])
        chosen = [palette[i] for i in sorted(picks)]
        weights = np.stack([np.exp(4.0 * _noise(rng, side, int(rng.integers(3, 8)))) for _ in chosen])
        weights /= weights.sum(axis=0, keepdims=True)
        lesion = np.einsum("kij,kc->ijc", weights, np.stack(chosen))
        net = _network(rng, side, max(6, side // 9), 0.2) * rng.uniform(0.1, 0.5) * np.clip(_noise(rng, side, 4) + 0.5, 0, 1)
        lesion = lesion * (1 - net[..., None] * 0.5)
        dots = np.clip(_noise(rng, side, max(12, side // 4)) - 0.6, 0, None) * 3 * rng.uniform(0.0, 1.0)
        lesion = _lerp(lesion, hue((30, 22, 22)), np.clip(dots, 0, 1) * np.clip(1.1 - t, 0, 1))
        lesion = lesion + fine[..., None] * 8
        alpha = 0.95
    elif dx == "bkl":
        base = hue((166, 118, 82), 0.1)
        ridges = _network(rng, side, max(8, side // 10), 0.1) * rng.uniform(0.2, 0.5)
        lesion = np.broadcast_to(base, colour.shape) * (1 - ridges[..., None] * 0.45)
        lesion = lesion + fine[..., None] * 5
        cysts = np.clip(_noise(rng, side, max(10, side // 5)) - 0.75, 0, None) * 4 * rng.uniform(0.0, 1.0)
        lesion = _lerp(lesion, np.array([235, 225, 195], np.float32), np.clip(cysts, 0, 1))
        alpha = rng.uniform(0.8, 0.95)
    elif dx == "bcc":
        lesion = np.broadcast_to(hue((228, 180, 178), 0.05), colour.shape) + fine[..., None] * 4
        vessels = _draw_vessels(rng, side, (cx, cy), radius, max(1.0, size / 70))
        lesion = _lerp(lesion, hue((175, 30, 45), 0.1), vessels * rng.uniform(0.6, 0.95))
        nests = np.clip(_noise(rng, side, int(rng.integers(4, 8))) - 0.6, 0, None) * 2.5 * rng.choice([0.0, 1.0], p=[0.5, 0.5])
        lesion = _lerp(lesion, hue((110, 118, 140)), np.clip(nests, 0, 1))
        alpha = rng.uniform(0.55, 0.8)
    elif dx == "akiec":
        lesion = np.broadcast_to(hue((206, 118, 108), 0.08), colour.shape).copy()
        rough = _noise(rng, side, max(12, side // 3))
        lesion = lesion * (1 + rough[..., None] * 0.14)
        scale = np.clip(_noise(rng, side, int(rng.integers(5, 10))) - rng.uniform(0.1, 0.4), 0, None) * 3
        scale = scale * np.clip(_noise(rng, side, max(16, side // 2)) + 0.6, 0, 1)
        lesion = _lerp(lesion, hue((238, 228, 218), 0.04), np.clip(scale, 0, 0.9))
        pores = np.clip(_noise(rng, side, max(14, side // 4)) - 0.7, 0, None) * 3 * rng.uniform(0.0, 1.0)
        lesion = _lerp(lesion, np.array([240, 215, 205], np.float32), np.clip(pores, 0, 1))
        alpha = rng.uniform(0.7, 0.9)
    elif dx == "df":
        net = _network(rng, side, max(6, side // 10), 0.15) * rng.uniform(0.2, 0.5)
        lesion = np.broadcast_to(hue((160, 110, 80), 0.1), colour.shape) * (1 - net[..., None] * 0.25)
        lesion = lesion + fine[..., None] * 4
        patch = np.clip((rng.uniform(0.4, 0.6) - t) / 0.2, 0, 1) * np.clip(1 + 0.5 * _noise(rng, side, 6), 0, 1)
        lesion = _lerp(lesion, hue((236, 218, 206), 0.03), patch)
        alpha = rng.uniform(0.6, 0.85)
    else:  # vasc
        lesion = np.broadcast_to(hue((205, 160, 158), 0.05), colour.shape).copy()  # the septa's colour
        purple = rng.uniform(0, 1)  # some lesions red, some purple, mixed within one
        for _ in range(int(rng.integers(8, 20))):
            a, r = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0, 0.9))
            lx, ly, lr = cx + r * math.cos(a), cy + r * math.sin(a), radius * rng.uniform(0.18, 0.38)
            inside = np.clip((lr - np.hypot(u - lx, v - ly)) / (lr * 0.3), 0, 1)
            w = np.clip(purple + rng.normal(0, 0.25), 0, 1)
            shade = np.array((165, 35, 50), np.float32) * (1 - w) + np.array((95, 30, 75), np.float32) * w
            shade = _jitter(rng, tuple(shade * rng.uniform(0.7, 1.05)), 0.04)
            lesion = _lerp(lesion, shade, inside * 0.95)
        alpha = 0.95

    weight = (mask * alpha)[..., None]
    colour = colour * (1 - weight) + np.asarray(lesion, np.float32) * weight
    img = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        _draw_hair(rng, img, size)
    return img, mask.astype(np.float32)


def _frame(canvas: Image.Image, size: int, angle: float, shift: np.ndarray) -> Image.Image:
    """The ``size``-pixel crop of a canvas rotated by ``angle`` about its centre and shifted by ``shift`` pixels."""
    side = canvas.size[0]
    rotated = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, center=(side / 2, side / 2)) if angle else canvas
    left, top = (side - size) / 2 + shift[0], (side - size) / 2 + shift[1]
    return rotated.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + size, top + size))


def view(rng: np.random.Generator, canvas: Image.Image, mask: np.ndarray, size: int, first: bool) -> tuple[Image.Image, Image.Image]:
    """One photo of a lesion: a slightly shifted/rotated crop of its canvas, new lighting, dermoscope vignette; and
    its segmentation mask (mode "L", 0/255): the same crop of the soft mask, thresholded at 0.5."""
    angle = 0.0 if first else rng.uniform(-25, 25)
    shift = np.zeros(2) if first else rng.uniform(-0.06, 0.06, 2) * size
    crop = _frame(canvas, size, angle, shift)
    segmentation = np.asarray(_frame(Image.fromarray(mask, "F"), size, angle, shift)) >= 0.5
    arr = np.asarray(crop, dtype=np.float32)
    arr = arr * rng.normal(1.0, 0.05) * rng.normal(1.0, 0.025, 3) + rng.normal(0, 4)
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    r = np.hypot(*np.meshgrid(axis, axis))
    scope = rng.uniform(0.95, 1.45)  # >1.41: the scope's circle lies outside the frame
    light = np.clip((scope - r) / 0.08, 0, 1) * (1 - 0.12 * r**2)
    arr = arr * light[..., None] + 12 * (1 - light[..., None])
    arr += rng.normal(0, 2.5, arr.shape).astype(np.float32)
    photo = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return photo, Image.fromarray(segmentation.astype(np.uint8) * 255, "L")


def plan(seed: int, images: int, min_per_class: int) -> pd.DataFrame:
    """The metadata table of the demo set (one row per image, HAM10000's columns + lesion index and view number)."""
    rng = np.random.default_rng([seed, 7919])
    counts = class_counts(images, min_per_class)
    lesions: list[tuple[str, int]] = []  # (dx, images of this lesion)
    for dx in sorted(counts):
        left = counts[dx]
        while left > 0:
            n = min(left, int(rng.choice(4, p=_IMAGES_PER_LESION_P)) + 1)
            lesions.append((dx, n))
            left -= n
    lesion_numbers = rng.choice(max(10000, 2 * len(lesions)), size=len(lesions), replace=False)
    image_numbers = FIRST_IMAGE_NUMBER + rng.permutation(images)
    if image_numbers.max() > 9_999_999:
        raise PipelineError(f"demo.images={images} is too large for 7-digit ISIC image ids")
    rows = []
    for index, ((dx, n), number) in enumerate(zip(lesions, lesion_numbers)):
        dx_type = "follow_up" if dx == "nv" and rng.random() < 0.55 else "histo"
        age = f"{float(np.clip(round(rng.normal(55, 15) / 5) * 5, 0, 85)):.1f}"
        sex, site = str(rng.choice(["male", "female"])), str(rng.choice(_LOCALIZATIONS))
        rows += [{"lesion_id": f"HAM_{number:07d}", "dx": dx, "dx_type": dx_type, "age": age, "sex": sex,
                  "localization": site, "lesion_index": index, "view": view_number} for view_number in range(n)]
    table = pd.DataFrame(rows)
    table.insert(1, "image_id", [f"ISIC_{number:07d}" for number in image_numbers])  # image numbers in row order
    return table


def write_demo(target: str | Path, seed: int, images: int, size: int, min_per_class: int) -> pd.DataFrame:
    """Draw the demo set, images and lesion masks, into ``target`` (the HAM10000 folder) in the release's layout."""
    target = Path(target)
    table = plan(seed, images, min_per_class)
    split_at = FIRST_IMAGE_NUMBER + (images + 1) // 2  # like the release: lower ids in part 1
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2", MASK_FOLDER):
        (target / part).mkdir(parents=True, exist_ok=True)
    canvas, soft_mask, current = None, None, -1
    for row in tqdm(table.itertuples(index=False), total=len(table), desc="drawing demo images", unit="img",
                    disable=None, mininterval=2):
        if row.lesion_index != current:
            current = row.lesion_index
            canvas, soft_mask = draw_lesion(np.random.default_rng([seed, current, 1]), row.dx, size)
        img, segmentation = view(np.random.default_rng([seed, current, row.view, 2]), canvas, soft_mask, size,
                                 first=row.view == 0)
        part = "HAM10000_images_part_1" if int(row.image_id[5:]) < split_at else "HAM10000_images_part_2"
        # Fixed quality and subsampling, no EXIF or timestamps: the same pixels always give the same bytes.
        img.save(target / part / f"{row.image_id}.jpg", "JPEG", quality=90, subsampling=2, optimize=False)
        segmentation.save(target / MASK_FOLDER / f"{row.image_id}{MASK_SUFFIX}", "PNG")
    metadata = table.sort_values(["dx", "lesion_id", "image_id"])[METADATA_COLUMNS]
    metadata.to_csv(target / "HAM10000_metadata.csv", index=False, lineterminator="\n")
    return table


def write_grid(folder: Path, table: pd.DataFrame, target: Path) -> None:
    """A labelled grid, one row per class, of the first images of distinct lesions: a glance at what was drawn."""
    per_class, cell, label_width, pad = 6, 96, 190, 4
    classes = [c for c in CLASS_NAMES if c in set(table["dx"])]
    grid = Image.new("RGB", (label_width + per_class * (cell + pad), len(classes) * (cell + pad) + pad), "white")
    draw, font, code_font = ImageDraw.Draw(grid), ImageFont.load_default(size=15), ImageFont.load_default(size=20)
    for r, dx in enumerate(classes):
        y = pad + r * (cell + pad)
        draw.text((8, y + cell // 2 - 18), dx, fill="black", font=code_font)
        draw.text((8, y + cell // 2 + 6), CLASS_NAMES[dx], fill=(70, 70, 70), font=font)
        firsts = table[(table["dx"] == dx) & (table["view"] == 0)].sort_values("image_id").head(per_class)
        for c, image_id in enumerate(firsts["image_id"]):
            path = next(folder.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
            with Image.open(path) as img:
                grid.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR), (label_width + c * (cell + pad), y))
    with atomic_file(target) as temp:
        grid.save(temp, "PNG")


def make_demo(params: Params) -> dict:
    """The demo_data stage: write data/demo/HAM10000 + reports/demo_grid.png, or only a SKIPPED marker for real data."""
    root = workspace_root()
    demo_root, grid = root / DEMO_DIR.parent, root / REPORTS_DIR / "demo_grid.png"  # DEMO_DIR.parent: the DVC output
    if not params.data.is_demo:
        with atomic_dir(demo_root) as temp:
            (temp / "SKIPPED").write_text(
                f"data.source is {params.data.source!r}: the prepare stage reads that folder, no demo images were drawn.\n"
            )
        # The grid stays an output (DVC requires it) when a real data folder replaces the demo.
        placeholder = Image.new("RGB", (520, 60), "white")
        text = f"real data source: {params.data.source} (no demo images drawn)"
        ImageDraw.Draw(placeholder).text((10, 20), text, fill="black", font=ImageFont.load_default(size=14))
        with atomic_file(grid) as temp:
            placeholder.save(temp, "PNG")
        return {"skipped": True}
    demo = params.demo
    with atomic_dir(demo_root) as temp:
        table = write_demo(temp / DEMO_DIR.name, params.seed, demo.images, demo.size, demo.min_per_class)
        write_grid(temp / DEMO_DIR.name, table, grid)
    counts = table["dx"].value_counts().to_dict()
    summary = {"images": len(table), "lesions": int(table["lesion_index"].nunique()), **{f"images.{k}": v for k, v in counts.items()}}
    tracking.log_metrics(summary)
    tracking.log_artifact(grid)
    return summary
