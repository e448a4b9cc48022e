"""Weight-free line extractors: four visibly different line styles from classic operators.

The paper trains on four sketch variants per image so that the colorizer does not overfit one line
style. Without network weights we get that diversity from four operators: XDoG (soft, ink-like strokes),
a blur-difference "pencil" line art (thin, pressure-like), Canny (hard one-pixel edges) and a
sketchKeras-style color high-pass (lines from color changes, not only luminance). The neural
extractors of :mod:`pipelines.data.neural_lines` are the selectable alternatives.

Every extractor maps (H, W, 3) uint8 RGB → (H, W) uint8 drawing: dark lines on white. Storage and the
model use the inverted form (:func:`invert`): lines bright on a dark field.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def _scale(image: np.ndarray) -> float:
    """Operator widths follow the image size so a 128 px tiny crop and a 1 MP crop look alike."""
    return max(image.shape[:2]) / 1024.0


def xdog(image: np.ndarray, sigma: float = 0.8, k: float = 1.6, sharpen: float = 20.0, epsilon: float = 0.08,
         phi: float = 40.0) -> np.ndarray:
    """eXtended Difference of Gaussians (Winnemöller et al. 2012): the sharpened image
    (1 + p)·G_σ − p·G_kσ, soft-thresholded, so edges and the darkest inks become strokes."""
    gray = _gray(image)
    s = max(0.5, sigma * _scale(image) * 1.5)
    narrow = cv2.GaussianBlur(gray, (0, 0), s)
    wide = cv2.GaussianBlur(gray, (0, 0), s * k)
    sharpened = (1 + sharpen) * narrow - sharpen * wide
    lines = np.where(sharpened >= epsilon, 1.0, 1.0 + np.tanh(phi * (sharpened - epsilon)))
    return (np.clip(lines, 0, 1) * 255).astype(np.uint8)


def blur_difference(image: np.ndarray, sigma: float = 3.0, gain: float = 6.0) -> np.ndarray:
    """Pencil-style line art: pixels darker than their blurred neighbourhood become strokes."""
    gray = _gray(image)
    blurred = cv2.GaussianBlur(gray, (0, 0), max(0.8, sigma * _scale(image) * 1.5))
    darker = np.clip(blurred - gray, 0, None)
    return (np.clip(1.0 - gain * darker, 0, 1) * 255).astype(np.uint8)


def canny(image: np.ndarray) -> np.ndarray:
    """Canny edges with thresholds set from the median intensity, one pixel wide, black on white."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    gray = cv2.GaussianBlur(gray, (0, 0), max(0.6, 1.0 * _scale(image) * 1.5))
    median = float(np.median(gray))
    low, high = int(max(10, 0.66 * median)), int(min(255, max(40, 1.33 * median)))
    edges = cv2.Canny(gray, low, high)
    return (255 - edges).astype(np.uint8)


def highpass(image: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """sketchKeras-style: the per-channel high-pass of the color image, strongest channel, normalized.
    Catches boundaries between regions of equal brightness but different hue. (Blurred in uint8, where
    OpenCV's Gaussian is several times faster than in float.)"""
    blurred = cv2.GaussianBlur(image, (0, 0), max(0.8, sigma * _scale(image) * 1.5))
    detail = cv2.subtract(blurred, image).max(axis=2)  # saturating: only pixels darker than their surround
    peak = max(float(np.percentile(detail, 99.5)), 8.0)
    return (255 - np.clip(detail.astype(np.float32) * (255.0 / peak), 0, 255)).astype(np.uint8)


CLASSIC_EXTRACTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "xdog": xdog,
    "blur_difference": blur_difference,
    "canny": canny,
    "highpass": highpass,
}
DEFAULT_EXTRACTORS = tuple(CLASSIC_EXTRACTORS)


def extract_drawing(image: np.ndarray, extractor: str) -> np.ndarray:
    """A colored or photographed drawing (H, W, 3) uint8 → its line drawing as the model takes a sketch
    (dark lines on white, RGB): what the API's ``extract_lines``, the colorize command and the batch job do."""
    if extractor not in CLASSIC_EXTRACTORS:
        raise ValueError(f"line extractor must be one of {', '.join(CLASSIC_EXTRACTORS)}, got {extractor!r}")
    return np.repeat(CLASSIC_EXTRACTORS[extractor](image)[..., None], 3, axis=2)


def invert(drawing: np.ndarray) -> np.ndarray:
    """Drawing (dark lines on white) ↔ stored sketch (bright lines on black); its own inverse."""
    return 255 - drawing
