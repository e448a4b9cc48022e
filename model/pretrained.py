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

Every loader takes a ``dtype`` and builds through :func:`model.weights.build_and_load`: the component is
built on the meta device and the file's tensors, cast one by one as they are read, become its weights.
Loading at bf16 never holds an fp32 copy, and no random init is computed only to be overwritten.
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
from model.weights import (
    PathLike,
    build_and_load,
    check_and_load,  # noqa: F401 - callers load their own parts through model.pretrained
    listing,
    read_state_dict,
    shape_of,
    tensor_shapes,
    under_prefix,
)

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


def read_diffusers_weights(folder: Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a diffusers model folder (single or sharded file) and the file it came from.

    The folder's ``config.json`` is not read: the preset decides the architecture and the strict load
    tells whether the weights fit it.
    """
    for name in DIFFUSERS_WEIGHT_NAMES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_state_dict(file, dtype=dtype), file
        return read_sharded(file, dtype=dtype), file
    raise FileNotFoundError(f"no diffusers weights in {folder}: expected one of {', '.join(DIFFUSERS_WEIGHT_NAMES)}")


def read_sharded(index: Path, prefixes: tuple[str, ...] | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint, from its ``*.index.json`` (diffusers and transformers alike)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a shard index with a 'weight_map': {err}") from err
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(index.parent / shard, prefixes=prefixes, dtype=dtype))
    return state


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


def convert_ldm(
    converter: Callable[[dict, dict], dict], checkpoint: dict[str, torch.Tensor], config: dict, path: Path
) -> dict[str, torch.Tensor]:
    """Run a diffusers LDM→diffusers converter and make its silent gaps loud.

    The converters index keys they require (a ``KeyError`` with a bare name) and drop keys they do not
    recognise without a word. Their output holds the input tensors themselves (VAE attention weights as
    views), so an input that no output is or views was dropped. Works on meta tensors too (listings).
    """
    try:
        converted = converter(checkpoint, config)
    except KeyError as err:
        raise ValueError(f"{path}: original-format checkpoint lacks a required tensor: {err}") from err
    converted = {key: value for key, value in converted.items() if value is not None}
    used = {id(value) for value in converted.values()} | {id(value._base) for value in converted.values()}
    used_memory = {value.data_ptr() for value in converted.values() if not value.is_meta}
    dropped = [key for key, value in checkpoint.items()
               if value.numel() and id(value) not in used
               and (value.is_meta or value.data_ptr() not in used_memory)]
    if dropped:
        rows = [f"{key}: found {shape_of(checkpoint[key])}" for key in dropped]
        raise ValueError(f"{path}: {len(dropped)} tensors have no place in the diffusers layout:{listing(rows)}")
    return converted


def unet_from_ldm(ldm: dict[str, torch.Tensor], cfg: UNetConfig, path: PathLike) -> dict[str, torch.Tensor]:
    """SGM-layout U-Net tensors (``model.diffusion_model.*`` keys) → diffusers keys, refusing any that
    have no place there. The tensors themselves are kept (no copy)."""
    # The converter reads layers_per_block and addition_embed_type: our constructor kwargs have both.
    return convert_ldm(convert_ldm_unet_checkpoint, ldm, unet_kwargs(cfg), Path(path))


def vae_from_ldm(ldm: dict[str, torch.Tensor], cfg: VAEConfig, path: PathLike) -> dict[str, torch.Tensor]:
    """LDM-layout VAE tensors (one prefix such as ``first_stage_model.``, or none) → diffusers keys."""
    return convert_ldm(convert_ldm_vae_checkpoint, ldm, vae_kwargs(cfg), Path(path))


def _unet_state_dict(path: Path, cfg: UNetConfig, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], Path]:
    if path.is_dir():
        return read_diffusers_weights(_diffusers_folder(path, "unet"), dtype)
    ldm = read_state_dict(path, prefixes=(LDM_UNET_PREFIX,), dtype=dtype)
    if ldm:
        return unet_from_ldm(ldm, cfg, path), path
    return read_state_dict(path, dtype=dtype), path  # a diffusers-keyed file, e.g. a model folder's weights file


def _vae_state_dict(path: Path, cfg: VAEConfig, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], Path]:
    if path.is_dir():
        return read_diffusers_weights(_diffusers_folder(path, "vae"), dtype)
    state = read_state_dict(path, prefixes=LDM_VAE_PREFIXES, dtype=dtype)
    if state:
        # Whole-pipeline file: take one prefix (the converter would otherwise mix them).
        prefix = next(p for p in LDM_VAE_PREFIXES if any(key.startswith(p) for key in state))
        ldm = {key: value for key, value in state.items() if key.startswith(prefix)}
        return vae_from_ldm(ldm, cfg, path), path
    state = read_state_dict(path, dtype=dtype)
    if any(key.startswith(LDM_VAE_BLOCK_MARKERS) for key in state):  # standalone original-format VAE
        return vae_from_ldm(state, cfg, path), path
    return state, path


# ------------------------------------------------------------------------------------------- loaders


def load_unet(path: PathLike, cfg: UNetConfig, dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """SDXL-family U-Net weights into the U-Net of ``cfg``, at ``dtype`` (default float32).

    ``path``: a diffusers model folder, a pipeline folder with ``unet/``, an original-format (SGM)
    single file with ``model.diffusion_model.*`` keys, or a diffusers-keyed single file. A differently
    shaped ``add_embedding.*`` tensor (stock SDXL's pooled-text input) keeps its fresh init, with a
    warning logged by :mod:`model.weights`.
    """
    state, source = _unet_state_dict(Path(path), cfg, dtype)
    unet, _ = build_and_load(lambda: build_unet(cfg), state, source, dtype=dtype,
                             allow_shape_mismatch_prefixes=UNET_SHAPE_MISMATCH_OK)
    return unet


def load_vae(path: PathLike, cfg: VAEConfig, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """VAE weights into the ``AutoencoderKL`` of ``cfg``, at ``dtype`` (default float32).

    ``path``: a diffusers model folder, a pipeline folder with ``vae/``, an original-format single file
    (``first_stage_model.*`` or ``vae.*`` keys, or a standalone LDM VAE with ``encoder.down.*`` keys), or
    a diffusers-keyed single file.
    """
    state, source = _vae_state_dict(Path(path), cfg, dtype)
    vae, _ = build_and_load(lambda: build_vae(cfg), state, source, dtype=dtype)
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


def load_tagger(weights_path: PathLike, tags_csv_path: PathLike, cfg: TaggerConfig,
                dtype: torch.dtype | None = None) -> WDTagger:
    """A WD-Tagger from its timm ``model.safetensors`` and ``selected_tags.csv``, at ``dtype``.

    The tag count comes from the CSV, not ``cfg``, so a tagger release with another tag count loads with
    the same preset; the classifier head must have one output per listed tag. SwinV2's relative-position
    tables and window masks are in no file: they are recomputed from the config after the load.
    """
    tags = read_tag_names(tags_csv_path)
    state = read_state_dict(weights_path, dtype=dtype)
    head = state.get("head.fc.weight")
    if head is not None and head.shape[0] != len(tags):
        raise ValueError(
            f"{tags_csv_path} lists {len(tags)} tags but the classifier head in {weights_path} has "
            f"{head.shape[0]} outputs (head.fc.weight {shape_of(head)}); the two files are from different taggers"
        )
    tagger_cfg = dataclasses.replace(cfg, num_tags=len(tags))
    model, _ = build_and_load(lambda: WDTagger(tagger_cfg, tags).model, state, weights_path, dtype=dtype)
    with torch.device("meta"):
        tagger = WDTagger(tagger_cfg, tags)
    tagger.model = model
    return tagger


# ------------------------------------------------------------------------------------------ CLIP vision

OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_VISION_PREFIXES = ("vision_model.", "visual_projection.")
# transformers' CLIP vision tower → OpenCLIP's VisionTransformer, names inside one encoder layer.
HF_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
HF_TOP_NAMES = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
# Older transformers saved this buffer; it is arange(num_positions) and OpenCLIP has no counterpart.
HF_POSITION_IDS = "vision_model.embeddings.position_ids"
HF_LAYER_PREFIX = "vision_model.encoder.layers."


def clip_vision_from_hf(hf: dict[str, torch.Tensor], path: PathLike) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPVisionModelWithProjection`` (or ``CLIPModel``'s vision half) state dict →
    OpenCLIP ``VisionTransformer`` keys (``visual.`` stripped). Entries are taken out of ``hf`` as they are
    converted, so the two layouts are not both held at once; keys with no OpenCLIP place raise.

    Per layer: ``self_attn.{q,k,v}_proj`` → one ``attn.in_proj_{weight,bias}`` (q, k, v concatenated, as
    ``nn.MultiheadAttention`` packs them), ``layer_norm1/2`` → ``ln_1/2``, ``mlp.fc1/fc2`` →
    ``mlp.c_fc/c_proj``; ``visual_projection.weight`` (out, in) → ``proj`` (in, out), transposed, because
    OpenCLIP applies it as ``x @ proj``. Both run the same block (pre-norm attention and MLP, exact GELU
    for ViT-bigG-14), scale attention by head_dim^-0.5 and use LayerNorm eps 1e-5.
    """
    out: dict[str, torch.Tensor] = {}
    hf.pop(HF_POSITION_IDS, None)
    for name, ours in HF_TOP_NAMES.items():
        if name in hf:
            out[ours] = hf.pop(name)
    if "visual_projection.weight" in hf:
        out["proj"] = hf.pop("visual_projection.weight").t().contiguous()
    layers = sorted({int(key[len(HF_LAYER_PREFIX):].split(".")[0]) for key in hf if key.startswith(HF_LAYER_PREFIX)})
    for i in layers:
        src, dst = f"{HF_LAYER_PREFIX}{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            parts = [f"{src}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if all(part in hf for part in parts):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf.pop(part) for part in parts])
        for name, ours in HF_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                if f"{src}{name}.{kind}" in hf:
                    out[f"{dst}{ours}.{kind}"] = hf.pop(f"{src}{name}.{kind}")
    if hf:
        rows = [f"{key}: found {shape_of(value)}" for key, value in hf.items()]
        raise ValueError(f"{path}: {len(rows)} CLIP vision tensors have no place in OpenCLIP's "
                         f"VisionTransformer (a q/k/v projection without its siblings?):{listing(rows)}")
    return out


