"""Synthetic illustrations for demos and tests: flat-colored shapes with dark outlines on a flat background,
plus the matching line drawing, and whole corpora of them on disk (:func:`write_corpus`).
Deterministic under a seed; no data set needed.

The pictures are made to be *learnable* by a colorizer: every picture draws its own small palette, and
each kind of region (its *role*) always takes the same palette slot: the background slot 0, ellipses
slot 1, triangles slot 2, pentagons slot 3 (:data:`ROLES`). The line drawing shows which region has which
role (its outline's shape), and any other picture shows which color each role takes there, so a sketch
colorized after another picture's reference should come out in that reference's colors inside the
sketch's own regions. Every role appears in every picture, so every reference carries every color.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROLES = ("background", "ellipse", "triangle", "pentagon")  # role i takes palette slot i
OUTLINE = (20, 20, 20)


@dataclass
class Illustration:
    color: np.ndarray  # (H, W, 3) uint8 RGB
    sketch: np.ndarray  # (H, W) uint8, dark lines on white
    palette: np.ndarray | None = None  # (len(ROLES), 3) uint8 RGB: the color of each role's regions


def synthetic_palette(rng: np.random.Generator) -> np.ndarray:
    """(len(ROLES), 3) uint8: a light, soft background color and three saturated shape colors whose hues
    are spread around the wheel from a random start (so the shape roles never share a color), in a random
    order (so no role owns a hue across pictures)."""
    start = rng.uniform(0, 1)
    hues = (start + np.arange(len(ROLES) - 1) / (len(ROLES) - 1) + rng.uniform(-0.08, 0.08, len(ROLES) - 1)) % 1
    rng.shuffle(hues)
    colors = [colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.05, 0.35), rng.uniform(0.85, 1.0))]
    colors += [colorsys.hsv_to_rgb(h, rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95)) for h in hues]
    return (np.asarray(colors) * 255).round().astype(np.uint8)


def synthetic_illustration(seed: int, width: int = 256, height: int = 256, shapes: int = 6) -> Illustration:
    """A picture of ``max(shapes, 3)`` outlined shapes (each shape role at least once) over its background,
    colored from its own palette (:func:`synthetic_palette`), and its line drawing."""
    rng = np.random.default_rng(seed)
    palette = synthetic_palette(rng)
    color = np.empty((height, width, 3), np.uint8)
    color[:] = palette[0]
    lines = np.full((height, width), 255, np.uint8)
    thickness = max(1, min(width, height) // 96)
    roles = [int(r) for r in rng.integers(1, len(ROLES), size=max(0, shapes - 3))] + list(rng.permutation([1, 2, 3]))
    for role in roles:
        _draw_shape(color, lines, rng, role, palette, thickness)
    for _ in range(8):  # a role hidden under later shapes is drawn again, on top, until every role shows
        hidden = [r for r in range(1, len(ROLES)) if np.all(color == palette[r], axis=2).mean() < 0.01]
        if not hidden:
            break
        _draw_shape(color, lines, rng, hidden[0], palette, thickness)
    return Illustration(color=color, sketch=lines, palette=palette)


def _draw_shape(color: np.ndarray, lines: np.ndarray, rng: np.random.Generator, role: int, palette: np.ndarray,
                thickness: int) -> None:
    """One outlined shape of ``role``, filled with its palette color, into the picture and the drawing."""
    height, width = lines.shape
    fill = tuple(int(v) for v in palette[role])
    cx, cy = int(rng.integers(width // 8, width - width // 8)), int(rng.integers(height // 8, height - height // 8))
    radius = float(rng.uniform(min(width, height) / 9, min(width, height) / 4.5))
    if ROLES[role] == "ellipse":
        axes = (int(radius), int(radius * rng.uniform(0.55, 1.0)))
        args = ((cx, cy), axes, float(rng.integers(0, 180)), 0.0, 360.0)
        cv2.ellipse(color, *args, fill, -1, cv2.LINE_AA)
        cv2.ellipse(color, *args, OUTLINE, thickness + 1, cv2.LINE_AA)
        cv2.ellipse(lines, *args, 255, -1)  # a shape hides the lines beneath it
        cv2.ellipse(lines, *args, 0, thickness, cv2.LINE_AA)
    else:
        points = _regular_polygon(rng, (cx, cy), radius, corners=3 if ROLES[role] == "triangle" else 5)
        cv2.fillPoly(color, [points], fill, cv2.LINE_AA)
        cv2.polylines(color, [points], True, OUTLINE, thickness + 1, cv2.LINE_AA)
        cv2.fillPoly(lines, [points], 255)
        cv2.polylines(lines, [points], True, 0, thickness, cv2.LINE_AA)


def _regular_polygon(rng: np.random.Generator, center: tuple[int, int], radius: float, corners: int) -> np.ndarray:
    """(corners, 2) int32: a regular polygon, turned and slightly jittered, so its corner count stays
    readable from the outline alone."""
    angles = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
    angles += rng.uniform(-0.12, 0.12, corners)
    radii = radius * rng.uniform(0.9, 1.1, corners)
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1).astype(np.int32)


# ------------------------------------------------------------------------------------- a corpus on disk
SIZES = ((256, 256), (320, 192), (192, 320), (288, 224), (240, 300))


def write_corpus(out: Path, count: int, with_bad_files: bool = False, seed: int = 0) -> dict:
    """Write ``count`` synthetic illustrations under ``out`` the way a scraped corpus looks to the preprocess
    job: PNG and JPEG with mixed-case extensions in nested folders, at several aspect ratios. With
    ``with_bad_files``, one file of each kind of damage the job must survive (empty, truncated, not an
    image, corrupt bytes, too small) and a file that is not an input at all."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        picture = synthetic_illustration(seed=seed * 100_003 + i, width=width, height=height)
        folder = out / f"set{i % 3}"
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(picture.color)
        if i % 4 == 3:
            path = folder / f"img_{i:05d}.JPG"
            image.save(path, format="JPEG", quality=92)
        else:
            path = folder / f"img_{i:05d}.png"
            image.save(path, format="PNG")
        written += 1
    bad = 0
    if with_bad_files:
        broken = out / "broken"
        broken.mkdir(exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(synthetic_illustration(seed=999, width=128, height=128).color).save(png, format="PNG")
        samples = {
            "empty.png": b"",
            "truncated.png": png.getvalue()[: len(png.getvalue()) // 3],
            "not_an_image.jpg": b"<html><body>404 not found</body></html>",
            "random_bytes.webp": bytes(range(256)) * 4,
            "tiny.png": _tiny_png(),
        }
        for name, data in samples.items():
            (broken / name).write_bytes(data)
        (broken / "README.txt").write_text("not an input: no image extension\n")
        bad = len(samples)
    return {"corpus": str(out), "images": written, "bad_files": bad}


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()
