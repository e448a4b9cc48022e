"""Stage 2 on the tiny preset: the published plug-in (ReferenceNet bank + background LoRA), its objective,
and the background modes inside ``Colorizer`` (plug-in, ``background_enhance``, controls, folder round
trip). Layer-level split attention is in ``test_split_attention.py``."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_training_parts import make_stage2_batch

from model.background import (
    crop_condition,
    crop_fraction,
    dilate_and_binarise,
    whiten_foreground,
)
from model.colorizer import Colorizer
from model.options import ColorizeOptions
from model.plugin import (
    PluginConfig,
    attach_plugin,
    plugin_training_step,
    prepare_stage2,
)
from model.split_attention import decoder_self_attention_names, lora_parameters


def wake(model, scale=0.1, seed=2):
    """Small random LoRA up-projections, mask channels and crop embedding, as after some stage-2 training
    (fresh ones add exactly nothing by design)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model.unet.unet):
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        net = model.plugin.reference_net.unet
        conv = net.conv_in.weight
        conv[:, -2:].copy_(torch.randn(conv[:, -2:].shape, generator=generator) * scale)
        linear = net.add_embedding.linear_1.weight
        linear.copy_(torch.randn(linear.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def plugin_model(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    attach_plugin(model, PluginConfig(lora_rank=4))
    return wake(model).eval()


def pixels(image):
    return np.asarray(image).astype(np.int16)


# -------------------------------------------------------------------------------------- ReferenceNet
def test_reference_net_is_the_published_shape_and_starts_as_the_denoiser(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    plugin = attach_plugin(model, PluginConfig(lora_rank=4))
    denoiser, net = model.unet.unet, plugin.reference_net.unet
    own, source = net.state_dict(), denoiser.state_dict()
    latent = model.config.unet.latent_channels
    assert own["conv_in.weight"].shape[1] == latent + 2  # latent, sketch mask, reference mask
    assert own["add_embedding.linear_1.weight"].shape[1] == 4 * model.config.unet.vector_embed_dim  # crop
    assert torch.equal(own["conv_in.weight"][:, :latent], source["conv_in.weight"])
    assert not own["conv_in.weight"][:, latent:].any() and not own["add_embedding.linear_1.weight"].any()
    copied = [k for k in own if k not in ("conv_in.weight", "add_embedding.linear_1.weight")]
    assert all(torch.equal(own[k], source[k]) for k in copied)
    assert not any(".attn2." in k for k in own) and not any(k.startswith("conv_out") for k in own)
    assert len(lora_parameters(denoiser)) == 6 * len([k for k in source if k.endswith(".attn2.to_q.weight")])

    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, latent, 12, 16, generator=g)
    sketch_mask, reference_mask = torch.zeros(2, 1, 12, 16), torch.zeros(2, 1, 12, 16)
    sketch_mask[..., 5:], reference_mask[..., :6, :] = 1, 1
    crop = crop_condition(96, 128, [(96, 200), (300, 128)])
    with torch.no_grad():
        bank = plugin(latents, sketch_mask, reference_mask, crop)
        seen = {}
        hooks = [denoiser.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[0].shape}))
                 for n in decoder_self_attention_names(denoiser)]
        model.unet(latents, torch.tensor([5, 5]), torch.zeros(2, 7, 64), torch.tensor([[110.0, 7.0]] * 2))
        for hook in hooks:
            hook.remove()
        wake(model)
        woken = plugin(latents, sketch_mask, reference_mask, crop)
        other_crop = plugin(latents, sketch_mask, reference_mask, crop_condition(96, 128, [(96, 128)] * 2))
        other_mask = plugin(latents, 1 - sketch_mask, reference_mask, crop)
    assert list(bank) == decoder_self_attention_names(denoiser)
    assert {k: v.shape for k, v in bank.items()} == seen
    for changed in (other_crop, other_mask):
        assert all(not torch.allclose(changed[k], woken[k]) for k in woken)


def test_background_conventions_follow_the_published_code():
    assert crop_fraction(1024, 1024, 800, 1600) == (1.0, 0.5)  # a square inside a 2:1 picture: its left half
    assert crop_fraction(1024, 512, 1000, 1000) == (1.0, 0.5)
    torch.testing.assert_close(crop_condition(64, 128, [(64, 64)]), torch.tensor([[0.0, 0.0, 0.5, 1.0]]))
    mask = torch.zeros(1, 1, 41, 41)
    mask[..., 20, 20] = 1.0
    grown = dilate_and_binarise(mask)
    assert grown.sum() == 21 * 21 and grown[..., 10:31, 10:31].all()
    assert dilate_and_binarise(torch.full((1, 1, 5, 5), 0.5)).sum() == 0  # binarised at > 0.5
    reference = torch.rand(1, 3, 4, 4) * 2 - 1
    painted = whiten_foreground(reference, torch.tensor([0.0, 0.5, 1.0, 0.2]).view(1, 1, 1, 4))
    assert torch.equal(painted[..., [0, 3]], reference[..., [0, 3]]) and (painted[..., [1, 2]] == 1).all()


