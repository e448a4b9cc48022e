"""Spatial entanglement: how much an output's structure follows the reference instead of the sketch.

The paper's failure mode: with a reference whose layout differs from the sketch, an entangled model
draws the reference's shapes (or bends the sketch's) instead of only taking its colors. Two measures, on
held-out rows, each row paired with another row's reference (``shift``):

* ``gram_distance`` (lower = less entangled): the ground-truth latent is noised at a few timesteps and the
  denoiser runs with the row's own reference (aligned branch) and with the other row's (misaligned
  branch); at the two Gram layers the token self-similarity matrices (:func:`model.gram.gram_matrix`,
  the spatial grouping the network infers) are compared, mean squared difference. 0 means the
  misaligned reference did not change the inferred layout at all; an identical reference gives exactly 0.
* ``line_agreement`` (higher = less entangled, in [0, 1]): the row's sketch is colored after the other
  row's reference, lines are extracted from the output with the extractor that made the input sketch
  (a weight-free one from :mod:`model.line_art`), and compared with the input sketch's lines as a
  tolerance F-score: a line pixel counts as matched when the other map has a line within ``tolerance``
  pixels. ``line_agreement_aligned`` is the same with the row's own reference, the baseline to compare
  against: their difference is what the misaligned reference costs.

Degenerate pairs measure nothing, yet would read as perfect (Gram distance 0, equal line agreements): a
row paired with itself (one row, or ``shift`` a multiple of the row count) or with a copy of its own
image (duplicate rows). They are skipped and counted in ``skipped``; with no proper pair left every
measure is NaN and ``degenerate`` says why. ``shift=0`` asks for the identity check on purpose and is
measured as asked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch

from model.gram import gram_matrix
from model.images import image_to_tensor, sketch_to_tensor
from model.line_art import CLASSIC_EXTRACTORS, invert
from model.options import ColorizeOptions
from model.vae import encode_latents
from model.vector_condition import vector_condition
from pipelines.data.tensor_cells import image_from_cell


@dataclass
class EntanglementResult:
    gram_distance: float
    gram_distance_per_layer: dict[str, float]
    line_agreement: float
    line_agreement_aligned: float
    pairs: int  # pairs measured (degenerate ones left out)
    timesteps: tuple[int, ...]
    line_extractors: list[str]
    plugin: bool = False  # whether the colorizations used the stage-2 plug-in
    skipped: dict[str, int] = field(default_factory=dict)  # reason → degenerate pairs left out
    degenerate: str | None = None  # why every measure is NaN, when no proper pair was left

    def to_json(self) -> dict:
        return asdict(self)


def line_f_score(lines: np.ndarray, reference_lines: np.ndarray, tolerance: int) -> float:
    """Tolerance F-score of two boolean line maps (H, W): precision = share of ``lines`` pixels within
    ``tolerance`` px of a reference line, recall = the converse; 1 when both maps are empty."""
    if lines.shape != reference_lines.shape:
        raise ValueError(f"line maps differ in shape: {lines.shape} vs {reference_lines.shape}")
    if not lines.any() and not reference_lines.any():
        return 1.0
    if not lines.any() or not reference_lines.any():
        return 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_reference = cv2.dilate(reference_lines.astype(np.uint8), kernel) > 0
    near_lines = cv2.dilate(lines.astype(np.uint8), kernel) > 0
    precision = float((lines & near_reference).sum() / lines.sum())
    recall = float((reference_lines & near_lines).sum() / reference_lines.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@torch.no_grad()
def _gram_distances(model, truth: np.ndarray, own: np.ndarray, other: np.ndarray, drawing: np.ndarray,
                    timesteps: tuple[int, ...], generator: torch.Generator) -> dict[str, float]:
    """Per Gram layer: mean over ``timesteps`` of mean((G_aligned − G_misaligned)²) for one row."""
    device, dtype = model.device, model.dtype
    height, width = truth.shape[:2]
    count = len(timesteps)
    latents = encode_latents(model.vae, image_to_tensor(truth).to(device, dtype) * 2 - 1).float()
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.tensor(timesteps, device=device)
    noisy = model.noise_scheduler.add_noise(latents.expand(count, -1, -1, -1), noise.expand(count, -1, -1, -1), t)
    context = model.encode_reference(image_to_tensor(own)).expand(count, -1, -1)
    misaligned = model.encode_reference(image_to_tensor(other)).expand(count, -1, -1)
    sketch = sketch_to_tensor(drawing, (width, height)).to(device, dtype)
    residuals = [r.expand(count, -1, -1, -1) for r in model.sketch_encoder(sketch)]
    vector = vector_condition(height, width, model.config.sampling.aesthetic_score, batch=count, device=device)
    out = model.unet(noisy.to(dtype), t, context, vector, residuals, misaligned_context=misaligned)
    return {name: float((gram_matrix(out.aligned_features[name]) - gram_matrix(out.misaligned_features[name]))
                        .pow(2).mean()) for name in sorted(out.aligned_features)}


def degenerate_pair(rows: list[dict], truths: list[np.ndarray], i: int, shift: int) -> str | None:
    """Why row ``i`` and its misaligned partner make no pair (None when they do)."""
    partner = (i + shift) % len(rows)
    if shift == 0:
        return None  # the identity check, asked for
    if partner == i:
        return "paired with itself (fewer rows than the shift needs)"
    same_id = rows[i].get("id") is not None and rows[i].get("id") == rows[partner].get("id")
    if same_id or np.array_equal(truths[i], truths[partner]):
        return "paired with a copy of its own image (duplicate rows)"
    return None


def spatial_entanglement(model, rows: list[dict], *, shift: int = 1, timesteps: tuple[int, ...] = (250, 500, 750),
                         seed: int = 0, steps: int | None = None, sketch_variant: int = 0,
                         fallback_extractor: str = "xdog", tolerance: int | None = None,
                         plugin: bool | None = None) -> EntanglementResult:
    """Both measures over ``rows`` (dataset rows: ``image``, ``sketches``, optionally ``sketch_extractors``).

    Row ``i`` gets row ``(i + shift) % len(rows)``'s image as its misaligned reference (``shift`` 0 = its
    own, the identity check). ``sketch_variant`` picks the stored sketch; lines of the outputs come from
    the same extractor when it is weight-free, else from ``fallback_extractor``. ``tolerance`` defaults to
    1 px per 128 px of the smaller side. ``steps`` is the sampling steps of the colorizations, ``plugin``
    whether they use the stage-2 plug-in (None: the model's default, on when it has one; the ablation
    measures its plug-in rung with it), recorded in the result. Degenerate pairs:
    see the module docstring.
    """
    if not rows:
        raise ValueError("no held-out rows given")
    if fallback_extractor not in CLASSIC_EXTRACTORS:
        raise ValueError(f"unknown line extractor {fallback_extractor!r}; expected one of {sorted(CLASSIC_EXTRACTORS)}")
    plugin = bool(model.resolve(ColorizeOptions(plugin=plugin)).plugin)
    generator = torch.Generator().manual_seed(seed)
    truths = [image_from_cell(r["image"], cv2.IMREAD_COLOR) for r in rows]
    per_layer: dict[str, list[float]] = {}
    aligned_scores, misaligned_scores, used = [], [], []
    skipped: dict[str, int] = {}
    for i, row in enumerate(rows):
        reason = degenerate_pair(rows, truths, i, shift)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        other = truths[(i + shift) % len(rows)]
        sketches = list(row["sketches"])
        drawing = invert(image_from_cell(sketches[sketch_variant % len(sketches)], cv2.IMREAD_GRAYSCALE))
        for name, value in _gram_distances(model, truths[i], truths[i], other, drawing, tuple(timesteps),
                                           generator).items():
            per_layer.setdefault(name, []).append(value)

        names = list(row.get("sketch_extractors") or [])
        made_by = names[sketch_variant % len(names)] if names else None
        extractor = made_by if made_by in CLASSIC_EXTRACTORS else fallback_extractor
        used.append(extractor)
        height, width = drawing.shape[:2]
        outputs = model.colorize_batch([drawing, drawing], [other, truths[i]],
                                       ColorizeOptions(size=(width, height), steps=steps, plugin=plugin),
                                       seeds=[seed + i] * 2)
        reach = tolerance if tolerance is not None else max(1, round(min(height, width) / 128))
        sketch_lines = drawing < 128
        for output, scores in zip(outputs, (misaligned_scores, aligned_scores)):
            output_lines = CLASSIC_EXTRACTORS[extractor](np.asarray(output)) < 128
            scores.append(line_f_score(output_lines, sketch_lines, reach))
    timesteps = tuple(int(t) for t in timesteps)
    if not misaligned_scores:
        why = "; ".join(f"{count} of {len(rows)} rows {reason}" for reason, count in skipped.items())
        return EntanglementResult(math.nan, {}, math.nan, math.nan, pairs=0, timesteps=timesteps, line_extractors=[],
                                  plugin=plugin, skipped=skipped,
                                  degenerate=f"no proper pair to measure: {why}; give at least 2 distinct rows")
    layers = {name: float(np.mean(values)) for name, values in per_layer.items()}
    return EntanglementResult(
        gram_distance=float(np.mean(list(layers.values()))), gram_distance_per_layer=layers,
        line_agreement=float(np.mean(misaligned_scores)), line_agreement_aligned=float(np.mean(aligned_scores)),
        pairs=len(misaligned_scores), timesteps=timesteps, line_extractors=sorted(set(used)), plugin=plugin,
        skipped=skipped)
