"""Neural line extractors: the four sketch styles of the paper, loaded from their published weight files.

Why: ColorizeDiffusionXL trains on sketches of several styles so that the colorizer does not overfit to the
look of one extractor. The reference implementation (``preprocessor/`` of tellurion-kanata/ColorizeDiffusionXL)
uses exactly four neural extractors, and the preprocess job offers the same four, selectable by name:

============================  ==============================  ===================  ======================
name                          network                         published file       reference name
============================  ==============================  ===================  ======================
``anime2sketch``              Anime2Sketch U-Net (8 downs)    ``netG.pth``         ``lineart``
``manga_line``                MangaLineExtraction res_skip    ``erika.pth``        ``lineart_denoise``
``sketchkeras``               sketchKeras (PyTorch port)      ``model.pth``        ``lineart_keras``
``informative_drawings``      informative-drawings generator  ``sk_model.pth``     ``lineart_sk``
============================  ==============================  ===================  ======================

Weights are NEVER downloaded here: :func:`load_line_extractor` reads a local file (or a directory holding the
published file name) and refuses anything whose keys or shapes do not match the architecture exactly, so a
wrong or truncated file fails loudly at actor start-up instead of producing garbage sketches.

Every network below is written so that ``state_dict()`` has the published keys and shapes (the loader strips a
leading ``module.`` left by ``DataParallel``). Each takes a width knob (``base_channels``, default = published)
so tests can build a tiny copy with the same key names.

:class:`LineExtractor` hides the per-network conventions. Its input is always (B, 3, H, W) RGB in [0, 1] at any
H, W; it pads (edge replication) to the size the network needs, crops back, and returns (B, 1, H, W) in [0, 1]
as an ordinary drawing: dark lines (0) on white (1). The model consumes inverted sketches; the caller inverts.
"""

from __future__ import annotations

import abc

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import check_and_load, read_state_dict

__all__ = [
    "NEURAL_EXTRACTORS",
    "ExtractorSpec",
    "LineExtractor",
    "Anime2SketchUNet",
    "MangaLineResSkip",
    "SketchKerasNet",
    "InformativeDrawingsGenerator",
    "build_line_network",
    "load_line_extractor",
]

# BatchNorm's step counter: older exports leave it out, and inference never reads it.
BATCHNORM_COUNTER = "num_batches_tracked"


class _LineNet(nn.Module, abc.ABC):
    """Interface the wrapper relies on. Subclasses hold the published layers (and nothing else with state)."""

    pad_multiple: int = 1  # spatial size the network needs (product of its strides)
    min_size: int = 1  # smallest padded side that keeps every padding/normalization layer valid

    @abc.abstractmethod
    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the network's input batch (its own normalization)."""

    @abc.abstractmethod
    def to_drawing(self, raw: torch.Tensor, batch: int) -> torch.Tensor:
        """Network output (cropped to H, W) -> (batch, 1, H, W) drawing, dark lines on white, not yet clamped."""


# --------------------------------------------------------------------------------------------------------------
# anime2sketch: pix2pix-style U-Net generator, InstanceNorm without affine parameters (so every conv has a bias)
# --------------------------------------------------------------------------------------------------------------


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class _UNetLevel(nn.Module):
    """One level of the U-Net. ``model`` is a Sequential whose indices match the published keys:

    outermost: [down conv, child, ReLU, up convT, Tanh]
    middle:    [LeakyReLU, down conv, norm, child, ReLU, up convT, norm]
    innermost: [LeakyReLU, down conv, ReLU, up convT, norm]

    Non-outermost levels return ``cat(skip, model(x))``. The published weights were trained with an in-place
    LeakyReLU at the head of ``model``, which rewrites ``x`` before it is concatenated, so the skip carries
    ``leaky_relu(x)`` rather than ``x``; this module reproduces that explicitly (without in-place ops).
    """

    def __init__(self, outer: int, inner: int, *, in_channels: int | None = None,
                 child: nn.Module | None = None, role: str = "middle") -> None:
        super().__init__()
        if role not in ("outermost", "middle", "innermost"):
            raise ValueError(f"unknown U-Net level role {role!r}")
        self.outermost = role == "outermost"
        source = outer if in_channels is None else in_channels
        down = nn.Conv2d(source, inner, kernel_size=4, stride=2, padding=1, bias=True)
        if role == "outermost":
            up = nn.ConvTranspose2d(inner * 2, outer, kernel_size=4, stride=2, padding=1)
            layers = [down, child, nn.ReLU(), up, nn.Tanh()]
        elif role == "innermost":
            up = nn.ConvTranspose2d(inner, outer, kernel_size=4, stride=2, padding=1, bias=True)
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, _instance_norm(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, kernel_size=4, stride=2, padding=1, bias=True)
            layers = [nn.LeakyReLU(0.2), down, _instance_norm(inner), child, nn.ReLU(), up, _instance_norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x).clamp(-1.0, 1.0)
        activated = self.model[0](x)
        out = activated
        for layer in list(self.model)[1:]:
            out = layer(out)
        return torch.cat([activated, out], dim=1)


