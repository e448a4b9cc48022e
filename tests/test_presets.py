"""Presets: the paper's sizes at ``sdxl`` (checked without allocating memory), numbers-only differences."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch

from model.config import ColorizerConfig, get_preset, sdxl, tiny


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl_on_meta():
    """The full-size model built on the meta device: real shapes, no memory."""
    from model.colorizer import Colorizer

    with torch.device("meta"):
        return Colorizer(sdxl())


def test_sdxl_unet_has_the_paper_size(sdxl_on_meta):
    count = parameter_count(sdxl_on_meta.unet)
    assert 2.50e9 < count < 2.65e9, count  # SDXL's U-Net: 2.567B
    unet = sdxl_on_meta.unet.unet
    assert unet.config.cross_attention_dim == 2048
    assert [len(b.attentions[0].transformer_blocks) for b in unet.down_blocks[1:]] == [2, 10]


def test_sdxl_reference_encoders_emit_the_paper_token_shapes(sdxl_on_meta):
    cfg = sdxl_on_meta.config
    assert (cfg.tagger.num_tokens, cfg.tagger.token_dim) == (196, 1024)
    assert cfg.clip.num_tokens == 257 and cfg.clip.embed_dim == 1280
    with torch.no_grad():
        tokens = sdxl_on_meta.clip(torch.rand(1, 3, 224, 224, device="meta"))
        context = sdxl_on_meta.projector(tokens, torch.rand(1, 196, 1024, device="meta"))
    assert tokens.shape == (1, 257, 1280)
    assert context.shape == (1, 196, 2048)
    tower = parameter_count(sdxl_on_meta.clip)
    assert tower > 1.8e9 and tower < 1.9e9  # the bigG image tower


def test_sdxl_clip_numbers_are_open_clips_vit_bigg_14():
    published = open_clip.get_model_config("ViT-bigG-14")
    vision, ours = published["vision_cfg"], sdxl().clip
    assert (ours.image_size, ours.patch_size, ours.width, ours.layers) == (
        vision["image_size"], vision["patch_size"], vision["width"], vision["layers"])
    assert ours.heads == vision["width"] // vision["head_width"]
    assert ours.mlp_ratio == vision["mlp_ratio"] and ours.embed_dim == published["embed_dim"]


def test_presets_differ_only_in_numbers():
    def shape_of(value):
        if dataclasses.is_dataclass(value):
            return {f.name: shape_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return ("tuple", len(value) if value and isinstance(value[0], bool) else "n")
        return type(value).__name__

    assert shape_of(tiny()) == shape_of(sdxl())


def test_configs_round_trip_and_reject_unknown_keys():
    for name in ("tiny", "sdxl"):
        cfg = get_preset(name)
        assert ColorizerConfig.from_dict(cfg.to_dict()) == cfg
    bad = tiny().to_dict()
    bad["unet"]["channels"] = 3
    with pytest.raises(ValueError, match="unknown keys \\['channels'\\]"):
        ColorizerConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_preset_names_are_recognized_from_numbers():
    from model.config import preset_name

    assert preset_name(tiny()) == "tiny" and preset_name(sdxl()) == "sdxl"
    assert preset_name(tiny().replace(tagger={"num_tags": 10861})) == "tiny"
    assert preset_name(tiny().replace(unet={"layers_per_block": 2})) == "custom"


def test_size_multiple_is_latent_stride_times_unet_downsampling():
    assert sdxl().latent_stride == 8 and sdxl().size_multiple == 32
    assert tiny().latent_stride == 8 and tiny().size_multiple == 32
