"""Assembling a model folder from a preset and, optionally, published weights.

The folder this writes is the starting point of training and holds the frozen encoders that the
preprocess job uses, so both read the same weights. Parts without a weight file are initialized from
the seed, so the same preset and seed always give the same folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.colorizer import Colorizer, PretrainedPaths, is_model_folder
from model.config import get_preset


def init_model(out: str | Path, preset: str, seed: int = 0, paths: PretrainedPaths | None = None) -> Path:
    """Write the model folder ``out`` (left as it is when it already holds a model) and return its path."""
    out = Path(out)
    if is_model_folder(out):
        return out
    torch.manual_seed(seed)
    return Colorizer.from_config(get_preset(preset), paths, progress=True).save_pretrained(out)
