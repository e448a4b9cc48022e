"""Loading pretrained parts from their published formats (model/pretrained.py).

Each test saves a tiny random-init component the way its authors publish it, loads it back into a fresh
component of the ``tiny`` preset and compares tensors. The original-format (LDM/SGM) files are written
with our own diffusers→original key mapping below, so a round trip through diffusers' converters checks
both the converter use and the mapping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from model.config import UNetConfig, tiny
from model.pretrained import load_clip_vision, load_tagger, load_unet, load_vae
from model.reference_encoders import ClipImageEncoder, WDTagger
from model.unet import build_unet
from model.vae import build_vae

CFG = tiny()


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().contiguous() for key, value in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()):
    loaded = module.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        if key not in skip:
            assert torch.equal(loaded[key], value), key


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, so zero/one inits (norms, biases) cannot pass a comparison by chance."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()
    return module


# ------------------------------------------------------------- diffusers → original (LDM/SGM) key mapping

RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_key_to_ldm(key: str, cfg: UNetConfig) -> str:
    """One diffusers U-Net key in the SGM layout (without the ``model.diffusion_model.`` prefix)."""
    per_level = cfg.layers_per_block + 1  # encoder: resnets + downsampler; decoder: resnets (one more)
    module, param = key.rsplit(".", 1)
    if module in UNET_FIXED_TO_LDM:
        return f"{UNET_FIXED_TO_LDM[module]}.{param}"

    def resnet(rest: str) -> str:
        first, _, tail = rest.partition(".")
        return f"{RESNET_TO_LDM[first]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per_level + j
        return f"input_blocks.{block}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + cfg.layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = b * per_level + j
        return f"output_blocks.{block}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        has_attention = tuple(reversed(cfg.attention_levels))[b]
        return f"output_blocks.{b * per_level + cfg.layers_per_block}.{2 if has_attention else 1}.conv.{m[2]}"
    raise AssertionError(f"no SGM name for U-Net key {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model." + unet_key_to_ldm(key, cfg): value for key, value in state.items()}


VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, levels: int) -> str:
    """One diffusers VAE key in the LDM layout (without the ``first_stage_model.`` prefix)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int, prefix: str = "first_stage_model.") -> dict:
    out = {}
    for key, value in state.items():
        ldm_key = vae_key_to_ldm(key, levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None].contiguous()  # LDM's attention projections are 1x1 convs
        out[prefix + ldm_key] = value
    return out


@pytest.fixture(scope="module")
def unet_and_state():
    torch.manual_seed(0)
    unet = randomized(build_unet(CFG.unet))
    return unet, clone_state(unet)


@pytest.fixture(scope="module")
def vae_and_state():
    torch.manual_seed(1)
    vae = randomized(build_vae(CFG.vae))
    return vae, clone_state(vae)


# --------------------------------------------------------------------------------- diffusers folders


def test_unet_and_vae_from_diffusers_model_folders(tmp_path, unet_and_state, vae_and_state):
    unet, unet_state = unet_and_state
    vae, vae_state = vae_and_state
    unet.save_pretrained(tmp_path / "unet_model")
    vae.save_pretrained(tmp_path / "vae_model")
    assert (tmp_path / "unet_model" / "diffusion_pytorch_model.safetensors").is_file()
    assert_same_state(load_unet(tmp_path / "unet_model", CFG.unet), unet_state)
    assert_same_state(load_vae(str(tmp_path / "vae_model"), CFG.vae), vae_state)


def test_unet_and_vae_from_pipeline_folder(tmp_path, unet_and_state, vae_and_state):
    unet, unet_state = unet_and_state
    vae, vae_state = vae_and_state
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert_same_state(load_unet(tmp_path / "pipe", CFG.unet), unet_state)
    assert_same_state(load_vae(tmp_path / "pipe", CFG.vae), vae_state)


