"""Learned foreground segmentation of illustrations and sketches, from published ISNet-DIS weights.

Why: stage 2 of training needs a foreground mask of the sketch and of the reference (the reference
implementation, ColorizeDiffusionXL, feeds them to the model as ``smask`` and ``rmask``). The
weight-free default lives in :mod:`model.masks`; this module is the learned option, for when the
published segmentation weights are on local disk. Nothing is downloaded: weights come from a path.

The network is ISNet-DIS as trained by SkyTNT's anime-segmentation (``isnetis.ckpt``, re-published as
``isnetis.safetensors`` by the ColorizeDiffusionXL authors, who also publish ``sketch-segment.safetensors``
with the same architecture for line drawings). :class:`ISNetDIS` is our own module with the published
state-dict keys and shapes; ``width`` scales every channel count (published: 64) so that tests can build a
tiny copy with identical key names.

Conventions of :class:`ForegroundSegmenter`: images are ``(B, 3, H, W)`` RGB floats in [0, 1] of any size;
the output is ``(B, 1, H, W)`` foreground probability in [0, 1] at the input size. Inside, the image is
fitted into an ``input_size`` square (1024, the training size of ``isnetis``), no mean/std normalization.

* ``isnetis`` (alias ``isnet``): as SkyTNT's ``inference.py``: aspect kept, centred on a black square canvas.
* ``isnet-sketch``: as the reference's ``proceed(..., crop=False)`` for sketch masks: squashed to the
  square and inverted (the net sees light lines on black), so pass a sketch as dark lines on white.

(The reference's ``proceed`` inverts the input for every ISNet variant, the colour one included; we follow
the training convention of ``isnetis`` instead, which never inverts.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.weights import PathLike, check_and_load, read_state_dict, under_prefix

logger = logging.getLogger(__name__)

PUBLISHED_WIDTH = 64
INPUT_SIZE = 1024
# A Lightning checkpoint of anime-segmentation's ``AnimeSegmentation`` module holds the segmenter under
# ``net.``; an ``isnet_is`` run also holds the frozen ground-truth encoder (``gt_encoder.``), which only
# supervised training and is not part of the segmenter.
LIGHTNING_PREFIX = "net."


# --------------------------------------------------------------------------------------------- network


class ConvBnRelu(nn.Module):
    """3x3 convolution (optionally dilated), batch norm, ReLU; attribute names are the published ones."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


