"""Pictures for experiment tracking: sample grids and Gram-matrix heat maps (the paper's Figs. 3 and 6).

A Gram heat map shows, for one query token, its cosine similarity to every other token of the same
feature map: the region the network groups with that point. Side by side for the aligned and the
misaligned branch, it shows whether the reference moved the sketch's segmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.gram import gram_matrix


def heat_colors(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (H, W) → RGB uint8, dark blue → yellow."""
    v = np.clip(values, 0, 1)[..., None]
    low, mid, high = np.array([20, 30, 90.0]), np.array([200, 60, 90.0]), np.array([250, 230, 80.0])
    rgb = np.where(v < 0.5, low + (mid - low) * (v * 2), mid + (high - mid) * (v * 2 - 1))
    return rgb.astype(np.uint8)


def gram_heat_map(features: torch.Tensor, query: tuple[float, float] = (0.5, 0.5), cell: int = 96) -> Image.Image:
    """(C, h, w) features → heat map of the query token's row of the Gram matrix, upscaled to ``cell``
    pixels high, with the query marked."""
    _, h, w = features.shape
    qy, qx = min(h - 1, int(query[0] * h)), min(w - 1, int(query[1] * w))
    row = gram_matrix(features[None])[0, qy * w + qx].reshape(h, w).cpu().numpy()
    image = Image.fromarray(heat_colors((row + 1) / 2)).resize((max(1, cell * w // h), cell), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    sy, sx = image.size[1] / h, image.size[0] / w
    draw.rectangle([qx * sx, qy * sy, (qx + 1) * sx - 1, (qy + 1) * sy - 1], outline=(255, 0, 0))
    return image


def grid(rows: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    """Rows of images → one picture, every image scaled to ``cell`` pixels high."""
    scaled = [[im.convert("RGB").resize((max(1, cell * im.size[0] // im.size[1]), cell)) for im in r] for r in rows]
    width = max(sum(im.size[0] for im in r) for r in scaled)
    canvas = Image.new("RGB", (width, cell * len(scaled)), (255, 255, 255))
    for y, r in enumerate(scaled):
        x = 0
        for im in r:
            canvas.paste(im, (x, y * cell))
            x += im.size[0]
    return canvas


def sketch_image(sketch: torch.Tensor) -> Image.Image:
    """Inverted model sketch (1, H, W) in [-1, 1] → drawing (dark lines on white)."""
    drawing = ((1 - (sketch[0].float().clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(drawing)