def test_sharded_diffusers_folder(tmp_path, unet_and_state):
    unet, unet_state = unet_and_state
    unet.save_pretrained(tmp_path / "unet", max_shard_size="200KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert_same_state(load_unet(tmp_path / "unet", CFG.unet), unet_state)


def test_diffusers_keyed_single_file(tmp_path, unet_and_state):
    unet, unet_state = unet_and_state
    unet.save_pretrained(tmp_path / "unet")
    assert_same_state(load_unet(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", CFG.unet), unet_state)


# ------------------------------------------------------------------------- original-format single file


def sgm_checkpoint(unet_state, vae_state) -> dict[str, torch.Tensor]:
    """A whole-pipeline SGM file: U-Net, VAE and (a stand-in for) the text encoders."""
    checkpoint = unet_to_ldm(unet_state, CFG.unet)
    checkpoint.update(vae_to_ldm(vae_state, len(CFG.vae.block_out_channels)))
    checkpoint["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(10, 4)
    return checkpoint


def test_single_file_round_trip(tmp_path, unet_and_state, vae_and_state):
    _, unet_state = unet_and_state
    _, vae_state = vae_and_state
    checkpoint = sgm_checkpoint(unet_state, vae_state)
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in checkpoint
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    save_file(checkpoint, tmp_path / "sd_xl.safetensors")
    assert_same_state(load_unet(tmp_path / "sd_xl.safetensors", CFG.unet), unet_state)
    assert_same_state(load_vae(tmp_path / "sd_xl.safetensors", CFG.vae), vae_state)


def test_single_file_torch_ckpt_and_standalone_vae(tmp_path, unet_and_state, vae_and_state):
    _, unet_state = unet_and_state
    _, vae_state = vae_and_state
    torch.save({"state_dict": sgm_checkpoint(unet_state, vae_state), "global_step": 7}, tmp_path / "model.ckpt")
    assert_same_state(load_unet(tmp_path / "model.ckpt", CFG.unet), unet_state)
    save_file(vae_to_ldm(vae_state, len(CFG.vae.block_out_channels), prefix=""), tmp_path / "sdxl_vae.safetensors")
    assert_same_state(load_vae(tmp_path / "sdxl_vae.safetensors", CFG.vae), vae_state)


def test_stock_sdxl_add_embedding_is_skipped_and_reported(tmp_path, unet_and_state, caplog):
    _, unet_state = unet_and_state
    checkpoint = unet_to_ldm(unet_state, CFG.unet)
    key = "add_embedding.linear_1.weight"
    ours = tuple(unet_state[key].shape)
    stock = (ours[0], ours[1] * 11 // 2)  # SDXL: 2816 inputs where we have 512
    checkpoint["model.diffusion_model.label_emb.0.0.weight"] = torch.randn(stock)
    save_file(checkpoint, tmp_path / "stock.safetensors")

    torch.manual_seed(123)
    fresh = build_unet(CFG.unet).state_dict()[key]
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        unet = load_unet(tmp_path / "stock.safetensors", CFG.unet)

    assert_same_state(unet, unet_state, skip=(key,))
    assert torch.equal(unet.state_dict()[key], fresh)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert key in warning and str(ours) in warning and str(stock) in warning


def test_converter_dropped_key_is_an_error(tmp_path, unet_and_state):
    _, unet_state = unet_and_state
    checkpoint = unet_to_ldm(unet_state, CFG.unet)
    checkpoint["model.diffusion_model.extra_head.weight"] = torch.zeros(3, 5)
    save_file(checkpoint, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"extra_head\.weight: found \(3, 5\)") as info:
        load_unet(tmp_path / "extra.safetensors", CFG.unet)
    assert str(tmp_path / "extra.safetensors") in str(info.value)


def test_single_file_without_required_key(tmp_path, unet_and_state):
    _, unet_state = unet_and_state
    checkpoint = unet_to_ldm(unet_state, CFG.unet)
    del checkpoint["model.diffusion_model.label_emb.0.2.bias"]
    save_file(checkpoint, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"label_emb\.0\.2\.bias"):
        load_unet(tmp_path / "partial.safetensors", CFG.unet)


# ------------------------------------------------------------------------------------ U-Net/VAE errors


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "sd_xl.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_unet(missing, CFG.unet)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_vae(missing, CFG.vae)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        load_vae(tmp_path / "empty", CFG.vae)


def test_wrong_shape_names_key_and_shapes(tmp_path, vae_and_state):
    _, vae_state = vae_and_state
    state = dict(vae_state)
    state["decoder.conv_in.weight"] = torch.randn(7, 4, 3, 3)
    (tmp_path / "vae").mkdir()
    save_file(state, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    expected = tuple(vae_state["decoder.conv_in.weight"].shape)
    with pytest.raises(ValueError) as info:
        load_vae(tmp_path / "vae", CFG.vae)
    message = str(info.value)
    assert str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors") in message
    assert f"decoder.conv_in.weight: expected {expected}, found (7, 4, 3, 3)" in message


def test_unexpected_and_many_missing_keys_are_listed(tmp_path, vae_and_state):
    _, vae_state = vae_and_state
    state = {"encoder.conv_in.weight": vae_state["encoder.conv_in.weight"], "encoder.bogus": torch.zeros(2)}
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError) as info:
        load_vae(tmp_path / "vae.safetensors", CFG.vae)
    message = str(info.value)
    missing = len(vae_state) - 1
    assert f"{missing} missing from the file" in message
    assert f"... and {missing - 10} more" in message
    assert "encoder.conv_in.bias: expected" in message
    assert "1 unexpected in the file" in message and "encoder.bogus: found (2,)" in message


def test_unet_shape_mismatch_outside_add_embedding_is_an_error(tmp_path, unet_and_state):
    _, unet_state = unet_and_state
    state = dict(unet_state)
    state["time_embedding.linear_1.weight"] = torch.randn(5, 5)
    save_file(state, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"time_embedding\.linear_1\.weight: expected \(\d+, \d+\), found \(5, 5\)"):
        load_unet(tmp_path / "unet.safetensors", CFG.unet)


# ------------------------------------------------------------------------------------------ WD tagger


def write_tags(path, count: int) -> list[str]:
    names = [f"tag,{i}" if i == 0 else f"tag_{i}" for i in range(count)]  # a comma needs CSV quoting
    lines = ["tag_id,name,category,count"]
    lines += [f'{1000 + i},"{name}",{i % 3},{50 - i}' for i, name in enumerate(names)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return names


def save_tagger(tmp_path, num_tags: int, seed: int = 2):
    torch.manual_seed(seed)
    model = WDTagger(dataclasses.replace(CFG.tagger, num_tags=num_tags)).model
    state = clone_state(randomized(model))
    save_file(state, tmp_path / "model.safetensors")
    return state


def test_tagger_round_trip_takes_tag_count_from_csv(tmp_path):
    state = save_tagger(tmp_path, num_tags=40)  # not the preset's 32: a v3 release with other tags
    names = write_tags(tmp_path / "selected_tags.csv", 40)
    tagger = load_tagger(tmp_path / "model.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)
    assert tagger.cfg.num_tags == 40 and tagger.tags == names
    assert_same_state(tagger.model, state)
    assert not any("relative_position_index" in key for key in state)  # timm keeps these out of state_dict


def test_tagger_file_with_relative_position_buffers(tmp_path):
    """Older timm saved the SwinV2 relative-position tables; they are recomputed, so they are ignored."""
    state = save_tagger(tmp_path, num_tags=32)
    model = WDTagger(CFG.tagger).model
    buffers = {k: v.clone() for k, v in model.named_buffers() if "relative_" in k}
    assert buffers
    save_file({**state, **buffers}, tmp_path / "old.safetensors")
    write_tags(tmp_path / "selected_tags.csv", 32)
    tagger = load_tagger(tmp_path / "old.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)
    assert_same_state(tagger.model, state)

    key = next(k for k in buffers if k.endswith("relative_position_index"))
    wrong_window = {**state, key: torch.zeros(9, 9, dtype=torch.long)}
    save_file(wrong_window, tmp_path / "other_window.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"{key}: expected {tuple(buffers[key].shape)}, found (9, 9)")):
        load_tagger(tmp_path / "other_window.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)


def test_tagger_csv_and_head_count_mismatch(tmp_path):
    save_tagger(tmp_path, num_tags=32)
    write_tags(tmp_path / "selected_tags.csv", 31)
    with pytest.raises(ValueError) as info:
        load_tagger(tmp_path / "model.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)
    message = str(info.value)
    assert str(tmp_path / "model.safetensors") in message and str(tmp_path / "selected_tags.csv") in message
    assert "31 tags" in message and "32 outputs" in message


def test_tagger_renamed_key_is_named(tmp_path):
    state = save_tagger(tmp_path, num_tags=32)
    key = "layers.0.blocks.0.attn.logit_scale"
    state["layers.0.blocks.0.attn.logit_scales"] = state.pop(key)
    save_file(state, tmp_path / "renamed.safetensors")
    write_tags(tmp_path / "selected_tags.csv", 32)
    with pytest.raises(ValueError) as info:
        load_tagger(tmp_path / "renamed.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)
    message = str(info.value)
    assert f"{key}: expected (1, 1, 1)" in message
    assert "layers.0.blocks.0.attn.logit_scales: found (1, 1, 1)" in message


def test_tagger_missing_files_are_named(tmp_path):
    save_tagger(tmp_path, num_tags=32)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "selected_tags.csv"))):
        load_tagger(tmp_path / "model.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)
    write_tags(tmp_path / "selected_tags.csv", 32)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.safetensors"))):
        load_tagger(tmp_path / "gone.safetensors", tmp_path / "selected_tags.csv", CFG.tagger)


# --------------------------------------------------------------------------------------------- OpenCLIP


def tiny_open_clip() -> open_clip.model.CLIP:
    c = CFG.clip
    vision = dict(image_size=c.image_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                  head_width=c.width // c.heads, mlp_ratio=c.mlp_ratio)
    text = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)
    torch.manual_seed(3)
    return randomized(open_clip.model.CLIP(embed_dim=c.embed_dim, vision_cfg=vision, text_cfg=text))


@pytest.fixture(scope="module")
def clip_state():
    return clone_state(tiny_open_clip())


def visual_part(state):
    return {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}


def test_open_clip_bin_and_safetensors(tmp_path, clip_state):
    assert "token_embedding.weight" in clip_state and "logit_scale" in clip_state
    torch.save(clip_state, tmp_path / "open_clip_pytorch_model.bin")
    save_file(clip_state, tmp_path / "open_clip_model.safetensors")
    for name in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        encoder = load_clip_vision(tmp_path / name, CFG.clip)
        assert isinstance(encoder, ClipImageEncoder)
        assert_same_state(encoder.visual, visual_part(clip_state))


def test_open_clip_training_checkpoint_with_module_prefix(tmp_path, clip_state):
    wrapped = {"epoch": 32, "state_dict": {f"module.{k}": v for k, v in clip_state.items()}}
    torch.save(wrapped, tmp_path / "epoch_32.pt")
    assert_same_state(load_clip_vision(tmp_path / "epoch_32.pt", CFG.clip).visual, visual_part(clip_state))


def test_open_clip_errors(tmp_path, clip_state):
    text_only = {k: v for k, v in clip_state.items() if not k.startswith("visual.")}
    save_file(text_only, tmp_path / "text.safetensors")
    with pytest.raises(ValueError, match=r"no 'visual\.\*' tensors"):
        load_clip_vision(tmp_path / "text.safetensors", CFG.clip)

    wrong = dict(clip_state)
    wrong["visual.positional_embedding"] = torch.randn(5, CFG.clip.width)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError) as info:
        load_clip_vision(tmp_path / "wrong.safetensors", CFG.clip)
    tokens, width = CFG.clip.num_tokens, CFG.clip.width
    assert f"positional_embedding: expected ({tokens}, {width}), found (5, {width})" in str(info.value)
    assert str(tmp_path / "wrong.safetensors") in str(info.value)

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.bin"))):
        load_clip_vision(tmp_path / "absent.bin", CFG.clip)
