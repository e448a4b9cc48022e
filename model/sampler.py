"""Noise schedules and the sampling loops.

Training and sampling share one schedule (1000 scaled-linear betas, v- or eps-prediction, from
:class:`DiffusionConfig`). Training uses diffusers' ``DDPMScheduler`` (``add_noise``, ``get_velocity``).

Inference defaults to the published model's sampler: k-diffusion's DPM++ 3M SDE, as the authors' code runs
it (``refnet/sampling`` of ColorizeDiffusionXL), re-implemented here from its definition:

- noise levels: the discrete schedule seen as sigmas ``σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)``; the steps are
  ``steps + 1`` levels spaced evenly in log σ from the schedule's σ_max to its σ_min, with the next-to-last
  one dropped, then 0 (so the last noisy level sits one step above σ_min and the final step denoises);
- the model is asked through k-diffusion's CompVis wrapping: input ``x · c_in`` with
  ``c_in = 1 / sqrt(σ² + 1)`` (the VP sample the U-Net was trained on), a *continuous* timestep (σ located
  between the discrete sigmas by linear interpolation in log σ), and the denoised estimate
  ``x · c_skip + prediction · c_out`` (v: ``c_skip = 1 / (σ² + 1)``, ``c_out = -σ / sqrt(σ² + 1)``;
  eps: ``c_skip = 1``, ``c_out = -σ``);
- the solver: DPM-Solver++(3M) SDE with η = 1 and unit noise scale (see :func:`dpmpp_3m_sde`), its fresh
  noise the increments of a Brownian motion over σ, one ``torchsde.BrownianTree`` per batch item with that
  item's seed, so an item's result does not depend on its batch neighbours (the reference's
  "deterministic" mode);
- the initial sample: ``N(0, 1)`` noise times the first sigma.

The other samplers are diffusers schedulers, selectable by name (:data:`model.options.SAMPLERS`). Every loop
works on a ``denoise(model_input, timestep) -> prediction`` callable: ``model_input`` already scaled for the
U-Net, ``timestep`` a float tensor, the prediction the U-Net's raw v or eps; guidance and the model never
meet the solver. Guidance combines raw predictions linearly; since ``c_skip`` and ``c_out`` are one number
per step, that is the same as the reference's combining of denoised estimates.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchsde
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from model.config import DiffusionConfig
from model.options import SAMPLERS

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoise(model_input, timestep) -> prediction``: the U-Net (with guidance) as the samplers see it."""
Callback = Callable[[int, torch.Tensor], None]
"""``callback(step_index, latents)``, called after each step."""


def _schedule_kwargs(cfg: DiffusionConfig) -> dict:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": "scaled_linear",
        "prediction_type": cfg.prediction_type,
    }


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(**_schedule_kwargs(cfg))


