"""Sampling from prepared conditions: the loop shared by ``Colorizer.colorize_batch`` and the training
job's sample grids (which start from cached reference tokens, not from images).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.config import ColorizerConfig
from model.guidance import Guidance, guided_prediction
from model.sampler import sample

StopCheck = Callable[[], bool]
"""``should_stop() -> bool``: asked before the first denoising step and after each one; True stops the run."""
StepReport = Callable[[int, int], None]
"""``on_step(done, total)``: told after each denoising step (for progress bars and logs)."""


class Cancelled(Exception):
    """A generation stopped because its ``should_stop`` said so (nobody waits for its result any more).

    ``steps`` is how many denoising steps had run when it stopped."""

    def __init__(self, steps: int):
        super().__init__(f"cancelled after {steps} denoising step(s)")
        self.steps = steps


@torch.no_grad()
def generate_latents(unet, sketch_encoder, config: ColorizerConfig, *, context: torch.Tensor, sketch: torch.Tensor,
                     vector: torch.Tensor, seeds: list[int], steps: int, guidance: Guidance,
                     sketch_strengths: list[float] | None = None, cross_attention_kwargs: dict | None = None,
                     reference_strength: float = 1.0, noise: torch.Tensor | None = None,
                     sampler: str = "dpmpp_3m_sde", should_stop: StopCheck | None = None,
                     on_step: StepReport | None = None) -> torch.Tensor:
    """Clean latents (B, C, h, w) for ``context`` (B, N, D), inverted ``sketch`` (B, S, H, W) and
    ``vector`` (B, 2), sampled with ``sampler`` (a name of :data:`model.options.SAMPLERS`). The sketch
    encoder runs once, not per step, and only the guidance branches the setting needs are evaluated (as
    one batch). ``reference_strength`` scales every cross-attention output (the published model's strength).

    Each item depends on its own seed only. Its initial N(0, 1) noise is drawn from
    ``torch.Generator("cpu").manual_seed(seed)``, unless ``noise`` (B, C, h, w) is given; the SDE's step
    noise is a separate stream of the same seed: for DPM++ 3M SDE the seed is the entropy of the item's
    Brownian tree (:class:`model.sampler.BrownianNoise`, numpy's SeedSequence, not torch's generator), for
    the diffusers samplers a seed derived from it (:func:`model.sampler.step_noise_seed`).

    ``should_stop`` is asked before the first step and after every step (never inside one); when it returns
    True the run ends with :class:`Cancelled`, so a caller that went away costs at most one more step.
    ``on_step(done, total)`` is told after every step."""
    if should_stop is not None and should_stop():
        raise Cancelled(0)
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

    shape = (config.unet.latent_channels, height // config.latent_stride, width // config.latent_stride)
    if noise is None:
        noise = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
                             for seed in seeds])
    elif tuple(noise.shape) != (batch, *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, *shape)}")
    callback = None
    if should_stop is not None or on_step is not None:
        def callback(index: int, latents: torch.Tensor) -> None:
            if on_step is not None:
                on_step(index + 1, steps)
            if should_stop is not None and should_stop():
                raise Cancelled(index + 1)
    return sample(denoise, noise.to(device, torch.float32), config.diffusion, steps, seeds=seeds, sampler=sampler,
                  callback=callback)
