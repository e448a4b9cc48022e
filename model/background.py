"""What the background modes read besides the reference: the masks, the background picture, its crop.

Conventions of the published code (ColorizeDiffusionXL), which the released ``xlv2`` weights were trained
and are run with:

* the **sketch mask** is soft, in [0, 1], computed on the letterboxed sketch at the output size;
* the **reference mask** is dilated by a 21 × 21 maximum and binarised at 0.5;
* the **background picture** is the reference with its foreground (mask ≥ the reference threshold, 0.5 by
  default) painted white, unless a separate background picture is given;
* masks reach the latent grid by a bicubic resize to the output size, then nearest-neighbour to 1/8;
* the **crop** ``[top, left, height, width]`` places the output inside the background picture: the output's
  aspect fitted into the picture's, anchored at the top-left.

The mask models are pluggable (:class:`MaskModels`): learned segmenters from local weights
(:mod:`model.segmenter`), or the weight-free masks of :mod:`model.masks` as the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch
import torch.nn.functional as F

from model.masks import reference_foreground, sketch_foreground

DILATION = 21  # the reference mask's dilation (a max filter), as published
REFERENCE_THRESHOLD = 0.5  # reference mask: which pixels are painted white for the background picture
SKETCH_THRESHOLD = 0.05  # sketch mask: which tokens are foreground in the hard splits

SketchMasker = Callable[[torch.Tensor], torch.Tensor]
"""white sketch (B, 3, H, W) in [-1, 1] (dark lines on white) → soft foreground (B, 1, H, W) in [0, 1]."""
ReferenceMasker = Callable[[torch.Tensor], torch.Tensor]
"""reference (1, 3, h, w) in [-1, 1] → foreground probability (1, 1, h, w) in [0, 1] (before dilation)."""


def weight_free_sketch_mask(white_sketch: torch.Tensor) -> torch.Tensor:
    """:func:`model.masks.sketch_foreground` per item, as a float mask."""
    drawings = ((white_sketch.float().mean(dim=1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    masks = np.stack([sketch_foreground(d) for d in drawings])
    return torch.from_numpy(masks > 127).float()[:, None].to(white_sketch.device)


def weight_free_reference_mask(reference: torch.Tensor) -> torch.Tensor:
    """:func:`model.masks.reference_foreground` per item, as a float mask."""
    pixels = ((reference.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    masks = np.stack([reference_foreground(np.ascontiguousarray(p)) for p in pixels])
    return torch.from_numpy(masks > 127).float()[:, None].to(reference.device)


@dataclass
class MaskModels:
    """The two mask models of the background modes (defaults: the weight-free masks). ``names`` records
    which learned models were loaded (for reports and the API's info)."""

    sketch: SketchMasker = weight_free_sketch_mask
    reference: ReferenceMasker = weight_free_reference_mask
    names: tuple[str, str] = ("weight-free", "weight-free")

    @classmethod
    def from_files(cls, reference: tuple[str, PathLike] | None = None, sketch: tuple[str, PathLike] | None = None,
                   device=None, dtype: torch.dtype = torch.float32, **masker_options) -> MaskModels:
        """Learned mask models from local weights in their published layouts: ``reference`` = (name, path)
        with name one of ``rmbg-2.0`` (the published default), ``birefnet``, ``birefnet-hr``, ``isnet``;
        ``sketch`` = (name, path), normally ``("isnet-sketch", sketch-segment.safetensors)``. A ``None``
        keeps the weight-free mask for that side. ``masker_options`` go to
        :func:`model.segmenter.load_masker` (sizes of a reduced copy, for tests)."""
        from model import segmenter  # imported on demand: BiRefNet pulls in torchvision's deformable conv

        device = device or "cpu"
        models = cls()
        names = list(models.names)
        if reference is not None:
            net = segmenter.load_masker(reference[0], reference[1], device=device, dtype=dtype, **masker_options)
            # undilated here (binarised at 0.5); MaskModels.reference_mask dilates: max-pooling a binarised
            # map equals binarising the max-pooled probabilities
            models.reference = lambda x: segmenter.reference_mask(net, x.to(device), dilate=False)
            names[0] = reference[0]
        if sketch is not None:
            sketch_net = segmenter.load_masker(sketch[0], sketch[1], device=device, dtype=dtype, **masker_options)
            models.sketch = lambda x: segmenter.sketch_mask(sketch_net, x.to(device))
            names[1] = sketch[0]
        models.names = (names[0], names[1])
        return models

    def sketch_mask(self, sketch: torch.Tensor) -> torch.Tensor:
        """Model-space ``sketch`` (B, 3, H, W: inverted, letterboxed) → soft mask (B, 1, H, W)."""
        with torch.no_grad():
            return self.sketch(-sketch).float().clamp(0, 1)

    def reference_mask(self, reference: torch.Tensor) -> torch.Tensor:
        """``reference`` (1, 3, h, w) in [-1, 1] → binary mask (1, 1, h, w): dilated, then > 0.5."""
        with torch.no_grad():
            return dilate_and_binarise(self.reference(reference).float())


def dilate_and_binarise(mask: torch.Tensor, size: int = DILATION) -> torch.Tensor:
    """The reference mask's post-processing: a ``size`` × ``size`` maximum, then > 0.5."""
    dilated = F.max_pool2d(mask, kernel_size=size, stride=1, padding=size // 2)
    return (dilated > 0.5).float()


def whiten_foreground(reference: torch.Tensor, mask: torch.Tensor, threshold: float = REFERENCE_THRESHOLD
                      ) -> torch.Tensor:
    """The background picture: ``reference`` (B, 3, h, w) in [-1, 1] with pixels where ``mask`` ≥ ``threshold``
    painted white."""
    return torch.where(mask < threshold, reference, torch.ones_like(reference))


def stretch(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to (height, width), aspect ignored (the published code's ``warp_resize``)."""
    return F.interpolate(images, size=size, mode="bicubic")


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A mask at the output size (B, 1, H, W) → the latent grid, nearest-neighbour (as published for inference;
    the published stage-2 training takes the sketch mask there bicubically)."""
    return F.interpolate(mask.float(), size=latent_size, mode="nearest")


def crop_fraction(height: int, width: int, background_height: int, background_width: int) -> tuple[float, float]:
    """(height, width) of the output's aspect fitted into the background picture, as fractions of it."""
    if width / height > background_width / background_height:
        return (height / width) * (background_width / background_height), 1.0
    return 1.0, (width / height) * (background_height / background_width)


def crop_condition(height: int, width: int, background_sizes: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(B, 4) crop values [top, left, height, width] for an output of ``height`` × ``width`` inside each
    background picture of (height, width) in ``background_sizes``; top and left are 0 at inference."""
    rows = [[0.0, 0.0, *crop_fraction(height, width, bh, bw)] for bh, bw in background_sizes]
    return torch.tensor(rows, dtype=torch.float32, device=device)
