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
* ``isnet-sketch``: as the reference's sketch-mask call ``proceed(x=white_sketch, th, tw, crop=False)``:
  squashed to the square (bicubic) and fed as the reference's ``white_sketch``, which is ``-sketch`` with
  ``sketch`` in [-1, 1] (``backend/functool.py``, ``preprocess_sketch``, ``new=False`` as the app calls it):
  a dark-on-white drawing ``x`` in [0, 1] reaches the net as ``1 - 2x``, light lines on black in [-1, 1].
  ``proceed`` itself neither inverts nor rescales on this path; the inversion is in ``white_sketch``.

The reference-convention maskers (:func:`reference_mask`, :func:`sketch_mask`, :func:`load_masker`) follow
the reference code step by step instead, inputs in [-1, 1] as the reference holds them: RMBG-2.0 /
BiRefNet (:mod:`model.birefnet`) through ``rmbg_proceed``, ISNet through ``ISNetDIS.proceed``.
(The reference's ``proceed(crop=True)``, its reference-mask path, does invert: ``1 - (x + 1) / 2`` on a
canvas padded with -1; :func:`reference_mask` does the same for an ISNet masker.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.weights import PathLike, check_and_load, read_state_dict, under_prefix
from model.birefnet import BiRefNet, BiRefNetConfig, PatchOrder

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


def _resize(x: torch.Tensor, size: tuple[int, int], resample: str = "bilinear") -> torch.Tensor:
    """Bilinear (antialiased when shrinking), or plain bicubic as the reference's ISNet ``proceed``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if resample == "bicubic":
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


class ForegroundSegmenter(nn.Module):
    """Foreground probability of RGB images of any size, from an :class:`ISNetDIS`.

    ``forward(images)``: ``(B, 3, H, W)`` floats in [0, 1] (on any device; moved to the net's) →
    ``(B, 1, H, W)`` probabilities in [0, 1], on the images' device and in their dtype. The image is
    resized to fit an ``input_size`` square: with ``letterbox`` its longer side fills it and the rest is
    ``pad_value``; without, it is squashed to the square. ``invert`` feeds ``1 - x`` (after padding),
    ``signed`` maps the result to [-1, 1] (``2 v - 1``). ``resample``: ``bilinear`` (antialiased when
    shrinking) or ``bicubic`` (plain, as the reference's ISNet ``proceed``), both ways.
    The probability map is cropped back to the image area and resized to ``(H, W)``.
    """

    def __init__(
        self,
        net: ISNetDIS,
        input_size: int = INPUT_SIZE,
        invert: bool = False,
        letterbox: bool = True,
        pad_value: float = 0.0,
        signed: bool = False,
        resample: str = "bilinear",
    ):
        super().__init__()
        if resample not in ("bilinear", "bicubic"):
            raise ValueError(f"resample must be 'bilinear' or 'bicubic', got {resample!r}")
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.net = net
        self.input_size = int(input_size)
        self.invert = invert
        self.letterbox = letterbox
        self.pad_value = float(pad_value)
        self.signed = signed
        self.resample = resample

    def _net_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The square the net sees, and where the image lies in it (top, left, height, width)."""
        s = self.input_size
        height, width = x.shape[-2:]
        if not self.letterbox:
            canvas = _resize(x, (s, s), self.resample)
            box = (0, 0, s, s)
        else:
            scale = s / max(height, width)
            h, w = max(1, min(s, round(height * scale))), max(1, min(s, round(width * scale)))
            top, left = (s - h) // 2, (s - w) // 2
            canvas = x.new_full((x.shape[0], x.shape[1], s, s), self.pad_value)
            canvas[:, :, top:top + h, left:left + w] = _resize(x, (h, w), self.resample)
            box = (top, left, h, w)
        if self.invert:
            canvas = 1.0 - canvas
        return (2.0 * canvas - 1.0 if self.signed else canvas), box

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
        prob = _resize(prob, (height, width), self.resample).clamp_(0.0, 1.0)
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
    signed: bool = False
    resample: str = "bilinear"

    def build(self, width: int = PUBLISHED_WIDTH, input_size: int | None = None) -> ForegroundSegmenter:
        return ForegroundSegmenter(
            ISNetDIS(width),
            input_size=self.input_size if input_size is None else input_size,
            invert=self.invert,
            letterbox=self.letterbox,
            pad_value=self.pad_value,
            signed=self.signed,
            resample=self.resample,
        )


SEGMENTERS: dict[str, SegmenterSpec] = {
    "isnetis": SegmenterSpec(
        "SkyTNT anime-segmentation ISNet-IS (isnetis.ckpt / isnetis.safetensors): colour illustrations, "
        "letterboxed onto black at 1024, as its inference.py",
    ),
    "isnet-sketch": SegmenterSpec(
        "ColorizeDiffusionXL sketch-segment.safetensors (same ISNet-DIS): line drawings given as dark lines on "
        "white, squashed to 1024 (bicubic) and fed as 1 - 2x, the reference's white_sketch (sketch_mask)",
        invert=True,
        signed=True,
        resample="bicubic",
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


# ------------------------------------------------------------------- reference-convention maskers


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DILATE_KERNEL = 21  # the reference's max-pool widening of a reference mask (stride 1, padding 10)


@dataclass(frozen=True)
class MaskerSpec:
    """How the reference builds and feeds one mask model (``preprocessor/__init__.py``)."""

    arch: str  # "birefnet" (rmbg_proceed) or "isnet" (ISNetDIS.proceed)
    input_size: int
    description: str
    patch_order: PatchOrder = "channel"  # BiRefNet only: see model.birefnet


MASKERS: dict[str, MaskerSpec] = {
    "rmbg-2.0": MaskerSpec("birefnet", 1024, "briaai/RMBG-2.0 model.safetensors, the reference's default "
                           "reference masker (rmbg-v2)", patch_order="column"),
    "birefnet": MaskerSpec("birefnet", 1024, "ZhengPeng7/BiRefNet model.safetensors (BiRefNet)"),
    "birefnet-hr": MaskerSpec("birefnet", 2048, "ZhengPeng7/BiRefNet_HR model.safetensors (BiRefNet_HR)"),
    "isnet": MaskerSpec("isnet", 1024, "isnetis.safetensors (ISNet): anime-segmentation ISNet-DIS"),
    "isnet-sketch": MaskerSpec("isnet", 1024, "sketch-segment.safetensors (ISNet-sketch), the sketch masker"),
}


class Masker(nn.Module):
    """A mask net and how the reference feeds it; use :func:`reference_mask` and :func:`sketch_mask`.

    ``net``: :class:`~model.birefnet.BiRefNet` or :class:`ISNetDIS` (logits out);
    ``input_size``: the square the reference resizes to (1024; 2048 for ``birefnet-hr``).
    """

    def __init__(self, name: str, arch: str, net: nn.Module, input_size: int):
        super().__init__()
        if arch not in ("birefnet", "isnet"):
            raise ValueError(f"unknown masker architecture {arch!r}")
        self.name, self.arch, self.net, self.input_size = name, arch, net, int(input_size)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground probability of a net-ready float32 batch (net in its own dtype, sigmoid in float32)."""
        weight = next(self.net.parameters())
        return torch.sigmoid(self.net(x.to(device=weight.device, dtype=weight.dtype)).float())


def _spec(name: str) -> MaskerSpec:
    if name not in MASKERS:
        raise ValueError(f"unknown masker {name!r}; known: {', '.join(sorted(MASKERS))}")
    return MASKERS[name]


def build_masker(
    name: str,
    *,
    birefnet_config: BiRefNetConfig | None = None,
    width: int = PUBLISHED_WIDTH,
    input_size: int | None = None,
) -> Masker:
    """A randomly initialized masker of a registered kind, in eval mode.

    ``birefnet_config`` (BiRefNet kinds; default: published Swin-L with the kind's patch order) and
    ``width`` (ISNet kinds) shrink the net for tests; ``input_size`` overrides the published square.
    """
    spec = _spec(name)
    if spec.arch == "birefnet":
        net: nn.Module = BiRefNet(birefnet_config or BiRefNetConfig(patch_order=spec.patch_order))
    else:
        net = ISNetDIS(width)
    return Masker(name, spec.arch, net, spec.input_size if input_size is None else input_size).eval()


def resolve_weights(path: PathLike) -> Path:
    """The weights file itself, or ``model.safetensors`` inside a Hugging Face snapshot folder."""
    path = Path(path)
    if path.is_dir():
        inside = path / "model.safetensors"
        if not inside.is_file():
            raise FileNotFoundError(f"{path} is a folder without model.safetensors")
        return inside
    if not path.exists():
        raise FileNotFoundError(f"masker weights not found: {path}")
    return path


def load_masker(
    name: str,
    weights_path: PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    birefnet_config: BiRefNetConfig | None = None,
    width: int = PUBLISHED_WIDTH,
    input_size: int | None = None,
) -> Masker:
    """A registered masker filled strictly from local weights, eval mode, gradients off.

    ``name``: ``rmbg-2.0``, ``birefnet``, ``birefnet-hr``, ``isnet`` or ``isnet-sketch``.
    ``weights_path``: a ``.safetensors`` / torch file, or a Hugging Face folder holding
    ``model.safetensors`` (as ``briaai/RMBG-2.0``). Missing, unexpected or mis-shaped keys raise a
    ``ValueError`` naming the file; BatchNorm counters and Swin's ``relative_position_index`` (both
    recomputable) may be absent. Nothing is downloaded and no remote code runs.
    """
    spec = _spec(name)
    path = resolve_weights(weights_path)
    masker = build_masker(name, birefnet_config=birefnet_config, width=width, input_size=input_size)
    if spec.arch == "birefnet":
        state = read_state_dict(path)
        optional = (".num_batches_tracked", ".relative_position_index")
    else:
        state = read_segmenter_weights(path)
        optional = (".num_batches_tracked",)
    check_and_load(masker.net, state, path, optional_suffixes=optional, target=f"the {name} masker")
    masker.to(device=device, dtype=dtype)
    masker.requires_grad_(False)
    logger.info("loaded %s masker (%d tensors) from %s", name, len(state), path)
    return masker.eval()


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"expected {what} of shape (B, 3, H, W), floating point in [-1, 1]; got "
                         f"{tuple(images.shape)} {images.dtype}")


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask, kernel_size=DILATE_KERNEL, stride=1, padding=DILATE_KERNEL // 2)


def _rmbg_probability(masker: Masker, x: torch.Tensor) -> torch.Tensor:
    """``rmbg_proceed`` up to the resize back: [-1, 1] → [0, 1] → square (torchvision's bilinear,
    antialiased) → ImageNet normalization → ``sigmoid(model(x)[-1])`` → bilinear back to (h, w)."""
    h, w = x.shape[-2:]
    s = masker.input_size
    x = F.interpolate((x + 1.0) / 2.0, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    prob = masker._run((x - mean) / std)
    return F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def _isnet_crop_probability(masker: Masker, x: torch.Tensor) -> torch.Tensor:
    """``ISNetDIS.proceed(crop=True)``: fitted (bicubic, by the scale factor) onto a -1 canvas, mapped to
    ``1 - (v + 1) / 2``, and the image area of the probability map resized (bicubic) back, clamped."""
    b, c, h, w = x.shape
    s = masker.input_size
    scale = s / max(h, w)
    fh, fw = int(h * scale), int(w * scale)
    top, left = (s - fh) // 2, (s - fw) // 2
    canvas = x.new_full((b, c, s, s), -1.0)
    canvas[:, :, top:top + fh, left:left + fw] = F.interpolate(x, scale_factor=scale, mode="bicubic")
    prob = masker._run(1.0 - (canvas + 1.0) / 2.0)[:, :, top:top + fh, left:left + fw]
    return F.interpolate(prob, size=(h, w), mode="bicubic").clamp(0.0, 1.0)


@torch.no_grad()
def reference_mask(masker: Masker, images: torch.Tensor, dilate: bool = True) -> torch.Tensor:
    """The reference's ``rmask``: ``(B, 3, H, W)`` RGB in [-1, 1] → ``(B, 1, H, W)`` in {0., 1.}.

    BiRefNet kinds follow ``rmbg_proceed``; ISNet kinds ``ISNetDIS.proceed(crop=True)``. With ``dilate``
    (the app's setting) the probability map is widened by a 21x21 max-pool before the app's binarisation
    at 0.5 (``> 0.5`` is foreground). Returned on the images' device and in their dtype.
    """
    _check_images(images, "images")
    x = images.float()
    if masker.arch == "birefnet":
        prob = _rmbg_probability(masker, x)
    else:
        prob = _isnet_crop_probability(masker, x)
    if dilate:
        prob = _dilate(prob)
    return (prob > 0.5).to(device=images.device, dtype=images.dtype)


@torch.no_grad()
def sketch_mask(
    masker: Masker, white_sketch: torch.Tensor, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """The reference's ``smask``: a SOFT ``(B, 1, height, width)`` foreground in [0, 1] of a sketch.

    ``white_sketch``: ``(B, 3, H, W)`` in [-1, 1], the reference's ``white_sketch = -sketch`` (a dark-on-
    white drawing ``x`` in [0, 1] gives ``1 - 2 x``). ISNet kinds follow ``ISNetDIS.proceed(crop=False)``:
    bicubic to the square, sigmoid, bicubic to (height, width) (default: the input size), clamped. A
    BiRefNet kind follows ``rmbg_proceed`` without dilation and is binary; it needs (height, width) equal
    to the input size (the reference pads otherwise, which the app never asks for).
    """
    _check_images(white_sketch, "white_sketch")
    h, w = white_sketch.shape[-2:]
    height, width = height or h, width or w
    x = white_sketch.float()
    if masker.arch == "birefnet":
        if (height, width) != (h, w):
            raise ValueError(f"a BiRefNet sketch mask comes at the sketch's size {h}x{w}, not {height}x{width}")
        mask = (_rmbg_probability(masker, x) > 0.5).float()
    else:
        s = masker.input_size
        prob = masker._run(F.interpolate(x, size=(s, s), mode="bicubic"))
        mask = F.interpolate(prob, size=(height, width), mode="bicubic").clamp(0.0, 1.0)
    return mask.to(device=white_sketch.device, dtype=white_sketch.dtype)
