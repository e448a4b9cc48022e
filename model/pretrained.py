"""Load published pretrained weights into components built from a preset.

Every loader first builds the component from our config (the preset, not the checkpoint, decides the
architecture) and then fills it from a local file in the format its authors publish. Nothing is fetched
from a hub: configs come from :mod:`model.config`, weights from the given paths.

This module knows the published layouts (diffusers folders, original LDM/SGM single files, timm and
OpenCLIP checkpoints) and converts them to ours; reading files and the strict load live in
:mod:`model.weights`, shared with every other loader of the project. Every missing key, unexpected key
or shape mismatch raises a ``ValueError`` naming the file and listing the offending keys with their
expected and found shapes. The one deliberate exception is the U-Net's vector-condition embedding: ours
embeds two scalars (``add_embedding.linear_1`` takes 512 inputs at ``sdxl``) where stock SDXL also takes
the pooled text vector (2816 inputs), so tensors under ``add_embedding.`` whose shape differs keep their
fresh init. They are logged as a warning by :mod:`model.weights` and returned in the
:class:`~model.weights.LoadReport` of :func:`~model.weights.check_and_load`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from model.config import ClipVisionConfig, TaggerConfig, UNetConfig, VAEConfig
from model.reference_encoders import ClipImageEncoder, WDTagger
from model.unet import build_unet, unet_kwargs
from model.vae import build_vae, vae_kwargs
from model.weights import PathLike, check_and_load, listing, read_state_dict, shape_of, under_prefix

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
# Keys of a standalone original-format VAE file (e.g. SDXL's sdxl_vae.safetensors), which has no prefix.
LDM_VAE_BLOCK_MARKERS = ("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")
# Weight files of a diffusers model folder, most preferred first (full precision before the fp16 variant).
DIFFUSERS_WEIGHT_NAMES = tuple(
    f"diffusion_pytorch_model{variant}{suffix}"
    for variant in ("", ".fp16")
    for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
)
UNET_SHAPE_MISMATCH_OK = ("add_embedding.",)
CLIP_VISION_PREFIX = "visual."


# ---------------------------------------------------------------------------------------------- files


def read_diffusers_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a diffusers model folder (single or sharded file) and the file it came from.

    The folder's ``config.json`` is not read: the preset decides the architecture and the strict load
    tells whether the weights fit it.
    """
    for name in DIFFUSERS_WEIGHT_NAMES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_state_dict(file), file
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file} is not a shard index with a 'weight_map': {err}") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_state_dict(folder / shard))
        return state, file
    raise FileNotFoundError(f"no diffusers weights in {folder}: expected one of {', '.join(DIFFUSERS_WEIGHT_NAMES)}")


def _diffusers_folder(path: Path, subfolder: str) -> Path:
    """``path`` itself when it is a model folder, else its ``subfolder`` when it is a pipeline folder."""
    if any((path / name).is_file() for name in DIFFUSERS_WEIGHT_NAMES):
        return path
    if (path / subfolder).is_dir():
        return path / subfolder
    raise FileNotFoundError(
        f"{path} is neither a diffusers model folder (no {DIFFUSERS_WEIGHT_NAMES[0]} or variant) "
        f"nor a pipeline folder (no '{subfolder}/' subfolder)"
    )


# ------------------------------------------------------------------------------ original-format files


def _convert_ldm(
    converter: Callable[[dict, dict], dict], checkpoint: dict[str, torch.Tensor], config: dict, path: Path
) -> dict[str, torch.Tensor]:
    """Run a diffusers LDM→diffusers converter and make its silent gaps loud.

    The converters index keys they require (a ``KeyError`` with a bare name) and drop keys they do not
    recognise without a word. Their output holds the input tensors themselves (VAE attention weights as
    views), so an input whose memory no output shares was dropped.
    """
    try:
        converted = converter(checkpoint, config)
    except KeyError as err:
        raise ValueError(f"{path}: original-format checkpoint lacks a required tensor: {err}") from err
    converted = {key: value for key, value in converted.items() if value is not None}
    used = {value.data_ptr() for value in converted.values()}
    dropped = [key for key, value in checkpoint.items() if value.numel() and value.data_ptr() not in used]
    if dropped:
        rows = [f"{key}: found {shape_of(checkpoint[key])}" for key in dropped]
        raise ValueError(f"{path}: {len(dropped)} tensors have no place in the diffusers layout:{listing(rows)}")
    return converted


def _unet_state_dict(path: Path, cfg: UNetConfig) -> tuple[dict[str, torch.Tensor], Path]:
    if path.is_dir():
        return read_diffusers_weights(_diffusers_folder(path, "unet"))
    ldm = read_state_dict(path, prefixes=(LDM_UNET_PREFIX,))
    if ldm:
        # The converter reads layers_per_block and addition_embed_type: our constructor kwargs have both.
        return _convert_ldm(convert_ldm_unet_checkpoint, ldm, unet_kwargs(cfg), path), path
    return read_state_dict(path), path  # a diffusers-keyed file, e.g. a model folder's weights file


