"""Stage 2 on the tiny preset: the reference-net plugin, split attention and its adapters, the stage-2
objective, and the plugin inside ``Colorizer`` (controls, caching, folder round trip)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model.colorizer import Colorizer
from model.objective import TrainingBatch
from model.options import ColorizeOptions
from model.plugin import PluginConfig, attach_plugin, plugin_training_step, prepare_stage2
from model.split_attention import (adapter_parameters, decoder_self_attention_names, install_split_attention,
                                   split_attention_kwargs)

SELF = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"  # 6x8 tokens at 48x64 "pixels" below
CROSS = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def wake(model, scale=0.1, seed=2):
    """Small random adapter up-projections and mask channels, as after some stage-2 training (fresh ones
    add exactly nothing by design)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.unet.unet.named_parameters():
            if name.endswith("up.weight") and ".processor." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        conv = model.plugin.unet.conv_in.weight
        conv[:, -2:].copy_(torch.randn(conv[:, -2:].shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def plugin_model(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    attach_plugin(model, PluginConfig(lora_rank=4))
    return wake(model).eval()


def halves():
    """Masks at 48x64: sketch foreground = left half (token column < 4 of 8), reference foreground = top
    half (token row < 3 of 6); and those token splits, computed independently of the code under test."""
    sketch, reference = torch.zeros(2, 1, 48, 64), torch.zeros(2, 1, 48, 64)
    sketch[..., :32], reference[..., :24, :] = 1, 1
    index = torch.arange(48)
    return sketch, reference, index % 8 < 4, index // 8 < 3


def pixels(image):
    return np.asarray(image).astype(np.int16)


# ------------------------------------------------------------------------------------------ processors
def test_processors_without_state_compute_the_stock_outputs(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    inputs = (torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10, 700]),
              torch.randn(2, cfg.context_tokens, cfg.unet.cross_attention_dim, generator=g),
              torch.tensor([[90.0, 7.0]] * 2), model.sketch_encoder(torch.rand(2, 1, 64, 96, generator=g)))
    with torch.no_grad():
        before = model.unet(*inputs).prediction
        attach_plugin(model, PluginConfig(lora_rank=4))
        wake(model)
        after = model.unet(*inputs).prediction
        after_empty = model.unet(*inputs, cross_attention_kwargs={}).prediction
    assert torch.equal(before, after) and torch.equal(before, after_empty)


def test_self_attention_keeps_foreground_and_background_plugin_tokens_apart(plugin_model):
    attn = plugin_model.unet.unet.get_submodule(SELF)
    g = torch.Generator().manual_seed(1)
    x, tokens = torch.randn(2, 48, 64, generator=g), torch.randn(2, 48, 64, generator=g)
    sketch, reference, fg_query, fg_plugin = halves()
    run = lambda t: attn(x, **split_attention_kwargs(sketch, reference, {SELF: t})).detach()
    base = run(tokens)
    bg_changed = run(tokens + 3 * torch.randn(tokens.shape, generator=g) * (~fg_plugin)[:, None])
    fg_changed = run(tokens + 3 * torch.randn(tokens.shape, generator=g) * fg_plugin[:, None])
    assert torch.equal(bg_changed[:, fg_query], base[:, fg_query])
    assert not torch.allclose(bg_changed[:, ~fg_query], base[:, ~fg_query], atol=1e-3)
    assert torch.equal(fg_changed[:, ~fg_query], base[:, ~fg_query])
    assert not torch.allclose(fg_changed[:, fg_query], base[:, fg_query], atol=1e-3)


def test_cross_attention_reads_the_foreground_and_background_context_apart(plugin_model):
    attn = plugin_model.unet.unet.get_submodule(CROSS)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 48, 64, generator=g)
    context, background = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    sketch, reference, fg_query, _ = halves()
    run = lambda c, b: attn(x, c, **split_attention_kwargs(sketch, reference, background_context=b)).detach()
    base = run(context, background)
    new_background = run(context, background + torch.randn(background.shape, generator=g))
    new_context = run(context + torch.randn(context.shape, generator=g), background)
    assert torch.equal(new_background[:, fg_query], base[:, fg_query])
    assert not torch.allclose(new_background[:, ~fg_query], base[:, ~fg_query], atol=1e-3)
    assert torch.equal(new_context[:, ~fg_query], base[:, ~fg_query])
    assert not torch.allclose(new_context[:, fg_query], base[:, fg_query], atol=1e-3)


def test_fresh_adapters_change_nothing_and_trained_ones_do(tiny_colorizer):
    unet = copy.deepcopy(tiny_colorizer.unet.unet)
    stock_self, stock_cross = copy.deepcopy(unet.get_submodule(SELF)), copy.deepcopy(unet.get_submodule(CROSS))
    install_split_attention(unet, rank=4)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 48, 64, generator=g), torch.randn(1, 7, 64, generator=g)
    everywhere, nowhere = torch.ones(1, 1, 48, 64), torch.zeros(1, 1, 48, 64)

    def outputs():
        # own tokens offered again as plugin tokens, all one region: duplicated keys leave softmax unchanged
        split_self = unet.get_submodule(SELF)(x, **split_attention_kwargs(everywhere, everywhere, {SELF: x}))
        # every query in the background: it reads the background half, i.e. the adapted context
        split_cross = unet.get_submodule(CROSS)(x, context, **split_attention_kwargs(nowhere))
        return split_self.detach(), split_cross.detach()

    fresh_self, fresh_cross = outputs()
    torch.testing.assert_close(fresh_self, stock_self(x).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh_cross, stock_cross(x, context).detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.add_(0.1)
    trained_self, trained_cross = outputs()
    assert not torch.allclose(trained_self, fresh_self, atol=1e-3)
    assert not torch.allclose(trained_cross, fresh_cross, atol=1e-3)


def test_strengths_and_threshold_act_per_region(plugin_model):
    unet = plugin_model.unet.unet
    g = torch.Generator().manual_seed(4)
    x, tokens = torch.randn(2, 48, 64, generator=g), torch.randn(2, 48, 64, generator=g)
    context = torch.randn(2, 7, 64, generator=g)
    sketch, reference, fg_query, _ = halves()
    attn1, attn2 = unet.get_submodule(SELF), unet.get_submodule(CROSS)
    stock = attn1(x).detach()  # no state: stock self-attention over own tokens only
    kwargs = split_attention_kwargs(sketch, reference, {SELF: tokens}, background_strength=0.0)
    no_bg_plugin = attn1(x, **kwargs).detach()
    torch.testing.assert_close(no_bg_plugin[:, ~fg_query], stock[:, ~fg_query], rtol=0, atol=1e-6)
    assert not torch.allclose(no_bg_plugin[:, fg_query], stock[:, fg_query], atol=1e-3)
    muted = attn2(x, context, **split_attention_kwargs(sketch, foreground_strength=0.0)).detach()
    torch.testing.assert_close(muted[:, fg_query], attn2.to_out[0].bias.detach().expand_as(muted[:, fg_query]))
    soft = torch.full((1, 1, 48, 64), 0.4)
    assert split_attention_kwargs(soft, mask_threshold=0.5)["split_attention"].foreground("sketch", 48, 1).sum() == 0
    assert split_attention_kwargs(soft, mask_threshold=0.3)["split_attention"].foreground("sketch", 48, 1).all()


# -------------------------------------------------------------------------------------------- plugin
def test_plugin_is_a_denoiser_copy_that_reads_only_the_reference_background(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    plugin = attach_plugin(model, PluginConfig(lora_rank=4))
    denoiser = model.unet.unet
    own, source = plugin.unet.state_dict(), denoiser.state_dict()
    assert torch.equal(own["conv_in.weight"][:, :4], source["conv_in.weight"])
    assert not own["conv_in.weight"][:, 4:].any()
    assert all(torch.equal(t, source[k]) for k, t in own.items() if k != "conv_in.weight")
    assert not any(k.endswith(".attn2.to_k.weight") for k in own)

    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 12, 16, generator=g)
    sketch, reference = torch.zeros(2, 1, 96, 128), torch.zeros(2, 1, 96, 128)
    sketch[..., 40:], reference[..., :48, :] = 1, 1  # reference foreground = latent rows 0-5
    vector = torch.tensor([[110.0, 7.0]] * 2)
    with torch.no_grad():
        features = plugin(latents, sketch, reference, vector)
        seen = {}
        hooks = [denoiser.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[0].shape}))
                 for n in decoder_self_attention_names(denoiser)]
        model.unet(latents, torch.tensor([5, 5]), torch.zeros(2, 7, 64), vector)
        for hook in hooks:
            hook.remove()
        foreground_edit, background_edit = latents.clone(), latents.clone()
        foreground_edit[:, :, :6] += 5.0
        background_edit[:, :, 6:] += 5.0
        same = plugin(foreground_edit, sketch, reference, vector)
        moved = plugin(background_edit, sketch, reference, vector)
    assert {k: v.shape for k, v in features.items()} == seen
    assert all(torch.equal(same[k], features[k]) for k in features)
    assert all(not torch.allclose(moved[k], features[k]) for k in features)


