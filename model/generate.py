"""Sampling from prepared conditions: the loop shared by ``Colorizer.colorize_batch`` and the training
job's sample grids (which start from cached reference tokens, not from images).
"""

from __future__ import annotations

import torch

from model.config import ColorizerConfig
from model.guidance import Guidance, guided_prediction
from model.sampler import dpmpp_sample, sampling_scheduler


@torch.no_grad()
def generate_latents(unet, sketch_encoder, config: ColorizerConfig, *, context: torch.Tensor, sketch: torch.Tensor,
                     vector: torch.Tensor, seeds: list[int], steps: int, guidance: Guidance,
                     sketch_strengths: list[float] | None = None, cross_attention_kwargs: dict | None = None,
                     reference_strength: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Clean latents (B, C, h, w) for ``context`` (B, N, D), inverted ``sketch`` (B, 1, H, W) and
    ``vector`` (B, 2). Each item's noise comes from its own seed; the sketch encoder runs once, not per
    step, and only the guidance branches the setting needs are evaluated (as one batch).
    ``reference_strength`` scales every cross-attention output (the published model's strength);
    ``noise`` (B, C, h, w) replaces the seeds' initial noise."""
    batch, _, height, width = sketch.shape
    device, dtype = sketch.device, sketch.dtype
    conditions = guidance.conditions
    residuals = {"full": sketch_encoder(sketch, sketch_strengths)}
    residuals["no_reference"] = residuals["full"]
    if "no_sketch" in conditions:
        residuals["no_sketch"] = sketch_encoder(torch.full_like(sketch, -1.0), sketch_strengths)
    contexts = {"full": context, "no_reference": torch.zeros_like(context), "no_sketch": context}
    k = len(conditions)
    stacked_context = torch.cat([contexts[c] for c in conditions])
    stacked_residuals = [torch.cat([residuals[c][i] for c in conditions]) for i in range(len(residuals["full"]))]
    stacked_vector = vector.repeat(k, 1)

    def denoise(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.expand(batch * k)
        out = unet(latents.repeat(k, 1, 1, 1).to(dtype), t, stacked_context, stacked_vector, stacked_residuals,
                   cross_attention_kwargs=cross_attention_kwargs, reference_strength=reference_strength)
        return guided_prediction(dict(zip(conditions, out.prediction.float().chunk(k))), guidance)

    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    shape = (config.unet.latent_channels, height // config.latent_stride, width // config.latent_stride)
    if noise is None:
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    elif tuple(noise.shape) != (batch, *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, *shape)}")
    noise = noise.to(device)
    return dpmpp_sample(denoise, noise, sampling_scheduler(config.diffusion), steps, generator=generators)