def _clip_file(path: Path) -> Path:
    """The weights file of a CLIP folder: OpenCLIP's own first, else a transformers one."""
    if not path.is_dir():
        return path
    for name in (*OPENCLIP_FILES, *HF_FILES):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no CLIP weights in {path}: expected one of {', '.join(OPENCLIP_FILES + HF_FILES)}")


def clip_vision_state(checkpoint_path: PathLike, dtype: torch.dtype | None = None
                      ) -> tuple[dict[str, torch.Tensor], Path, str]:
    """The image tower of a CLIP checkpoint in OpenCLIP ``VisionTransformer`` keys, the file it came from
    and its layout (``"openclip"`` or ``"transformers"``), reading nothing of the text tower.

    ``checkpoint_path``: an OpenCLIP file (``visual.*`` keys: ``open_clip_model.safetensors``,
    ``open_clip_pytorch_model.bin``, a colorize-xl ``clip/model.safetensors``), a transformers file
    (``vision_model.*``: ``model.safetensors``, ``pytorch_model.bin``, or a sharded ``*.index.json``), or a
    folder holding one of them (OpenCLIP's preferred when both are there).
    """
    path = _clip_file(Path(checkpoint_path))
    if path.name.endswith(".index.json"):
        return clip_vision_from_hf(read_sharded(path, prefixes=HF_VISION_PREFIXES, dtype=dtype), path), path, \
            "transformers"
    keys = tensor_shapes(path)
    if any(key.startswith(CLIP_VISION_PREFIX) for key in keys):
        state = under_prefix(read_state_dict(path, prefixes=(CLIP_VISION_PREFIX,), dtype=dtype), CLIP_VISION_PREFIX)
        return state, path, "openclip"
    if any(key.startswith(HF_VISION_PREFIXES) for key in keys):
        hf = read_state_dict(path, prefixes=HF_VISION_PREFIXES, dtype=dtype)
        return clip_vision_from_hf(hf, path), path, "transformers"
    raise ValueError(
        f"{path} holds no 'visual.*' tensors (OpenCLIP's image tower) nor 'vision_model.*' ones "
        f"(transformers'); found e.g.{listing(sorted(keys)[:5])}"
    )


def load_clip_vision(checkpoint_path: PathLike, cfg: ClipVisionConfig,
                     dtype: torch.dtype | None = None) -> ClipImageEncoder:
    """The image tower of a CLIP checkpoint (see :func:`clip_vision_state` for the accepted files and
    layouts), at ``dtype``; the text tower and ``logit_scale`` are not read.

    A ``state_dict`` wrapper and DistributedDataParallel's ``module.`` prefix are removed first.
    """
    visual, path, _ = clip_vision_state(checkpoint_path, dtype)
    loaded, _ = build_and_load(lambda: ClipImageEncoder(cfg).visual, visual, path, dtype=dtype)
    with torch.device("meta"):
        encoder = ClipImageEncoder(cfg)
    encoder.visual = loaded
    return encoder
