"""BiRefNet (Zheng et al., 2024): the background-removal net of briaai/RMBG-2.0 and ZhengPeng7/BiRefNet.

Why: the reference implementation of ColorizeDiffusionXL masks the reference image with RMBG-2.0 by default
(``rmbg-v2``; ``BiRefNet`` and ``BiRefNet_HR`` are its alternatives), loaded through transformers'
``trust_remote_code``. We load the same published ``model.safetensors`` into our own module instead: no
network, no remote code. :mod:`model.segmenter` wraps it with the reference's pre/post-processing.

Architecture (the published config: ``bb='swin_v1_l'``, ``mul_scl_ipt='cat'``, ``cxt_num=3``,
``squeeze_block='BasicDecBlk_x1'``, ``dec_blk='BasicDecBlk'``, ``dec_att='ASPPDeformable'``,
``dec_ipt=True`` with split patches, ``ms_supervision=out_ref=True``, BatchNorm everywhere since the
training batch size was > 1):

* ``bb``: a Swin-v1 backbone (patch 4, window 12; Swin-L: width 192, depths 2-2-18-2) run twice, on the
  image and on its half-size copy; each of the four levels concatenates both (channels doubled).
* ``squeeze_module.0``: the deepest level plus the three others resized to it, squeezed by one decoder block.
* ``decoder``: four decoder blocks (3x3 conv → ASPP with deformable 1/1/3/7 branches and a global pool →
  3x3 conv), 1x1 lateral convs from the backbone levels, gradient-attention gates (``gdt_convs_*``) on the
  three coarser levels, and at every level the image cut into a grid of patches stacked on the channel axis
  (``ipt_blk*``; the grid makes each patch the level's size). ``conv_out1`` gives the mask logits.

Only inference is implemented: the training-only heads (``conv_ms_spvn_*``, ``gdt_convs_pred_*``) are kept
as modules so that the published file loads strictly, and are never run (their outputs are not part of the
final prediction that the reference reads with ``model(x)[-1]``).

Published key list: built from the upstream code (GitHub ZhengPeng7/BiRefNet at 25cb930 and the
``birefnet.py`` shipped with briaai/RMBG-2.0, which define the same modules and names), not from the
published files themselves, which were not at hand. Two points are therefore not certain: whether the files
hold the ``relative_position_index`` buffers and BatchNorm's ``num_batches_tracked`` counters (both are
accepted present or absent), and the patch order (below).

Patch order: RMBG-2.0's code (and upstream before its 2024-11-05 commit 5198d3f) stacks the patches
column by column, each patch's channels together (``(wg hg c)``); upstream since then uses einops
``b c (hg h) (wg w) -> b (c hg wg) h w`` (channel-major). The two orders feed the same ``ipt_blk`` weights
differently, so :attr:`BiRefNetConfig.patch_order` says which code a file was exported with. The loader
presets ``column`` for RMBG-2.0 and ``channel`` for ZhengPeng7's BiRefNet models (their hub code tracks
GitHub); pass the other order if masks of a given file look wrong.

Size knob: every width and depth is a :class:`BiRefNetConfig` field, so tests build a tiny copy with the
published key names (:meth:`BiRefNetConfig.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

PatchOrder = Literal["column", "channel"]


@dataclass(frozen=True)
class BiRefNetConfig:
    """Widths, depths and options of :class:`BiRefNet`; the defaults are the published Swin-L model."""

    embed_dim: int = 192  # Swin width of the first level; level i has embed_dim * 2**i channels
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 4
    decoder_channels: int = 64  # the fixed inner width of every decoder block
    aspp_channels: int = 256  # each ASPP branch
    aspp_kernels: tuple[int, ...] = (1, 3, 7)  # the deformable branches after the 1x1 one
    patch_channels: int = 64  # inner width of the patch-input blocks (ipt_blk*)
    gradient_channels: int = 16  # width of the gradient-attention gates (gdt_convs_*)
    patch_order: PatchOrder = "column"

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("BiRefNet's decoder reads four backbone levels: depths and num_heads need 4 entries")
        for level, heads in enumerate(self.num_heads):
            if (self.embed_dim << level) % heads:
                raise ValueError(f"level {level} width {self.embed_dim << level} is not divisible by {heads} heads")
        if self.patch_order not in ("column", "channel"):
            raise ValueError(f"patch_order must be 'column' or 'channel', got {self.patch_order!r}")

    @property
    def level_channels(self) -> tuple[int, int, int, int]:
        """Channels of the four backbone levels after the two scales are concatenated, deepest first."""
        return tuple(2 * (self.embed_dim << level) for level in (3, 2, 1, 0))  # type: ignore[return-value]

    @classmethod
    def tiny(cls, **overrides) -> BiRefNetConfig:
        """A small copy (about half a million parameters) with the published key names (tests)."""
        small = {"embed_dim": 8, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2), "window_size": 4,
                     "decoder_channels": 8, "aspp_channels": 4, "patch_channels": 2, "gradient_channels": 4}
        return replace(cls(**small), **overrides)


# ---------------------------------------------------------------------------------------------- backbone


def _window_split(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``size`` → (B * windows, size * size, C), row-major windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c)


def _window_merge(windows: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_index(size: int) -> torch.Tensor:
    """For each pair of positions in a window, the row of the bias table of their (dy, dx) offset."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    flat = torch.stack((ys.flatten(), xs.flatten()))  # 2, N
    delta = flat[:, :, None] - flat[:, None, :] + (size - 1)  # 2, N, N, each in [0, 2 size - 2]
    return delta[0] * (2 * size - 1) + delta[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned bias per relative offset."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Persistent as upstream, so a file that holds it loads strictly; it is recomputed, never learned.
        self.register_buffer("relative_position_index", _relative_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0).to(q.dtype)
        if mask is not None:  # (windows, N, N), repeated for each image of the batch
            bias = bias + mask.to(q.dtype).repeat(b // mask.shape[0], 1, 1).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention (shifted by half a window when ``shift``) and MLP, both residual.

    The feature map is padded at the bottom/right to whole windows; padded positions take part in the
    attention like any other (as upstream: the shift mask only separates the rolled-in borders).
    """

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, shift: bool):
        super().__init__()
        self.window = window
        self.shift = window // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, mask: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        s = self.window
        y = self.norm1(x).view(b, h, w, c)
        y = F.pad(y, (0, 0, 0, (s - w % s) % s, 0, (s - h % s) % s))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_window_split(y, s), mask if self.shift else None)
        y = _window_merge(y.view(-1, s, s, c), s, hp, wp)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (odd sizes padded), normalized, projected to twice the width."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # Order of the published weights: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


def _shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(windows, N, N) additive mask: -inf between positions that the cyclic shift brought together."""
    region = torch.zeros(1, hp, wp, 1, device=device)
    bands = ((0, hp - window), (hp - window, hp - shift), (hp - shift, hp))
    cols = ((0, wp - window), (wp - window, wp - shift), (wp - shift, wp))
    label = 0
    for top, bottom in bands:
        for left, right in cols:
            region[:, max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = label
            label += 1
    windows = _window_split(region, window).squeeze(-1)
    differs = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(differs.shape, device=device).masked_fill(differs, float("-inf"))


class SwinLevel(nn.Module):
    """One Swin stage: alternating plain and shifted blocks, then (but the last stage) patch merging."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float, merge: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, mlp_ratio, bool(i % 2)) for i in range(depth))
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        s = self.window
        hp, wp = -(-h // s) * s, -(-w // s) * s
        mask = _shift_mask(hp, wp, s, s // 2, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        x = F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p))
        x = self.proj(x)
        b, c, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class SwinBackbone(nn.Module):
    """Swin-v1 feature pyramid: four (B, C_i, H/4/2**i, W/4/2**i) maps, each layer-normed (``norm{i}``)."""

    def __init__(self, cfg: BiRefNetConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.layers = nn.ModuleList(
            SwinLevel(cfg.embed_dim << i, cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, i < 3)
            for i in range(4)
        )
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(cfg.embed_dim << i))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        levels = []
        for i, layer in enumerate(self.layers):
            out, x, next_h, next_w = layer(x, h, w)
            out = self._modules[f"norm{i}"](out)
            levels.append(out.view(-1, h, w, out.shape[-1]).permute(0, 3, 1, 2).contiguous())
            h, w = next_h, next_w
        return levels


# ----------------------------------------------------------------------------------------------- decoder


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Upstream's only resampling inside the net: bilinear with ``align_corners=True``."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class DeformableConv(nn.Module):
    """Modulated deformable convolution (DCNv2): offsets and a 2*sigmoid modulator from plain convs."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.padding = kernel // 2
        self.offset_conv = nn.Conv2d(cin, 2 * kernel * kernel, kernel, padding=self.padding)
        self.modulator_conv = nn.Conv2d(cin, kernel * kernel, kernel, padding=self.padding)
        self.regular_conv = nn.Conv2d(cin, cout, kernel, padding=self.padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return deform_conv2d(x, self.offset_conv(x), self.regular_conv.weight, None,
                             padding=self.padding, mask=modulator)


class DeformableBranch(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.atrous_conv = DeformableConv(cin, cout, kernel)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.atrous_conv(x)))


class ASPPDeformable(nn.Module):
    """A 1x1 branch, deformable branches of ``kernels``, and a global-pool branch, fused by a 1x1 conv."""

    def __init__(self, channels: int, branch: int, kernels: tuple[int, ...]):
        super().__init__()
        self.aspp1 = DeformableBranch(channels, branch, 1)
        self.aspp_deforms = nn.ModuleList(DeformableBranch(channels, branch, k) for k in kernels)
        # Indices as upstream's Sequential(pool, conv, bn, relu): weights at .1 and .2.
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(branch * (2 + len(kernels)), channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.aspp1(x)
        pooled = _resize(self.global_avg_pool(x), first.shape[-2:])
        x = torch.cat((first, *(branch(x) for branch in self.aspp_deforms), pooled), dim=1)
        return F.relu(self.bn1(self.conv1(x)))  # upstream's dropout is inactive at inference


class DecoderBlock(nn.Module):
    """3x3 conv → BN → ReLU → deformable ASPP → 3x3 conv → BN (upstream ``BasicDecBlk``)."""

    def __init__(self, cin: int, cout: int, cfg: BiRefNetConfig):
        super().__init__()
        inner = cfg.decoder_channels
        self.conv_in = nn.Conv2d(cin, inner, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(inner)
        self.dec_att = ASPPDeformable(inner, cfg.aspp_channels, cfg.aspp_kernels)
        self.conv_out = nn.Conv2d(inner, cout, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.conv_out(self.dec_att(F.relu(self.bn_in(self.conv_in(x))))))


class PatchInput(nn.Module):
    """Two 3x3 convs (no activation between them, as upstream ``SimpleConvs``)."""

    def __init__(self, cin: int, cout: int, inner: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 3, padding=1)
        self.conv_out = nn.Conv2d(inner, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv1(x))


class Lateral(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def image_patches(image: torch.Tensor, like: torch.Tensor, order: PatchOrder) -> torch.Tensor:
    """The image cut into the grid whose cells have ``like``'s size, stacked on the channel axis.

    ``column``: cells column by column, top to bottom, each cell's channels together (RMBG-2.0's loop);
    ``channel``: channel-major, cells row by row within a channel (upstream's einops pattern).
    """
    b, c, height, width = image.shape
    h, w = like.shape[-2:]
    gh, gw = height // h, width // w
    if gh * h != height or gw * w != width:
        raise ValueError(f"image {height}x{width} does not split into {h}x{w} cells; use a multiple of 32")
    cells = image.view(b, c, gh, h, gw, w)
    if order == "column":
        cells = cells.permute(0, 4, 2, 1, 3, 5)  # b, gw, gh, c, h, w
    else:
        cells = cells.permute(0, 1, 2, 4, 3, 5)  # b, c, gh, gw, h, w
    return cells.reshape(b, c * gh * gw, h, w)


class GradientGate(nn.Module):
    """Index-compatible stand-in for upstream's ``gdt_convs_k``: conv → BN → ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.add_module("0", nn.Conv2d(cin, cout, 3, padding=1))
        self.add_module("1", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._modules["1"](self._modules["0"](x)))


def _head(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, 1, 1))


class Decoder(nn.Module):
    """Coarse-to-fine decoder; level k (4 = deepest) reads the previous level, a lateral conv and patches."""

    # Cells per side of the image grid at each decoder input, from the deepest (stride 32) to the image.
    GRID_LEVELS = (5, 4, 3, 2, 0)

    def __init__(self, cfg: BiRefNetConfig):
        super().__init__()
        self.patch_order = cfg.patch_order
        c = cfg.level_channels
        patch_out = [ch // 8 for ch in c]
        for index, (level, log_grid) in enumerate(zip((5, 4, 3, 2, 1), self.GRID_LEVELS)):
            out = patch_out[max(0, index - 1)]
            self.add_module(f"ipt_blk{level}", PatchInput(3 * 4 ** log_grid, out, cfg.patch_channels))
        block_out = [c[1], c[2], c[3], c[3] // 2]
        for index, level in enumerate((4, 3, 2, 1)):
            self.add_module(f"decoder_block{level}",
                            DecoderBlock(c[index] + patch_out[max(0, index - 1)], block_out[index], cfg))
        self.conv_out1 = _head(block_out[3] + patch_out[3])
        for index, level in enumerate((4, 3, 2)):
            self.add_module(f"lateral_block{level}", Lateral(c[index + 1], block_out[index]))
        n = cfg.gradient_channels
        for index, level in enumerate((4, 3, 2)):  # training-only heads first, in upstream's order
            self.add_module(f"conv_ms_spvn_{level}", nn.Conv2d(block_out[index], 1, 1))
        for index, level in enumerate((4, 3, 2)):
            self.add_module(f"gdt_convs_{level}", GradientGate(block_out[index], n))
        for level in (4, 3, 2):
            self.add_module(f"gdt_convs_pred_{level}", _head(n))
        for level in (4, 3, 2):
            self.add_module(f"gdt_convs_attn_{level}", _head(n))

    def _with_patches(self, x: torch.Tensor, image: torch.Tensor, level: int) -> torch.Tensor:
        patches = _resize(image_patches(image, x, self.patch_order), x.shape[-2:])
        return torch.cat((x, self._modules[f"ipt_blk{level}"](patches)), dim=1)

    def _gate(self, p: torch.Tensor, level: int) -> torch.Tensor:
        m = self._modules
        return p * torch.sigmoid(m[f"gdt_convs_attn_{level}"](m[f"gdt_convs_{level}"](p)))

    def forward(self, image: torch.Tensor, x1, x2, x3, x4) -> torch.Tensor:
        m = self._modules
        p = self._gate(m["decoder_block4"](self._with_patches(x4, image, 5)), 4)
        p = _resize(p, x3.shape[-2:]) + m["lateral_block4"](x3)
        p = self._gate(m["decoder_block3"](self._with_patches(p, image, 4)), 3)
        p = _resize(p, x2.shape[-2:]) + m["lateral_block3"](x2)
        p = self._gate(m["decoder_block2"](self._with_patches(p, image, 3)), 2)
        p = _resize(p, x1.shape[-2:]) + m["lateral_block2"](x1)
        p = m["decoder_block1"](self._with_patches(p, image, 2))
        p = _resize(p, image.shape[-2:])
        return self.conv_out1(self._with_patches(p, image, 1))


# ----------------------------------------------------------------------------------------------- network


class BiRefNet(nn.Module):
    """BiRefNet with the published state-dict layout; :meth:`forward` gives the final mask logits.

    Input: ``(B, 3, H, W)`` ImageNet-normalized RGB, H and W multiples of 32 (the published models run
    at 1024² or 2048²). Output: ``(B, 1, H, W)`` logits, the reference's ``model(x)[-1]``.
    """

    def __init__(self, cfg: BiRefNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BiRefNetConfig()
        self.bb = SwinBackbone(cfg)
        c = cfg.level_channels
        self.squeeze_module = nn.Sequential(DecoderBlock(c[0] + c[1] + c[2] + c[3], c[0], cfg))
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four levels (finest first), each the full-size and the half-size pass concatenated."""
        full = self.bb(x)
        half = self.bb(_resize(x, (x.shape[-2] // 2, x.shape[-1] // 2)))
        return tuple(torch.cat((f, _resize(h, f.shape[-2:])), dim=1) for f, h in zip(full, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4 = self.encode(x)
        context = [_resize(level, x4.shape[-2:]) for level in (x1, x2, x3)]
        x4 = self.squeeze_module(torch.cat((*context, x4), dim=1))
        return self.decoder(x, x1, x2, x3, x4)
