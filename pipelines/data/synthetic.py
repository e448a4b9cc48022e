"""Synthetic illustrations for demos and tests: flat-colored shapes with dark outlines over a gradient
background, plus the matching line drawing, and whole corpora of them on disk (:func:`write_corpus`).
Deterministic under a seed; no data set needed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


@dataclass
class Illustration:
    color: np.ndarray  # (H, W, 3) uint8 RGB
    sketch: np.ndarray  # (H, W) uint8, dark lines on white


def synthetic_illustration(seed: int, width: int = 256, height: int = 256, shapes: int = 6) -> Illustration:
    rng = np.random.default_rng(seed)
    color = _background(rng, width, height)
    lines = np.full((height, width), 255, np.uint8)
    thickness = max(1, min(width, height) // 96)
    for _ in range(shapes):
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 3)
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        rx, ry = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
        if kind == 0:
            args = ((cx, cy), (rx, ry), float(rng.integers(0, 180)), 0.0, 360.0)
            cv2.ellipse(color, *args, fill, -1, cv2.LINE_AA)
            cv2.ellipse(color, *args, (20, 20, 20), thickness + 1, cv2.LINE_AA)
            cv2.ellipse(lines, *args, 255, -1)  # a shape hides the lines beneath it
            cv2.ellipse(lines, *args, 0, thickness, cv2.LINE_AA)
        else:
            count = 3 if kind == 1 else 5
            angles = np.sort(rng.uniform(0, 2 * np.pi, count))
            points = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1).astype(np.int32)
            cv2.fillPoly(color, [points], fill, cv2.LINE_AA)
            if rng.random() < 0.4:  # hatching texture inside some shapes
                _hatch(color, points, rng)
            cv2.polylines(color, [points], True, (20, 20, 20), thickness + 1, cv2.LINE_AA)
            cv2.fillPoly(lines, [points], 255)
            cv2.polylines(lines, [points], True, 0, thickness, cv2.LINE_AA)
    return Illustration(color=color, sketch=lines)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """White paper, a vertical gradient, or soft stripes: the backdrops illustrations sit on."""
    kind = rng.integers(0, 3)
    if kind == 0:
        return np.full((height, width, 3), 255, np.uint8)
    top, bottom = rng.integers(80, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    color = (top * (1 - ramp) + bottom * ramp).astype(np.uint8).repeat(width, axis=1)
    if kind == 2:
        stripes = (np.sin(np.arange(width) / max(2.0, width / 24)) > 0)[None, :, None]
        color = np.where(stripes, color, (color * 0.85).astype(np.uint8))
    return np.ascontiguousarray(color)


def _hatch(color: np.ndarray, polygon: np.ndarray, rng: np.random.Generator) -> None:
    mask = np.zeros(color.shape[:2], np.uint8)
    cv2.fillPoly(mask, [polygon], 255)
    spacing = max(3, color.shape[1] // 40)
    shade = tuple(int(v) for v in rng.integers(0, 200, size=3))
    lines = np.zeros_like(mask)
    for offset in range(-color.shape[0], color.shape[1], spacing):
        cv2.line(lines, (offset, 0), (offset + color.shape[0], color.shape[0]), 255, 1)
    color[(mask > 0) & (lines > 0)] = shade


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