class Anime2SketchUNet(_LineNet):
    """Anime2Sketch generator (the ``lineart`` annotator): UnetGenerator(3 -> 1, 8 downs, ngf 64), InstanceNorm
    (affine=False), no dropout. Published file ``netG.pth`` (keys often carry ``module.``).

    Convention: input RGB normalized to [-1, 1] (``x * 2 - 1``); output Tanh in [-1, 1] is a drawing (white
    background +1, lines -1), so the drawing in [0, 1] is ``(y + 1) / 2``. Eight stride-2 levels: the padded side
    must be a multiple of 256 (the bottleneck is then >= 1x1 and every InstanceNorm sees >= 2x2).
    """

    min_size = 256

    def __init__(self, base_channels: int = 64, num_downs: int = 8, in_channels: int = 3,
                 out_channels: int = 1) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        c = base_channels
        level: nn.Module = _UNetLevel(c * 8, c * 8, role="innermost")
        for _ in range(num_downs - 5):
            level = _UNetLevel(c * 8, c * 8, child=level)
        level = _UNetLevel(c * 4, c * 8, child=level)
        level = _UNetLevel(c * 2, c * 4, child=level)
        level = _UNetLevel(c, c * 2, child=level)
        self.model = _UNetLevel(out_channels, c, in_channels=in_channels, child=level, role="outermost")
        self.pad_multiple = 2 ** num_downs
        self.min_size = 2 ** num_downs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb * 2.0 - 1.0

    def to_drawing(self, raw: torch.Tensor, batch: int) -> torch.Tensor:
        return (raw + 1.0) * 0.5


# --------------------------------------------------------------------------------------------------------------
# manga_line: MangaLineExtraction "res_skip" (pre-activation residual U-Net, BatchNorm eps 1e-3)
# --------------------------------------------------------------------------------------------------------------


class _BnActConv(nn.Module):
    """BatchNorm -> LeakyReLU(0.2) -> Conv (same padding), optionally followed by a nearest 2x upsample."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.BatchNorm2d(cin, eps=1e-3),
            nn.LeakyReLU(0.2),
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2),
        ]
        if upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Projection(nn.Module):
    """Residual merge: ``y + proj(x)`` when the widths or strides differ (1x1 conv), else ``x + y`` (no weights)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.model: nn.Sequential | None = None
        if cin != cout or stride != 1:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x if self.model is None else self.model(x)) + y


class _ResUnit(nn.Module):
    """conv1 -> residual, merged with the (projected) input; ``upsample`` doubles the resolution in conv1."""

    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.conv1 = _BnActConv(cin, cout, 3, stride=stride, upsample=upsample)
        self.residual = _BnActConv(cout, cout, 3)
        self.shortcut = _Projection(cin, cout, stride=stride, upsample=upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x, self.residual(self.conv1(x)))


