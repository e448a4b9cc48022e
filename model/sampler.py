"""Noise schedules and the DPM++ sampling loop.

Training and sampling share one schedule (1000 scaled-linear betas, v-prediction), built from
:class:`DiffusionConfig` into diffusers schedulers: ``DDPMScheduler`` supplies ``add_noise`` and
``get_velocity`` for the objective, ``DPMSolverMultistepScheduler`` (third-order SDE variant with Karras
sigmas, the reference default "DPM++ 3M SDE") drives inference. The loop is a plain function over a
``denoise(latents, timestep) -> prediction`` callable, so guidance and the model never meet the solver.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from model.config import DiffusionConfig


def _schedule_kwargs(cfg: DiffusionConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type,
    )


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(**_schedule_kwargs(cfg))


def sampling_scheduler(cfg: DiffusionConfig, solver_order: int = 3, stochastic: bool = True) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        **_schedule_kwargs(cfg),
        algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++",
        solver_order=solver_order,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )


def dpmpp_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    scheduler: DPMSolverMultistepScheduler,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from pure ``noise`` (B, C, h, w) to clean latents in ``steps`` solver steps.

    ``generator`` drives the SDE's fresh noise, so a seed fixes the whole trajectory.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        prediction = denoise(model_input, timestep)
        latents = scheduler.step(prediction, timestep, latents, generator=generator).prev_sample
        if callback is not None:
            callback(index, latents)
    return latents
