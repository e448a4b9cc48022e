"""Rows → single-bucket batches, the same number per epoch on every worker."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.tensor_cells import tensor_to_bytes
from pipelines.data.batches import BucketBatcher, epoch_batches, steps_per_epoch


def fake_row(width: int, height: int, seed: int) -> dict:
    """A row shaped like the preprocess output (tiny sizes)."""
    g = torch.Generator().manual_seed(seed)
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width), seed % 255, np.uint8)).save(buffer, format="PNG")
    latents, latents_shape = tensor_to_bytes(torch.randn(4, height // 8, width // 8, generator=g))
    tagger, tagger_shape = tensor_to_bytes(torch.randn(4, 128, generator=g))
    clip, clip_shape = tensor_to_bytes(torch.randn(17, 48, generator=g))
    return {"width": width, "height": height, "source_width": 2 * width, "source_height": 2 * height,
            "sketches": [buffer.getvalue()] * 4, "latents": latents, "latents_shape": latents_shape,
            "tagger_tokens": tagger, "tagger_tokens_shape": tagger_shape, "clip_tokens": clip,
            "clip_tokens_shape": clip_shape, "tensor_dtype": "float16"}


def test_every_epoch_gives_exactly_the_promised_single_bucket_batches():
    sizes = [(96, 160), (128, 128), (160, 96)]
    rows = [fake_row(*sizes[i % 3 if i < 9 else 1], seed=i) for i in range(16)]  # uneven bucket mix
    steps = steps_per_epoch(rows_per_worker=16, buckets=3, batch_size=3)
    assert steps == (16 - 3 * 2) // 3 == 3
    batcher, rng = BucketBatcher(3), random.Random(0)
    for epoch in range(3):
        batches = list(epoch_batches(iter(rows), batcher, steps, rng=rng, aesthetic_score=7.0))
        assert len(batches) == steps
        for batch in batches:
            assert batch.latents.shape[0] == 3 and batch.sketch.shape[0] == 3
            assert batch.sketch.shape[-2:] == (batch.latents.shape[-2] * 8, batch.latents.shape[-1] * 8)
            assert batch.vector_condition[0, 0].item() == pytest.approx(2 * (batch.sketch.shape[-1] * batch.sketch.shape[-2]) ** 0.5)
    # rows left over at each epoch's end wait in the buffers instead of being lost
    assert sum(len(v) for v in batcher.pending.values()) == 3 * 16 - 3 * steps * 3


def test_too_little_data_for_the_batch_size_is_refused():
    with pytest.raises(ValueError, match="lower the batch size"):
        steps_per_epoch(rows_per_worker=5, buckets=3, batch_size=4)