# ------------------------------------------------------------------------------------ the noise levels
@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The training schedule as k-diffusion sees a CompVis model: one sigma per discrete timestep.

    ``alphas_cumprod`` is computed as the CompVis/SGM code of the published model does (betas in float64,
    ``ᾱ`` stored as float32), and the sigmas from it in float32, so the noise levels, and the Brownian
    trees spanned over them, are the reference's to the bit.
    """

    alphas_cumprod: torch.Tensor  # (T,) float32, decreasing
    prediction_type: str  # "v_prediction" or "epsilon"

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        if cfg.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {cfg.prediction_type!r}")
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                               dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0).float(), cfg.prediction_type)

    @property
    def sigmas(self) -> torch.Tensor:
        """(T,) float32, increasing with the timestep."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep of each ``sigma``: its place between the two discrete sigmas around it,
        linear in log σ (clamped to [0, T - 1])."""
        log_sigmas = self.sigmas.to(sigma.device).log()
        log_sigma = sigma.float().log()
        below = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True).reshape(sigma.shape)
        low = (below - 1).clamp(0, len(log_sigmas) - 2)
        low_log, high_log = log_sigmas[low], log_sigmas[low + 1]
        fraction = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return (1 - fraction) * low + fraction * (low + 1)

    def sigma_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`timestep`: σ of a continuous timestep (log σ interpolated linearly)."""
        log_sigmas = self.sigmas.to(timestep.device).log()
        t = timestep.float()
        fraction = t.frac()
        log_sigma = (1 - fraction) * log_sigmas[t.floor().long()] + fraction * log_sigmas[t.ceil().long()]
        return log_sigma.exp()

    def exponential_sigmas(self, steps: int) -> torch.Tensor:
        """(steps + 1,) noise levels, ending with 0: ``steps + 1`` levels evenly spaced in log σ from σ_max
        to σ_min with the next-to-last dropped (the reference's DPM++ 3M SDE schedule)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        levels = torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), steps + 1,
                                dtype=torch.float32).exp()
        return torch.cat([levels[:-1], levels.new_zeros(1)])

    def denoiser(self, denoise: Denoise) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """``denoised(x, sigma)``: the estimate of the clean sample from ``x = x0 + σ·n`` (k-diffusion's
        variance-exploding view), asking ``denoise`` at the VP input ``x·c_in`` and the continuous timestep."""
        v_prediction = self.prediction_type == "v_prediction"

        def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
            sigma_tensor = torch.tensor(sigma, dtype=torch.float32)
            timestep = self.timestep(sigma_tensor).to(x.device)
            scale = 1.0 / math.sqrt(sigma * sigma + 1.0)  # c_in
            prediction = denoise(x * scale, timestep).float()
            if v_prediction:  # c_skip = c_in², c_out = -σ·c_in
                return x * (scale * scale) - prediction * (sigma * scale)
            return x - prediction * sigma  # eps: c_skip = 1, c_out = -σ

        return denoised


# ----------------------------------------------------------------------------------------- the noise
class BrownianNoise:
    """The SDE's fresh noise, one Brownian motion over σ per batch item, each from its own seed.

    ``noise(sigma, sigma_next)`` is the increment of the item's Brownian motion from ``sigma`` to
    ``sigma_next`` divided by ``sqrt(|sigma - sigma_next|)``: standard normal, independent across disjoint
    steps. A ``torchsde.BrownianTree`` answers any interval the same way whatever was asked before, so the
    noise of a step is fixed by the seed and the step's two levels, not by the batch, the step count or the
    order of queries (the per-item trees of k-diffusion's ``BrownianTreeNoiseSampler``, seeded the same
    way: the seed is the tree's entropy). The trees draw on the sample's device; the same seed gives other
    numbers on CPU and CUDA.
    """

    def __init__(self, like: torch.Tensor, seeds: Sequence[int], sigma_min: float, sigma_max: float):
        if len(seeds) != like.shape[0]:
            raise ValueError(f"one seed per batch item: got {len(seeds)} seeds for a batch of {like.shape[0]}")
        if not sigma_min < sigma_max:
            raise ValueError(f"the noise needs sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        start = torch.zeros_like(like[0])
        self._trees = [torchsde.BrownianTree(sigma_min, start, sigma_max, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        low, high = min(sigma, sigma_next), max(sigma, sigma_next)
        direction = 1.0 if sigma_next > sigma else -1.0
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its tolerance, so a query at σ_min or σ_max lands a hair
            # outside, is clamped back (as in k-diffusion) and warns each time: expected, not news.
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            increments = torch.stack([tree(low, high) for tree in self._trees])
        return increments * (direction / math.sqrt(high - low))


# ------------------------------------------------------------------------------------- DPM++ 3M SDE
def dpmpp_3m_sde(denoised: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                 noise: Callable[[float, float], torch.Tensor], callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (η = 1, unit noise), from ``x`` at ``sigmas[0]`` down the levels ``sigmas``.

    In λ = -log σ, with ``x = x0 + σ·n`` and η = 1, one step of length ``h = λ_next - λ`` solves exactly

        x_next = e^(-2h)·x + ∫₀ʰ 2·e^(-2(h-u))·D(λ + u) du + σ_next·sqrt(1 - e^(-2h))·z

    where D is the denoised estimate along the path. The integral is taken with D extrapolated as a
    polynomial in λ through the last one, two or three estimates (first steps: lower order). With
    H = 2h, ``φ₂ = 1 - (1 - e^(-H))/H`` and the history's ratios ``r = h_prev / h``:

        x_next = e^(-H)·x + (1 - e^(-H))·D + φ₂·d₁ + w₂·d₂ + noise,   w₂ = 1/2 - φ₂/H

    ``d₁`` estimates h·D' at the current point (from the last three estimates: the newest difference plus
    its curvature correction) and ``d₂`` the second divided difference times h² (≈ h²·D''/2).

    Why this weight of d₂ and not diffusers' (0.42, ``sde-dpmsolver++`` order 3): written alike,
    ``w₂ = (1 - e^(-H) - H)/H² + 1/2``, which tends to ``H/6`` as h → 0, so the correction vanishes with
    the step as a higher-order term must. Diffusers weights d₂ by ``(1 - e^(-H) - H)/H² - 1/2``, which
    tends to -1: each step then adds about ``-h²·D''/2``, an O(h²) local error, and the solver is only
    first order (its own ODE variant, like k-diffusion, uses +1/2). ``bench/sampler.py`` measures both on
    data with a known exact denoiser.

    Strictly, the Taylor-exact weight of this d₂ is ``2·w₂`` (∫₀ʰ 2e^(-2(h-u))·u²/2 du = 2·w₂·h²/2): the
    weight used here, k-diffusion's, which is also DPM-Solver's multistep third-order ODE weight, is half of
    it, so the quadratic term is under-weighted and the local error is O(h³) (global second order) rather
    than O(h⁴). We keep it: it is the sampler the published model was made and judged with, and the
    reference comparison in ``tests/test_sampler.py`` holds us to it.

    ``noise(sigma, sigma_next)`` gives the step's standard-normal noise (:class:`BrownianNoise`); a step to
    σ = 0 is the plain denoised estimate.
    """
    history: list[tuple[torch.Tensor, float]] = []  # (denoised, h) of the previous steps, newest first
    levels = [float(s) for s in sigmas]
    for index in range(len(levels) - 1):
        sigma, sigma_next = levels[index], levels[index + 1]
        estimate = denoised(x, sigma)
        if sigma_next == 0:
            x = estimate
        else:
            h = math.log(sigma) - math.log(sigma_next)
            big_h = 2.0 * h  # η = 1: the SDE decays twice as fast as the ODE
            decay = math.exp(-big_h)
            phi_2 = 1.0 + math.expm1(-big_h) / big_h
            x = decay * x + (1.0 - decay) * estimate
            if len(history) >= 2:
                (previous, h_1), (older, h_2) = history[0], history[1]
                r0, r1 = h_1 / h, h_2 / h
                slope_new = (estimate - previous) / r0
                slope_old = (previous - older) / r1
                curvature = (slope_new - slope_old) / (r0 + r1)  # d₂
                slope = slope_new + curvature * r0  # d₁
                x = x + phi_2 * slope + (0.5 - phi_2 / big_h) * curvature
            elif history:
                previous, h_1 = history[0]
                x = x + phi_2 * (estimate - previous) * (h / h_1)
            x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-big_h)))
            history = [(estimate, h)] + history[:1]
        if callback is not None:
            callback(index, x)
    return x