def _vae_state_dict(path: Path, cfg: VAEConfig) -> tuple[dict[str, torch.Tensor], Path]:
    if path.is_dir():
        return read_diffusers_weights(_diffusers_folder(path, "vae"))
    state = read_state_dict(path, prefixes=LDM_VAE_PREFIXES)
    if state:
        # Whole-pipeline file: take one prefix (the converter would otherwise mix them).
        prefix = next(p for p in LDM_VAE_PREFIXES if any(key.startswith(p) for key in state))
        ldm = {key: value for key, value in state.items() if key.startswith(prefix)}
        return _convert_ldm(convert_ldm_vae_checkpoint, ldm, vae_kwargs(cfg), path), path
    state = read_state_dict(path)
    if any(key.startswith(LDM_VAE_BLOCK_MARKERS) for key in state):  # standalone original-format VAE
        return _convert_ldm(convert_ldm_vae_checkpoint, state, vae_kwargs(cfg), path), path
    return state, path


# ------------------------------------------------------------------------------------------- loaders


def load_unet(path: PathLike, cfg: UNetConfig) -> UNet2DConditionModel:
    """SDXL-family U-Net weights into the U-Net of ``cfg``.

    ``path``: a diffusers model folder, a pipeline folder with ``unet/``, an original-format (SGM)
    single file with ``model.diffusion_model.*`` keys, or a diffusers-keyed single file. A differently
    shaped ``add_embedding.*`` tensor (stock SDXL's pooled-text input) keeps its fresh init, with a
    warning logged by :mod:`model.weights`.
    """
    unet = build_unet(cfg)
    state, source = _unet_state_dict(Path(path), cfg)
    check_and_load(unet, state, source, allow_shape_mismatch_prefixes=UNET_SHAPE_MISMATCH_OK)
    return unet


def load_vae(path: PathLike, cfg: VAEConfig) -> AutoencoderKL:
    """VAE weights into the ``AutoencoderKL`` of ``cfg``.

    ``path``: a diffusers model folder, a pipeline folder with ``vae/``, an original-format single file
    (``first_stage_model.*`` or ``vae.*`` keys, or a standalone LDM VAE with ``encoder.down.*`` keys), or
    a diffusers-keyed single file.
    """
    vae = build_vae(cfg)
    state, source = _vae_state_dict(Path(path), cfg)
    check_and_load(vae, state, source)
    return vae


def read_tag_names(tags_csv_path: PathLike) -> list[str]:
    """Tag names of a WD-Tagger ``selected_tags.csv`` (header ``tag_id,name,category,count``), in row order."""
    path = Path(tags_csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"tag list not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a header with a 'name' column (tag_id,name,category,count), "
                             f"found {reader.fieldnames}")
        names = []
        for row in reader:
            if not row.get("name"):
                raise ValueError(f"{path}: line {reader.line_num} has no tag name")
            names.append(row["name"])
    if not names:
        raise ValueError(f"{path}: no tags listed")
    return names


def load_tagger(weights_path: PathLike, tags_csv_path: PathLike, cfg: TaggerConfig) -> WDTagger:
    """A WD-Tagger from its timm ``model.safetensors`` and ``selected_tags.csv``.

    The tag count comes from the CSV, not ``cfg``, so a tagger release with another tag count loads with
    the same preset; the classifier head must have one output per listed tag.
    """
    tags = read_tag_names(tags_csv_path)
    state = read_state_dict(weights_path)
    head = state.get("head.fc.weight")
    if head is not None and head.shape[0] != len(tags):
        raise ValueError(
            f"{tags_csv_path} lists {len(tags)} tags but the classifier head in {weights_path} has "
            f"{head.shape[0]} outputs (head.fc.weight {shape_of(head)}); the two files are from different taggers"
        )
    tagger = WDTagger(dataclasses.replace(cfg, num_tags=len(tags)), tags)
    check_and_load(tagger.model, state, weights_path)
    return tagger


def load_clip_vision(checkpoint_path: PathLike, cfg: ClipVisionConfig) -> ClipImageEncoder:
    """The image tower of a whole-model OpenCLIP checkpoint (``open_clip_pytorch_model.bin`` or
    ``open_clip_model.safetensors``); the text tower and ``logit_scale`` are not read.

    A ``state_dict`` wrapper and DistributedDataParallel's ``module.`` prefix are removed first.
    """
    path = Path(checkpoint_path)
    visual = under_prefix(read_state_dict(path, prefixes=(CLIP_VISION_PREFIX,)), CLIP_VISION_PREFIX)
    if not visual:
        raise ValueError(
            f"{path} holds no 'visual.*' tensors; an OpenCLIP model checkpoint keeps its image tower there"
        )
    encoder = ClipImageEncoder(cfg)
    check_and_load(encoder.visual, visual, path)
    return encoder
