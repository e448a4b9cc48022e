"""The samplers: the default (DPM++ 3M SDE) is k-diffusion's algorithm to float tolerance, recovers data
whose exact denoiser is known, and gives each batch item a result of its own seed alone.

k-diffusion is the oracle but not a dependency: its package pulls in wandb, kornia, clean-fid and more (and
would move numpy back a major version), while the three modules the comparison needs import only torch,
scipy, torchsde, torchdiffeq, tqdm and torchvision. So the test fetches the release's 34 KB wheel once with
``pip download --no-deps`` into pytest's cache (checked against its sha256) and loads ``sampling.py``,
``external.py`` and ``utils.py`` from it under a private package name, without its ``__init__``.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from model.config import DiffusionConfig, SamplingConfig, tiny
from model.options import SAMPLERS, ColorizeOptions
from model.sampler import BrownianNoise, NoiseSchedule, sample, training_scheduler

V = DiffusionConfig(prediction_type="v_prediction")
EPS = DiffusionConfig(prediction_type="epsilon")
MU, STD = 0.8, 0.5  # the data: every scalar ~ N(MU, STD²)

KD_VERSION = "0.1.1.post1"
KD_WHEEL = f"k_diffusion-{KD_VERSION}-py3-none-any.whl"
KD_WHEEL_SHA256 = "b4bdcc74e35dd66df5d25433ea76b19edeaeaf2aad05ed97438be447cf4f5ee1"
KD_PACKAGE = "_k_diffusion_oracle"

# torchsde rounds a Brownian tree's ends and warns when k-diffusion queries exactly at them
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


def gaussian_prediction(config: DiffusionConfig, perturbation: float = 0.0):
    """``denoise(model_input, timestep)`` of a U-Net that is exact for the Gaussian data: the posterior
    mean of v (or eps) given the VP sample ``x_t = √ᾱ·x0 + √(1-ᾱ)·ε``. Built from the VP definitions alone
    (numpy, float64), not from the sampler's own scalings. A continuous timestep means log σ interpolated
    between the discrete ones, as k-diffusion's ``t_to_sigma``. ``perturbation`` adds a nonlinear term,
    for comparisons where exactness does not matter."""
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    log_sigmas = np.log(np.sqrt((1 - alphas_cumprod) / alphas_cumprod))

    def denoise(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        assert timestep.is_floating_point() and timestep.numel() == 1
        sigma = math.exp(np.interp(float(timestep), np.arange(len(log_sigmas)), log_sigmas))
        alpha, sigma_vp = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        x_t = model_input.double()
        x0 = MU + alpha * STD ** 2 * (x_t - alpha * MU) / (alpha ** 2 * STD ** 2 + sigma_vp ** 2)
        eps = (x_t - alpha * x0) / sigma_vp
        out = alpha * eps - sigma_vp * x0 if config.prediction_type == "v_prediction" else eps
        return (out + perturbation * torch.tanh(2 * x_t + float(timestep) / 500)).float()

    return denoise


def mixing_prediction(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A nonlinear stand-in U-Net that mixes values within an item (never across items)."""
    return torch.tanh(0.8 * model_input + 0.3 * model_input.flip(-1).roll(1, 1) + timestep / 1000)


def relative_errors(samples: torch.Tensor) -> tuple[float, float]:
    return samples.mean().item() / MU - 1, samples.std().item() / STD - 1


