"""Sketch encoder: turns the (inverted) sketch into residuals for the U-Net encoder.

The architecture is the published ColorizeDiffusionXL one, so its released ``control_encoder.*`` tensors
load by name (our state-dict keys are theirs without that prefix):

* a conv stem takes the 3-channel sketch from full resolution to the latent's 1/8 (its last conv starts
  at zero, as the authors train it);
* one SiLU + conv per injection point (stride 2 where the U-Net halves its resolution);
* every level's raw features are projected to the width of the last level by a 1×1 conv and flattened to
  tokens; a global token is the 1×1 projection of the mean of the last level's raw features;
* one attention layer over ``[global, coarsest, ..., finest]`` in which each scale attends to the global
  token, every coarser scale and itself (block-causal across scales), with q/k RMS-normalized over the
  full width and 2-D rotary positions per scale (the global token has no position). Its output is added
  to the tokens (residual), so thin local strokes are read with the whole drawing in view;
* each level's tokens go back to that level's channel count through a zero-initialized 1×1 conv: a fresh
  encoder adds exactly nothing, so pretrained U-Net weights start undisturbed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import SketchEncoderConfig
from model.unet import InjectionPoint


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class RMSNorm(nn.Module):
    """RMS normalization computed in float32 whatever the input dtype (bf16 squares lose too much)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_angles(height: int, width: int, head_dim: int, device, theta: float = 10000.0) -> torch.Tensor:
    """(h·w, head_dim/2) rotation angles of a 2-D rotary embedding over an h×w token grid (row-major).

    The first half of each head's channel pairs turns with the row index, the second half with the
    column index, each at frequencies ``theta^(-2i/(head_dim/2))``. Positions are grid indices, so the
    same place of the image has different indices at different scales: scales are told apart by their
    position in the token sequence, not by their codes. Angles are made in float64 (indices reach the
    hundreds at 1536 pixels, where float32 angles would be off by ~1e-4 rad).
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary positions need a head width divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64, device=device) / half)
    rows = torch.arange(height, dtype=torch.float64, device=device)[:, None] * freqs  # (h, half/2)
    cols = torch.arange(width, dtype=torch.float64, device=device)[:, None] * freqs  # (w, half/2)
    grid = torch.cat([rows[:, None, :].expand(height, width, -1), cols[None, :, :].expand(height, width, -1)], dim=-1)
    return grid.reshape(height * width, half)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, heads, N, head_dim) by ``angles`` (N, head_dim/2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos().float(), angles.sin().float()
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class MultiScaleAttention(nn.Module):
    """Block-causal attention over ``[global, scale_0, scale_1, ...]`` (coarse to fine): the queries of a
    scale see the keys of the global token, of every earlier scale and of their own.

    Run as one fused attention call per scale (no masks), so ``scaled_dot_product_attention`` picks its
    fastest kernel. The projections carry the published names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
    ``q_norm``, ``k_norm``).
    """

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of the head width {head_dim}")
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.q_norm = RMSNorm(dim)
        self.k_norm = RMSNorm(dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, head_dim)

    def forward(self, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """``tokens`` (B, 1 + Σ h·w, D): the global token, then each scale of ``grids`` (coarse to fine)."""
        q = self._heads(self.q_norm(self.to_q(tokens)))
        k = self._heads(self.k_norm(self.to_k(tokens)))
        v = self._heads(self.to_v(tokens))
        angles = [rope_angles(h, w, self.head_dim, tokens.device) for h, w in grids]
        rotated_q = [q[:, :, :1]]
        rotated_k = [k[:, :, :1]]
        start = 1
        for (h, w), a in zip(grids, angles):
            end = start + h * w
            rotated_q.append(apply_rope(q[:, :, start:end], a))
            rotated_k.append(apply_rope(k[:, :, start:end], a))
            start = end
        q, k = torch.cat(rotated_q, dim=2), torch.cat(rotated_k, dim=2)
        # The global token shares the first block with the coarsest scale: both see [global, scale 0].
        ends = [1 + grids[0][0] * grids[0][1]]
        for h, w in grids[1:]:
            ends.append(ends[-1] + h * w)
        outputs, start = [], 0
        for end in ends:
            outputs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end]))
            start = end
        out = torch.cat(outputs, dim=2).transpose(1, 2).flatten(2)
        return self.to_out(out)


class SketchEncoder(nn.Module):
    """(B, 3, H, W) inverted sketch in [-1, 1] → one residual per :class:`InjectionPoint` (B, C_i, h_i, w_i)."""

    def __init__(self, cfg: SketchEncoderConfig, points: list[InjectionPoint]):
        super().__init__()
        self.points = list(points)
        self.in_channels = cfg.in_channels
        widths = cfg.stem_channels
        stem: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1), nn.SiLU()]
        for prev, nxt in zip(widths[:-1], widths[1:]):
            stem += [nn.Conv2d(prev, prev, 3, padding=1), nn.SiLU(), nn.Conv2d(prev, nxt, 3, padding=1, stride=2), nn.SiLU()]
        stem += [zero_module(nn.Conv2d(widths[-1], self.points[0].channels, 3, padding=1))]
        self.model = nn.Sequential(*stem)  # the published name of the stem
        self.stem_stride = 2 ** (len(widths) - 1)

        self.downsample_layers = nn.ModuleList()
        for prev, point in zip(self.points[:-1], self.points[1:]):
            stride = point.downscale // prev.downscale
            if stride not in (1, 2):
                raise ValueError(f"injection point {point.name} is {stride}× coarser than the previous one; expected 1× or 2×")
            self.downsample_layers.append(nn.Sequential(
                nn.SiLU(), nn.Conv2d(prev.channels, point.channels, 3, padding=1, stride=stride)))

        width = self.points[-1].channels
        # One projection per level, then one for the global token (the published order of proj_ins).
        self.proj_ins = nn.ModuleList([nn.Conv2d(p.channels, width, 1) for p in self.points] + [nn.Conv2d(width, width, 1)])
        self.attn_layer = MultiScaleAttention(width, cfg.attention_head_dim)
        self.proj_outs = nn.ModuleList(zero_module(nn.Conv2d(width, p.channels, 1)) for p in self.points)
        for module in [*self.model, *self.downsample_layers.modules()]:
            if isinstance(module, nn.Conv2d) and module is not self.model[-1]:
                # He init keeps the strokes' signal alive through the deep stem when training from
                # scratch; PyTorch's default shrinks it ~100×. Published weights overwrite it anyway.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @property
    def pixel_multiple(self) -> int:
        return self.stem_stride * self.points[-1].downscale

    def forward(self, sketch: torch.Tensor, strengths: list[float] | torch.Tensor | None = None) -> list[torch.Tensor]:
        """``strengths`` scales each residual (an inference control); ``None`` means 1 everywhere.

        A one-channel sketch (the gray drawings a dataset stores) stands for equal RGB channels."""
        height, width = sketch.shape[-2:]
        if sketch.shape[1] == 1:
            sketch = sketch.expand(-1, self.in_channels, -1, -1)
        if sketch.shape[1] != self.in_channels:
            raise ValueError(f"sketch has {sketch.shape[1]} channels; the encoder takes {self.in_channels} (or 1)")
        if height % self.pixel_multiple or width % self.pixel_multiple:
            raise ValueError(f"sketch size {width}x{height} must be a multiple of {self.pixel_multiple} on each side")
        features = [self.model(sketch)]
        for layer in self.downsample_layers:
            features.append(layer(features[-1]))

        global_token = self.proj_ins[-1](features[-1].mean(dim=(2, 3), keepdim=True)).flatten(2).transpose(1, 2)
        maps = [proj(f) for proj, f in zip(self.proj_ins, features)]
        order = list(range(len(maps)))[::-1]  # finest level first in self.points: attend coarse → fine
        grids = [tuple(maps[i].shape[-2:]) for i in order]
        tokens = torch.cat([global_token] + [maps[i].flatten(2).transpose(1, 2) for i in order], dim=1)
        tokens = self.attn_layer(tokens, grids) + tokens

        residuals: list[torch.Tensor | None] = [None] * len(maps)
        start = 1
        for i, (h, w) in zip(order, grids):
            grid = tokens[:, start:start + h * w].transpose(1, 2).unflatten(2, (h, w))
            start += h * w
            residual = self.proj_outs[i](grid)
            if strengths is not None:
                residual = residual * strengths[i]
            residuals[i] = residual
        return residuals
