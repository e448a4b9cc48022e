"""Split attention (stage 2): the denoiser's attention layers learn to keep foreground and background apart.

With the sketch's foreground mask resized to each layer's token grid, every query token is foreground or
background, and one ``scaled_dot_product_attention`` call with a mask lets it see only its own region:

* decoder self-attention (``attn1`` of the transformer blocks in ``up_blocks``): keys and values are
  ``[own tokens ‖ plugin tokens]``; a query sees all own tokens plus the plugin tokens of its region
  (the plugin's grid is split by the reference's foreground mask);
* cross-attention (every ``attn2``): the context is ``[foreground ‖ background]`` (the background half is
  the same context unless a separate background reference gives one); a query sees only its region's half.

Low-rank adapters on the key/value projections that read plugin tokens or the background context let those
inputs be projected differently from the layer's own; their up-projections start at zero, so a fresh
install computes what the stock layer computes. The adapters are ``nn.Module`` processors registered in
the denoiser (diffusers' way), so they move, cast and checkpoint with it.

Everything per call travels in a :class:`SplitAttentionState` under ``cross_attention_kwargs``, which the
U-Net hands to every attention processor. Without a state every processor runs diffusers' stock
``AttnProcessor2_0``, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

STATE_KEY = "split_attention"
_STOCK = AttnProcessor2_0()


def decoder_self_attention_names(unet: nn.Module) -> list[str]:
    """Module names of the decoder self-attention layers, e.g.
    ``up_blocks.0.attentions.0.transformer_blocks.0.attn1`` (the keys of the plugin's features)."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.startswith("up_blocks.") and name.endswith(".attn1")]


@dataclass
class SplitAttentionState:
    """Per-call inputs of the split attention; build it with :func:`split_attention_kwargs`.

    ``sketch_mask`` (b, 1, H, W) foreground of the output in [0, 1] at any resolution of the output's aspect
    (pixels in practice); ``plugin_tokens`` maps decoder self-attention names to plugin tokens (b, M, C), or
    is ``None`` (plugin off: self-attention stays stock); ``reference_mask`` (b, 1, H', W') foreground of the
    plugin's input; ``background_context`` (b, L, D) or ``None`` (= the cross-attention context itself).
    Tensors whose batch b divides the denoiser's batch are tiled, so guidance conditions stacked
    condition-major share one state. Strengths weight a region's reference (see the processors).
    """

    sketch_mask: torch.Tensor
    reference_mask: torch.Tensor | None = None
    plugin_tokens: dict[str, torch.Tensor] | None = None
    background_context: torch.Tensor | None = None
    foreground_strength: float = 1.0
    background_strength: float = 1.0
    mask_threshold: float = 0.5
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def foreground(self, which: str, tokens: int, batch: int) -> torch.Tensor:
        """(batch, tokens) bool: which tokens of a grid are foreground, for ``which`` in {"sketch", "reference"}.
        Masks are area-resized to the grid (the fraction of foreground pixels) and thresholded."""
        key = (which, tokens, batch)
        if key not in self._cache:
            mask = self.sketch_mask if which == "sketch" else self.reference_mask
            height, width = token_grid(tokens, *mask.shape[-2:])
            fraction = F.interpolate(mask.float(), size=(height, width), mode="area")
            self._cache[key] = tile(fraction.flatten(1) > self.mask_threshold, batch)
        return self._cache[key]

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` tokens of an image of ``height`` × ``width``, downscaled by a whole factor
    (the U-Net's convolutions round up)."""
    factor = round(math.sqrt(height * width / tokens))
    grid = (-(-height // max(factor, 1)), -(-width // max(factor, 1)))
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"{tokens} tokens are no downscaled grid of a {height}x{width} mask")
    return grid


def tile(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat ``tensor`` (b, ...) along the batch to ``batch`` rows (b must divide it)."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"split-attention input has batch {tensor.shape[0]}, which does not divide the "
                         f"denoiser's batch {batch}")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.dim() - 1)))


def split_attention_kwargs(sketch_mask: torch.Tensor, reference_mask: torch.Tensor | None = None,
                           plugin_tokens: dict[str, torch.Tensor] | None = None,
                           background_context: torch.Tensor | None = None, *, foreground_strength: float = 1.0,
                           background_strength: float = 1.0, mask_threshold: float = 0.5) -> dict:
    """``cross_attention_kwargs`` for :class:`model.unet.ColorizerUNet` that switch the split attention on.

    Shapes as in :class:`SplitAttentionState`; masks may be any float or bool tensor in [0, 1].
    """
    if sketch_mask.dim() != 4 or sketch_mask.shape[1] != 1:
        raise ValueError(f"sketch_mask must be (B, 1, H, W), got {tuple(sketch_mask.shape)}")
    if plugin_tokens is not None and (reference_mask is None or reference_mask.dim() != 4):
        raise ValueError("plugin tokens need the reference mask (B, 1, H, W) that splits them")
    for name, value in (("foreground_strength", foreground_strength), ("background_strength", background_strength)):
        if not 0.0 <= value <= 10.0:
            raise ValueError(f"{name} {value} is outside [0, 10]")
    if not 0.0 <= mask_threshold < 1.0:
        raise ValueError(f"mask_threshold {mask_threshold} is outside [0, 1)")
    return {STATE_KEY: SplitAttentionState(sketch_mask, reference_mask, plugin_tokens, background_context,
                                           float(foreground_strength), float(background_strength),
                                           float(mask_threshold))}


class LowRankAdapter(nn.Module):
    """x (…, in) ↦ up(down(x)) (…, out): a rank-r update of a frozen projection; ``up`` starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class SplitAttentionProcessor(nn.Module):
    """Processor of one split layer: ``self_attention`` for decoder ``attn1`` (plugin tokens), otherwise
    cross-attention (background context). Adapters act on the key/value projections of that second input.

    Strengths: in cross-attention the attention output (before ``to_out``) of foreground queries is scaled
    by ``foreground_strength`` and of background queries by ``background_strength``; in self-attention
    the plugin tokens' logits get ``log(strength)`` of the query's region (0 removes the plugin there).
    """

    def __init__(self, attn: Attention, layer_name: str, self_attention: bool, rank: int):
        super().__init__()
        unsupported = [flag for flag in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                       if getattr(attn, flag, None) is not None]
        if unsupported or attn.residual_connection or attn.norm_cross or attn.rescale_output_factor != 1.0:
            found = unsupported or "a residual, rescaling or cross-norm"
            raise ValueError(f"split attention cannot wrap {layer_name}: it uses {found}")
        self.layer_name = layer_name
        self.self_attention = self_attention
        inner = attn.to_k.out_features
        self.key_adapter = LowRankAdapter(attn.to_k.in_features, inner, min(rank, inner))
        self.value_adapter = LowRankAdapter(attn.to_v.in_features, inner, min(rank, inner))
        self.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)

    # diffusers passes only the keyword arguments named in ``__call__``'s signature, so it is spelled out
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, split_attention: SplitAttentionState | None = None):
        state = split_attention
        if state is None or (self.self_attention and state.plugin_tokens is None):
            return _STOCK(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or hidden_states.dim() != 3:
            raise ValueError(f"split attention at {self.layer_name} expects (B, N, C) tokens and no attention mask")
        batch, tokens, _ = hidden_states.shape
        if self.self_attention:
            if self.layer_name not in state.plugin_tokens:
                raise ValueError(f"plugin tokens have no entry for {self.layer_name}; got {sorted(state.plugin_tokens)}")
            own, other = hidden_states, tile(state.plugin_tokens[self.layer_name], batch).to(hidden_states.dtype)
        else:
            own = encoder_hidden_states
            background = state.background_context
            other = own if background is None else tile(background, batch).to(own.dtype)
        key = torch.cat([attn.to_k(own), attn.to_k(other) + self.key_adapter(other)], dim=1)
        value = torch.cat([attn.to_v(own), attn.to_v(other) + self.value_adapter(other)], dim=1)
        query_fg = state.foreground("sketch", tokens, batch)
        if self.self_attention:
            mask = self._plugin_mask(state, query_fg, own.shape[1], other.shape[1], batch, key.dtype)
        else:
            mask = self._halves_mask(state, query_fg, own.shape[1], other.shape[1], batch)
        out = _attend(attn, attn.to_q(hidden_states), key, value, mask)
        if not self.self_attention and (state.foreground_strength != 1.0 or state.background_strength != 1.0):
            out = out * _per_region(query_fg, state).to(out.dtype)[..., None]
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _plugin_mask(state, query_fg, own_len, plugin_len, batch, dtype):
        """(B, 1, N, N + M): all own tokens, plus the plugin tokens of the query's region (bool), or the
        additive form carrying log-strengths when a strength is not 1."""
        def build():
            plugin_fg = state.foreground("reference", plugin_len, batch)
            same = query_fg[:, :, None] == plugin_fg[:, None, :]
            allowed = torch.cat([same.new_ones(batch, own_len, own_len), same], dim=2)[:, None]
            if state.foreground_strength == 1.0 and state.background_strength == 1.0:
                return allowed
            weights = _per_region(query_fg, state).log()
            bias = torch.cat([weights.new_zeros(batch, own_len, own_len),
                              weights[:, :, None].expand(batch, own_len, plugin_len)], dim=2)[:, None]
            return bias.masked_fill(~allowed, -math.inf).to(dtype)

        return state.cached(("plugin", own_len, plugin_len, batch, dtype), build)

    @staticmethod
    def _halves_mask(state, query_fg, fg_len, bg_len, batch):
        """(B, 1, N, L + L'): foreground queries see the first half, background queries the second."""
        def build():
            first = torch.arange(fg_len + bg_len, device=query_fg.device) < fg_len
            return (query_fg[:, :, None] == first[None, None, :])[:, None]

        return state.cached(("halves", query_fg.shape[1], fg_len, bg_len, batch), build)


def _per_region(query_fg: torch.Tensor, state: SplitAttentionState) -> torch.Tensor:
    """(B, N) float32: each query's region strength."""
    fg = torch.tensor(state.foreground_strength, device=query_fg.device)
    return torch.where(query_fg, fg, torch.tensor(state.background_strength, device=query_fg.device))


def _attend(attn: Attention, query, key, value, mask) -> torch.Tensor:
    """Multi-head attention of (B, N, inner) queries over (B, S, inner) keys/values with a (B, 1, N, S) mask."""
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class PassThroughProcessor(AttnProcessor2_0):
    """Stock attention for layers that take no part in the split (encoder and middle self-attention); it
    only accepts the state so diffusers does not warn about an unexpected keyword on every call."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 split_attention=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_split_attention(unet: nn.Module, rank: int) -> list[nn.Parameter]:
    """Put split processors on the decoder self-attention and every cross-attention of a diffusers U-Net,
    pass-through processors elsewhere; returns the adapters' parameters (the only new trainable ones)."""
    if rank < 1:
        raise ValueError(f"adapter rank must be at least 1, got {rank}")
    if any(isinstance(p, SplitAttentionProcessor) for p in unet.attn_processors.values()):
        raise ValueError("split attention is already installed on this U-Net")
    decoder_self = set(decoder_self_attention_names(unet))
    processors = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            if name in decoder_self or name.endswith(".attn2"):
                processors[f"{name}.processor"] = SplitAttentionProcessor(module, name, name in decoder_self, rank)
            else:
                processors[f"{name}.processor"] = PassThroughProcessor()
    unet.set_attn_processor(processors)
    return adapter_parameters(unet)


def split_processors(unet: nn.Module) -> dict[str, SplitAttentionProcessor]:
    """Installed split processors keyed by their attention layer's name."""
    return {name.removesuffix(".processor"): p for name, p in unet.attn_processors.items()
            if isinstance(p, SplitAttentionProcessor)}


def adapter_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for processor in split_processors(unet).values() for p in processor.parameters()]


def adapter_modules(unet: nn.Module) -> nn.Module:
    """A module whose ``state_dict`` is exactly the adapters, keyed by layer name (the processors are
    shared, not copied): ``up_blocks.0.attentions.0.transformer_blocks.0.attn1.key_adapter.down.weight``."""
    root = nn.Module()
    for name, processor in split_processors(unet).items():
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
