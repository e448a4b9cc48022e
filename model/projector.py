"""Projector: fuses OpenCLIP and WD-Tagger tokens into the U-Net's cross-attention context.

Self-attention mixes the CLIP tokens so that the first N of them (N = the tagger's token count) carry
the whole image; those are normalized, concatenated channel-wise with the WD tokens and mapped by an MLP
to the cross-attention width. This is the only trainable part of the reference path (the encoders are
frozen); its layer shapes follow the reference implementation so released weights can be mapped in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceProjector(nn.Module):
    """(B, Nc, Dc) CLIP tokens + (B, Nw, Dw) WD tokens → (B, Nw, context_dim) context."""

    def __init__(self, clip_dim: int, tagger_dim: int, context_dim: int, num_tokens: int, head_dim: int = 64):
        super().__init__()
        self.num_tokens = num_tokens
        self.heads = max(1, clip_dim // head_dim)
        self.qkv = nn.Linear(clip_dim, 3 * clip_dim, bias=False)
        self.attention_out = nn.Linear(clip_dim, clip_dim)
        self.norm = nn.LayerNorm(clip_dim)
        self.mlp = nn.Sequential(
            nn.Linear(clip_dim + tagger_dim, context_dim),
            nn.SiLU(),
            nn.Linear(context_dim, context_dim),
            nn.LayerNorm(context_dim),
        )

    def forward(self, clip_tokens: torch.Tensor, tagger_tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = clip_tokens.shape
        if count < self.num_tokens:
            raise ValueError(f"projector keeps {self.num_tokens} CLIP tokens but got only {count}")
        if tagger_tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tagger tokens, got {tagger_tokens.shape[1]}")
        q, k, v = self.qkv(clip_tokens).reshape(batch, count, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, count, dim)
        kept = self.norm(self.attention_out(mixed)[:, : self.num_tokens])
        return self.mlp(torch.cat([kept, tagger_tokens.to(kept.dtype)], dim=-1))
