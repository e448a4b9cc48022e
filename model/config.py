"""Presets: every size of the colorizer as plain numbers.

One dataclass per component, grouped in :class:`ColorizerConfig`. The ``tiny`` preset keeps every module of
the ``sdxl`` preset with small numbers, so a laptop test exercises the exact code that a cluster trains:
no module reads the preset's name, only its numbers.

Configs round-trip through ``to_dict``/``from_dict`` so a saved model folder records how it was built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    """SDXL-shaped denoiser (diffusers ``UNet2DConditionModel``).

    ``attention_levels`` says which resolution levels carry transformer blocks (SDXL: none at the top level).
    ``attention_heads`` is the per-level head count (diffusers calls it ``attention_head_dim`` for
    historical reasons). The vector condition is ``vector_condition_values`` scalars, each embedded by a
    ``vector_embed_dim``-wide sinusoid (SDXL's add-time slot), with no pooled text vector.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    attention_levels: tuple[bool, ...] = (False, True, True)
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_heads: tuple[int, ...] = (5, 10, 20)
    layers_per_block: int = 2
    cross_attention_dim: int = 2048
    latent_channels: int = 4
    vector_embed_dim: int = 256
    vector_condition_values: int = 2
    norm_num_groups: int = 32


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL``; the latent stride is ``2 ** (len(block_out_channels) - 1)``."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    scaling_factor: float = 0.13025
    norm_num_groups: int = 32


@dataclass(frozen=True)
class SketchEncoderConfig:
    """Conv stem to 1/8 of the image, then one level per U-Net injection point (the published encoder).

    ``in_channels``: the sketch is an RGB drawing (3), inverted. ``stem_channels`` are the widths of the
    full-resolution stage and the three stride-2 stages of the stem. ``attention_head_dim`` sets the head
    width of the multi-scale attention layer, whose width is the last injection point's channel count.
    """

    in_channels: int = 3
    stem_channels: tuple[int, ...] = (16, 32, 96, 256)
    attention_head_dim: int = 128


@dataclass(frozen=True)
class TaggerConfig:
    """WD-Tagger: a timm SwinV2 classifier over anime tags; its final-stage tokens are the reference."""

    image_size: int = 448
    patch_size: int = 4
    window_size: int = 14
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    num_tags: int = 9083

    @property
    def token_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        side = self.image_size // self.patch_size // 2 ** (len(self.depths) - 1)
        return side * side


@dataclass(frozen=True)
class ClipVisionConfig:
    """OpenCLIP ViT image tower; tokens are taken after the final norm and the output projection."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    embed_dim: int = 1280

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ProjectorConfig:
    """Fusion of CLIP and WD tokens into the cross-attention context (published: 10 heads of 128 at 1280)."""

    attention_head_dim: int = 128


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and training-objective constants (paper and its reference implementation)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "v_prediction"
    offset_noise: float = 0.05
    reference_dropout: float = 0.2
    sketch_dropout: float = 0.1
    gram_start_fraction: float = 0.33
    gram_weight: float = 1.0


@dataclass(frozen=True)
class SamplingConfig:
    """Inference defaults and the accepted output sizes (pixels; every side a multiple of ``size_multiple``)."""

    steps: int = 20
    reference_guidance: float = 4.5
    sketch_guidance: float = 1.0
    aesthetic_score: float = 7.0
    sampler: str = "dpmpp_3m_sde"  # a name of model.options.SAMPLERS; the published model's sampler
    default_area: int = 1024 * 1024
    min_side: int = 768
    max_side: int = 1536


@dataclass(frozen=True)
class DataConfig:
    """Training crops: aspect buckets of about ``bucket_area`` pixels, sides within the limits, on the
    model's size grid (``ColorizerConfig.size_multiple``)."""

    bucket_area: int = 1024 * 1024
    bucket_min_side: int = 736
    bucket_max_side: int = 1312


@dataclass(frozen=True)
class ColorizerConfig:
    """The whole colorizer. Sizes of derived parts (context length, injection points) follow from these."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    sketch_encoder: SketchEncoderConfig = field(default_factory=SketchEncoderConfig)
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    clip: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def latent_stride(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Pixel sides must divide by this: VAE stride times the U-Net's downsampling."""
        return self.latent_stride * 2 ** (len(self.unet.block_out_channels) - 1)

    @property
    def context_tokens(self) -> int:
        return self.tagger.num_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ColorizerConfig":
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory  # each field is a dataclass built by its factory
            given = dict(data.get(f.name, {}))
            known = {sf.name for sf in dataclasses.fields(sub_cls)}
            unknown = set(given) - known
            if unknown:
                raise ValueError(f"config section '{f.name}' has unknown keys {sorted(unknown)}; expected {sorted(known)}")
            parts[f.name] = sub_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
        return cls(**parts)

    def replace(self, **sections: Any) -> "ColorizerConfig":
        """Copy with some sections' fields overridden: ``cfg.replace(unet={"layers_per_block": 1})``."""
        updated = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **updated)


def sdxl() -> ColorizerConfig:
    """The paper's sizes: 2.6B-parameter SDXL U-Net, WD SwinV2-base at 448², OpenCLIP ViT-bigG-14."""
    return ColorizerConfig()


def tiny() -> ColorizerConfig:
    """Every module of ``sdxl`` with small numbers: trains in minutes on 2 CPU cores at 128² pixels."""
    return ColorizerConfig(
        unet=UNetConfig(
            block_out_channels=(32, 64, 128),
            transformer_layers_per_block=(1, 1, 1),
            attention_heads=(1, 2, 4),
            layers_per_block=1,
            cross_attention_dim=64,
            latent_channels=16,
            vector_embed_dim=32,
            norm_num_groups=8,
        ),
        # one normalization group, so the group norms keep a flat picture's color as offsets between channels
        # (see model/assets/tiny/README.md for what was measured); scaling: 1 / std of the shipped VAE's latents
        vae=VAEConfig(block_out_channels=(16, 32, 64, 128), layers_per_block=1, latent_channels=16, scaling_factor=0.5043,
                      norm_num_groups=1),
        sketch_encoder=SketchEncoderConfig(stem_channels=(8, 16, 16, 32), attention_head_dim=32),
        tagger=TaggerConfig(
            image_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_tags=32
        ),
        clip=ClipVisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, embed_dim=48),
        projector=ProjectorConfig(attention_head_dim=16),
        sampling=SamplingConfig(steps=8, default_area=128 * 128, min_side=64, max_side=256),
        data=DataConfig(bucket_area=128 * 128, bucket_min_side=96, bucket_max_side=160),
    )


PRESETS = {"tiny": tiny, "sdxl": sdxl}


def preset_name(config: ColorizerConfig) -> str:
    """The preset a config equals, ignoring the tag count (a loaded tagger brings its own): for logs."""
    for name, make in PRESETS.items():
        if config.replace(tagger={"num_tags": make().tagger.num_tags}) == make():
            return name
    return "custom"


def get_preset(name: str) -> ColorizerConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; expected one of {sorted(PRESETS)}") from None
