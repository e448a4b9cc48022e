"""Split attention as published (ColorizeDiffusionXL), checked layer by layer on the tiny preset against
independent dense forms: the reference computes each split as one attention call over both context
halves with a (B, heads, N, 2N) additive mask, and merges the background LoRA into the weights; ours
takes two attention calls and adds the LoRA outside. Both must give the same numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from model.split_attention import (BankSelfAttention, CrossAttentionSplit, add_background_lora, attend,
                                   install_split_attention, lora_parameters, split_attention_kwargs, token_grid)

SELF = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"  # 6x8 tokens for a 6x8 latent mask
CROSS = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
GRID = (6, 8)


@pytest.fixture(scope="module")
def unet(tiny_colorizer):
    """The tiny denoiser with split processors and a woken background LoRA (fresh up-projections are zero)."""
    net = copy.deepcopy(tiny_colorizer.unet.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in add_background_lora(net, rank=4):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return net.eval()


def mask_left(batch=2, value=1.0):
    """Sketch mask at the latent grid: the left half (token column < 4) is foreground."""
    mask = torch.zeros(batch, 1, *GRID)
    mask[..., :4] = value
    return mask


def dense_reference(attn, query, key, value, foreground, first_half):
    """The reference's masked form: one call over all keys, -inf where a query may not look."""
    allowed = foreground[:, :, None] == first_half[None, None, :]
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)[:, None]
    return attend(attn.heads, query, key, value, bias)


def output(attn, out):
    return attn.to_out[1](attn.to_out[0](out))


def test_without_state_every_processor_is_stock(tiny_colorizer, unet):
    stock = tiny_colorizer.unet.unet
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 48, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    with torch.no_grad():
        for name in (SELF, CROSS):
            args = (x,) if name == SELF else (x, context)
            assert torch.equal(unet.get_submodule(name)(*args), stock.get_submodule(name)(*args))
    assert isinstance(unet.get_submodule(CROSS).processor, CrossAttentionSplit)
    assert isinstance(unet.get_submodule(SELF).processor, BankSelfAttention)


@pytest.mark.parametrize("lora", [False, True])
def test_hard_cross_attention_split_is_the_dense_masked_call(unet, lora):
    attn = unet.get_submodule(CROSS)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 48, 64, generator=g), torch.randn(2, 14, 64, generator=g)
    with torch.no_grad():
        ours = attn(x, context, **split_attention_kwargs(mask_left(), background_lora=lora))
        merged = copy.deepcopy(attn)  # the reference merges the LoRA into the weights
        if lora:
            for name in ("to_q", "to_k", "to_v"):
                adapter = getattr(attn.processor, name)
                getattr(merged, name).weight += adapter.up.weight @ adapter.down.weight
        foreground = (torch.arange(48) % 8 < 4).expand(2, 48)
        expected = output(merged, dense_reference(merged, merged.to_q(x), merged.to_k(context), merged.to_v(context),
                                                  foreground, torch.arange(14) < 7))
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)
    with torch.no_grad():  # as published, the plain hard split leaves the strengths unused
        scaled = attn(x, context, **split_attention_kwargs(mask_left(), background_lora=lora, foreground_strength=2.0,
                                                           background_strength=0.5))
    torch.testing.assert_close(scaled, ours, rtol=0, atol=0)


