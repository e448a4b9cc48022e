"""Importing the published ColorizeDiffusionXL checkpoint (model/cdxl_checkpoint.py, jobs/import_checkpoint.py)
and the meta-device loading it relies on (model/weights.build_and_load).

The published files are not available to CI; their key names and shapes are (tests/fixtures/cdxl/, from the
reference code's configs). So the tests (1) check the full-size listings against the ``sdxl`` preset built on
the meta device, key by key and shape by shape, and (2) import reduced-width files that carry exactly the
listed key names, written from a small model of the same structure, through the same code as a real import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from model.cdxl_checkpoint import (
    PARTS,
    PROJECTOR_PREFIX,
    SKETCH_ENCODER_PREFIX,
    group_keys,
    import_checkpoint,
    lora_layer_names,
    map_lora,
    map_part,
    map_reference_net,
    reference_schedule_buffers,
)
from model.colorizer import Colorizer
from model.config import ClipVisionConfig, ColorizerConfig, TaggerConfig, sdxl, tiny
from model.plugin import plugin_state_keys
from model.pretrained import clip_vision_from_hf, load_clip_vision, load_tagger, load_unet
from model.reference_encoders import WDTagger
from model.unet import build_unet
from model.vae import build_vae
from model.weights import build_and_load, meta_tensors

FIXTURES = Path(__file__).parent / "fixtures" / "cdxl"
CHECKPOINT_KEYS = json.loads((FIXTURES / "cdxl-checkpoint-keys.json").read_text())
ENCODER_KEYS = json.loads((FIXTURES / "cdxl-encoder-keys.json").read_text())
CLIP_PREFIX, TAGGER_PREFIX = "cond_stage_model.model.", "img_embedder.model."


def meta_listing(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def shapes_of(state) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def meta_state(build) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build().state_dict()


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


# ------------------------------------------------------------------------ full-size listings vs the preset


@pytest.fixture(scope="module")
def sdxl_groups():
    return group_keys(CHECKPOINT_KEYS["sdxl"])


def test_listings_group_as_documented(sdxl_groups):
    counts = {part: len(keys) for part, keys in sdxl_groups.parts.items()}
    assert counts == {"unet": 1680, "vae": 248, "sketch_encoder": 47, "projector": 13}
    assert len(sdxl_groups.schedule) == 12 and not sdxl_groups.unknown and sdxl_groups.kind == "sdxl"
    xlv2 = group_keys(CHECKPOINT_KEYS["xlv2"])
    assert {g: len(k) for g, k in xlv2.plugin.items()} == {"bg_encoder": 1162, "background_lora": 420, "conv_fg": 2}
    assert xlv2.parts == sdxl_groups.parts and not xlv2.unknown and xlv2.kind == "xlv2"


def test_every_sdxl_key_maps_onto_the_sdxl_preset_with_its_shape(sdxl_groups):
    """Each published tensor has a place in our model at the ``sdxl`` preset, with the same shape, and every
    tensor of ours is filled: U-Net, VAE, sketch encoder and projector from the checkpoint (the schedule
    buffers are checked and dropped), CLIP and the tagger from the encoder listing."""
    cfg = sdxl()
    listing = meta_listing(CHECKPOINT_KEYS["sdxl"])
    builders = {"unet": lambda: build_unet(cfg.unet), "vae": lambda: build_vae(cfg.vae)}
    with torch.device("meta"):
        model = Colorizer(cfg)
    for part in PARTS:
        mapped = map_part(part, {key: listing[key] for key in sdxl_groups.parts[part]}, cfg, "sdxl.safetensors")
        ours = meta_state(builders[part]) if part in builders else getattr(model, part).state_dict()
        assert shapes_of(mapped) == shapes_of(ours), part
    # label_emb takes the two 256-d sinusoids (√(H·W) and the aesthetic score): our add_embedding at sdxl
    assert CHECKPOINT_KEYS["sdxl"]["model.diffusion_model.label_emb.0.0.weight"] == [1280, 512]

    encoders = meta_listing(ENCODER_KEYS)
    hf = {key[len(CLIP_PREFIX):]: value for key, value in encoders.items() if key.startswith(CLIP_PREFIX)}
    tagger = {key[len(TAGGER_PREFIX):]: value for key, value in encoders.items() if key.startswith(TAGGER_PREFIX)}
    assert len(hf) + len(tagger) == len(encoders)
    assert shapes_of(clip_vision_from_hf(hf, "clip")) == shapes_of(model.clip.visual.state_dict())
    assert shapes_of(tagger) == shapes_of(model.tagger.model.state_dict())


def test_every_xlv2_plugin_key_maps_onto_the_sdxl_preset_with_its_shape():
    """The ReferenceNet (after dropping the decoder resnet and upsampler it never uses) and the background LoRA
    (rank 4) of the published listing fill our plug-in at the ``sdxl`` preset exactly, key by key and shape by
    shape."""
    from model.plugin import Plugin, PluginConfig
    from model.split_attention import add_background_lora, lora_modules

    keys = CHECKPOINT_KEYS["xlv2"]
    groups = group_keys(keys)
    cfg = sdxl()
    reference_net, dropped = map_reference_net(meta_listing({k: keys[k] for k in groups.plugin["bg_encoder"]}),
                                               cfg.unet, "xlv2.safetensors")
    assert sorted({".".join(key.split(".")[:3]) for key in dropped}) == ["up_blocks.1.upsamplers", "up_blocks.2.resnets"]
    assert len(dropped) == 14
    names = lora_layer_names({k: keys[k] for k in groups.parts["unet"]}, cfg, "xlv2.safetensors")
    lora = map_lora(meta_listing({k: keys[k] for k in groups.plugin["background_lora"]}), names, "xlv2.safetensors")
    with torch.device("meta"):
        plugin = Plugin(cfg.unet, PluginConfig(lora_rank=4))
        unet = build_unet(cfg.unet)
        add_background_lora(unet, 4)
    assert shapes_of(reference_net) == shapes_of(plugin.reference_net.unet.state_dict())
    assert shapes_of(lora) == shapes_of(lora_modules(unet).state_dict())


# --------------------------------------------------------------------------------- meta + assign loading


def test_meta_assign_tagger_matches_a_normally_built_one(tmp_path):
    """SwinV2 keeps relative-position tables, shifted-window masks and k_bias as non-persistent buffers: no
    file has them, so after a meta-device build they must be recomputed, at the load dtype."""
    cfg = TaggerConfig(image_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_tags=5)
    reference = randomized(WDTagger(cfg), seed=3).eval()
    assert any(name.endswith("attn_mask") for name, _ in reference.named_buffers())  # shifted blocks present
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "tags.csv").write_text("tag_id,name,category,count\n" + "".join(f"{i},t{i},0,0\n" for i in range(5)))
    images = torch.rand(2, 3, 48, 40)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_tagger(tmp_path / "model.safetensors", tmp_path / "tags.csv", cfg, dtype=dtype).eval()
        expected = reference if dtype == torch.float32 else randomized(WDTagger(cfg), seed=3).to(dtype).eval()
        assert not meta_tensors(loaded)
        ours, theirs = dict(loaded.named_buffers()), dict(expected.named_buffers())
        assert set(ours) == set(theirs)
        for name, buffer in theirs.items():
            assert ours[name].dtype == buffer.dtype and torch.equal(ours[name], buffer), name
        with torch.no_grad():
            assert torch.equal(loaded(images.to(dtype)).logits, expected(images.to(dtype)).logits)


def test_meta_assign_unet_loads_at_the_dtype_without_a_float32_copy(tmp_path):
    cfg = tiny().unet
    unet = randomized(build_unet(cfg), seed=4)
    unet.save_pretrained(tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet", cfg, dtype=torch.bfloat16)
    assert not meta_tensors(loaded)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key


def test_buffers_no_module_can_recompute_are_an_error():
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    state = {k: v.detach().clone() for k, v in Table().state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot recompute.*\n    table"):
        build_and_load(Table, state, "x.safetensors")


# ------------------------------------------------------------------------------------ CLIP layouts


def tiny_hf_clip(cfg: ClipVisionConfig, seed: int = 5) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    hf_cfg = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, image_size=cfg.image_size,
                              patch_size=cfg.patch_size, projection_dim=cfg.embed_dim, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    model = CLIPVisionModelWithProjection(hf_cfg).eval()
    return randomized(model, seed)


@pytest.mark.parametrize("shards", [False, True])
def test_transformers_clip_gives_the_same_tokens_as_our_encoder(tmp_path, shards):
    """The reference's HFCLIPVisionModel takes post_layernorm + visual_projection of every last_hidden_state
    token; our OpenCLIP tower, loaded from the converted tensors, must give the same tokens."""
    cfg = tiny().clip
    hf = tiny_hf_clip(cfg)
    hf.save_pretrained(tmp_path / "clip", max_shard_size="100KB" if shards else "10GB")
    assert (tmp_path / "clip" / ("model.safetensors.index.json" if shards else "model.safetensors")).is_file()
    encoder = load_clip_vision(tmp_path / "clip", cfg)
    encoder.prepare = lambda images: images  # the same pixels into both towers
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels).last_hidden_state
        expected = hf.visual_projection(hf.vision_model.post_layernorm(hidden))
        ours = encoder(pixels)
    assert ours.shape == expected.shape == (2, cfg.num_tokens, cfg.embed_dim)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()


def test_clip_file_with_neither_layout_is_named(tmp_path):
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, tmp_path / "text.safetensors")
    with pytest.raises(ValueError, match=r"no 'visual\.\*' tensors .* nor 'vision_model\.\*'"):
        load_clip_vision(tmp_path / "text.safetensors", tiny().clip)


# ----------------------------------------------------------------------- reduced-width published files


def reduced() -> ColorizerConfig:
    """The ``sdxl`` preset's structure (layers per block, transformer depths, levels), so a file written
    from it carries exactly the published key names, at the ``tiny`` preset's widths."""
    return tiny().replace(unet={"layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10)},
                          vae={"layers_per_block": 2, "block_out_channels": (8, 16, 32, 32)})


def file_names(part: str, groups) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our key → (published key, published rank) for a converted part, read off the converter itself: it
    hands the listing's (meta) tensors through, so each of ours is, or views, one published tensor."""
    listing = meta_listing({key: CHECKPOINT_KEYS["sdxl"][key] for key in groups.parts[part]})
    by_id = {id(value): key for key, value in listing.items()}
    mapped = map_part(part, dict(listing), sdxl(), "listing")
    names = {}
    for ours, value in mapped.items():
        key = by_id.get(id(value)) or by_id[id(value._base)]
        names[ours] = (key, len(CHECKPOINT_KEYS["sdxl"][key]))
    return names


@pytest.fixture(scope="module")
def published(tmp_path_factory, sdxl_groups):
    """A reduced ``sdxl`` file in the published layout, the encoders' files, and what each part holds."""
    root = tmp_path_factory.mktemp("cdxl")
    cfg = reduced()
    model = Colorizer(cfg)
    parts = {
        "unet": randomized(model.unet.unet, 10), "vae": randomized(model.vae, 11),
        "sketch_encoder": randomized(model.sketch_encoder, 12), "projector": randomized(model.projector, 13),
    }
    states = {part: {k: v.detach().clone() for k, v in module.state_dict().items()} for part, module in parts.items()}
    checkpoint = {}
    for part in ("unet", "vae"):
        for ours, (key, rank) in file_names(part, sdxl_groups).items():
            value = states[part][ours]
            checkpoint[key] = value.reshape(*value.shape, *[1] * (rank - value.ndim)).half()
    for part, prefix in (("sketch_encoder", SKETCH_ENCODER_PREFIX), ("projector", PROJECTOR_PREFIX)):
        checkpoint.update({prefix + key: value.half() for key, value in states[part].items()})
    checkpoint.update(reference_schedule_buffers(cfg.diffusion))
    assert set(checkpoint) == set(CHECKPOINT_KEYS["sdxl"])  # exactly the published names, at reduced widths
    save_file(checkpoint, root / "sdxl_reduced.safetensors")

    tiny_hf_clip(cfg.clip).save_pretrained(root / "clip")
    tagger = randomized(WDTagger(cfg.tagger), 14)
    save_file({k: v.contiguous() for k, v in tagger.model.state_dict().items()}, root / "tagger.safetensors")
    tags = [f"tag_{i}" for i in range(cfg.tagger.num_tags)]
    (root / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "".join(f"{i},{t},0,1\n" for i, t in enumerate(tags)))
    return {"root": root, "checkpoint": checkpoint, "states": states, "config": cfg,
            "tagger": {k: v.detach().clone() for k, v in tagger.model.state_dict().items()}}


XLV2_RANK = 3


@pytest.fixture(scope="module")
def xlv2(published):
    """A reduced ``xlv2`` file: the reduced ``sdxl`` file plus the plug-in's published keys (ReferenceNet
    ``bg_encoder.*`` at in_channels 6 and a 4-sinusoid add-embedding, every attn2 LoRA factor at rank 3 with
    non-zero ``up``, ``conv_fg``), written from a randomized stock diffusers U-Net of the ReferenceNet's
    constructor arguments. ``ours``: plug-in file key (``model.plugin``'s names) → published key."""
    from model.plugin import reference_net_kwargs
    from diffusers import UNet2DConditionModel

    cfg = published["config"]
    keys = CHECKPOINT_KEYS["xlv2"]
    groups = group_keys(keys)
    listing = meta_listing({key: keys[key] for key in groups.plugin["bg_encoder"]})
    kept, dropped = map_reference_net(dict(listing), sdxl().unet, "listing")
    full = _convert_with_drops(listing)  # diffusers key → published key, dropped ones included
    assert set(full) == set(kept) | set(dropped) and len(dropped) == 14
    stock = randomized(UNet2DConditionModel(**reference_net_kwargs(cfg.unet)), 20).state_dict()
    file = dict(published["checkpoint"])
    for ours, theirs in full.items():
        value = stock[ours]
        rank = len(keys[theirs])
        file[theirs] = value.reshape(*value.shape, *[1] * (rank - value.ndim)).half().contiguous()
    assert {theirs for theirs in full.values()} == set(groups.plugin["bg_encoder"])
    ours_to_file = {f"reference_net.{ours}": theirs for ours, theirs in full.items() if ours in kept}
    layer_names = lora_layer_names({key: keys[key] for key in groups.parts["unet"]}, sdxl(), "listing")
    denoiser = published["states"]["unet"]
    generator = torch.Generator().manual_seed(21)
    for key in groups.plugin["background_lora"]:
        layer, factor = re.fullmatch(r"model\.diffusion_model\.(.*\.attn2\.to_[qkv])\.lora_(down|up)_background\.weight",
                                     key).groups()
        ours = layer_names[layer]
        out_features, in_features = denoiser[f"{ours}.weight"].shape
        shape = (XLV2_RANK, in_features) if factor == "down" else (out_features, XLV2_RANK)
        file[key] = (torch.randn(shape, generator=generator) * 0.2).half()
        ours_to_file[f"background_lora.{ours}.{factor}.weight"] = key
    channels = cfg.unet.block_out_channels[0]
    file["model.diffusion_model.conv_fg.weight"] = torch.randn(channels, 4, 3, 3, generator=generator).half()
    file["model.diffusion_model.conv_fg.bias"] = torch.randn(channels, generator=generator).half()
    assert set(file) == set(keys)  # exactly the published names, at reduced widths
    save_file(file, published["root"] / "xlv2_reduced.safetensors")
    return {"file": file, "ours": ours_to_file}


def _convert_with_drops(listing: dict[str, torch.Tensor]) -> dict[str, str]:
    """diffusers key → published key of every ``bg_encoder.*`` tensor (dropped ones included), by running the
    U-Net converter on the listing at the ReferenceNet's arguments."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from model.plugin import reference_net_kwargs

    by_id = {id(value): key for key, value in listing.items()}
    renamed = {"model.diffusion_model." + key[len("bg_encoder."):]: value for key, value in listing.items()}
    converted = convert_ldm_unet_checkpoint(renamed, reference_net_kwargs(sdxl().unet))
    return {ours: by_id[id(value)] for ours, value in converted.items()}


def run_import(published, out, checkpoint=None, name="sdxl_reduced.safetensors", **kwargs):
    root = published["root"]
    path = root / name
    if checkpoint is not None:
        save_file(checkpoint, path)
    lines = []
    report = import_checkpoint(path, root / "clip", root / "tagger.safetensors", root / "selected_tags.csv", out,
                               config=published["config"], log=lines.append, **kwargs)
    return report, lines


def test_reduced_sdxl_file_imports_into_a_model_folder(published, tmp_path):
    report, progress = run_import(published, tmp_path / "model", dtype=torch.bfloat16)
    assert report.kind == "sdxl" and report.prediction_type == "v_prediction"
    assert report.loaded["unet"] == 1680 and report.loaded["vae"] == 248
    assert report.loaded["sketch_encoder"] == 47 and report.loaded["projector"] == 13
    assert list(report.dropped.values()) == [12]
    text = "\n".join(report.lines())
    assert "dropped 12 tensors: DDPM schedule buffers" in text and "v_prediction" in text
    assert "transformers layout to OpenCLIP" in text and progress

    model = Colorizer.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert model.config.diffusion.prediction_type == "v_prediction"
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    states = published["states"]
    loaded = {"unet": model.unet.unet, "vae": model.vae, "sketch_encoder": model.sketch_encoder,
              "projector": model.projector}
    for part, module in loaded.items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, part
        for key, value in module.state_dict().items():
            assert torch.equal(value, states[part][key].half().to(torch.bfloat16)), f"{part}.{key}"
    for key, value in model.tagger.model.state_dict().items():
        assert torch.equal(value, published["tagger"][key].to(torch.bfloat16)), key
    hf = tiny_hf_clip(published["config"].clip)
    assert torch.equal(model.clip.visual.proj, hf.visual_projection.weight.t().to(torch.bfloat16))
    assert not meta_tensors(model)


def test_parameterization_from_the_file_name_or_the_flag(published, tmp_path):
    checkpoint = published["checkpoint"]
    report, _ = run_import(published, tmp_path / "eps", checkpoint, name="sdxl_eps.safetensors", dtype=torch.float32)
    assert report.prediction_type == "epsilon" and "contains 'eps'" in report.prediction_reason
    assert Colorizer.from_pretrained(tmp_path / "eps", components=()).config.diffusion.prediction_type == "epsilon"
    report, _ = run_import(published, tmp_path / "v", checkpoint, name="sdxl_eps.safetensors", prediction="v")
    assert report.prediction_type == "v_prediction" and report.prediction_reason == "given"


def test_missing_and_misshaped_keys_are_named_with_shapes(published, tmp_path):
    checkpoint = dict(published["checkpoint"])
    del checkpoint["control_encoder.attn_layer.to_q.weight"]
    expected = tuple(published["states"]["sketch_encoder"]["attn_layer.to_q.weight"].shape)
    with pytest.raises(ValueError) as info:
        run_import(published, tmp_path / "a", checkpoint, name="missing.safetensors")
    message = str(info.value)
    assert "the sketch encoder (control_encoder.* in the file)" in message
    assert f"1 missing from the file:\n    attn_layer.to_q.weight: expected {expected}" in message

    checkpoint = dict(published["checkpoint"])
    latent = published["config"].unet.latent_channels
    checkpoint["model.diffusion_model.out.2.weight"] = torch.zeros(latent, 7, 3, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=rf"the U-Net .*\n.*\n    conv_out\.weight: expected \({latent}, 32, 3, 3\), "
                                         rf"found \({latent}, 7, 3, 3\)"):
        run_import(published, tmp_path / "b", checkpoint, name="misshaped.safetensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_another_noise_schedule_is_refused(published, tmp_path):
    checkpoint = dict(published["checkpoint"])
    checkpoint.update(reference_schedule_buffers(published["config"].diffusion, beta_start=0.0001, beta_end=0.02))
    with pytest.raises(ValueError, match=r"DDPM schedule differs from ours .*betas\[\d+\] is"):
        run_import(published, tmp_path / "m", checkpoint, name="other_schedule.safetensors")
    checkpoint["betas"] = torch.zeros(500)
    with pytest.raises(ValueError, match=r"betas has shape \(500,\), expected \(1000,\)"):
        run_import(published, tmp_path / "m", checkpoint, name="other_schedule.safetensors")


def test_unknown_tensors_are_refused(published, tmp_path):
    checkpoint = dict(published["checkpoint"])
    checkpoint["cond_stage_model.model.logit_scale"] = torch.zeros(())
    with pytest.raises(ValueError, match=r"1 tensors belong to no part.*\n    cond_stage_model\.model\.logit_scale: found \(\)"):
        run_import(published, tmp_path / "m", checkpoint, name="unknown.safetensors")


def test_xlv2_backbone_only_drops_and_counts_the_plugin(published, xlv2, tmp_path):
    report, _ = run_import(published, tmp_path / "x", name="xlv2_reduced.safetensors", backbone_only=True)
    assert report.kind == "xlv2" and report.loaded["unet"] == 1680 and "plugin.reference_net" not in report.loaded
    assert sorted(report.dropped.values()) == [2, 12, 420, 1162]
    assert any("ReferenceNet" in line and "1162 tensors" in line and "--backbone-only" in line
               for line in report.lines())
    assert not (tmp_path / "x" / "plugin").exists()
    assert Colorizer.from_pretrained(tmp_path / "x", components=()).plugin is None


def test_xlv2_file_imports_with_its_plugin(published, xlv2, tmp_path):
    """Every published plug-in tensor lands in the loaded model under its diffusers name; conv_fg and the
    ReferenceNet's unused tail are dropped and counted."""
    report, _ = run_import(published, tmp_path / "m", name="xlv2_reduced.safetensors", dtype=torch.float32)
    assert report.kind == "xlv2" and report.loaded["unet"] == 1680
    assert report.loaded["plugin.reference_net"] == 1148 and report.loaded["plugin.background_lora"] == 420
    dropped = {what: count for what, count in report.dropped.items() if "DDPM" not in what}
    assert sorted(dropped.values()) == [2, 14]
    text = "\n".join(report.lines())
    assert re.search(r"dropped 2 tensors: .*conv_fg", text)
    assert re.search(r"dropped 14 tensors: .*up_blocks\.1\.upsamplers\.0\.\*?, up_blocks\.2\.resnets\.0\.", text)
    assert "rank 3" in text

    config = json.loads((tmp_path / "m" / "plugin" / "config.json").read_text())
    assert config["lora_rank"] == 3
    model = Colorizer.from_pretrained(tmp_path / "m", components=("unet",))
    assert model.plugin is not None and model.plugin.config.lora_rank == 3
    state = plugin_state_keys(model)
    assert len(state) == len(xlv2["ours"]) == 1148 + 420
    from model.plugin import _weights_view

    loaded = _weights_view(model).state_dict()
    assert set(loaded) == set(xlv2["ours"])
    for ours, theirs in xlv2["ours"].items():
        assert torch.equal(loaded[ours], xlv2["file"][theirs].float().reshape(loaded[ours].shape)), (ours, theirs)
    backbone = published["states"]["unet"]
    for key, value in model.unet.unet.state_dict().items():  # the backbone is untouched by the plug-in
        if ".processor." not in key:  # the LoRA lives in the processors
            assert torch.equal(value, backbone[key].half().float()), key


def test_xlv2_refusals_name_the_keys_and_shapes(published, xlv2, tmp_path):
    file = xlv2["file"]
    key = "bg_encoder.output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
    checkpoint = {k: v for k, v in file.items() if k != key}
    with pytest.raises(ValueError) as info:
        run_import(published, tmp_path / "a", checkpoint, name="xlv2_missing.safetensors")
    shape = tuple(file[key].shape)
    assert "the plug-in's ReferenceNet (bg_encoder.* in the file" in str(info.value)
    assert (f"reference_net.unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight: expected {shape}"
            in str(info.value))

    lora = "model.diffusion_model.output_blocks.2.1.transformer_blocks.9.attn2.to_v.lora_up_background.weight"
    checkpoint = dict(file)
    checkpoint[lora] = torch.zeros(7, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"background LoRA .*\n(.*\n)*    up_blocks\.0\.attentions\.2\."
                                         r"transformer_blocks\.9\.attn2\.to_v\.up\.weight: expected \(\d+, 3\), "
                                         r"found \(7, 3\)"):
        run_import(published, tmp_path / "b", checkpoint, name="xlv2_misshaped.safetensors")

    checkpoint = dict(file)
    stray = "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn2.to_q.lora_down_background.weight"
    checkpoint[stray] = torch.zeros(3, 32, dtype=torch.float16)  # the top level has no attention
    with pytest.raises(ValueError, match=r"1 background LoRA tensors belong to no cross-attention projection of "
                                         r"the U-Net:\n    " + re.escape(stray) + r": found \(3, 32\)"):
        run_import(published, tmp_path / "c", checkpoint, name="xlv2_stray.safetensors")

    checkpoint = {k: v for k, v in file.items() if "lora" not in k}
    with pytest.raises(ValueError, match=r"only part of the xlv2 plug-in(.*\n)*.*background LoRA .*: none"):
        run_import(published, tmp_path / "d", checkpoint, name="xlv2_half.safetensors")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_job_prints_the_report_and_turns_refusals_into_one_line(published, tmp_path, capsys, monkeypatch):
    from jobs.import_checkpoint import main

    root = published["root"]
    args = ["--cdxl", str(root / "sdxl_reduced.safetensors"), "--clip", str(root / "clip"),
            "--tagger-weights", str(root / "tagger.safetensors"), "--tagger-tags", str(root / "selected_tags.csv")]
    # the job imports at the sdxl preset: a reduced file does not fit it, and the message says where
    with pytest.raises(SystemExit, match=r"^import_checkpoint: .*weights do not fit the U-Net"):
        main([*args, "--out", str(tmp_path / "job")])
    assert not (tmp_path / "job").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main([*args, "--out", str(tmp_path / "full")])

    monkeypatch.setattr("model.cdxl_checkpoint.sdxl", reduced)  # the job's default architecture, reduced
    assert main([*args, "--out", str(tmp_path / "job"), "--dtype", "fp16", "--prediction", "eps"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("loaded 1680 tensors into unet") for line in lines)
    assert json.loads(lines[-1]) == {"model": str(tmp_path / "job"), "checkpoint": "sdxl",
                                     "prediction_type": "epsilon", "dtype": "fp16", "dropped": 12, "plugin": False}


def test_job_imports_an_xlv2_file_with_its_plugin(published, xlv2, tmp_path, capsys, monkeypatch):
    from jobs.import_checkpoint import main

    root = published["root"]
    args = ["--cdxl", str(root / "xlv2_reduced.safetensors"), "--clip", str(root / "clip"),
            "--tagger-weights", str(root / "tagger.safetensors"), "--tagger-tags", str(root / "selected_tags.csv")]
    monkeypatch.setattr("model.cdxl_checkpoint.sdxl", reduced)
    assert main([*args, "--out", str(tmp_path / "job"), "--dtype", "fp16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("loaded 1148 tensors into plugin.reference_net") for line in lines)
    assert any(line.startswith("dropped 2 tensors") and "conv_fg" in line for line in lines)
    assert json.loads(lines[-1])["plugin"] is True and json.loads(lines[-1])["dropped"] == 12 + 2 + 14
    assert (tmp_path / "job" / "plugin" / "model.safetensors").is_file()
    assert main([*args, "--out", str(tmp_path / "backbone"), "--backbone-only"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plugin"] is False
