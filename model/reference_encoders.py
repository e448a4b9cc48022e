"""Frozen reference encoders: WD-Tagger (timm SwinV2) and the OpenCLIP ViT image tower.

Both return token features, not pooled vectors: the projector fuses them into the cross-attention
context. Both take RGB images in [0, 1] of any size and aspect and prepare them as the published
ColorizeDiffusionXL model was trained to see them: the whole reference is stretched to the encoder's
square input (bicubic, ``align_corners=True``, antialiased), with no padding or crop. The tagger then
gets BGR in [-1, 1] (the WD tagger's own convention), CLIP its mean/std-normalized RGB. Their outputs for
a corpus are what the preprocess job caches.
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


Images = torch.Tensor | list[torch.Tensor]  # a batch (B, 3, H, W), or (1, 3, H_i, W_i) images of any sizes


def stretch_to_square(images: Images, size: int) -> torch.Tensor:
    """(B, 3, H, W), or a list of (1, 3, H_i, W_i) → (B, 3, size, size), each image stretched (aspect not
    kept) with antialiased bicubic and ``align_corners=True``, in float32 (bf16 lacks antialiased bicubic
    on CPU). Not clamped: the published encoders saw the overshoot of the bicubic kernel too. Images of
    different sizes are resized one by one, so batching never changes an image's result."""
    if isinstance(images, torch.Tensor):
        images = [images]
    return torch.cat([F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=True, antialias=True)
                      for x in images])


def _dtype_of(images: Images) -> torch.dtype:
    return (images if isinstance(images, torch.Tensor) else images[0]).dtype


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

    def prepare(self, images: Images) -> torch.Tensor:
        """RGB in [0, 1] → the tagger's input: BGR in [-1, 1] at its square size."""
        square = stretch_to_square(images, self.cfg.image_size) * 2 - 1
        return square.flip(1).to(_dtype_of(images))

    def forward(self, images: Images) -> TaggerOutput:
        """``images``: (B, 3, H, W) RGB in [0, 1], or a list of single images of any sizes."""
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

    def prepare(self, images: Images) -> torch.Tensor:
        """RGB in [0, 1] → CLIP's input: mean/std-normalized RGB at its square size."""
        square = stretch_to_square(images, self.cfg.image_size)
        mean = square.new_tensor(CLIP_MEAN).view(1, -1, 1, 1)
        std = square.new_tensor(CLIP_STD).view(1, -1, 1, 1)
        return ((square - mean) / std).to(_dtype_of(images))

    def forward(self, images: Images) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] (or a list of single images of any sizes) → (B, 1 + grid², embed_dim);
        token 0 is the class token."""
        visual = self.visual
        x = visual._embeds(self.prepare(images))
        x = visual.transformer(x)
        return visual.ln_post(x) @ visual.proj


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
