"""Load published pretrained weights into components built from a preset.

Every loader first builds the component from our config (the preset, not the checkpoint, decides the
architecture) and then fills it from a local file in the format its authors publish. Nothing is fetched
from a hub: configs come from :mod:`model.config`, weights from the given paths.

Loading is strict, because a silently half-loaded model trains for days before anyone notices. Every
missing key, unexpected key or shape mismatch raises a ``ValueError`` naming the file and listing the
offending keys with their expected and found shapes. The one deliberate exception is the U-Net's
vector-condition embedding: ours embeds two scalars (``add_embedding.linear_1`` takes 512 inputs at
``sdxl``) where stock SDXL also takes the pooled text vector (2816 inputs), so tensors under
``add_embedding.`` whose shape differs keep their fresh init. They are logged as a warning on this
module's logger and returned in the :class:`LoadReport` of :func:`check_and_load`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from torch import nn

from model.config import ClipVisionConfig, TaggerConfig, UNetConfig, VAEConfig
from model.reference_encoders import ClipImageEncoder, WDTagger
from model.unet import build_unet, unet_kwargs
from model.vae import build_vae, vae_kwargs

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
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
MAX_LISTED = 10


@dataclass(frozen=True)
class TensorShapes:
    """One tensor whose shape in the file differs from the model's."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]


@dataclass(frozen=True)
class LoadReport:
    """What :func:`check_and_load` did besides loading every tensor of the model.

    ``skipped``: tensors left at their fresh init because their shape differs under an allowed prefix.
    ``recomputed``: tensors in the file that are non-persistent buffers of the model (e.g. timm SwinV2's
    relative-position tables, which older timm versions saved); the model derives them from its config,
    so they are shape-checked and otherwise ignored.
    """

    path: Path
    skipped: tuple[TensorShapes, ...] = ()
    recomputed: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- files


def read_state_dict(path: PathLike, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` file (``.ckpt/.pt/.pth/.bin``).

    Torch files are read with ``weights_only=True`` only, so a checkpoint cannot run code on load; a
    top-level ``state_dict`` entry (Lightning and OpenCLIP training checkpoints) is unwrapped. With
    ``prefixes`` only keys starting with one of them are kept; a safetensors file then reads nothing
    else, which matters when taking a 300 MB VAE out of a 7 GB single-file checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")

    def wanted(key: str) -> bool:
        return prefixes is None or key.startswith(prefixes)

    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys() if wanted(key)}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read safetensors file {path}: {err}") from err
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"{path}: unknown weights format '{path.suffix}'; expected .safetensors or one of {TORCH_SUFFIXES}"
        )
    try:
        # mmap keeps unused tensors (e.g. a CLIP text tower) on disk; only the zip format supports it.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) (it may pickle more than tensors; "
            f"re-save its state_dict or convert it to .safetensors): {err}"
        ) from err
    state = _unwrap_state_dict(loaded, path)
    return {key: value for key, value in state.items() if wanted(key)}


def _unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a mapping of tensor names to tensors")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {_listing(not_tensors)}")
    return dict(loaded)


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


# ------------------------------------------------------------------------------------------- checking


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _listing(items: list[str]) -> str:
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n    {shown}{more}"


def _non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Buffers that ``state_dict`` leaves out because the module recomputes them, by full key."""
    found = {}
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            found[f"{prefix}.{name}" if prefix else name] = sub._buffers.get(name)
    return found


def check_and_load(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_path: PathLike,
    allow_shape_mismatch_prefixes: tuple[str, ...] = (),
    optional_suffixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``module`` strictly, or raise a ``ValueError`` that says what does not fit.

    The error names ``source_path`` and lists (up to ten of) the missing keys with the shape the model
    expects, the unexpected keys with the shape found, and the shape mismatches with both. Shape
    mismatches under ``allow_shape_mismatch_prefixes`` keep the module's tensor and are reported instead.
    Module tensors whose names end with ``optional_suffixes`` (e.g. BatchNorm's ``num_batches_tracked``,
    which some exporters drop) may be absent from the file and keep their current value.
    """
    source_path = Path(source_path)
    expected = module.state_dict()
    buffers = _non_persistent_buffers(module)
    to_load: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[TensorShapes] = []
    skipped: list[TensorShapes] = []
    recomputed: list[str] = []
    for key, tensor in state_dict.items():
        found = _shape(tensor)
        if key in expected:
            want = _shape(expected[key])
            if want == found:
                to_load[key] = tensor
            elif key.startswith(tuple(allow_shape_mismatch_prefixes)):
                skipped.append(TensorShapes(key, want, found))
                to_load[key] = expected[key]
            else:
                mismatched.append(TensorShapes(key, want, found))
        elif key in buffers:
            want = _shape(buffers[key])
            if want is not None and want != found:
                mismatched.append(TensorShapes(key, want, found))
            else:
                recomputed.append(key)
        else:
            unexpected.append(key)
    missing = [key for key in expected if key not in state_dict and not key.endswith(tuple(optional_suffixes))]
    for key in expected:
        if key not in state_dict and key.endswith(tuple(optional_suffixes)):
            to_load[key] = expected[key]

    if missing or unexpected or mismatched:
        parts = [f"{source_path}: weights do not fit the {type(module).__name__} built from the config"]
        if missing:
            rows = [f"{key}: expected {_shape(expected[key])}" for key in missing]
            parts.append(f"  {len(missing)} missing from the file:{_listing(rows)}")
        if unexpected:
            rows = [f"{key}: found {_shape(state_dict[key])}" for key in unexpected]
            parts.append(f"  {len(unexpected)} unexpected in the file:{_listing(rows)}")
        if mismatched:
            rows = [f"{m.key}: expected {m.expected}, found {m.found}" for m in mismatched]
            parts.append(f"  {len(mismatched)} with a different shape:{_listing(rows)}")
        raise ValueError("\n".join(parts))

    module.load_state_dict(to_load, strict=True)
    report = LoadReport(source_path, tuple(skipped), tuple(recomputed))
    if skipped:
        rows = [f"{s.key}: model {s.expected}, file {s.found}" for s in skipped]
        logger.warning("%s: kept the fresh init of %d tensors whose shape differs:%s", source_path, len(skipped),
                       _listing(rows))
    logger.info("loaded %d tensors into %s from %s", len(to_load) - len(skipped), type(module).__name__, source_path)
    return report


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
        rows = [f"{key}: found {_shape(checkpoint[key])}" for key in dropped]
        raise ValueError(f"{path}: {len(dropped)} tensors have no place in the diffusers layout:{_listing(rows)}")
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
    warning on this module's logger.
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
            f"{head.shape[0]} outputs (head.fc.weight {_shape(head)}); the two files are from different taggers"
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
    state = read_state_dict(path, prefixes=("visual.", "module.visual."))
    visual = {key.removeprefix("module.").removeprefix("visual."): value for key, value in state.items()}
    if not visual:
        raise ValueError(
            f"{path} holds no 'visual.*' tensors; an OpenCLIP model checkpoint keeps its image tower there"
        )
    encoder = ClipImageEncoder(cfg)
    check_and_load(encoder.visual, visual, path)
    return encoder
