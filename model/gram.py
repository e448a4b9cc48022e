"""Gram regularization (the paper's Eq. 1).

The Gram matrix of a feature map is the token-by-token cosine self-similarity: each spatial token is
L2-normalized over channels, G = T·Tᵀ (N×N). It describes which places the network groups together,
i.e. the spatial segmentation it has inferred. The loss pulls the misaligned branch's segmentation onto
the aligned branch's, whose Gram is a stop-gradient anchor so it cannot drift toward the misaligned one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, N, C) → (B, N, N) cosine self-similarity, computed in float32."""
    tokens = features.flatten(2).transpose(1, 2) if features.dim() == 4 else features
    tokens = F.normalize(tokens.float(), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def gram_loss(aligned: dict[str, torch.Tensor], misaligned: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over layers of mean((stop_grad(G_aligned) − G_misaligned)²)."""
    if set(aligned) != set(misaligned):
        raise ValueError(f"Gram layers differ between branches: {sorted(aligned)} vs {sorted(misaligned)}")
    if not aligned:
        raise ValueError("no Gram-layer features were captured")
    total = None
    for name in sorted(aligned):
        anchor = gram_matrix(aligned[name].detach())
        term = (anchor - gram_matrix(misaligned[name])).pow(2).mean()
        total = term if total is None else total + term
    return total
