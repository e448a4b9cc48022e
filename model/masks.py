"""Weight-free foreground masks for stage 2 (split attention needs foreground vs background).

Reference images: the background is whatever connects to the border and looks like the border's color
(illustrations mostly sit on a flat or gently varying backdrop). Sketches: the background is the paper
reachable from the border without crossing a line; regions enclosed by strokes are foreground. The
learned alternative (:mod:`model.segmenter`) replaces both where its weights are given.

Masks are (H, W) uint8, 255 = foreground.
"""

from __future__ import annotations

import cv2
import numpy as np


def _border_connected(candidate: np.ndarray) -> np.ndarray:
    """Pixels of ``candidate`` (bool) connected to the image border."""
    count, labels = cv2.connectedComponents(candidate.astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = border[border != 0]
    return np.isin(labels, border) & candidate


def _clean(foreground: np.ndarray, size: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    mask = cv2.morphologyEx(foreground.astype(np.uint8) * 255, cv2.MORPH_OPEN, kernel)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)


def reference_foreground(image: np.ndarray, step_tolerance: int = 3, seeds_per_side: int = 16) -> np.ndarray:
    """(H, W, 3) uint8 RGB → mask. Background: flood fills from points along the border that spread while
    neighbouring pixels differ by at most ``step_tolerance`` per channel, so smooth gradients and flat
    backdrops are followed but outlines stop them."""
    height, width = image.shape[:2]
    smooth = cv2.GaussianBlur(image, (3, 3), 0)
    fill = np.zeros((height + 2, width + 2), np.uint8)
    tolerance = (step_tolerance,) * 3
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | (255 << 8)
    xs = np.linspace(0, width - 1, seeds_per_side).astype(int)
    ys = np.linspace(0, height - 1, seeds_per_side).astype(int)
    seeds = [(x, 0) for x in xs] + [(x, height - 1) for x in xs] + [(0, y) for y in ys] + [(width - 1, y) for y in ys]
    for x, y in seeds:
        if fill[y + 1, x + 1] == 0:
            cv2.floodFill(smooth, fill, (int(x), int(y)), 0, tolerance, tolerance, flags)
    background = fill[1:-1, 1:-1] > 0
    size = max(3, (max(height, width) // 128) | 1)
    return _clean(~background, size)


def sketch_foreground(drawing: np.ndarray, line_threshold: int = 160) -> np.ndarray:
    """(H, W) uint8 drawing (dark lines on white) → mask of the line work and the regions it encloses."""
    lines = drawing < line_threshold
    size = max(3, (max(drawing.shape) // 256) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    closed = cv2.dilate(lines.astype(np.uint8), kernel) > 0  # bridge small gaps in the strokes
    background = _border_connected(~closed)
    return _clean(~background, size)
