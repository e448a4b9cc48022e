"""Conversions between user images (PIL / uint8 arrays) and model tensors.

Colors: RGB floats in [0, 1] for the encoders, [-1, 1] for the VAE. Sketches: users hand in ordinary
drawings (dark lines on a light page); the model sees them as RGB inverted, lines bright on a dark field
in [-1, 1], so that an all −1 image means "no sketch". A drawing is letterboxed into the output size (its
aspect kept, the margins empty), as the published model's own preprocessing does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_rgb_array(image) -> np.ndarray:
    """PIL image or (H, W[, C]) uint8 array → (H, W, 3) uint8, alpha composited on white."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    if array.shape[2] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255
        array = (array[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return array


def image_to_tensor(image) -> torch.Tensor:
    """→ (1, 3, H, W) float RGB in [0, 1]."""
    array = to_rgb_array(image)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def letterbox(image: Image.Image, size: tuple[int, int], fill=(255, 255, 255)) -> Image.Image:
    """``image`` scaled (bicubic, aspect kept) to fit ``size`` = (width, height) and centered on ``fill``."""
    width, height = size
    scale = min(height / image.height, width / image.width)
    inner = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image.resize(inner, Image.Resampling.BICUBIC), ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def sketch_to_tensor(image, size: tuple[int, int]) -> torch.Tensor:
    """A drawing (dark lines on light, PIL or uint8 array) → (1, 3, height, width) inverted RGB sketch in
    [-1, 1], letterboxed into ``size`` = (width, height): the margins are empty (−1)."""
    page = letterbox(Image.fromarray(to_rgb_array(image)), size)
    rgb = torch.from_numpy(np.asarray(page).copy()).permute(2, 0, 1)[None].float() / 255
    return 1 - 2 * rgb


def empty_sketch(batch: int, height: int, width: int, device=None, dtype=torch.float32, channels: int = 3) -> torch.Tensor:
    """The "no sketch" input: all −1 (used by sketch dropout and sketch-unconditional guidance)."""
    return torch.full((batch, channels, height, width), -1.0, device=device, dtype=dtype)


def tensor_to_image(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL RGB images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]