def gaussian_noise(batch: int, shape=(1, 64, 64), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the oracle
@pytest.fixture(scope="module")
def k_diffusion(request, tmp_path_factory):
    """k-diffusion's ``sampling`` and ``external`` modules from the released wheel (see the module doc)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(f"k-diffusion-{KD_VERSION}") if cache is not None else tmp_path_factory.mktemp("kd")
    wheel = folder / KD_WHEEL
    if not wheel.exists():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               f"k-diffusion=={KD_VERSION}", "--dest", str(folder)],
                              check=False, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not wheel.exists():
            message = f"could not fetch k-diffusion {KD_VERSION} (the comparison's oracle): {done.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == KD_WHEEL_SHA256, f"{wheel} is not the released wheel"
    source = folder / "src"
    with zipfile.ZipFile(wheel) as archive:
        for name in ("sampling.py", "external.py", "utils.py"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(archive.read(f"k_diffusion/{name}"))
    package = types.ModuleType(KD_PACKAGE)
    package.__path__ = [str(source)]
    sys.modules[KD_PACKAGE] = package
    try:
        yield types.SimpleNamespace(sampling=importlib.import_module(f"{KD_PACKAGE}.sampling"),
                                    external=importlib.import_module(f"{KD_PACKAGE}.external"))
    finally:
        for name in [n for n in sys.modules if n == KD_PACKAGE or n.startswith(KD_PACKAGE + ".")]:
            del sys.modules[name]


def k_diffusion_sample(kd, config: DiffusionConfig, denoise, noise: torch.Tensor, steps: int, seeds: list[int]):
    """The reference's path: CompVis(V)Denoiser around the model, exponential sigmas for steps + 1 with the
    next-to-last dropped, x_T = noise·σ₀, one Brownian tree per item seeded by that item's seed."""

    class CompVisModel:  # what the CompVis wrappers read: the schedule and apply_model
        alphas_cumprod = NoiseSchedule.from_config(config).alphas_cumprod

        def apply_model(self, x, t, cond=None):
            assert t.shape == (x.shape[0],) and torch.all(t == t[0])
            return denoise(x, t[0])

    wrapper_class = kd.external.CompVisVDenoiser if config.prediction_type == "v_prediction" else kd.external.CompVisDenoiser
    model = wrapper_class(CompVisModel())
    sigmas = kd.sampling.get_sigmas_exponential(steps + 1, model.sigma_min, model.sigma_max)
    sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    x = noise * sigmas[0]
    noise_sampler = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    result = kd.sampling.sample_dpmpp_3m_sde(model, x, sigmas, extra_args={"cond": None}, disable=True,
                                             noise_sampler=noise_sampler)
    return result, sigmas


@pytest.mark.parametrize("config", [V, EPS], ids=["v", "eps"])
@pytest.mark.parametrize("steps", [3, 12])
def test_default_sampler_is_k_diffusions_dpmpp_3m_sde(k_diffusion, config, steps):
    seeds = [11, 22, 33]
    noise = gaussian_noise(3, shape=(4, 8, 8), seed=5)
    denoise = gaussian_prediction(config, perturbation=0.3)
    reference, reference_sigmas = k_diffusion_sample(k_diffusion, config, denoise, noise, steps, seeds)
    assert torch.equal(NoiseSchedule.from_config(config).exponential_sigmas(steps), reference_sigmas)
    ours = sample(denoise, noise, config, steps, seeds=seeds)
    assert ours.dtype == torch.float32 and reference.abs().max() > 0.5
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # the comparison can tell: another seed or a step fewer is far off
    assert (sample(denoise, noise, config, steps, seeds=[11, 22, 34]) - reference)[2].abs().max() > 0.01
    assert (sample(denoise, noise, config, steps - 1, seeds=seeds) - reference).abs().max() > 0.01


def test_brownian_noise_is_k_diffusions_per_item_trees(k_diffusion):
    like = torch.zeros(2, 3, 4)
    sigma_min, sigma_max = 0.05, 14.6
    ours = BrownianNoise(like, [7, 8], sigma_min, sigma_max)
    reference = k_diffusion.sampling.BrownianTreeNoiseSampler(like, torch.tensor(sigma_min), torch.tensor(sigma_max),
                                                              seed=[7, 8])
    for sigma, sigma_next in [(14.6, 9.0), (9.0, 2.5), (2.5, 0.05), (3.0, 1.0)]:
        torch.testing.assert_close(ours(sigma, sigma_next), reference(torch.tensor(sigma), torch.tensor(sigma_next)),
                                   atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ the noise levels
def test_noise_levels_are_the_training_schedules():
    schedule = NoiseSchedule.from_config(V)
    torch.testing.assert_close(schedule.alphas_cumprod, training_scheduler(V).alphas_cumprod, rtol=1e-5, atol=0)
    assert schedule.sigma_min == pytest.approx(0.029168, rel=1e-4)
    assert schedule.sigma_max == pytest.approx(14.614643, rel=1e-6)


def test_timesteps_are_continuous_and_interpolate_in_log_sigma():
    schedule = NoiseSchedule.from_config(V)
    sigmas = schedule.sigmas
    for k in (0, 1, 500, 998, 999):
        assert schedule.timestep(sigmas[k]).item() == pytest.approx(k, abs=1e-3)
    halfway = (sigmas[300].log() + sigmas[301].log()).div(2).exp()
    assert schedule.timestep(halfway).item() == pytest.approx(300.5, abs=1e-3)
    assert schedule.timestep(torch.tensor([1e-4, 100.0])).tolist() == [0.0, 999.0]  # clamped at the ends
    levels = torch.tensor([0.05, 0.7, 3.3, 12.0])
    torch.testing.assert_close(schedule.sigma_at(schedule.timestep(levels)), levels, rtol=1e-5, atol=0)


def test_exponential_sigmas_drop_the_next_to_last_level():
    schedule = NoiseSchedule.from_config(V)
    sigmas = schedule.exponential_sigmas(4)
    assert len(sigmas) == 5 and sigmas[-1] == 0 and sigmas[0].item() == pytest.approx(schedule.sigma_max)
    top, bottom = math.log(schedule.sigma_max), math.log(schedule.sigma_min)
    expected = [math.exp(top + i / 4 * (bottom - top)) for i in range(4)]  # 5 levels, the 5th (σ_min) dropped
    assert sigmas[:-1].tolist() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------- data with a known answer
@pytest.mark.parametrize("config", [V, EPS], ids=["v", "eps"])
def test_gaussian_data_is_recovered_and_converges_with_steps(config):
    noise, seeds = gaussian_noise(8), list(range(100, 108))  # 8 items of 4096 scalars
    errors = {steps: relative_errors(sample(gaussian_prediction(config), noise, config, steps, seeds=seeds))
              for steps in (10, 20, 40)}
    std_errors = [abs(errors[steps][1]) for steps in (10, 20, 40)]
    assert std_errors[0] > std_errors[1] > std_errors[2], errors
    assert abs(errors[20][0]) < 0.02 and abs(errors[20][1]) < 0.02, errors
    assert abs(errors[40][0]) < 0.01 and abs(errors[40][1]) < 0.01, errors


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_named_sampler_runs_and_lands_near_the_data(sampler):
    # loose: the deterministic ones start from N(0, σ_max²) rather than the data's marginal (about -3.5 % on
    # the mean here) and Euler ancestral is blurry at 20 steps; a wrong prediction type is off by far more
    for config in (V, EPS):
        samples = sample(gaussian_prediction(config), gaussian_noise(1), config, 20, seeds=[3], sampler=sampler)
        mean_error, std_error = relative_errors(samples)
        assert abs(mean_error) < 0.06 and abs(std_error) < 0.25, (config.prediction_type, mean_error, std_error)


def test_one_step_is_a_plain_denoising():
    noise = gaussian_noise(2, shape=(1, 4, 4))
    schedule = NoiseSchedule.from_config(V)
    expected = schedule.denoiser(mixing_prediction)(noise * schedule.sigma_max, schedule.sigma_max)
    torch.testing.assert_close(sample(mixing_prediction, noise, V, 1, seeds=[1, 2]), expected)


# ------------------------------------------------------------------------------------------- the seeds
@pytest.mark.parametrize("sampler", ["dpmpp_3m_sde", "euler_ancestral"])
def test_an_item_depends_on_its_own_seed_only(sampler):
    noise = gaussian_noise(3, shape=(4, 8, 8), seed=9)
    batch = sample(mixing_prediction, noise, V, 6, seeds=[40, 41, 42], sampler=sampler)
    alone = sample(mixing_prediction, noise[1:2], V, 6, seeds=[41], sampler=sampler)
    other_neighbours = sample(mixing_prediction, noise, V, 6, seeds=[7, 41, 9], sampler=sampler)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(other_neighbours[1], batch[1], atol=1e-6, rtol=0)
    other_seed = sample(mixing_prediction, noise[1:2], V, 6, seeds=[43], sampler=sampler)
    assert (other_seed - alone).abs().max() > 1e-3  # the seed does reach the step noise


def test_seeds_must_match_the_batch():
    with pytest.raises(ValueError, match="one seed per batch item: got 1 seeds for a batch of 2"):
        sample(mixing_prediction, gaussian_noise(2, shape=(1, 2, 2)), V, 4, seeds=[1])


# ----------------------------------------------------------------------------------------- the names
def test_sampler_names_are_checked_and_default_to_the_config():
    assert SAMPLERS[0] == SamplingConfig().sampler == "dpmpp_3m_sde"
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample(mixing_prediction, gaussian_noise(1, shape=(1, 2, 2)), V, 2, seeds=[0], sampler="heun")
    with pytest.raises(ValueError, match="sampler must be one of dpmpp_3m_sde, dpmpp_2m, .*got 'heun'"):
        ColorizeOptions(sampler="heun")
    assert ColorizeOptions().resolved(tiny()).sampler == "dpmpp_3m_sde"
    assert ColorizeOptions(sampler="ddim").resolved(tiny()).sampler == "ddim"
    assert ColorizeOptions(sampler="ddim") != ColorizeOptions()  # the Serve app batches by options


def test_the_http_api_takes_a_sampler_by_name():
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from serve.api import ModelInfo, create_app

    received = []

    class Backend:
        def info(self):
            return ModelInfo.from_config(tiny(), plugin=False)

        async def colorize(self, request):
            received.append(request.options)
            return np.zeros((request.options.size[1], request.options.size[0], 3), np.uint8)

    buffer = io.BytesIO()
    Image.fromarray(np.full((96, 128, 3), 255, np.uint8)).save(buffer, format="PNG")
    files = {"sketch": ("s.png", buffer.getvalue(), "image/png"), "reference": ("r.png", buffer.getvalue(), "image/png")}
    client = TestClient(create_app(Backend()))
    refused = client.post("/v1/colorize", files=files, data={"sampler": "heun", "steps": "2"})
    assert refused.status_code == 422 and "sampler" in refused.json()["error"]
    chosen = client.post("/v1/colorize", files=files, data={"sampler": "ddim", "steps": "2"})
    assert (chosen.status_code, chosen.headers["X-Sampler"], received[-1].sampler) == (200, "ddim", "ddim")
    default = client.post("/v1/colorize", files=files, data={"steps": "2", "format": "json"})
    assert default.json()["parameters"]["sampler"] == received[-1].sampler == "dpmpp_3m_sde"
    assert client.get("/v1/info").json()["samplers"] == list(SAMPLERS)
