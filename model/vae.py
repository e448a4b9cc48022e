"""The latent autoencoder (diffusers ``AutoencoderKL``, SDXL's VAE at ``sdxl``), frozen.

``encode``/``decode`` include the scaling factor, so the rest of the code only ever sees latents in the
diffusion model's units (unit variance).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from model.config import VAEConfig


def vae_kwargs(cfg: VAEConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        sample_size=1024,
    )


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    return AutoencoderKL(**vae_kwargs(cfg))


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None,
                   sample: bool = False) -> torch.Tensor:
    """(B, 3, H, W) RGB in [-1, 1] → scaled latents (B, C, H/8, W/8). ``sample=False`` takes the mean,
    which is what a latent cache stores (sampling at training time adds nothing the noise doesn't)."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mode()
    return latents * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → (B, 3, H, W) RGB in [-1, 1]."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.clamp(-1, 1)
