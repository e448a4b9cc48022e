"""Output sizes: every side a multiple of the latent stride times the U-Net's downsampling (32 px at both
presets), within the preset's side limits. Explicit sizes are checked and refused with the reason; an
absent size is fitted to the sketch's aspect ratio at the preset's default area.
"""

from __future__ import annotations

import math


def validate_size(width: int, height: int, *, multiple: int, min_side: int, max_side: int) -> tuple[int, int]:
    problems = []
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an integer, got {value!r}")
        elif value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            problems.append(f"{name} {value} is not a multiple of {multiple} (try {lower} or {upper})")
        elif not min_side <= value <= max_side:
            problems.append(f"{name} {value} is outside [{min_side}, {max_side}]")
    if problems:
        raise ValueError("invalid output size: " + "; ".join(problems))
    return width, height


def fit_size(aspect_width: int, aspect_height: int, *, area: int, multiple: int, min_side: int,
             max_side: int) -> tuple[int, int]:
    """The (width, height) closest to ``area`` pixels with the given aspect, on the size grid."""
    if aspect_width <= 0 or aspect_height <= 0:
        raise ValueError(f"cannot fit a size to a {aspect_width}x{aspect_height} image")
    aspect = aspect_width / aspect_height
    width = math.sqrt(area * aspect)
    height = width / aspect

    def snap(value: float) -> int:
        snapped = int(round(value / multiple)) * multiple
        return max(min_side, min(max_side, snapped))

    return snap(width), snap(height)
