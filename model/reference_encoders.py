"""Frozen reference encoders: WD-Tagger (timm SwinV2) and the OpenCLIP ViT image tower.

Both return token features, not pooled vectors: the projector fuses them into the cross-attention
context. Both take RGB images in [0, 1] of any size and aspect: a reference is padded to a square with
white (illustrations sit on white; a crop would drop part of the reference) and resized to the
encoder's input size. Their outputs for a corpus are what the preprocess job caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from model.config import ClipVisionConfig, TaggerConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_to_square(images: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W) → (B, 3, S, S), S = max(H, W), the image centered on ``fill``."""
    height, width = images.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return F.pad(images, (left, side - width - left, top, side - height - top), value=fill)


def square_resize(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    dtype = images.dtype
    images = pad_to_square(images.float())  # resampled in float32: bf16 lacks antialiased bicubic on CPU
    images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = images.new_tensor(mean).view(1, -1, 1, 1)
    std = images.new_tensor(std).view(1, -1, 1, 1)
    return ((images.clamp(0, 1) - mean) / std).to(dtype)


@dataclass
class TaggerOutput:
    tokens: torch.Tensor  # (B, N, C): final-stage tokens after the last norm, unpooled
    logits: torch.Tensor  # (B, num_tags): multi-label tag logits (sigmoid → probabilities)


class WDTagger(nn.Module):
    """WD-Tagger (SwinV2) with the published architecture's numbers taken from :class:`TaggerConfig`."""

    def __init__(self, cfg: TaggerConfig, tags: list[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = SwinTransformerV2(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            window_size=cfg.window_size,
            embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths),
            num_heads=tuple(cfg.num_heads),
            num_classes=cfg.num_tags,
            drop_path_rate=0.0,
        )
        self.tags = list(tags) if tags is not None else [f"tag_{i}" for i in range(cfg.num_tags)]
        if len(self.tags) != cfg.num_tags:
            raise ValueError(f"{len(self.tags)} tag names for a tagger with {cfg.num_tags} outputs")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return square_resize(images, self.cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward(self, images: torch.Tensor) -> TaggerOutput:
        """``images``: (B, 3, H, W) RGB in [0, 1]."""
        features = self.model.forward_features(self.prepare(images))  # (B, h, w, C), normed
        logits = self.model.forward_head(features)
        return TaggerOutput(tokens=features.flatten(1, 2), logits=logits)


class ClipImageEncoder(nn.Module):
    """OpenCLIP ViT image tower returning all tokens after the final norm and the output projection."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            layers=cfg.layers,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=cfg.embed_dim,
        )

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return square_resize(images, self.cfg.image_size, CLIP_MEAN, CLIP_STD)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] → (B, 1 + grid², embed_dim); token 0 is the class token."""
        visual = self.visual
        x = visual._embeds(self.prepare(images))
        x = visual.transformer(x)
        return visual.ln_post(x) @ visual.proj


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
