"""Projector: fuses OpenCLIP and WD-Tagger tokens into the U-Net's cross-attention context.

Self-attention mixes the CLIP tokens so that the first N of them (N = the tagger's token count) carry
the whole image; those are layer-normed, concatenated channel-wise with the WD tokens and mapped by an MLP
to the cross-attention width. This is the only trainable part of the reference path (the encoders are
frozen). The layers and their names are the published ColorizeDiffusionXL projector's (``attn.to_q``,
``attn.to_k``, ``attn.to_v``, ``attn.to_out.0``, ``norm``, ``proj.0``, ``proj.2``, ``proj.3``), so its
released ``proj.*`` tensors load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenMixer(nn.Module):
    """Plain multi-head self-attention with separate bias-free q/k/v projections."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"CLIP token width {dim} is not a multiple of the head width {head_dim}")
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ReferenceProjector(nn.Module):
    """(B, Nc, Dc) CLIP tokens + (B, Nw, Dw) WD tokens → (B, Nw, context_dim) context."""

    def __init__(self, clip_dim: int, tagger_dim: int, context_dim: int, num_tokens: int, head_dim: int = 128):
        super().__init__()
        self.num_tokens = num_tokens
        self.attn = TokenMixer(clip_dim, head_dim)
        self.norm = nn.LayerNorm(clip_dim)
        self.proj = nn.Sequential(
            nn.Linear(clip_dim + tagger_dim, context_dim),
            nn.SiLU(),
            nn.Linear(context_dim, context_dim),
            nn.LayerNorm(context_dim),
        )

    def forward(self, clip_tokens: torch.Tensor, tagger_tokens: torch.Tensor) -> torch.Tensor:
        count = clip_tokens.shape[1]
        if count < self.num_tokens:
            raise ValueError(f"projector keeps {self.num_tokens} CLIP tokens but got only {count}")
        if tagger_tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tagger tokens, got {tagger_tokens.shape[1]}")
        kept = self.norm(self.attn(clip_tokens)[:, : self.num_tokens])
        return self.proj(torch.cat([kept, tagger_tokens.to(kept.dtype)], dim=-1))