class _ResStage(nn.Module):
    def __init__(self, units: list[nn.Module]) -> None:
        super().__init__()
        self.model = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _down_stage(cin: int, cout: int, repeats: int, first: bool) -> _ResStage:
    """``repeats`` units; unless ``first``, the LAST unit halves the resolution (as in the published net)."""
    units = []
    for i in range(repeats):
        stride = 2 if (i == repeats - 1 and not first) else 1
        units.append(_ResUnit(cin if i == 0 else cout, cout, stride=stride))
    return _ResStage(units)


def _up_stage(cin: int, cout: int, repeats: int) -> _ResStage:
    """First unit upsamples 2x (nearest) while narrowing, the others keep the size."""
    units: list[nn.Module] = [_ResUnit(cin, cout, upsample=True)]
    units += [_ResUnit(cout, cout) for _ in range(repeats - 1)]
    return _ResStage(units)


class _Sum(nn.Module):
    """Weightless skip merge (the published ``res1``..``res4``: same width, stride 1, so no projection)."""

    def forward(self, skip: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return skip + y


class MangaLineResSkip(_LineNet):
    """MangaLineExtraction ``res_skip`` (the ``lineart_denoise`` annotator). Published file ``erika.pth``.

    Encoder widths ``b, 2b, 4b, 8b, 16b`` (b = ``base_channels`` = 24) with 2/3/5/7/12 residual units, a mirrored
    decoder of 7/5/3/2 units with additive skips, a ``head_channels`` (16) stage and a 1x1 output.

    Convention: input one channel in [0, 255]. The reference takes channel 0 of the RGB image
    (``gray="first_channel"``, the default, i.e. red); ``gray="luma"`` uses BT.601 luma like the original project
    (which reads images as grayscale). Output is a drawing in [0, 255] (white background); drawing = ``y / 255``.
    Four stride-2 stages: the padded side must be a multiple of 16.
    """

    pad_multiple = 16
    min_size = 16

    def __init__(self, base_channels: int = 24, head_channels: int = 16, gray: str = "first_channel") -> None:
        super().__init__()
        if gray not in ("first_channel", "luma"):
            raise ValueError(f"gray must be 'first_channel' or 'luma', got {gray!r}")
        self.gray = gray
        b = base_channels
        w = [b, 2 * b, 4 * b, 8 * b, 16 * b]
        self.block0 = _down_stage(1, w[0], 2, first=True)
        self.block1 = _down_stage(w[0], w[1], 3, first=False)
        self.block2 = _down_stage(w[1], w[2], 5, first=False)
        self.block3 = _down_stage(w[2], w[3], 7, first=False)
        self.block4 = _down_stage(w[3], w[4], 12, first=False)
        self.block5 = _up_stage(w[4], w[3], 7)
        self.res1 = _Sum()
        self.block6 = _up_stage(w[3], w[2], 5)
        self.res2 = _Sum()
        self.block7 = _up_stage(w[2], w[1], 3)
        self.res3 = _Sum()
        self.block8 = _up_stage(w[1], w[0], 2)
        self.res4 = _Sum()
        self.block9 = _down_stage(w[0], head_channels, 2, first=True)
        self.conv15 = _BnActConv(head_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.block0(x)
        e1 = self.block1(e0)
        e2 = self.block2(e1)
        e3 = self.block3(e2)
        d = self.res1(e3, self.block5(self.block4(e3)))
        d = self.res2(e2, self.block6(d))
        d = self.res3(e1, self.block7(d))
        d = self.res4(e0, self.block8(d))
        return self.conv15(self.block9(d))

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        if self.gray == "luma":
            weights = rgb.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            gray = (rgb * weights).sum(dim=1, keepdim=True)
        else:
            gray = rgb[:, :1]
        return gray * 255.0

    def to_drawing(self, raw: torch.Tensor, batch: int) -> torch.Tensor:
        return raw / 255.0


# --------------------------------------------------------------------------------------------------------------
# sketchkeras: PyTorch port of sketchKeras (reflection-padded U-Net, BatchNorm eps 1e-3, bicubic upsampling)
# --------------------------------------------------------------------------------------------------------------


def _keras_conv(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    """[ReflectionPad(1), Conv, BN, ReLU]: 4 layers, so a conv lands at index 1 (or 5) of its Sequential."""
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, kernel, stride=stride),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.0), nn.ReLU()]