def test_stage2_training_moves_only_the_reference_net_and_the_lora(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    attach_plugin(model, PluginConfig(lora_rank=4))
    model.train()
    trainable = prepare_stage2(model)
    names = {n for n, p in model.named_parameters() if any(p is t for t in trainable)}
    assert any(n.startswith("plugin.reference_net.") for n in names)
    assert any(".attn2.processor.to_q." in n for n in names)
    assert all(n.startswith("plugin.") or ".attn2.processor." in n for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        losses = plugin_training_step(model, model.plugin, make_stage2_batch(model, seed=step), model.noise_scheduler,
                                      model.config.diffusion, generator=g)
        assert torch.isfinite(losses.loss) and losses.gram_loss.item() == 0.0
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert after.keys() == before.keys()
    frozen_moved = [k for k in after if k not in names and not torch.equal(after[k], before[k])]
    trainable_still = [k for k in names if torch.equal(after[k], before[k])]
    assert not frozen_moved, frozen_moved[:5]
    assert not trainable_still, trainable_still[:5]


def test_stage2_gradients_survive_gradient_checkpointing(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    attach_plugin(model, PluginConfig(lora_rank=4))
    wake(model)
    trainable = prepare_stage2(model)
    batch = make_stage2_batch(model, seed=7)

    def loss_and_grads():
        model.zero_grad()
        loss = plugin_training_step(model, model.plugin, batch, model.noise_scheduler, model.config.diffusion,
                                    generator=torch.Generator().manual_seed(1)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    plain_loss, plain_grads = loss_and_grads()
    model.train()
    model.unet.unet.enable_gradient_checkpointing()
    model.plugin.reference_net.unet.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for plain, checkpointed in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in plain_grads)


# ------------------------------------------------------------------------------------------- colorize
def test_colorize_runs_the_plugin_once_and_plugin_off_is_the_base_model(plugin_model, tiny_colorizer, drawing_pair):
    pair = drawing_pair
    options = ColorizeOptions(size=(64, 64), steps=3, reference_guidance=4.5, sketch_guidance=1.0)
    calls = []
    hook = plugin_model.plugin.register_forward_hook(lambda *_: calls.append(1))
    try:
        on = pixels(plugin_model.colorize(pair.sketch, pair.color, options, seed=0))
    finally:
        hook.remove()
    assert len(calls) == 1
    off = pixels(plugin_model.colorize(pair.sketch, pair.color, replace(options, plugin=False), seed=0))
    base = pixels(tiny_colorizer.colorize(pair.sketch, pair.color, options, seed=0))
    assert np.array_equal(off, base)
    assert np.abs(on - off).mean() > 0.5
    other_background = pixels(plugin_model.colorize(pair.sketch, pair.color, options, seed=0,
                                                    background_reference=255 - pair.color))
    assert np.abs(other_background - on).mean() > 0.5


def test_plugin_batches_match_single_runs(plugin_model, drawing_pair):
    pair = drawing_pair
    flipped = pair.color[::-1].copy()
    options = ColorizeOptions(size=(64, 64), steps=2)
    batched = plugin_model.colorize_batch([pair.sketch, pair.sketch], [pair.color, flipped], options, seeds=[1, 2],
                                          background_references=[None, pair.color])
    single = plugin_model.colorize(pair.sketch, flipped, options, seed=2, background_reference=pair.color)
    assert np.abs(pixels(batched[1]) - pixels(single)).max() <= 1


def test_background_enhance_splits_attention_without_a_plugin(tiny_colorizer, drawing_pair):
    pair = drawing_pair
    options = ColorizeOptions(size=(64, 64), steps=2)
    plain = pixels(tiny_colorizer.colorize(pair.sketch, pair.color, options, seed=0))
    enhanced = replace(options, background_enhance=True)
    split = pixels(tiny_colorizer.colorize(pair.sketch, pair.color, enhanced, seed=0))
    assert np.abs(split - plain).mean() > 0.5
    assert np.array_equal(split, pixels(tiny_colorizer.colorize(pair.sketch, pair.color, enhanced, seed=0)))
    other = pixels(tiny_colorizer.colorize(pair.sketch, pair.color, enhanced, seed=0,
                                           background_reference=255 - pair.color))
    assert np.abs(other - split).mean() > 0.5
    # the threshold decides which tokens read the background: at 0.99 nearly all of them do
    high = pixels(tiny_colorizer.colorize(pair.sketch, pair.color, replace(enhanced, sketch_mask_threshold=0.99),
                                          seed=0))
    assert np.abs(high - split).mean() > 0.5


def test_folder_round_trip_with_a_plugin_reproduces_the_output(plugin_model, drawing_pair, tmp_path):
    folder = plugin_model.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "plugin" / "config.json").read_text())["lora_rank"] == 4
    with safe_open(str(folder / "plugin" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("reference_net.") for k in keys)
    assert any(k.startswith("background_lora.") and k.endswith(".attn2.to_q.down.weight") for k in keys)
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not any(".processor." in k for k in f.keys())  # the unet folder stays stock diffusers

    loaded = Colorizer.from_pretrained(folder)
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == plugin_model.state_dict().keys()
    for name, tensor in plugin_model.state_dict().items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0, msg=name)
    args = dict(options=ColorizeOptions(size=(64, 96), steps=2), seed=5)
    expected = pixels(plugin_model.colorize(drawing_pair.sketch, drawing_pair.color, **args))
    assert np.array_equal(pixels(loaded.colorize(drawing_pair.sketch, drawing_pair.color, **args)), expected)

    half = Colorizer.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.plugin is not None and next(half.plugin.parameters()).dtype == torch.bfloat16
    assert np.abs(pixels(half.colorize(drawing_pair.sketch, drawing_pair.color, **args)) - expected).mean() < 12

    config = json.loads((folder / "plugin" / "config.json").read_text())
    del config["format"]  # as the pre-publication plug-in wrote it
    (folder / "plugin" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format 1; this code reads format 2"):
        Colorizer.from_pretrained(folder)


def test_plugin_requests_without_a_plugin_are_refused(tiny_colorizer, plugin_model, drawing_pair):
    pair = drawing_pair
    with pytest.raises(ValueError, match="plugin=True needs a model with a plugin"):
        tiny_colorizer.colorize(pair.sketch, pair.color, ColorizeOptions(size=(64, 64), steps=1, plugin=True))
    with pytest.raises(ValueError, match="background reference needs the plug-in or background_enhance"):
        plugin_model.colorize(pair.sketch, pair.color, ColorizeOptions(size=(64, 64), steps=1, plugin=False),
                              background_reference=pair.color)
    batch = make_stage2_batch(plugin_model)
    batch.background_latents = batch.crop = None
    with pytest.raises(ValueError, match="needs \\['background_latents', 'crop'\\]"):
        plugin_training_step(plugin_model, plugin_model.plugin, batch, plugin_model.noise_scheduler,
                             plugin_model.config.diffusion)
    with pytest.raises(ValueError, match="already has a plugin"):
        attach_plugin(plugin_model)


def test_learned_mask_models_load_from_published_files_and_drive_the_split(tiny_colorizer, drawing_pair, tmp_path):
    from safetensors.torch import save_file

    from model.background import MaskModels
    from model.segmenter import build_masker

    torch.manual_seed(0)
    paths = {}
    for name in ("isnet", "isnet-sketch"):
        net = build_masker(name, width=4, input_size=64).net
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(paths[name]))
    masks = MaskModels.from_files(("isnet", paths["isnet"]), ("isnet-sketch", paths["isnet-sketch"]),
                                  width=4, input_size=64)
    assert masks.names == ("isnet", "isnet-sketch")
    sketch = torch.rand(1, 3, 64, 64) * 2 - 1
    soft = masks.sketch_mask(sketch)
    reference = masks.reference_mask(torch.rand(1, 3, 40, 56) * 2 - 1)
    assert soft.shape == (1, 1, 64, 64) and 0 <= soft.min() and soft.max() <= 1
    assert reference.shape == (1, 1, 40, 56) and set(reference.unique().tolist()) <= {0.0, 1.0}

    model = copy.deepcopy(tiny_colorizer)
    options = ColorizeOptions(size=(64, 64), steps=2, background_enhance=True)
    weight_free = pixels(model.colorize(drawing_pair.sketch, drawing_pair.color, options, seed=0))
    model.masks = masks
    learned = pixels(model.colorize(drawing_pair.sketch, drawing_pair.color, options, seed=0))
    assert learned.shape == weight_free.shape and np.abs(learned - weight_free).mean() > 0.1
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        MaskModels.from_files(("isnet", paths["isnet-sketch"].with_name("missing.safetensors")))

