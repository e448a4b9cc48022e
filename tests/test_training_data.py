"""Rows → single-bucket batches, the same number per epoch on every worker."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.tensor_cells import tensor_to_bytes
from pipelines.data.batches import (BucketBatcher, check_dataset_for, collate, decode_sample, epoch_batches,
                                   steps_per_epoch)


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


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def stage2_row(width: int, height: int, seed: int) -> dict:
    """A row with the stage-2 columns: soft sketch mask, binary reference mask, a known crop."""
    row = fake_row(width, height, seed)
    g = torch.Generator().manual_seed(seed + 100)
    sketch_mask = np.zeros((height, width), np.uint8)
    sketch_mask[:, : width // 2] = 128  # soft
    reference_mask = np.zeros((height, width), np.uint8)
    reference_mask[: height // 2] = 255
    return row | {
        "background_latents": tensor_to_bytes(torch.randn(4, height // 8, width // 8, generator=g))[0],
        "background_tagger_tokens": tensor_to_bytes(torch.randn(4, 128, generator=g))[0],
        "background_clip_tokens": tensor_to_bytes(torch.randn(17, 48, generator=g))[0],
        "crop": np.array([0.125, 0.0, 0.75, 1.0], np.float32), "sketch_mask": png(sketch_mask),
        "reference_mask": png(reference_mask)}


def test_stage2_rows_decode_into_every_plugin_field():
    rows = [stage2_row(96, 160, seed) for seed in range(3)]
    batch = collate([decode_sample(row, random.Random(0), 7.0, stage="plugin") for row in rows])
    assert batch.background_latents.shape == batch.latents.shape == (3, 4, 20, 12)
    assert batch.background_tagger_tokens.shape == batch.tagger_tokens.shape == (3, 4, 128)
    assert batch.background_clip_tokens.shape == batch.clip_tokens.shape == (3, 17, 48)
    torch.testing.assert_close(batch.crop, torch.tensor([[0.125, 0.0, 0.75, 1.0]] * 3))
    assert batch.sketch_mask.shape == batch.reference_mask.shape == (3, 1, 160, 96)
    assert batch.sketch_mask.unique().tolist() == pytest.approx([0.0, 128 / 255])  # soft values stay soft
    assert batch.reference_mask[:, :, :80].eq(1).all() and batch.reference_mask[:, :, 80:].eq(0).all()

    no_background = rows[0] | {"background_latents": None}
    with pytest.raises(ValueError, match="--latent-views target,background"):
        decode_sample(no_background, random.Random(0), 7.0, stage="plugin")
    assert decode_sample(no_background, random.Random(0), 7.0)["latents"].shape == (4, 20, 12)  # stage 1 is fine


def test_a_dataset_without_the_background_view_is_refused_for_stage_two():
    check_dataset_for("plugin", {"config": {"latent_views": ["target", "background"]}}, "d")
    check_dataset_for("backbone", {"config": {"latent_views": ["target"]}}, "d")
    with pytest.raises(ValueError, match="d was preprocessed with --latent-views target;.*target,background"):
        check_dataset_for("plugin", {"config": {"latent_views": ["target"]}}, "d")
