"""References "deformed from the ground truth" for the paper's PSNR, MS-SSIM and CLIP columns.

A colorizer given the ground truth itself as reference could copy it pixel by pixel; the paper's protocol
instead hands it a geometrically and photometrically perturbed copy, so those columns measure whether the
colors land in the right places, not copying. Parameters are drawn once per sample from the evaluation's
seed (:func:`draw_deformation`), so every run, batch order and worker sees the same references.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Deformation:
    """One reference's perturbation: affine (degrees, scale, shift as fractions of the size), a smooth
    elastic warp (peak displacement as a fraction of the smaller side, its noise seed) and color jitter
    (brightness and contrast factors, saturation factor, hue shift in degrees)."""

    angle: float
    scale: float
    shift_x: float
    shift_y: float
    elastic: float
    elastic_seed: int
    brightness: float
    contrast: float
    saturation: float
    hue: float

    def to_json(self) -> dict:
        return asdict(self)


def draw_deformation(rng: np.random.Generator) -> Deformation:
    """Mild perturbations: ±10°, ×0.9–1.1, ±5 % shift, ≤2 % elastic, ±10 % light and saturation, ±5° hue."""
    return Deformation(
        angle=float(rng.uniform(-10, 10)), scale=float(rng.uniform(0.9, 1.1)),
        shift_x=float(rng.uniform(-0.05, 0.05)), shift_y=float(rng.uniform(-0.05, 0.05)),
        elastic=float(rng.uniform(0.0, 0.02)), elastic_seed=int(rng.integers(2**31)),
        brightness=float(rng.uniform(0.9, 1.1)), contrast=float(rng.uniform(0.9, 1.1)),
        saturation=float(rng.uniform(0.9, 1.1)), hue=float(rng.uniform(-5, 5)),
    )


def _elastic_maps(height: int, width: int, amount: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampling maps of a smooth random warp: a 4×4 grid of random displacements, upsampled bicubically."""
    rng = np.random.default_rng(seed)
    peak = amount * min(height, width)
    coarse = rng.uniform(-1, 1, size=(2, 4, 4)).astype(np.float32) * peak
    dx = cv2.resize(coarse[0], (width, height), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(coarse[1], (width, height), interpolation=cv2.INTER_CUBIC)
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return grid_x + dx, grid_y + dy


def deform_reference(image: np.ndarray, d: Deformation) -> np.ndarray:
    """(H, W, 3) uint8 RGB → the same size, warped and color-jittered; borders are mirrored so no flat
    band appears that the ground truth does not have."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), d.angle, d.scale)
    matrix[:, 2] += (d.shift_x * width, d.shift_y * height)
    warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if d.elastic > 0:
        map_x, map_y = _elastic_maps(height, width, d.elastic, d.elastic_seed)
        warped = cv2.remap(warped, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    hsv = cv2.cvtColor(warped, cv2.COLOR_RGB2HSV).astype(np.float32)  # H in [0, 180)
    hsv[..., 0] = (hsv[..., 0] + d.hue / 2) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * d.saturation, 0, 255)
    rgb = cv2.cvtColor(hsv.round().astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = rgb.mean()
    rgb = (rgb - mean) * d.contrast + mean * d.brightness
    return np.clip(rgb, 0, 255).round().astype(np.uint8)
