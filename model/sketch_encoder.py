"""Sketch encoder: turns the (inverted) sketch into residuals for the U-Net encoder.

A conv stem takes the sketch from full resolution to the latent's 1/8, then one conv level per injection
point (stride 2 where the U-Net halves its resolution). One coarse-to-fine attention layer lets every
level read the coarser levels (and a global token), so thin local strokes are interpreted with the whole
drawing in view. Every output goes through a zero-initialized 1×1 conv: a fresh encoder adds exactly
nothing, so pretrained U-Net weights start undisturbed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import SketchEncoderConfig
from model.unet import InjectionPoint


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sincos_positions(height: int, width: int, dim: int, device, dtype) -> torch.Tensor:
    """(h·w, dim) 2D sine-cosine codes of normalized coordinates, so a token at the same place of the
    image gets the same code at every scale (what lets fine tokens find their coarse neighbourhood)."""
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(1000.0) / quarter))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    angles_y = gy.reshape(-1, 1) * freqs * 2 * math.pi * 16
    angles_x = gx.reshape(-1, 1) * freqs * 2 * math.pi * 16
    codes = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return F.pad(codes, (0, dim - codes.shape[1])).to(dtype)


class CoarseToFineAttention(nn.Module):
    """Each scale's tokens attend to themselves and every coarser scale (plus one global token).

    Run as one attention call per scale without masks, so fused attention kernels apply; queries and
    keys are RMS-normalized for stable training at large token counts.
    """

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // self.heads)
        self.k_norm = nn.RMSNorm(dim // self.heads)
        self.out = nn.Linear(dim, dim)

    def forward(self, scales: list[torch.Tensor], global_token: torch.Tensor) -> list[torch.Tensor]:
        """``scales``: (B, N_i, D) token maps ordered coarse → fine; ``global_token``: (B, 1, D)."""
        batch, _, dim = global_token.shape
        heads = self.heads

        def split(x):
            q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
            shape = (batch, x.shape[1], heads, dim // heads)
            q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
            return self.q_norm(q), self.k_norm(k), v

        keys, values = [], []
        _, k0, v0 = split(global_token)
        keys.append(k0)
        values.append(v0)
        outputs = []
        for tokens in scales:
            q, k, v = split(tokens)
            keys.append(k)
            values.append(v)
            attended = F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2))
            attended = attended.transpose(1, 2).reshape(batch, tokens.shape[1], dim)
            outputs.append(tokens + self.out(attended))
        return outputs


class SketchEncoder(nn.Module):
    """(B, 1, H, W) sketch in [-1, 1] → one residual per :class:`InjectionPoint` (B, C_i, h_i, w_i)."""

    def __init__(self, cfg: SketchEncoderConfig, points: list[InjectionPoint]):
        super().__init__()
        self.points = list(points)
        widths = cfg.stem_channels
        stem: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1), nn.SiLU()]
        for prev, nxt in zip(widths[:-1], widths[1:]):
            stem += [nn.Conv2d(prev, prev, 3, padding=1), nn.SiLU(), nn.Conv2d(prev, nxt, 3, padding=1, stride=2), nn.SiLU()]
        stem += [nn.Conv2d(widths[-1], self.points[0].channels, 3, padding=1)]
        self.stem = nn.Sequential(*stem)
        self.stem_stride = 2 ** (len(widths) - 1)

        self.levels = nn.ModuleList()
        for prev, point in zip(self.points[:-1], self.points[1:]):
            stride = point.downscale // prev.downscale
            if stride not in (1, 2):
                raise ValueError(f"injection point {point.name} is {stride}× coarser than the previous one; expected 1× or 2×")
            self.levels.append(nn.Sequential(
                nn.SiLU(), nn.Conv2d(prev.channels, point.channels, 3, padding=1, stride=stride),
                nn.SiLU(), nn.Conv2d(point.channels, point.channels, 3, padding=1),
            ))

        attention_dim = self.points[-1].channels
        self.to_tokens = nn.ModuleList(nn.Conv2d(p.channels, attention_dim, 1) for p in self.points)
        self.global_token = nn.Linear(attention_dim, attention_dim)
        self.attention = CoarseToFineAttention(attention_dim, cfg.attention_head_dim)
        self.outputs = nn.ModuleList(zero_module(nn.Conv2d(attention_dim, p.channels, 1)) for p in self.points)
        for module in [*self.stem, *self.levels.modules()]:
            if isinstance(module, nn.Conv2d):  # He init keeps the strokes' signal alive through the deep stem;
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # PyTorch's default shrinks it ~100×
                nn.init.zeros_(module.bias)

    @property
    def pixel_multiple(self) -> int:
        return self.stem_stride * self.points[-1].downscale

    def forward(self, sketch: torch.Tensor, strengths: list[float] | torch.Tensor | None = None) -> list[torch.Tensor]:
        """``strengths`` scales each residual (an inference control); ``None`` means 1 everywhere."""
        height, width = sketch.shape[-2:]
        if height % self.pixel_multiple or width % self.pixel_multiple:
            raise ValueError(f"sketch size {width}x{height} must be a multiple of {self.pixel_multiple} on each side")
        features = [self.stem(sketch)]
        for level in self.levels:
            features.append(level(features[-1]))

        maps = [proj(f) for proj, f in zip(self.to_tokens, features)]
        tokens = [m.flatten(2).transpose(1, 2) + sincos_positions(*m.shape[-2:], m.shape[1], m.device, m.dtype) for m in maps]
        global_token = self.global_token(maps[-1].mean(dim=(2, 3)))[:, None]
        order = sorted(range(len(maps)), key=lambda i: -self.points[i].downscale)  # coarse → fine, stable
        attended = self.attention([tokens[i] for i in order], global_token)
        by_point = dict(zip(order, attended))

        residuals = []
        for i, (out, m) in enumerate(zip(self.outputs, maps)):
            grid = by_point[i].transpose(1, 2).reshape(m.shape)
            residual = out(grid)
            if strengths is not None:
                residual = residual * strengths[i]
            residuals.append(residual)
        return residuals
