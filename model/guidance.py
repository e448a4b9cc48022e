"""Dual classifier-free guidance over the reference and the sketch.

Reference-unconditional means a zeroed context; sketch-unconditional means the empty (all −1) sketch.
With both scales above 1 the two guided predictions are averaged, so neither condition is extrapolated
twice. Only the predictions a setting needs are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    reference: float = 4.5
    sketch: float = 1.0

    def __post_init__(self):
        for name in ("reference", "sketch"):
            value = getattr(self, name)
            if not 0.0 <= value <= 30.0:
                raise ValueError(f"{name} guidance {value} is outside [0, 30]")

    @property
    def conditions(self) -> tuple[str, ...]:
        """Which model evaluations a step needs, in batch order."""
        needed = ["full"]
        if self.reference != 1.0:
            needed.append("no_reference")
        if self.sketch != 1.0:
            needed.append("no_sketch")
        return tuple(needed)


def guided_prediction(predictions: dict[str, torch.Tensor], guidance: Guidance) -> torch.Tensor:
    """Combine ``{"full", "no_reference", "no_sketch"}`` predictions (each (B, C, h, w))."""
    full = predictions["full"]
    guided = []
    if "no_reference" in predictions:
        guided.append(predictions["no_reference"] + guidance.reference * (full - predictions["no_reference"]))
    if "no_sketch" in predictions:
        guided.append(predictions["no_sketch"] + guidance.sketch * (full - predictions["no_sketch"]))
    if not guided:
        return full
    return sum(guided) / len(guided)
