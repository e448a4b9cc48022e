"""Starting weights that ship with the code, per preset: what ``init_model`` starts from unless told otherwise.

Why: the ``tiny`` preset's VAE, left random, reconstructs a picture at about 6 dB PSNR, so every latent a
tiny U-Net learns from is noise and every output decodes through a random decoder. A tiny VAE trained
once (``jobs/train_vae.py``) and a tiny colorizer pretrained once on the learnable synthetic corpus
(``jobs/train.py``, stage 1) ship as two fp16 safetensors files in ``model/assets/<preset>/``, with a
README giving the commands and seeds that made them and the numbers they reached.

* ``vae.safetensors``: the ``AutoencoderKL`` in diffusers' names (what ``pretrained.load_vae`` reads);
* ``colorizer.safetensors``: every other part of the ``Colorizer`` (U-Net, sketch encoder, projector and
  the frozen tagger and CLIP tower the projector was trained with), its names prefixed by the part.

The ``sdxl`` preset ships nothing: its parts are the published weights (``PretrainedPaths``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.weights import check_and_load, read_state_dict, under_prefix

ASSETS = Path(__file__).resolve().parent / "assets"
VAE_FILE = "vae.safetensors"
COLORIZER_FILE = "colorizer.safetensors"
COLORIZER_PARTS = ("unet", "sketch_encoder", "projector", "tagger", "clip")  # everything but the VAE


@dataclass(frozen=True)
class ShippedWeights:
    """The two files of one preset's starting weights."""

    vae: Path
    colorizer: Path


def shipped_weights(preset: str, assets: Path = ASSETS) -> ShippedWeights | None:
    """The preset's shipped files, or None when it ships none (a half-present pair is an error: a
    colorizer trained on one VAE's latents must not run with another)."""
    folder = assets / preset
    weights = ShippedWeights(vae=folder / VAE_FILE, colorizer=folder / COLORIZER_FILE)
    present = [p.is_file() for p in (weights.vae, weights.colorizer)]
    if not any(present):
        return None
    if not all(present):
        raise FileNotFoundError(f"{folder} holds only one of {VAE_FILE} and {COLORIZER_FILE}; both ship together")
    return weights


def load_colorizer_parts(model, path: str | Path, parts: tuple[str, ...] = COLORIZER_PARTS) -> None:
    """Load ``parts`` of ``model`` (a :class:`model.colorizer.Colorizer` of the preset) from a shipped
    ``colorizer.safetensors``, strictly: a file of another preset's shapes is refused with what misfits."""
    state = read_state_dict(path)
    for part in parts:
        check_and_load(getattr(model, part), under_prefix(state, f"{part}."), path, target=f"the {part} of the preset")


def check_same_encoder(trained_with, candidate, source: str | Path) -> None:
    """Refuse a VAE (``candidate``, read from ``source``) that encodes differently from the one a colorizer
    learned its latents from (``trained_with``): only a decoder-only fine-tune may ship beside it."""
    ours, theirs = trained_with.state_dict(), candidate.state_dict()
    differ = [k for k in ours if k.startswith(("encoder.", "quant_conv.")) and not torch.equal(ours[k], theirs[k])]
    if differ:
        raise ValueError(f"the VAE of {source} does not encode as the one the colorizer learned from ({len(differ)} "
                         f"encoder tensors differ, e.g. {differ[0]}); ship a decoder-only fine-tune of that VAE")


def save_shipped(model, folder: str | Path) -> ShippedWeights:
    """Write ``model``'s VAE and its other parts as fp16 safetensors into ``folder`` (integer tensors, such as
    position indices, stay as they are)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = ShippedWeights(vae=folder / VAE_FILE, colorizer=folder / COLORIZER_FILE)
    save_file(_half(model.vae.state_dict()), str(weights.vae))
    colorizer = {f"{part}.{name}": value for part in COLORIZER_PARTS
                 for name, value in getattr(model, part).state_dict().items()}
    save_file(_half(colorizer), str(weights.colorizer))
    return weights


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: (value.half() if value.is_floating_point() else value).detach().contiguous().cpu()
            for name, value in state.items()}
