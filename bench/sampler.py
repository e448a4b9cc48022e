"""Sampler accuracy on data whose exact denoiser is known, printed as JSON lines (no Ray, no model).

    python bench/sampler.py                       # v-prediction, 10/20/40 steps, 16 items of 64×64 scalars
    python bench/sampler.py --prediction epsilon --steps 10 20 40 80 --items 32

The data: every scalar ~ N(mu, std²) independently, so the exact denoiser is known in closed form and a
perfect sampler returns samples with that mean and std. The "U-Net" here is that exact posterior mean,
expressed as the v (or eps) prediction the sampling contract asks for. Each line is one (sampler, steps):
``mean_error`` and ``std_error`` are the samples' mean and std relative to the truth (signed: -0.05 is 5 %
low), with ``monte_carlo`` the sampling noise of those two figures at this sample count.

Samplers compared: ``dpmpp_3m_sde`` (ours, the published model's k-diffusion DPM++ 3M SDE) against
``diffusers_sde_dpmpp_3`` (diffusers' DPMSolverMultistepScheduler, ``sde-dpmsolver++``, order 3, Karras
sigmas: the sampler this project used before, whose second-difference weight tends to -1 instead of 0,
see :func:`model.sampler.dpmpp_3m_sde`). Both start from the same N(0, 1) noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import DPMSolverMultistepScheduler

from model.config import DiffusionConfig
from model.sampler import NoiseSchedule, diffusers_scheduler, sample, scheduler_sample

OLD = "diffusers_sde_dpmpp_3"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def gaussian_prediction(config: DiffusionConfig, mu: float, std: float):
    """``denoise(model_input, timestep)``: the exact v or eps for N(mu, std²) data at the VP input."""
    schedule = NoiseSchedule.from_config(config)

    def denoise(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = float(schedule.sigma_at(timestep.reshape(-1)[:1].float().cpu()))
        alpha, sigma_vp = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        x_t = model_input.double()
        x0 = mu + alpha * std ** 2 * (x_t - alpha * mu) / (alpha ** 2 * std ** 2 + sigma_vp ** 2)
        eps = (x_t - alpha * x0) / sigma_vp
        return (alpha * eps - sigma_vp * x0 if config.prediction_type == "v_prediction" else eps).float()

    return denoise


def old_scheduler(config: DiffusionConfig) -> DPMSolverMultistepScheduler:
    """The sampler of git history before the switch: diffusers' third-order SDE DPM-Solver++ on Karras sigmas."""
    base = diffusers_scheduler("dpmpp_2m", config)  # the same training schedule
    return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="sde-dpmsolver++", solver_order=3,
                                                   use_karras_sigmas=True, final_sigmas_type="zero")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--items", type=int, default=16, help="batch items (one seed each)")
    parser.add_argument("--side", type=int, default=64, help="each item is side × side scalars")
    parser.add_argument("--mu", type=float, default=0.8)
    parser.add_argument("--std", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = DiffusionConfig(prediction_type=args.prediction)
    denoise = gaussian_prediction(config, args.mu, args.std)
    noise = torch.randn(args.items, 1, args.side, args.side, generator=torch.Generator().manual_seed(args.seed))
    seeds = [args.seed * 1000 + i for i in range(args.items)]
    count = noise.numel()
    monte_carlo = {"mean": args.std / math.sqrt(count) / abs(args.mu), "std": 1 / math.sqrt(2 * count)}
    for sampler in ("dpmpp_3m_sde", OLD):
        for steps in args.steps:
            start = time.perf_counter()
            if sampler == OLD:
                samples = scheduler_sample(denoise, noise, old_scheduler(config), steps, seeds=seeds)
            else:
                samples = sample(denoise, noise, config, steps, seeds=seeds, sampler=sampler)
            seconds = time.perf_counter() - start
            emit({"bench": "sampler_gaussian", "sampler": sampler, "prediction": args.prediction, "steps": steps,
                  "mean_error": round(samples.mean().item() / args.mu - 1, 5),
                  "std_error": round(samples.std().item() / args.std - 1, 5),
                  "monte_carlo": {k: round(v, 5) for k, v in monte_carlo.items()},
                  "scalars": count, "seconds": round(seconds, 3)})


if __name__ == "__main__":
    main()
