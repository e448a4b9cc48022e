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


# ------------------------------------------------------------------ the row stream and its position
def write_shards(folder, sizes: list[int]) -> None:
    """Shard files shaped like the dataset's data/ (only the position columns and a payload)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard, size in enumerate(sizes):
        pq.write_table(pa.table({"shard": [shard] * size, "ordinal": list(range(size)),
                                 "payload": [f"{shard}/{i}" for i in range(size)]}), folder / f"{shard}.parquet")


def parquet_reader(folder):
    """``read(shards)`` with pyarrow, in the given order, as Ray Data's reader with ``preserve_order``."""
    import pyarrow.parquet as pq

    def read(shards, epoch=0):
        for shard in shards:
            yield from pq.read_table(folder / f"{shard}.parquet").to_pylist()

    return read


def test_every_epoch_reads_the_files_in_a_new_order_drawn_from_the_seed():
    from pipelines.training.data_stream import epoch_order

    orders = [epoch_order(40, seed=0, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3 and orders[0] != list(range(40))  # not the sorted order
    assert epoch_order(40, seed=0, epoch=1) == orders[1] and epoch_order(40, seed=1, epoch=1) != orders[1]


def test_a_resume_continues_the_epoch_with_rows_not_seen_yet_at_another_worker_count(tmp_path):
    """Two workers take some rows each, the run stops (rows in the shuffle buffers are lost with it), the
    positions are merged as the checkpoint does; three workers then finish the epoch: every row of the
    epoch is seen exactly once over both runs, and the next epoch starts complete."""
    from pipelines.training.data_stream import DataPosition, DataStream

    sizes = [7, 0, 5, 9, 6, 8, 3, 7]  # uneven, with an empty shard
    write_shards(tmp_path, sizes)
    read, everything = parquet_reader(tmp_path), {(s, o) for s, n in enumerate(sizes) for o in range(n)}

    def stream(rank, world, position=None):
        return DataStream(read, shards=len(sizes), seed=3, rank=rank, world=world, position=position, shuffle_buffer=4)

    first = [stream(rank, 2) for rank in range(2)]
    rows = [iter(s.epoch_rows(0)) for s in first]
    before = [(r["shard"], r["ordinal"]) for k in (10, 13) for r in [next(rows[k % 2]) for _ in range(k)]]
    assert len(before) == len(set(before)) == 23
    state = DataPosition.merge([s.position for s in first], len(sizes)).to_state()  # what the checkpoint holds

    position = DataPosition.from_state(state)
    assert position.epoch == 0 and position.progress(0).done  # some files were read to their end
    second = [stream(rank, 3, DataPosition.from_state(state)) for rank in range(3)]
    after = [(r["shard"], r["ordinal"]) for s in second for r in s.epoch_rows(0)]
    assert len(after) == len(set(after)) and not set(after) & set(before)  # nothing replayed
    assert set(before) | set(after) == everything  # nothing lost

    merged = DataPosition.merge([s.position for s in second], len(sizes))
    assert merged.epoch == 1 and merged.epochs == {}  # the epoch is finished; the next one is whole
    assert sorted(r["payload"] for s in second for r in s.epoch_rows(1)) == sorted(
        f"{s}/{o}" for s, o in everything)


def test_a_reader_that_breaks_the_file_order_is_refused(tmp_path):
    from pipelines.training.data_stream import DataStream

    write_shards(tmp_path, [2, 2, 2])
    read = parquet_reader(tmp_path)
    stream = DataStream(lambda shards, epoch: read(list(reversed(shards))), shards=3, seed=0)
    with pytest.raises(RuntimeError, match="out of the reading order"):
        list(stream.epoch_rows(0))
    with pytest.raises(ValueError, match="3 shard files cannot feed 4 workers"):
        DataStream(read, shards=3, seed=0, rank=0, world=4)


# ------------------------------------------------------------------ decoding inside Ray Data
@pytest.mark.slow
def test_ray_data_decodes_the_rows_into_the_numbers_the_training_thread_decoded(tiny_dataset):
    """The reader with the decode stage (Ray Data ``map_batches``, prefetching) hands out ready tensors
    equal to :func:`decode_sample` on the stored rows (read here with pyarrow) with the same sketch draw,
    in the reading order, with the position columns kept. Stage 2's fields include stage 1's."""
    import pyarrow.parquet as pq
    import ray

    from pipelines.data.batches import DecodeSettings, columns_for, decoded_sample, sketch_variant
    from pipelines.training.data_stream import ray_data_reader, shard_path

    dataset = str(tiny_dataset / "dataset")
    stored = [row for shard in (1, 0) for row in pq.read_table(shard_path(dataset, shard)).to_pylist()]
    settings = DecodeSettings(stage="plugin", aesthetic_score=6.5, seed=7)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        decoded = list(ray_data_reader(dataset, columns_for("plugin"), decode=settings, prefetch_batches=2)([1, 0], 3))
    finally:
        ray.shutdown()
    assert [(r["shard"], r["ordinal"]) for r in decoded] == [(r["shard"], r["ordinal"]) for r in stored]
    assert len(decoded) == 24
    variants = set()
    for row, ready in zip(stored, decoded):
        index = sketch_variant(7, 3, row["shard"], row["ordinal"], len(row["sketches"]))
        variants.add(index)
        expected = decode_sample(row, None, 6.5, "plugin", sketch_index=index)
        sample = decoded_sample(ready)
        assert sample.keys() == expected.keys() and sample["bucket"] == expected["bucket"]
        for key in expected.keys() - {"bucket"}:
            assert sample[key].dtype == expected[key].dtype and torch.equal(sample[key], expected[key]), key
    assert len(variants) > 1  # the draw varies between rows
    # and with the epoch, so every style of a row is met over the epochs
    assert len({sketch_variant(7, epoch, 0, 0, 4) for epoch in range(20)}) == 4
