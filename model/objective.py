"""The stage-1 training objective as a plain function: a trainer (Ray Train + DeepSpeed, a test, a bench)
calls :func:`training_step` and back-propagates the returned loss.

One step: v-prediction diffusion loss on the semantic-aligned branch (reference from the ground truth),
with offset noise, reference dropout (zeroed context) and sketch dropout (the empty sketch); when the
Gram weight λ is non-zero, the semantic-misaligned branch runs in the same U-Net call with the batch's
contexts rolled by one, and λ·L_gram joins the loss. λ follows :func:`gram_weight_at`: 0 for the first
``gram_start_fraction`` of the steps (entanglement appears later in training), then ``gram_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from model.config import DiffusionConfig

STAGES = ("backbone", "plugin")  # stage 1 (this module's objective) and stage 2 (:mod:`model.plugin`)
from model.gram import gram_loss


@dataclass
class TrainingBatch:
    """What the preprocess cache provides per sample; the frozen encoders never run in the step.

    latents (B, C, h, w) scaled VAE latents of the ground truth; sketch (B, 1, H, W) inverted in [-1, 1]
    with H = h·stride; clip_tokens (B, Nc, Dc); tagger_tokens (B, Nw, Dw); vector_condition (B, 2).
    """

    latents: torch.Tensor
    sketch: torch.Tensor
    clip_tokens: torch.Tensor
    tagger_tokens: torch.Tensor
    vector_condition: torch.Tensor
    # stage 2 (plugin) only: the background picture (the reference stretched to the target's size with its
    # foreground whitened): its latents (B, C, h, w) and tokens; the crop [top, left, height, width] of the
    # target inside the reference (B, 4); the foreground masks of sketch and reference (B, 1, H, W) in [0, 1]
    background_latents: torch.Tensor | None = None
    background_clip_tokens: torch.Tensor | None = None
    background_tagger_tokens: torch.Tensor | None = None
    crop: torch.Tensor | None = None
    sketch_mask: torch.Tensor | None = None
    reference_mask: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "TrainingBatch":
        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TrainingBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


@dataclass
class StepLosses:
    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    gram_loss: torch.Tensor
    gram_weight: float


def gram_weight_at(step: int, total_steps: int, cfg: DiffusionConfig) -> float:
    """λ for a (0-based) step: 0 before ``gram_start_fraction · total_steps``, then ``gram_weight``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return cfg.gram_weight if step >= int(cfg.gram_start_fraction * total_steps) else 0.0


@dataclass
class NoisedBatch:
    """The random draws of one step: noised latents, their timesteps and target, the sketch after
    dropout and the per-sample reference keep mask (B, 1, 1)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    sketch: torch.Tensor
    keep_reference: torch.Tensor


def noise_and_dropout(batch: TrainingBatch, scheduler: DDPMScheduler, cfg: DiffusionConfig,
                      generator: torch.Generator | None = None) -> NoisedBatch:
    """Offset noise, uniform timesteps, the v-prediction target, sketch and reference dropout; drawn in
    this order from ``generator`` so every stage reproduces the same draws under a seed."""
    latents = batch.latents
    batch_size, channels = latents.shape[:2]
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if cfg.offset_noise:
        offset = torch.randn((batch_size, channels, 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + cfg.offset_noise * offset
    timesteps = torch.randint(0, cfg.num_train_timesteps, (batch_size,), generator=generator, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if cfg.prediction_type == "v_prediction" else noise
    drop_sketch = torch.rand((batch_size, 1, 1, 1), generator=generator, device=device) < cfg.sketch_dropout
    sketch = torch.where(drop_sketch, torch.full_like(batch.sketch, -1.0), batch.sketch)
    keep = (torch.rand((batch_size, 1, 1), generator=generator, device=device) >= cfg.reference_dropout)
    return NoisedBatch(noisy, timesteps, target, sketch, keep.to(latents.dtype))


def training_step(
    model,
    batch: TrainingBatch,
    scheduler: DDPMScheduler,
    cfg: DiffusionConfig,
    *,
    gram_weight: float,
    generator: torch.Generator | None = None,
) -> StepLosses:
    """Losses of one stage-1 step for ``model`` (anything with ``sketch_encoder``, ``projector``, ``unet``
    as in :class:`model.colorizer.Colorizer`). ``generator`` (on the batch's device) fixes noise, timesteps
    and dropout draws, for tests and reproducible benches."""
    drawn = noise_and_dropout(batch, scheduler, cfg, generator)
    residuals = model.sketch_encoder(drawn.sketch)
    context = model.projector(batch.clip_tokens, batch.tagger_tokens) * drawn.keep_reference
    misaligned = torch.roll(context, shifts=1, dims=0) if gram_weight > 0 else None

    out = model.unet(drawn.noisy, drawn.timesteps, context, batch.vector_condition, residuals,
                     misaligned_context=misaligned)
    diffusion = F.mse_loss(out.prediction.float(), drawn.target.float())
    if misaligned is not None:
        gram = gram_loss(out.aligned_features, out.misaligned_features)
    else:
        gram = diffusion.new_zeros(())
    return StepLosses(loss=diffusion + gram_weight * gram, diffusion_loss=diffusion, gram_loss=gram,
                      gram_weight=gram_weight)