def test_hard_split_with_merge_scales_and_selects_below_the_threshold(unet):
    attn = unet.get_submodule(CROSS)
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(1, 48, 64, generator=g), torch.randn(1, 14, 64, generator=g)
    mask = torch.rand(1, 1, *GRID, generator=g)
    with torch.no_grad():
        ours = attn(x, context, **split_attention_kwargs(mask, threshold=0.4, foreground_strength=1.5,
                                                         background_strength=0.5, merge_scale=0.3))
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        fg = attend(attn.heads, q, k[:, :7], v[:, :7]) * 1.5
        bg = attend(attn.heads, q, k[:, 7:], v[:, 7:]) * 0.5
        fg = fg * 0.7 + bg * 0.3
        expected = output(attn, torch.where(mask.flatten(1)[..., None] < 0.4, bg, fg))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_soft_blend_with_strengths_and_merge_follows_the_published_formula(unet):
    attn = unet.get_submodule(CROSS)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 48, 64, generator=g), torch.randn(1, 14, 64, generator=g)
    mask = torch.rand(1, 1, *GRID, generator=g)
    fg_s, bg_s, merge = 1.3, 0.7, 0.25
    with torch.no_grad():
        ours = attn(x, context, **split_attention_kwargs(mask, blend=True, foreground_strength=fg_s,
                                                         background_strength=bg_s, merge_scale=merge))
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        fg = attend(attn.heads, q, k[:, :7], v[:, :7]) * fg_s
        bg = attend(attn.heads, q, k[:, 7:], v[:, 7:]) * bg_s
        fg = fg * (1 - merge) + bg * merge
        m = mask.flatten(1)[..., None]
        expected = output(attn, fg * m + bg * (1 - m))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_bank_self_attention_is_the_dense_masked_call(unet):
    attn = unet.get_submodule(SELF)
    g = torch.Generator().manual_seed(4)
    x, bank = torch.randn(2, 48, 64, generator=g), torch.randn(1, 48, 64, generator=g)  # bank tiles to batch 2
    mask = mask_left(value=0.06)  # just above the published 0.05
    with torch.no_grad():
        ours = attn(x, **split_attention_kwargs(mask, bank={SELF: bank}))
        keys_from = torch.cat([x, bank.expand(2, -1, -1)], dim=1)
        foreground = (torch.arange(48) % 8 < 4).expand(2, 48)
        expected = output(attn, dense_reference(attn, attn.to_q(x), attn.to_k(keys_from), attn.to_v(keys_from),
                                                foreground, torch.arange(96) < 48))
        below = attn(x, **split_attention_kwargs(mask_left(value=0.04), bank={SELF: bank}))
        everything_bank = output(attn, attend(attn.heads, attn.to_q(x), attn.to_k(bank.expand(2, -1, -1)),
                                              attn.to_v(bank.expand(2, -1, -1))))
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(below, everything_bank, rtol=0, atol=2e-6)  # 0.04: all background


def test_the_mask_reaches_each_layer_bicubically():
    mask = torch.rand(1, 1, 12, 16, generator=torch.Generator().manual_seed(5))
    state = split_attention_kwargs(mask)["split_attention"]
    assert token_grid(48, 12, 16) == (6, 8) and token_grid(12, 12, 16) == (3, 4)
    expected = F.interpolate(mask, size=(6, 8), mode="bicubic").flatten(1)[..., None]
    torch.testing.assert_close(state.region(48, 3), expected.repeat(3, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(state.region(192, 1), mask.flatten(1)[..., None], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no downscaled grid"):
        state.region(50, 1)


def test_fresh_lora_changes_nothing_and_missing_pieces_are_refused(tiny_colorizer):
    net = copy.deepcopy(tiny_colorizer.unet.unet)
    install_split_attention(net)
    attn = net.get_submodule(CROSS)
    g = torch.Generator().manual_seed(6)
    x, context = torch.randn(1, 48, 64, generator=g), torch.randn(1, 14, 64, generator=g)
    with torch.no_grad():
        without = attn(x, context, **split_attention_kwargs(mask_left(1)))
        with pytest.raises(ValueError, match="has none"):
            attn(x, context, **split_attention_kwargs(mask_left(1), background_lora=True))
        parameters = add_background_lora(net, rank=2)
        assert len(parameters) == 6 * len([n for n, _ in net.named_modules() if n.endswith(".attn2")])
        fresh = attn(x, context, **split_attention_kwargs(mask_left(1), background_lora=True))
        with pytest.raises(ValueError, match="already has"):
            add_background_lora(net, rank=2)
        with pytest.raises(ValueError, match="two equal halves"):
            attn(x, context[:, :7], **split_attention_kwargs(mask_left(1)))
        with pytest.raises(ValueError, match="no entry"):
            net.get_submodule(SELF)(x, **split_attention_kwargs(mask_left(1), bank={}))
    torch.testing.assert_close(fresh, without, rtol=0, atol=0)
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in lora_parameters(net))
    for bad, message in (({"merge_scale": 1.5}, "merge_scale"), ({"threshold": 1.0}, "threshold"),
                         ({"foreground_strength": -1}, "foreground_strength")):
        with pytest.raises(ValueError, match=message):
            split_attention_kwargs(mask_left(1), **bad)
