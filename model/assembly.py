"""Assembling a model folder from a preset and, optionally, published weights.

The folder this writes is the starting point of training and holds the frozen encoders that the
preprocess job uses, so both read the same weights. A preset that ships starting weights
(:mod:`model.shipped`: the ``tiny`` VAE and pretrained colorizer) starts from them unless
``random_init`` says otherwise; published parts named in ``paths`` take precedence over shipped ones.
Parts with neither are initialized from the seed, so the same preset and seed always give the same folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from model.colorizer import Colorizer, PretrainedPaths, is_model_folder
from model.config import get_preset
from model.shipped import COLORIZER_PARTS, load_colorizer_parts, shipped_weights

PUBLISHED_PART_OF = {"unet": "unet", "tagger": "tagger_weights", "clip": "clip"}  # part -> PretrainedPaths field


def init_model(out: str | Path, preset: str, seed: int = 0, paths: PretrainedPaths | None = None,
               random_init: bool = False) -> Path:
    """Write the model folder ``out`` (left as it is when it already holds a model) and return its path.
    ``random_init``: ignore the preset's shipped weights (tests of untrained behaviour, ablations from zero)."""
    out = Path(out)
    if is_model_folder(out):
        return out
    paths = paths or PretrainedPaths()
    shipped = None if random_init else shipped_weights(preset)
    torch.manual_seed(seed)
    model = Colorizer.from_config(get_preset(preset), replace(paths, vae=paths.vae or (shipped and shipped.vae)),
                                  progress=True)
    if shipped is not None:
        parts = tuple(p for p in COLORIZER_PARTS if not getattr(paths, PUBLISHED_PART_OF.get(p, ""), None))
        load_colorizer_parts(model, shipped.colorizer, parts)
    return model.save_pretrained(out)