def make_stage2_batch(model, batch=2, width=64, height=64, seed=0):
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g)
    with torch.no_grad():
        tagger_tokens, clip_tokens = model.tagger(images).tokens, model.clip(images)
    latent = (batch, cfg.unet.latent_channels, height // cfg.latent_stride, width // cfg.latent_stride)
    sketch_mask, reference_mask = torch.zeros(batch, 1, height, width), torch.zeros(batch, 1, height, width)
    sketch_mask[..., : width // 2], reference_mask[..., : height // 2, :] = 1, 1
    sketch = torch.rand(batch, 1, height, width, generator=g) * 2 - 1
    return TrainingBatch(latents=torch.randn(latent, generator=g), sketch=sketch, clip_tokens=clip_tokens,
                         tagger_tokens=tagger_tokens, vector_condition=torch.tensor([[float(width), 7.0]] * batch),
                         reference_latents=torch.randn(latent, generator=g), sketch_mask=sketch_mask,
                         reference_mask=reference_mask)


def test_stage2_training_moves_only_the_plugin_and_the_adapters(tiny_colorizer):
    model = copy.deepcopy(tiny_colorizer)
    attach_plugin(model, PluginConfig(lora_rank=4))
    model.train()
    trainable = prepare_stage2(model)
    names = {n for n, p in model.named_parameters() if any(p is t for t in trainable)}
    assert any(n.startswith("plugin.") for n in names) and any(".processor." in n for n in names)
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
    model.plugin.unet.enable_gradient_checkpointing()
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


def test_folder_round_trip_with_a_plugin_reproduces_the_output(plugin_model, drawing_pair, tmp_path):
    folder = plugin_model.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "plugin" / "config.json").read_text())["lora_rank"] == 4
    with safe_open(str(folder / "plugin" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("reference_net.") for k in keys) and any(k.startswith("split_attention.") for k in keys)
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


def test_plugin_requests_without_a_plugin_are_refused(tiny_colorizer, plugin_model, drawing_pair):
    pair = drawing_pair
    with pytest.raises(ValueError, match="plugin=True needs a model with a plugin"):
        tiny_colorizer.colorize(pair.sketch, pair.color, ColorizeOptions(size=(64, 64), steps=1, plugin=True))
    with pytest.raises(ValueError, match="background reference needs the plugin"):
        plugin_model.colorize(pair.sketch, pair.color, ColorizeOptions(size=(64, 64), steps=1, plugin=False),
                              background_reference=pair.color)
    with pytest.raises(ValueError, match="needs \\['reference_latents', 'sketch_mask', 'reference_mask'\\]"):
        batch = make_stage2_batch(plugin_model)
        batch.reference_latents = batch.sketch_mask = batch.reference_mask = None
        plugin_training_step(plugin_model, plugin_model.plugin, batch, plugin_model.noise_scheduler,
                             plugin_model.config.diffusion)
    with pytest.raises(ValueError, match="already installed"):
        install_split_attention(plugin_model.unet.unet, rank=4)
