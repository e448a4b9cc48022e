"""Aspect-ratio buckets: every training crop has one of a few sizes of about the same pixel count, so a
batch drawn from one bucket stacks without padding and no illustration is squashed.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from model.config import ColorizerConfig


def aspect_buckets(area: int, multiple: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """(width, height) pairs on the ``multiple`` grid, each the largest height with w·h ≤ area for its
    width, within the side limits; closed under transposition; sorted by aspect (portrait first)."""
    buckets = set()
    first = math.ceil(min_side / multiple) * multiple
    for width in range(first, max_side + 1, multiple):
        height = min(max_side, area // width // multiple * multiple)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    if not buckets:
        raise ValueError(f"no bucket fits area {area} with sides in [{min_side}, {max_side}] on a {multiple} grid")
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def buckets_for(config: ColorizerConfig) -> list[tuple[int, int]]:
    d = config.data
    return aspect_buckets(d.bucket_area, config.size_multiple, d.bucket_min_side, d.bucket_max_side)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def crop_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Scale to cover the bucket, then center-crop: (H, W, C) → (bucket_h, bucket_w, C)."""
    width, height = bucket
    scale = max(width / image.shape[1], height / image.shape[0])
    scaled_w, scaled_h = max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale))
    scaled = resize(image, scaled_w, scaled_h)
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    return np.ascontiguousarray(scaled[top:top + height, left:left + width])


def letterbox(image: np.ndarray, bucket: tuple[int, int], fill: int = 255) -> np.ndarray:
    """Scale to fit inside the bucket, keeping all of the image, and pad with white: the reference view."""
    width, height = bucket
    scale = min(width / image.shape[1], height / image.shape[0])
    fit_w, fit_h = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))
    canvas = np.full((height, width) + image.shape[2:], fill, dtype=image.dtype)
    left, top = (width - fit_w) // 2, (height - fit_h) // 2
    canvas[top:top + fit_h, left:left + fit_w] = resize(image, fit_w, fit_h)
    return canvas
