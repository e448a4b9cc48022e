"""The vector condition (SDXL's add-embedding slot): √(H·W) of the crop's source image and an aesthetic
score. The U-Net embeds each value with a sinusoid (``UNetConfig.vector_embed_dim`` wide); no pooled
CLIP vector is involved, since the colorizer has no text encoder.
"""

from __future__ import annotations

import torch


def vector_condition(source_height, source_width, aesthetic_score, batch: int | None = None,
                     device=None) -> torch.Tensor:
    """(B, 2) float tensor of [√(H·W), score]; scalars broadcast to ``batch`` rows."""
    height = torch.as_tensor(source_height, dtype=torch.float32, device=device)
    width = torch.as_tensor(source_width, dtype=torch.float32, device=device)
    score = torch.as_tensor(aesthetic_score, dtype=torch.float32, device=device)
    size = torch.sqrt(height * width)
    size, score = torch.broadcast_tensors(size.reshape(-1), score.reshape(-1))
    values = torch.stack([size, score], dim=-1)
    if batch is not None and values.shape[0] != batch:
        if values.shape[0] != 1:
            raise ValueError(f"vector condition has {values.shape[0]} rows for a batch of {batch}")
        values = values.expand(batch, 2)
    return values.contiguous()