# ------------------------------------------------------------------------------- diffusers schedulers
def diffusers_scheduler(name: str, cfg: DiffusionConfig) -> SchedulerMixin:
    """The diffusers scheduler behind a sampler name other than "dpmpp_3m_sde", on the training schedule."""
    kwargs = _schedule_kwargs(cfg)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2,
                                           use_karras_sigmas=True, final_sigmas_type="zero")
    if name == "euler":
        return EulerDiscreteScheduler(**kwargs)
    if name == "euler_ancestral":
        return EulerAncestralDiscreteScheduler(**kwargs)
    if name == "ddim":  # "trailing" starts at the last timestep; latents are not clipped
        return DDIMScheduler(**kwargs, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    if name == "unipc":
        return UniPCMultistepScheduler(**kwargs)
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def step_noise_seed(seed: int) -> int:
    """The seed of an item's step noise in the diffusers samplers: a stream of its own, derived from the
    item's seed, so it never repeats the initial noise that ``torch.Generator(seed)`` drew."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(1,)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def scheduler_sample(denoise: Denoise, noise: torch.Tensor, scheduler: SchedulerMixin, steps: int, *,
                     seeds: Sequence[int], callback: Callback | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (B, C, h, w; N(0, 1)) with a diffusers scheduler in ``steps`` steps.

    A stochastic scheduler draws each item's step noise from its own generator
    (:func:`step_noise_seed`), so here too an item does not depend on its neighbours."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if len(seeds) != noise.shape[0]:
        raise ValueError(f"one seed per batch item: got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    scheduler.set_timesteps(steps, device=noise.device)
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = [torch.Generator("cpu").manual_seed(step_noise_seed(s)) for s in seeds]
    latents = noise.float() * scheduler.init_noise_sigma
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        prediction = denoise(model_input, timestep.float()).float()
        latents = scheduler.step(prediction, timestep, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(index, latents)
    return latents


# ------------------------------------------------------------------------------------------ the entry
def sample(denoise: Denoise, noise: torch.Tensor, config: DiffusionConfig, steps: int, *, seeds: Sequence[int],
           sampler: str = "dpmpp_3m_sde", callback: Callback | None = None) -> torch.Tensor:
    """Clean latents (B, C, h, w) from ``noise`` (B, C, h, w; N(0, 1)) in ``steps`` model evaluations.

    ``sampler`` is one of :data:`model.options.SAMPLERS`: ``"dpmpp_3m_sde"`` (the published model's, see the
    module docstring) or a diffusers scheduler. ``seeds`` (one per item) fix the SDE's noise: the item's
    Brownian tree for DPM++ 3M SDE, a generator per item for the stochastic diffusers samplers. The
    result is float32 on ``noise``'s device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if len(seeds) != noise.shape[0]:
        raise ValueError(f"one seed per batch item: got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    if sampler != "dpmpp_3m_sde":
        return scheduler_sample(denoise, noise, diffusers_scheduler(sampler, config), steps, seeds=seeds, callback=callback)
    schedule = NoiseSchedule.from_config(config)
    sigmas = schedule.exponential_sigmas(steps)
    x = noise.float() * float(sigmas[0])
    positive = sigmas[sigmas > 0]
    if len(positive) > 1:  # one step is a plain denoising, with no noise to draw
        brownian = BrownianNoise(x, seeds, float(positive.min()), float(positive.max()))
    else:
        def brownian(sigma: float, sigma_next: float) -> torch.Tensor:
            raise AssertionError("a single-step schedule draws no noise")
    return dpmpp_3m_sde(schedule.denoiser(denoise), x, sigmas, brownian, callback)