def _resize_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _halve(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """Residual U-block of ``depth`` levels (RSU-7 ... RSU-4; RSU-4F when ``dilated``).

    An input conv to ``out_ch`` (``rebnconvin``), an encoder ``rebnconv1..depth`` at ``mid_ch`` whose last
    level is dilated, a decoder ``rebnconv{depth-1}d..1d`` that concatenates each skip, and the input conv's
    output added back. The plain block halves the resolution between encoder levels 1..depth-2 (max-pool,
    odd sizes rounded up) and upsamples bilinearly on the way back; the ``dilated`` block (4F) never
    changes resolution and dilates level i by 2**(i-1) instead.
    """

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int, dilated: bool = False):
        super().__init__()
        self.depth = depth
        self.dilated = dilated
        self.rebnconvin = ConvBnRelu(in_ch, out_ch)
        for level in range(1, depth + 1):
            dilation = 2 ** (level - 1) if dilated else (2 if level == depth else 1)
            self.add_module(f"rebnconv{level}", ConvBnRelu(out_ch if level == 1 else mid_ch, mid_ch, dilation))
        for level in range(depth - 1, 0, -1):
            dilation = 2 ** (level - 1) if dilated else 1
            self.add_module(f"rebnconv{level}d", ConvBnRelu(2 * mid_ch, out_ch if level == 1 else mid_ch, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.rebnconvin(x)
        skips: list[torch.Tensor] = []
        h = top
        for level in range(1, self.depth):
            h = self._modules[f"rebnconv{level}"](h)
            skips.append(h)
            if not self.dilated and level < self.depth - 1:
                h = _halve(h)
        h = self._modules[f"rebnconv{self.depth}"](h)
        for level in range(self.depth - 1, 0, -1):
            skip = skips[level - 1]
            h = self._modules[f"rebnconv{level}d"](torch.cat((_resize_like(h, skip), skip), dim=1))
        return h + top


class ISNetDIS(nn.Module):
    """ISNet-DIS (Qin et al., 2022) with the state-dict layout of anime-segmentation's ``isnetis``.

    A stride-2 input conv, six encoder RSU stages (RSU-7, 6, 5, 4, 4F, 4F; max-pooled in between), five
    decoder stages mirroring them, and six 3x3 side heads (``side1``: finest, from the last decoder stage;
    ``side6``: from the bottleneck). ``width`` is the input conv's channel count (published: 64); every
    other channel count scales with it, so any multiple of 4 keeps the published key names.

    :meth:`forward` returns logits at the input size: ``side1`` only (the mask the published inference
    uses), or all six with ``all_sides=True`` (training-time deep supervision). The published module also
    defines a max-pool after the input conv whose output it discards (stage 1 runs on the input conv's
    half-resolution output); it has no weights, so it is left out here with the same result.
    """

    def __init__(self, width: int = PUBLISHED_WIDTH, in_ch: int = 3, out_ch: int = 1):
        super().__init__()
        if width < 4 or width % 4:
            raise ValueError(f"ISNetDIS width must be a positive multiple of 4, got {width}")
        u = width // 4  # 16 at the published width
        self.width = width
        self.conv_in = nn.Conv2d(in_ch, 4 * u, 3, stride=2, padding=1)
        # (depth, in, mid, out, dilated) in units of u; published: u = 16.
        encoder = [(7, 4, 2, 4, False), (6, 4, 2, 8, False), (5, 8, 4, 16, False),
                   (4, 16, 8, 32, False), (4, 32, 16, 32, True), (4, 32, 16, 32, True)]
        decoder = [(4, 64, 16, 32, True), (4, 64, 8, 16, False), (5, 32, 4, 8, False),
                   (6, 16, 2, 4, False), (7, 8, 1, 4, False)]
        for index, (depth, cin, mid, cout, dilated) in enumerate(encoder, start=1):
            self.add_module(f"stage{index}", RSU(depth, cin * u, mid * u, cout * u, dilated))
        for index, (depth, cin, mid, cout, dilated) in zip(range(5, 0, -1), decoder):
            self.add_module(f"stage{index}d", RSU(depth, cin * u, mid * u, cout * u, dilated))
        for index, cin in enumerate((4, 4, 8, 16, 32, 32), start=1):
            self.add_module(f"side{index}", nn.Conv2d(cin * u, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, all_sides: bool = False) -> torch.Tensor | list[torch.Tensor]:
        m = self._modules
        h = self.conv_in(x)
        encoded = []
        for index in range(1, 7):
            if index > 1:
                h = _halve(h)
            h = m[f"stage{index}"](h)
            encoded.append(h)
        decoded = {6: h}
        for index in range(5, 0, -1):
            skip = encoded[index - 1]
            h = m[f"stage{index}d"](torch.cat((_resize_like(h, skip), skip), dim=1))
            decoded[index] = h
        if not all_sides:
            return _resize_like(self.side1(decoded[1]), x)
        return [_resize_like(m[f"side{index}"](decoded[index]), x) for index in range(1, 7)]


# ------------------------------------------------------------------------------------------ segmenter


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


class ForegroundSegmenter(nn.Module):
    """Foreground probability of RGB images of any size, from an :class:`ISNetDIS`.

    ``forward(images)``: ``(B, 3, H, W)`` floats in [0, 1] (on any device; moved to the net's) →
    ``(B, 1, H, W)`` probabilities in [0, 1], on the images' device and in their dtype. The image is
    resized to fit an ``input_size`` square: with ``letterbox`` its longer side fills it and the rest is
    ``pad_value``; without, it is squashed to the square. ``invert`` feeds ``1 - x`` (after padding).
    The probability map is cropped back to the image area and resized to ``(H, W)``.
    """

    def __init__(
        self,
        net: ISNetDIS,
        input_size: int = INPUT_SIZE,
        invert: bool = False,
        letterbox: bool = True,
        pad_value: float = 0.0,
    ):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.net = net
        self.input_size = int(input_size)
        self.invert = invert
        self.letterbox = letterbox
        self.pad_value = float(pad_value)

    def _net_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The square the net sees, and where the image lies in it (top, left, height, width)."""
        s = self.input_size
        height, width = x.shape[-2:]
        if not self.letterbox:
            canvas = _resize(x, (s, s))
            box = (0, 0, s, s)
        else:
            scale = s / max(height, width)
            h, w = max(1, min(s, round(height * scale))), max(1, min(s, round(width * scale)))
            top, left = (s - h) // 2, (s - w) // 2
            canvas = x.new_full((x.shape[0], x.shape[1], s, s), self.pad_value)
            canvas[:, :, top:top + h, left:left + w] = _resize(x, (h, w))
            box = (top, left, h, w)
        return (1.0 - canvas if self.invert else canvas), box

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected images of shape (B, 3, H, W), floating point in [0, 1]; got {tuple(images.shape)} "
                f"{images.dtype}"
            )
        height, width = images.shape[-2:]
        weight = self.net.conv_in.weight
        # Resizing and the sigmoid run in float32; the net in its own dtype.
        canvas, (top, left, h, w) = self._net_input(images.to(device=weight.device, dtype=torch.float32))
        logits = self.net(canvas.to(weight.dtype))
        prob = torch.sigmoid(logits.float())[:, :, top:top + h, left:left + w]
        prob = _resize(prob, (height, width)).clamp_(0.0, 1.0)
        return prob.to(device=images.device, dtype=images.dtype)

    def mask(self, images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Boolean ``(B, 1, H, W)`` foreground: probability above ``threshold``."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        return self(images) > threshold


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SegmenterSpec:
    """How to build and feed one published segmenter."""

    description: str
    input_size: int = INPUT_SIZE
    invert: bool = False
    letterbox: bool = True
    pad_value: float = 0.0

    def build(self, width: int = PUBLISHED_WIDTH, input_size: int | None = None) -> ForegroundSegmenter:
        return ForegroundSegmenter(
            ISNetDIS(width),
            input_size=self.input_size if input_size is None else input_size,
            invert=self.invert,
            letterbox=self.letterbox,
            pad_value=self.pad_value,
        )


SEGMENTERS: dict[str, SegmenterSpec] = {
    "isnetis": SegmenterSpec(
        "SkyTNT anime-segmentation ISNet-IS (isnetis.ckpt / isnetis.safetensors): colour illustrations, "
        "letterboxed onto black at 1024, as its inference.py",
    ),
    "isnet-sketch": SegmenterSpec(
        "ColorizeDiffusionXL sketch-segment.safetensors (same ISNet-DIS): line drawings given as dark lines on "
        "white, squashed to 1024 and inverted, as the reference's sketch-mask call",
        invert=True,
        letterbox=False,
        pad_value=1.0,  # white paper, used only if letterboxing is switched on
    ),
}
SEGMENTERS["isnet"] = SEGMENTERS["isnetis"]  # the reference's name for the same weights ("ISNet")


def build_segmenter(name: str, width: int = PUBLISHED_WIDTH, input_size: int | None = None) -> ForegroundSegmenter:
    """A randomly initialized segmenter of a registered kind (``width``: see :class:`ISNetDIS`)."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; known: {', '.join(sorted(SEGMENTERS))}")
    return SEGMENTERS[name].build(width, input_size)


# ------------------------------------------------------------------------------------------------ weights


def read_segmenter_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """The ISNet-DIS tensors of a weights file, keyed as :class:`ISNetDIS` keys them.

    Read by :func:`model.weights.read_state_dict` (a ``state_dict`` wrapper and DDP's ``module.`` are
    removed there). When keys carry the Lightning ``net.`` prefix only those are kept, unprefixed: the
    training-only ``gt_encoder.`` of an ``isnet_is`` run is left out.
    """
    state = read_state_dict(path)
    if not any(key.startswith(LIGHTNING_PREFIX) for key in state):
        return state
    dropped = sorted({key.split(".", 1)[0] for key in state if not key.startswith(LIGHTNING_PREFIX)})
    if dropped:
        logger.info("%s: keeping the '%s' tensors, leaving out %s", path, LIGHTNING_PREFIX, ", ".join(dropped))
    return under_prefix(state, LIGHTNING_PREFIX)


def load_segmenter(
    name: str,
    weights_path: PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    width: int = PUBLISHED_WIDTH,
    input_size: int | None = None,
) -> ForegroundSegmenter:
    """A registered segmenter filled from a local weights file, in eval mode with gradients off.

    ``name``: a key of :data:`SEGMENTERS`. ``weights_path``: ``.safetensors`` or a ``torch.save`` file
    (``.ckpt/.pt/.pth/.bin``; a Lightning checkpoint with ``net.``-prefixed keys is fine). ``width`` and
    ``input_size`` default to the published values. Raises ``ValueError`` for an unknown name or weights
    that do not fit, ``FileNotFoundError`` for a missing file.
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; known: {', '.join(sorted(SEGMENTERS))}")
    state = read_segmenter_weights(weights_path)
    segmenter = SEGMENTERS[name].build(width, input_size)
    # Some converters drop BatchNorm's integer counters; inference never reads them.
    check_and_load(segmenter.net, state, weights_path, optional_suffixes=(".num_batches_tracked",))
    segmenter.to(device=device, dtype=dtype)
    segmenter.requires_grad_(False)
    logger.info("loaded %s segmenter (%d tensors) from %s", name, len(state), weights_path)
    return segmenter.eval()
