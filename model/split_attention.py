"""Split attention: the denoiser keeps the sketch's foreground and background apart (stage 2 and the
background modes of the published model, ColorizeDiffusionXL).

With the sketch's foreground mask ``m`` brought to each layer's token grid, every query token belongs to the
foreground (the character) or the background, and:

* **cross-attention** (every ``attn2``) reads a context of two halves, ``[reference ‖ background
  reference]``. With the plug-in (``xlv2`` models) the two readings are blended softly,
  ``out = fg · m + bg · (1 − m)``, with ``fg = fg_s · A(q, fg half) · (1 − merge) + merge · bg`` and
  ``bg = bg_s · A(q, bg half)``. Without it (``bg_enhance`` on ``sdxl`` models) the split is hard at a
  threshold: a query reads only its region's half (with ``merge_scale`` 0 the published code ignores the
  strengths there, and so do we; with ``merge_scale`` > 0 the foreground side is ``fg`` above).
* **decoder self-attention** (``attn1`` of the blocks in ``up_blocks``), when the plug-in's ReferenceNet has
  written its bank (:mod:`model.plugin`): foreground queries (``m`` above 0.05, fixed as published) attend to their own
  tokens only, background queries to the bank's tokens only.
* the plug-in's **background LoRA**: rank-r factors on ``to_q``, ``to_k`` and ``to_v`` of every cross-attention,
  applied to all tokens while the plug-in is on (the reference merges them into the weights then).

The mask follows the published code: it arrives at the latent grid (1/8 of the pixels) and is resized
bicubically to each layer's grid (no clamping, so a soft blend may slightly over- or undershoot at edges).

Each split is computed as two ordinary attention calls and a per-query selection or blend, not as one call
over both halves with a dense (B, heads, N, 2N) additive mask as the reference does: a query's softmax over
its own half is exactly the masked softmax over both, and the two calls stay on SDPA's fused kernels with
no mask in memory. ``tests/test_split_attention.py`` checks the identity; ``bench/split_attention.py``
measures the difference.

Everything per call travels in a :class:`SplitAttentionState` under ``cross_attention_kwargs``, which the
U-Net hands to every attention processor. Without one, every processor runs diffusers' stock
``AttnProcessor2_0``, bit for bit (the LoRA stays off).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

STATE_KEY = "split_attention"
BANK_THRESHOLD = 0.05  # the published bank self-attention's foreground test (attn1's own mask_threshold)
_STOCK = AttnProcessor2_0()
LORA_PROJECTIONS = ("to_q", "to_k", "to_v")


def decoder_self_attention_names(unet: nn.Module) -> list[str]:
    """Module names of the decoder self-attention layers, in forward order, e.g.
    ``up_blocks.0.attentions.0.transformer_blocks.0.attn1`` (the keys of the plug-in's bank)."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.startswith("up_blocks.") and name.endswith(".attn1")]


def cross_attention_names(unet: nn.Module) -> list[str]:
    """Module names of every cross-attention layer (``attn2``) in forward order."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and name.endswith(".attn2")]


@dataclass
class SplitAttentionState:
    """Per-call inputs of the split attention; build it with :func:`split_attention_kwargs`.

    ``sketch_mask`` (b, 1, h, w): the sketch's foreground in [0, 1] at the latent grid. ``blend``: soft
    cross-attention blend (plug-in) instead of the hard split. ``bank``: ReferenceNet tokens (b, M, C) per
    decoder self-attention name, or ``None`` (self-attention stays stock). ``background_lora``: apply the
    cross-attentions' background LoRA. ``threshold``: foreground test ``m > threshold`` of the hard
    cross-attention split (the user's sketch threshold); ``bank_threshold``: the same for the bank
    self-attention, which the published code keeps at 0.05 whatever the user sets. Tensors whose batch b
    divides the denoiser's
    batch are tiled, so guidance conditions stacked condition-major share one state.
    """

    sketch_mask: torch.Tensor
    blend: bool = False
    bank: dict[str, torch.Tensor] | None = None
    background_lora: bool = False
    threshold: float = 0.05
    foreground_strength: float = 1.0
    background_strength: float = 1.0
    merge_scale: float = 0.0
    bank_threshold: float = BANK_THRESHOLD
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def region(self, tokens: int, batch: int) -> torch.Tensor:
        """(batch, tokens, 1) float32: the sketch mask resized bicubically to a layer's token grid."""
        key = (tokens, batch)
        if key not in self._cache:
            mask = self.sketch_mask.float()
            grid = token_grid(tokens, *mask.shape[-2:])
            if grid != tuple(mask.shape[-2:]):
                mask = F.interpolate(mask, size=grid, mode="bicubic")
            self._cache[key] = tile(mask.flatten(1)[..., None], batch)
        return self._cache[key]


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` tokens of a ``height`` × ``width`` latent, downscaled by a power of two
    (the U-Net's strided convolutions round up)."""
    factor = 1
    while factor <= max(height, width):
        grid = (-(-height // factor), -(-width // factor))
        if grid[0] * grid[1] == tokens:
            return grid
        factor *= 2
    raise ValueError(f"{tokens} tokens are no downscaled grid of a {height}x{width} mask")


def tile(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat ``tensor`` (b, ...) along the batch to ``batch`` rows (b must divide it)."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"split-attention input has batch {tensor.shape[0]}, which does not divide the "
                         f"denoiser's batch {batch}")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.dim() - 1)))


def split_attention_kwargs(sketch_mask: torch.Tensor, *, blend: bool = False,
                           bank: dict[str, torch.Tensor] | None = None, background_lora: bool = False,
                           threshold: float = 0.05, foreground_strength: float = 1.0,
                           background_strength: float = 1.0, merge_scale: float = 0.0) -> dict:
    """``cross_attention_kwargs`` for :class:`model.unet.ColorizerUNet` that switch the split attention on.
    The cross-attention context must then be ``[foreground ‖ background]`` halves of equal length."""
    if sketch_mask.dim() != 4 or sketch_mask.shape[1] != 1:
        raise ValueError(f"sketch_mask must be (B, 1, h, w), got {tuple(sketch_mask.shape)}")
    for name, value in (("foreground_strength", foreground_strength), ("background_strength", background_strength)):
        if not 0.0 <= value <= 10.0:
            raise ValueError(f"{name} {value} is outside [0, 10]")
    if not 0.0 <= merge_scale <= 1.0:
        raise ValueError(f"merge_scale {merge_scale} is outside [0, 1]")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1)")
    return {STATE_KEY: SplitAttentionState(sketch_mask, bool(blend), bank, bool(background_lora), float(threshold),
                                           float(foreground_strength), float(background_strength),
                                           float(merge_scale))}


class LowRankAdapter(nn.Module):
    """x (…, in) ↦ up(down(x)) (…, out): a rank-r update of a frozen projection. ``up`` starts at zero (a
    fresh adapter changes nothing), ``down`` at N(0, 1/r) as the reference's LoRA."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _check_plain(attn: Attention, layer_name: str) -> None:
    unsupported = [flag for flag in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                   if getattr(attn, flag, None) is not None]
    if unsupported or attn.residual_connection or attn.norm_cross or attn.rescale_output_factor != 1.0:
        found = unsupported or "a residual, rescaling or cross-norm"
        raise ValueError(f"split attention cannot wrap {layer_name}: it uses {found}")


class CrossAttentionSplit(nn.Module):
    """Processor of one cross-attention layer: the split over ``[foreground ‖ background]`` context halves,
    and the layer's background LoRA (``to_q``, ``to_k``, ``to_v``: :class:`LowRankAdapter` of rank r)."""

    def __init__(self, attn: Attention, layer_name: str):
        super().__init__()
        _check_plain(attn, layer_name)
        self.layer_name = layer_name
        self.has_lora = False

    def add_lora(self, attn: Attention, rank: int) -> None:
        """Give the layer its background LoRA (rank ``rank``, a fresh one changes nothing)."""
        if self.has_lora:
            raise ValueError(f"{self.layer_name} already has a background LoRA")
        for projection in LORA_PROJECTIONS:
            linear = getattr(attn, projection)
            adapter = LowRankAdapter(linear.in_features, linear.out_features, rank)
            self.add_module(projection, adapter.to(device=linear.weight.device, dtype=linear.weight.dtype))
        self.has_lora = True

    def project(self, attn: Attention, name: str, x: torch.Tensor, lora: bool) -> torch.Tensor:
        out = getattr(attn, name)(x)
        return out + getattr(self, name)(x) if lora else out

    # diffusers passes only the keyword arguments named in ``__call__``'s signature, so it is spelled out
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, split_attention: SplitAttentionState | None = None):
        state = split_attention
        if state is None:
            return _STOCK(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or hidden_states.dim() != 3 or encoder_hidden_states is None:
            raise ValueError(f"split attention at {self.layer_name} expects (B, N, C) tokens, a context and no mask")
        if encoder_hidden_states.shape[1] % 2:
            raise ValueError(f"split cross-attention at {self.layer_name} needs a context of two equal halves "
                             f"[foreground, background]; got {encoder_hidden_states.shape[1]} tokens")
        lora = state.background_lora
        if lora and not self.has_lora:
            raise ValueError(f"the background LoRA is asked for at {self.layer_name}, which has none (no plug-in)")
        query = self.project(attn, "to_q", hidden_states, lora)
        key = self.project(attn, "to_k", encoder_hidden_states, lora)
        value = self.project(attn, "to_v", encoder_hidden_states, lora)
        fg_key, bg_key = key.chunk(2, dim=1)
        fg_value, bg_value = value.chunk(2, dim=1)
        batch, tokens, _ = hidden_states.shape
        foreground = attend(attn.heads, query, fg_key, fg_value)
        background = attend(attn.heads, query, bg_key, bg_value)
        mask = state.region(tokens, batch)
        if not state.blend and state.merge_scale == 0:  # as published: the plain hard split, strengths unused
            out = torch.where(mask > state.threshold, foreground, background)
            return attn.to_out[1](attn.to_out[0](out))
        foreground = foreground * state.foreground_strength
        background = background * state.background_strength
        if state.merge_scale > 0:
            foreground = foreground * (1 - state.merge_scale) + background * state.merge_scale
        if state.blend:
            out = foreground * mask.to(foreground.dtype) + background * (1 - mask).to(foreground.dtype)
        else:  # the published code tests "background below" on this path, "foreground above" on the plain one
            out = torch.where(mask < state.threshold, background, foreground)
        return attn.to_out[1](attn.to_out[0](out))


class BankSelfAttention(nn.Module):
    """Processor of one decoder self-attention layer: with a ReferenceNet bank in the state, foreground
    queries attend to their own tokens and background queries to the bank's; otherwise stock."""

    def __init__(self, attn: Attention, layer_name: str):
        super().__init__()
        _check_plain(attn, layer_name)
        self.layer_name = layer_name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, split_attention: SplitAttentionState | None = None):
        state = split_attention
        if state is None or state.bank is None:
            return _STOCK(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or hidden_states.dim() != 3 or encoder_hidden_states is not None:
            raise ValueError(f"bank self-attention at {self.layer_name} expects (B, N, C) tokens and nothing else")
        if self.layer_name not in state.bank:
            raise ValueError(f"the bank has no entry for {self.layer_name}; it has {len(state.bank)} layers")
        batch, tokens, _ = hidden_states.shape
        bank = tile(state.bank[self.layer_name], batch).to(hidden_states.dtype)
        query = attn.to_q(hidden_states)
        own = attend(attn.heads, query, attn.to_k(hidden_states), attn.to_v(hidden_states))
        other = attend(attn.heads, query, attn.to_k(bank), attn.to_v(bank))
        out = torch.where(state.region(tokens, batch) > state.bank_threshold, own, other)
        return attn.to_out[1](attn.to_out[0](out))


def attend(heads: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of (B, N, inner) queries over (B, S, inner) keys/values → (B, N, inner);
    ``mask`` (B, 1 or heads, N, S) bool or additive, for the dense reference form."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // heads
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class PassThroughProcessor(AttnProcessor2_0):
    """Stock attention for layers that take no part in the split (encoder and middle self-attention); it
    only accepts the state so diffusers does not warn about an unexpected keyword on every call."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 split_attention=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_split_attention(unet: nn.Module) -> None:
    """Put split processors on every cross-attention and bank processors on the decoder self-attention of a
    diffusers U-Net, pass-through processors elsewhere. Without a state they compute what stock diffusers
    does, so every denoiser gets them (``background_enhance`` needs no plug-in); they hold no parameters
    until :func:`add_background_lora`."""
    if any(isinstance(p, CrossAttentionSplit) for p in unet.attn_processors.values()):
        return
    decoder_self = set(decoder_self_attention_names(unet))
    processors = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            if name.endswith(".attn2"):
                processor = CrossAttentionSplit(module, name)
            elif name in decoder_self:
                processor = BankSelfAttention(module, name)
            else:
                processor = PassThroughProcessor()
            processors[f"{name}.processor"] = processor
    unet.set_attn_processor(processors)


def add_background_lora(unet: nn.Module, rank: int) -> list[nn.Parameter]:
    """Give every cross-attention of ``unet`` its background LoRA of ``rank``; returns the new parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    install_split_attention(unet)
    for name, processor in lora_processors(unet).items():
        processor.add_lora(unet.get_submodule(name), rank)
    return lora_parameters(unet)


def lora_processors(unet: nn.Module) -> dict[str, CrossAttentionSplit]:
    """Installed cross-attention processors (which hold the background LoRA, if any) keyed by layer name."""
    return {name.removesuffix(".processor"): p for name, p in unet.attn_processors.items()
            if isinstance(p, CrossAttentionSplit)}


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for processor in lora_processors(unet).values() for p in processor.parameters()]


def lora_modules(unet: nn.Module) -> nn.Module:
    """A module whose ``state_dict`` is exactly the background LoRA, keyed by layer name (the processors are
    shared, not copied): ``up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.down.weight``."""
    root = nn.Module()
    for name, processor in lora_processors(unet).items():
        if not processor.has_lora:
            continue
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, processor)
    return root


@contextlib.contextmanager
def stock_processors(unet: nn.Module):
    """Run a block with stock processors (e.g. to save a U-Net folder any diffusers can load), then put the
    installed ones back."""
    installed = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield unet
    finally:
        unet.set_attn_processor(dict(installed))