def _keras_up(cin: int, mid: int, cout: int) -> nn.Sequential:
    """Bicubic 2x, pad (1,2,1,2) + 4x4 conv (size-preserving), then a 3x3 conv: convs at indices 2 and 6."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bicubic"),
        nn.ReflectionPad2d((1, 2, 1, 2)),
        nn.Conv2d(cin, mid, 4), nn.BatchNorm2d(mid, eps=1e-3, momentum=0.0), nn.ReLU(),
        *_keras_conv(mid, cout, 3, 1),
    )


class SketchKerasNet(_LineNet):
    """sketchKeras PyTorch port (the ``lineart_keras`` extractor). Published file ``model.pth``.

    Six down blocks (widths b, 2b, 4b, 8b, 16b, 16b with b = ``base_channels`` = 32), four bicubic up blocks fed
    with skip concatenations, and a final 3x3 conv over ``cat(d1, u4)``; one input and one output channel.

    Convention (as the reference ``proceed``): the image in [0, 255] minus its Gaussian blur (sigma 3, 19 taps,
    as OpenCV picks for 8-bit input), divided by 127.5 and then by its maximum; each RGB channel goes through
    the network as its own one-channel image. The per-pixel max over the three outputs is the line strength
    (lines high); values below ``threshold`` (0.1) are zeroed, and the drawing is ``1 - strength``. Four
    stride-2 blocks: padded side a multiple of 16, at least 32 (reflection padding at the 1/16 scale).
    """

    pad_multiple = 16
    min_size = 32

    def __init__(self, base_channels: int = 32, threshold: float = 0.1, blur_sigma: float = 3.0) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.blur_sigma = float(blur_sigma)
        b = base_channels
        self.downblock_1 = nn.Sequential(*_keras_conv(1, b, 3, 1))
        self.downblock_2 = nn.Sequential(*_keras_conv(b, 2 * b, 4, 2), *_keras_conv(2 * b, 2 * b, 3, 1))
        self.downblock_3 = nn.Sequential(*_keras_conv(2 * b, 4 * b, 4, 2), *_keras_conv(4 * b, 4 * b, 3, 1))
        self.downblock_4 = nn.Sequential(*_keras_conv(4 * b, 8 * b, 4, 2), *_keras_conv(8 * b, 8 * b, 3, 1))
        self.downblock_5 = nn.Sequential(*_keras_conv(8 * b, 16 * b, 4, 2))
        self.downblock_6 = nn.Sequential(*_keras_conv(16 * b, 16 * b, 3, 1))
        self.upblock_1 = _keras_up(32 * b, 16 * b, 8 * b)
        self.upblock_2 = _keras_up(16 * b, 8 * b, 4 * b)
        self.upblock_3 = _keras_up(8 * b, 4 * b, 2 * b)
        self.upblock_4 = _keras_up(4 * b, 2 * b, b)
        self.last_pad = nn.ReflectionPad2d(1)
        self.last_conv = nn.Conv2d(2 * b, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.downblock_1(x)
        d2 = self.downblock_2(d1)
        d3 = self.downblock_3(d2)
        d4 = self.downblock_4(d3)
        d5 = self.downblock_5(d4)
        d6 = self.downblock_6(d5)
        u = self.upblock_1(torch.cat([d5, d6], dim=1))
        u = self.upblock_2(torch.cat([d4, u], dim=1))
        u = self.upblock_3(torch.cat([d3, u], dim=1))
        u = self.upblock_4(torch.cat([d2, u], dim=1))
        return self.last_conv(self.last_pad(torch.cat([d1, u], dim=1)))

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of each channel; OpenCV's 8-bit kernel size and its default border
        (reflect-101 = torch "reflect") where the image is large enough, edge replication otherwise."""
        radius = max(1, int(round(self.blur_sigma * 3)))  # OpenCV: ksize = round(sigma * 3 * 2 + 1) | 1 for 8-bit
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-(taps ** 2) / (2.0 * self.blur_sigma ** 2))
        kernel = (kernel / kernel.sum()).to(x.dtype)
        channels = x.shape[1]
        mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
        x = F.pad(x, (radius, radius, radius, radius), mode=mode)
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = rgb.shape
        pixels = (rgb * 255.0).round()  # the reference works on 8-bit images
        high_pass = (pixels - self._blur(pixels).round()) / 127.5
        peak = high_pass.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return (high_pass / peak).reshape(batch * channels, 1, height, width)

    def to_drawing(self, raw: torch.Tensor, batch: int) -> torch.Tensor:
        strength = raw.reshape(batch, -1, *raw.shape[-2:]).amax(dim=1, keepdim=True)
        strength = torch.where(strength < self.threshold, torch.zeros_like(strength), strength)
        return 1.0 - strength


