"""Numerical parity with the authors' reference code (tellurion-kanata/ColorizeDiffusionXL).

The fixtures in ``tests/fixtures/parity`` (see its README) are the reference's own outputs at a reduced width
with random weights, on CPU in float32. Each test loads the fixture weights the way a user loads the
released files (the reference checkpoint layout, the transformers CLIP tower, the timm tagger), runs our
component on the fixture's inputs and compares. ``pytest -s`` prints the errors measured.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.config import (
    ClipVisionConfig,
    ColorizerConfig,
    ProjectorConfig,
    SketchEncoderConfig,
    TaggerConfig,
    UNetConfig,
    VAEConfig,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity"

UNET = UNetConfig(block_out_channels=(32, 64, 128), attention_levels=(False, True, True),
                  transformer_layers_per_block=(1, 1, 2), attention_heads=(2, 4, 8), layers_per_block=2,
                  cross_attention_dim=64, vector_embed_dim=32, vector_condition_values=2, norm_num_groups=32)
VAE = VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, scaling_factor=0.13025,
                norm_num_groups=32)
SKETCH = SketchEncoderConfig(in_channels=3, stem_channels=(16, 32, 96, 256), attention_head_dim=32)
PROJECTOR = ProjectorConfig(attention_head_dim=16)
CLIP = ClipVisionConfig(image_size=224, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=4.0, embed_dim=48)
TAGGER = TaggerConfig(image_size=448, patch_size=4, window_size=14, embed_dim=16, depths=(1, 1, 1, 1),
                      num_heads=(1, 1, 2, 2), num_tags=32)
TAGGER_SHIFTED = TaggerConfig(image_size=448, patch_size=4, window_size=14, embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 1, 2, 2), num_tags=32)
CONFIG = ColorizerConfig(unet=UNET, vae=VAE, sketch_encoder=SKETCH, tagger=TAGGER, clip=CLIP, projector=PROJECTOR)


def _recipe():
    spec = importlib.util.spec_from_file_location("parity_recipe", FIXTURES / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """The fixture weights written as the published files (reference checkpoint, HF CLIP, timm tagger), plus
    a ``selected_tags.csv`` for the tagger."""
    folder = tmp_path_factory.mktemp("parity-weights")
    paths = _recipe().write_files(folder)
    tags = folder / "selected_tags.csv"
    tags.write_text("tag_id,name,category,count\n" + "".join(f"{i},tag_{i},0,1\n" for i in range(TAGGER.num_tags)))
    paths["tags"] = tags
    return paths


def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(FIXTURES / f"{name}.safetensors")), json.loads((FIXTURES / f"{name}.json").read_text())


def compare(what: str, ours: torch.Tensor, ref: torch.Tensor, *, rtol: float = 1e-4, atol: float) -> None:
    """Print the max abs and max rel error (rel over elements above 1% of the reference's scale), then assert."""
    ours, ref = ours.detach().float(), ref.detach().float()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    err = (ours - ref).abs()
    scale = ref.abs().max().item()
    big = ref.abs() > 0.01 * scale
    rel = (err[big] / ref.abs()[big]).max().item() if big.any() else 0.0
    print(f"\n  {what}: max abs {err.max().item():.3g}, max rel {rel:.3g} (reference max |x| {scale:.3g}, "
          f"std {ref.std().item():.3g})")
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------- component loaders
def load_sketch_encoder(weights: Path):
    from model.sketch_encoder import SketchEncoder
    from model.unet import injection_points
    from model.weights import check_and_load, read_state_dict, under_prefix

    encoder = SketchEncoder(SKETCH, injection_points(UNET)).eval()
    state = under_prefix(read_state_dict(weights, prefixes=("control_encoder.",)), "control_encoder.")
    check_and_load(encoder, state, weights)
    return encoder


def load_projector(weights: Path):
    from model.projector import ReferenceProjector
    from model.weights import check_and_load, read_state_dict, under_prefix

    projector = ReferenceProjector(clip_dim=CLIP.embed_dim, tagger_dim=TAGGER.token_dim,
                                   context_dim=UNET.cross_attention_dim, num_tokens=TAGGER.num_tokens,
                                   head_dim=PROJECTOR.attention_head_dim).eval()
    check_and_load(projector, under_prefix(read_state_dict(weights, prefixes=("proj.",)), "proj."), weights)
    return projector


def load_unet(weights: Path):
    from model import pretrained
    from model.unet import ColorizerUNet

    return ColorizerUNet(pretrained.load_unet(weights, UNET, dtype=torch.float32)).eval()


def image01(u8: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) RGB in [0, 1], as :func:`model.images.image_to_tensor`."""
    return u8.permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def unet(published):
    return load_unet(published["weights"])


@pytest.fixture(scope="module")
def sketch_encoder(published):
    return load_sketch_encoder(published["weights"])


@pytest.fixture(scope="module")
def colorizer(published, tmp_path_factory):
    """The user's path: the published-layout files imported into a model folder, loaded back."""
    from model.cdxl_checkpoint import import_checkpoint
    from model.colorizer import Colorizer

    folder = tmp_path_factory.mktemp("parity-model") / "model"
    import_checkpoint(published["weights"], published["clip_vision"], published["wd_tagger"], published["tags"],
                      folder, dtype=torch.float32, config=CONFIG, log=lambda message: None)
    return Colorizer.from_pretrained(folder).eval()


# ------------------------------------------------------------------------------------------------- tests
@torch.no_grad()
def test_sketch_encoder(sketch_encoder):
    data, _ = fixture("sketch_encoder")
    outs = sketch_encoder(data["sketch"])
    assert len(outs) == 4
    for i, out in enumerate(outs):
        compare(f"sketch encoder out{i}", out, data[f"out{i}"], atol=1e-4)


@torch.no_grad()
def test_projector(published):
    data, _ = fixture("projector")
    context = load_projector(published["weights"])(data["clip_tokens"], data["wd_tokens"])
    compare("projector context", context, data["context"], atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("strength, key", [(1.0, "out_scale_1"), (0.6, "out_scale_0_6")])
def test_unet(unet, strength, key):
    data, _ = fixture("unet")
    controls = [data[f"control{i}"] for i in range(4)]
    out = unet(data["x"], data["timesteps"], data["context"], data["vector_values"], controls,
               reference_strength=strength).prediction
    compare(f"U-Net (reference strength {strength})", out, data[key], atol=1e-4)


@torch.no_grad()
def test_vector_condition_is_the_reference_y(unet):
    """Our U-Net embeds the raw [√(H·W), 7]; the reference feeds its sinusoids: the same vector."""
    from model.vector_condition import vector_condition

    data, _ = fixture("unet")
    values = vector_condition(96, 128, 7.0, batch=2)
    compare("vector condition values", values, data["vector_values"], atol=1e-5)
    y = unet.unet.add_time_proj(values.flatten()).reshape(2, -1)
    compare("sinusoids of the vector condition (y)", y, data["y"], atol=1e-5)


@torch.no_grad()
def test_clip_tokens(published):
    from model import pretrained

    data, _ = fixture("encoders")
    clip = pretrained.load_clip_vision(published["clip_vision"], CLIP, dtype=torch.float32).eval()
    compare("CLIP tokens", clip(image01(data["image_u8"])), data["clip_tokens"], atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("weights, cfg, key", [("wd_tagger", TAGGER, "wd_tokens"),
                                              ("wd_tagger_shifted", TAGGER_SHIFTED, "wd_tokens_shifted")])
def test_tagger_tokens(published, weights, cfg, key):
    from model import pretrained

    data, _ = fixture("encoders")
    tagger = pretrained.load_tagger(published[weights], published["tags"], cfg, dtype=torch.float32).eval()
    out = tagger(image01(data["image_u8"]))
    compare(f"WD tokens ({weights})", out.tokens, data[key], atol=1e-4)
    if key == "wd_tokens":  # the pooled head is the mean of the per-token logits (a linear head)
        compare("WD pooled logits", out.logits, data["wd_logits"].mean(1), atol=1e-4)


@pytest.mark.parametrize("which", ["tall", "wide"])
def test_sketch_letterbox(which):
    from model.images import sketch_to_tensor

    data, settings = fixture("letterbox")
    height, width = settings["target_hw"]
    ours = sketch_to_tensor(data[f"{which}_drawing_u8"].numpy(), (width, height))
    compare(f"letterboxed sketch ({which})", ours, data[f"{which}_sketch"], rtol=0, atol=1e-6)


@torch.no_grad()
def test_vae_decode(published):
    from model import pretrained

    data, _ = fixture("colorize")
    vae = pretrained.load_vae(published["weights"], VAE, dtype=torch.float32).eval()
    for run in ("ref_cfg", "dual_cfg"):
        decoded = vae.decode(data[f"{run}_latents"] / VAE.scaling_factor).sample
        compare(f"VAE decode ({run})", decoded, data[f"{run}_decoded"], atol=1e-4)


@torch.no_grad()
def test_reference_context(published):
    """CLIP + tagger + projector from the reference picture: the conditional context of the whole run."""
    from model import pretrained

    enc, _ = fixture("encoders")
    data, _ = fixture("colorize")
    image = image01(enc["image_u8"])
    clip = pretrained.load_clip_vision(published["clip_vision"], CLIP, dtype=torch.float32).eval()
    tagger = pretrained.load_tagger(published["wd_tagger"], published["tags"], TAGGER, dtype=torch.float32).eval()
    context = load_projector(published["weights"])(clip(image), tagger(image).tokens)
    compare("reference context", context, data["ref_cfg_context"][:1], atol=1e-4)


RUNS = {"ref_cfg": (4.5, 1.0), "dual_cfg": (4.5, 1.5)}


def test_sampler_sigmas():
    """DPM++ 3M SDE's levels: exponential from the schedule's σ_max to σ_min, next-to-last dropped, then 0."""
    from model.config import DiffusionConfig
    from model.sampler import NoiseSchedule

    data, settings = fixture("colorize")
    sigmas = NoiseSchedule.from_config(DiffusionConfig()).exponential_sigmas(settings["steps"])
    compare("sampler sigmas", sigmas, data["ref_cfg_sigmas"], rtol=1e-6, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("run", list(RUNS))
def test_sampled_latents(unet, sketch_encoder, run):
    """The sampler and guidance with the reference's own conditions: DPM++ 3M SDE, 6 steps, per-item
    Brownian trees, v-prediction, strength 0.8, from the reference's x_T."""
    from model.generate import generate_latents
    from model.guidance import Guidance
    from model.vector_condition import vector_condition

    data, settings = fixture("colorize")
    cfg = settings["runs"][run]
    batch = cfg["batch"]
    sketch = data["sketch"].expand(batch, -1, -1, -1)
    latents = generate_latents(
        unet, sketch_encoder, CONFIG,
        context=data[f"{run}_context"], sketch=sketch, vector=vector_condition(96, 128, 7.0, batch=batch),
        seeds=cfg["brownian_seeds"], steps=settings["steps"], guidance=Guidance(*RUNS[run]),
        reference_strength=settings["strength"], noise=data[f"{run}_x_T"], sampler="dpmpp_3m_sde")
    compare(f"sampled latents ({run})", latents, data[f"{run}_latents"], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("run", list(RUNS))
def test_colorize_tensors(colorizer, run):
    """The whole colorization through the user's path (import, ``Colorizer.colorize_tensors``); our output
    is clamped to [-1, 1], the reference's decode is not."""
    from model.options import ColorizeOptions

    enc, _ = fixture("encoders")
    data, settings = fixture("colorize")
    cfg = settings["runs"][run]
    batch = cfg["batch"]
    reference, sketch_guidance = RUNS[run]
    options = ColorizeOptions(steps=settings["steps"], reference_guidance=reference, sketch_guidance=sketch_guidance,
                              reference_strength=settings["strength"], plugin=False, sampler="dpmpp_3m_sde")
    decoded = colorizer.colorize_tensors(data["sketch"].expand(batch, -1, -1, -1),
                                     image01(enc["image_u8"]).expand(batch, -1, -1, -1), options,
                                     seeds=cfg["brownian_seeds"], noise=data[f"{run}_x_T"])
    compare(f"colorize_tensors ({run})", decoded, data[f"{run}_decoded"].clamp(-1, 1), atol=1e-3)


# ------------------------------------------------------------------------------------ xlv2 plug-in
LAYER = "up_blocks.1.attentions.0.transformer_blocks.0"  # the reference's output_blocks.3.1.transformer_blocks.0


@pytest.fixture(scope="module")
def xlv2_colorizer(published, tmp_path_factory):
    """The recipe's ``xlv2`` file (backbone + ReferenceNet + background LoRA + conv_fg) imported with the
    user's importer, loaded back: the plug-in is attached from the model folder."""
    from model.cdxl_checkpoint import import_checkpoint
    from model.colorizer import Colorizer

    folder = tmp_path_factory.mktemp("parity-xlv2") / "model"
    report = import_checkpoint(published["xlv2"], published["clip_vision"], published["wd_tagger"], published["tags"],
                               folder, dtype=torch.float32, config=CONFIG, log=lambda message: None)
    assert report.kind == "xlv2" and "plugin.reference_net" in report.loaded
    model = Colorizer.from_pretrained(folder).eval()
    assert model.plugin is not None
    return model


def split_state(mask: torch.Tensor, **kwargs):
    from model.split_attention import STATE_KEY, split_attention_kwargs

    return split_attention_kwargs(mask, **kwargs)[STATE_KEY]


@torch.no_grad()
def test_xlv2_reference_net_bank(xlv2_colorizer):
    """The ReferenceNet (imported bg_encoder) from the same latent, masks and crop: every decoder
    self-attention's input (norm1 output) equals the reference's writer bank."""
    from model.split_attention import decoder_self_attention_names

    data, settings = fixture("xlv2_bank")
    bank = xlv2_colorizer.plugin(data["z_bg"], data["sketch_mask"], data["reference_mask"], data["crop"])
    names = decoder_self_attention_names(xlv2_colorizer.unet.unet)
    assert list(bank) == names and len(names) == settings["n_banks"]
    for i, name in enumerate(names):
        compare(f"ReferenceNet bank {i} ({name})", bank[name], data[f"bank{i}"], atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("key", ["lora_merged", "lora_unmerged"])
def test_xlv2_background_lora_layer(xlv2_colorizer, key):
    """One cross-attention with the background LoRA (the reference merges it into the weights at inference):
    ours adds it per projection. A mask of ones with the soft blend reads the first context half only."""
    data, _ = fixture("xlv2_attention")
    attn = xlv2_colorizer.unet.unet.get_submodule(f"{LAYER}.attn2")
    state = split_state(torch.ones(2, 1, 12, 16), blend=True, background_lora=True)
    out = attn(data["x"], encoder_hidden_states=data["context"], split_attention=state)
    compare(f"cross-attention with the background LoRA ({key})", out, data[key], atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("key, kwargs", [
    ("soft_blend", dict(blend=True, background_lora=True, foreground_strength=1.3, background_strength=0.7,
                        merge_scale=0.3)),
    ("soft_blend_default", dict(blend=True, background_lora=True)),
    ("hard_merge0", dict(threshold=0.3)),
    ("hard_merge0_scaled", dict(threshold=0.3, foreground_strength=1.3, background_strength=0.7)),  # unused at merge 0
    ("hard_merge", dict(threshold=0.3, foreground_strength=1.3, background_strength=0.7, merge_scale=0.3)),
])
def test_xlv2_split_cross_attention(xlv2_colorizer, key, kwargs):
    """The soft blend (the reference's lora_forward, LoRA merged) and the hard split of a model without the
    plug-in (MemoryEfficientAttention.masked_forward: one masked call at merge 0, two calls at merge > 0):
    the reference resizes the 1/8 mask with scale_factor 0.5, ours to the layer's grid by size."""
    data, _ = fixture("xlv2_attention")
    attn = xlv2_colorizer.unet.unet.get_submodule(f"{LAYER}.attn2")
    out = attn(data["x"], encoder_hidden_states=data["context"], split_attention=split_state(data["mask"], **kwargs))
    compare(f"split cross-attention ({key})", out, data[key], atol=1e-4)


@torch.no_grad()
def test_xlv2_bank_self_attention(xlv2_colorizer):
    """transformer_forward_read's attn1: foreground queries (mask > 0.05) attend to their own tokens,
    background ones to the bank."""
    data, _ = fixture("xlv2_attention")
    attn = xlv2_colorizer.unet.unet.get_submodule(f"{LAYER}.attn1")
    state = split_state(data["mask"], blend=True, bank={f"{LAYER}.attn1": data["bank"]}, background_lora=True)
    compare("bank self-attention", attn(data["x"], split_attention=state), data["bank_self_attention"], atol=1e-4)


@torch.no_grad()
def test_xlv2_colorize_with_a_background(xlv2_colorizer):
    """The whole plug-in colorization (InferenceWrapperXL.generate with bg_enhance, a background picture and
    given masks; the reference's VAE encoding patched to the posterior mode) through ``colorize_tensors``."""
    from model.options import ColorizeOptions

    enc, _ = fixture("encoders")
    letterbox, _ = fixture("letterbox")
    data, settings = fixture("xlv2_colorize")
    run = settings["run"]
    options = ColorizeOptions(steps=settings["steps"], reference_guidance=run["gs"][0], sketch_guidance=run["gs"][1],
                              reference_strength=run["strength"], plugin=True, sampler="dpmpp_3m_sde",
                              merge_scale=run["merge_scale"], foreground_strength=run["fg_strength"],
                              background_strength=run["bg_strength"])
    decoded = xlv2_colorizer.colorize_tensors(
        letterbox["tall_sketch"], image01(enc["image_u8"]), options, seeds=[run["seed"]], noise=data["x_T"],
        backgrounds=[image01(data["background_u8"])], sketch_mask=data["sketch_mask"],
        reference_masks=[data["reference_mask_u8"].float()])
    compare("xlv2 colorize_tensors (plug-in, background)", decoded, data["decoded"].clamp(-1, 1), atol=1e-3)


@torch.no_grad()
def test_xlv2_bank_self_attention_keeps_0_05_whatever_the_sketch_threshold(xlv2_colorizer):
    data, _ = fixture("xlv2_attention")
    attn = xlv2_colorizer.unet.unet.get_submodule(f"{LAYER}.attn1")
    state = split_state(data["mask"], blend=True, bank={f"{LAYER}.attn1": data["bank"]}, background_lora=True,
                        threshold=0.3)  # what background_conditions passes for sketch_mask_threshold=0.3:
    # as in the reference, the bank self-attention keeps 0.05 (adjust_fgbg_scale sets only attn2's threshold)
    compare("bank self-attention, sketch threshold 0.3", attn(data["x"], split_attention=state),
            data["bank_self_attention"], atol=1e-4)