# --------------------------------------------------------------------------------------------------------------
# informative_drawings: CycleGAN-style ResNet generator (the ControlNet "lineart" / sk_model.pth network)
# --------------------------------------------------------------------------------------------------------------


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class InformativeDrawingsGenerator(_LineNet):
    """informative-drawings generator (the reference ``LineartDetector`` = ``Generator(3, 1, 3)``). Published
    file ``sk_model.pth``; its keys are the generator's own (``model0.1.weight`` ...), without a wrapper prefix.

    7x7 stem (b = ``base_channels`` = 64), two stride-2 convs to 4b, ``n_residual_blocks`` (3) residual blocks,
    two transposed convs back to b, a 7x7 conv to one channel and a Sigmoid; InstanceNorm without affine.

    Convention: the reference feeds RGB as float in [0, 255] (``pil_to_tensor(...).float()``, default
    ``input_scale=255``); the original project and ControlNet feed [0, 1] (``input_scale=1``). The InstanceNorm
    after the stem makes the two nearly equivalent. The Sigmoid output is a drawing in [0, 1] (white background),
    used as is. Padded side a multiple of 4, at least 8 (reflection padding at the 1/4 scale).
    """

    pad_multiple = 4
    min_size = 8

    def __init__(self, base_channels: int = 64, n_residual_blocks: int = 3, in_channels: int = 3,
                 out_channels: int = 1, input_scale: float = 255.0) -> None:
        super().__init__()
        self.input_scale = float(input_scale)
        b = base_channels
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, b, 7), nn.InstanceNorm2d(b),
                                    nn.ReLU())
        self.model1 = nn.Sequential(
            nn.Conv2d(b, 2 * b, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * b), nn.ReLU(),
            nn.Conv2d(2 * b, 4 * b, 3, stride=2, padding=1), nn.InstanceNorm2d(4 * b), nn.ReLU(),
        )
        self.model2 = nn.Sequential(*[_ResidualBlock(4 * b) for _ in range(n_residual_blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(4 * b, 2 * b, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(2 * b),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * b, b, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(b), nn.ReLU(),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(b, out_channels, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = stage(x)
        return x

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb * self.input_scale

    def to_drawing(self, raw: torch.Tensor, batch: int) -> torch.Tensor:
        return raw


# --------------------------------------------------------------------------------------------------------------
# registry, wrapper, loader
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractorSpec:
    """What the registry knows about one extractor."""

    name: str
    network: Callable[..., _LineNet]  # the class; keyword arguments are its knobs
    published_file: str  # file name as published (what a weights directory is searched for)
    reference_name: str  # the name ColorizeDiffusionXL's ``create_model`` uses
    summary: str


NEURAL_EXTRACTORS: dict[str, ExtractorSpec] = {
    spec.name: spec
    for spec in (
        ExtractorSpec("anime2sketch", Anime2SketchUNet, "netG.pth", "lineart",
                      "Anime2Sketch U-Net: clean, thin lines; ignores shading"),
        ExtractorSpec("manga_line", MangaLineResSkip, "erika.pth", "lineart_denoise",
                      "MangaLineExtraction: manga-style lines, denoised, keeps screentone edges"),
        ExtractorSpec("sketchkeras", SketchKerasNet, "model.pth", "lineart_keras",
                      "sketchKeras: pencil-like lines from color high-pass, keeps soft shading strokes"),
        ExtractorSpec("informative_drawings", InformativeDrawingsGenerator, "sk_model.pth", "lineart_sk",
                      "informative drawings: artistic, geometry-aware contour drawing"),
    )
}


def _spec(name: str) -> ExtractorSpec:
    try:
        return NEURAL_EXTRACTORS[name]
    except KeyError:
        known = ", ".join(sorted(NEURAL_EXTRACTORS))
        raise ValueError(f"unknown neural line extractor {name!r}; known: {known}") from None


def build_line_network(name: str, **knobs) -> _LineNet:
    """A randomly initialized network of the named extractor (default knobs = the published architecture).
    Build under ``torch.device("meta")`` to inspect shapes without allocating memory."""
    return _spec(name).network(**knobs)


class LineExtractor(nn.Module):
    """A loaded extractor: ``forward(images)`` maps (B, 3, H, W) RGB in [0, 1] (any H, W) to (B, 1, H, W) in
    [0, 1], dark lines (0) on white (1), in the input's dtype. The network runs in its own parameters' dtype.

    Internally: the network's own input normalization (see each network class), edge-replicating pad on the
    right/bottom to the size the network needs, the network, crop back to H x W, conversion to a drawing, clamp.
    """

    def __init__(self, name: str, net: _LineNet) -> None:
        super().__init__()
        self.name = name
        self.net = net

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: expected float images in [0, 1], got dtype {images.dtype}")
        batch, _, height, width = images.shape
        reference = next(self.net.parameters())
        x = images.to(device=reference.device, dtype=reference.dtype).clamp(0.0, 1.0)
        x = self.net.prepare(x)
        padded_h = _padded_size(height, self.net.pad_multiple, self.net.min_size)
        padded_w = _padded_size(width, self.net.pad_multiple, self.net.min_size)
        if (padded_h, padded_w) != (height, width):
            x = F.pad(x, (0, padded_w - width, 0, padded_h - height), mode="replicate")
        raw = self.net(x)[..., :height, :width]
        drawing = self.net.to_drawing(raw, batch).clamp(0.0, 1.0)
        return drawing.to(device=images.device, dtype=images.dtype)


def _padded_size(size: int, multiple: int, minimum: int) -> int:
    return max(minimum, multiple * math.ceil(size / multiple))


def load_line_extractor(name: str, weights_path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **knobs) -> LineExtractor:
    """Build the named extractor and strictly load its published weights from a LOCAL file (never downloads).

    ``weights_path`` is the weights file, or a directory holding the published file name (e.g. ``netG.pth``).
    ``knobs`` go to the network class (width knobs for tests; convention knobs such as ``gray="luma"``).
    BatchNorm ``num_batches_tracked`` counters absent from older exports are filled with 0 (unused in eval).
    Returns the extractor in eval mode, on ``device`` in ``dtype``, with ``requires_grad`` False.

    Raises FileNotFoundError (path), ValueError for an unknown name (lists the known ones), an unreadable
    file, or weights that do not fit (names the path, the extractor and up to 10 missing, unexpected and
    mis-shaped keys each, with shapes; see :func:`model.weights.check_and_load`).
    """
    spec = _spec(name)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(weights_path)
    if path.is_dir():
        path = path / spec.published_file
    state = read_state_dict(path)

    with torch.device("meta"):  # no time spent on an init the file overwrites
        net = spec.network(**knobs)
    net = net.to_empty(device="cpu")
    for buffer_name, buffer in net.named_buffers():
        if buffer_name.endswith(BATCHNORM_COUNTER):  # the value a file without counters leaves in place
            buffer.zero_()
    check_and_load(net, state, path, optional_suffixes=(BATCHNORM_COUNTER,),
                   target=f"the {name!r} line extractor ({type(net).__name__}, expects {spec.published_file})")
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LineExtractor(name, net).eval()
