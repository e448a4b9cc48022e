"""From preprocessed rows to training batches.

The trainer streams the preprocess dataset with Ray Data and turns rows into
:class:`model.objective.TrainingBatch` es here. Decoding (the sketch PNG, the stored tensors, the vector
condition: 12-30 ms a sample at 1 MP) runs inside Ray Data, as a ``map_batches`` stage over the rows
(:func:`decode_rows`), so it overlaps the GPU instead of sitting on the training thread; the loop only
stacks decoded samples (:func:`decoded_sample`, :class:`BucketBatcher`). Three rules:

* every batch comes from one aspect bucket, so latents and sketches stack without padding: rows are
  buffered per bucket and a batch leaves as soon as its bucket has ``batch_size`` rows;
* every worker takes the same number of batches from every epoch (:func:`steps_per_epoch`), since
  the workers step together and their data splits start each epoch together;
* the sketch of each sample is one of its stored variants, drawn at random each time the row is seen,
  so the model meets every line style of every image over the epochs. The draw is seeded by the run seed,
  the epoch and the row (:func:`sketch_variant`), so it does not depend on which process decodes the row
  or in which order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from model.objective import STAGES, TrainingBatch
from model.vector_condition import vector_condition
from pipelines.data.tensor_cells import bytes_to_tensor, image_from_cell

STAGE1_COLUMNS = ["width", "height", "source_width", "source_height", "sketches", "latents", "latents_shape",
                  "tagger_tokens", "tagger_tokens_shape", "clip_tokens", "clip_tokens_shape", "tensor_dtype"]
STAGE2_COLUMNS = STAGE1_COLUMNS + ["background_latents", "background_tagger_tokens", "background_clip_tokens", "crop",
                                   "sketch_mask", "reference_mask"]


def columns_for(stage: str) -> list[str]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return STAGE1_COLUMNS if stage == "backbone" else STAGE2_COLUMNS


def check_dataset_for(stage: str, manifest: dict, dataset: str) -> None:
    """Refuse, before any worker starts, a dataset that lacks what ``stage`` reads (``manifest``: the
    dataset's finished manifest)."""
    views = manifest.get("config", {}).get("latent_views", [])
    if columns_for(stage) is STAGE2_COLUMNS and "background" not in views:
        raise ValueError(f"{dataset} was preprocessed with --latent-views {','.join(views) or '?'}; stage 2 (plugin) "
                         "reads the background picture's latents and tokens: preprocess it again with --latent-views "
                         "target,background")


def sketch_variant(seed: int, epoch: int, shard: int, ordinal: int, variants: int) -> int:
    """Which of a row's ``variants`` stored sketches epoch ``epoch`` of a run seeded ``seed`` trains on."""
    return random.Random(f"colorize-sketch/{seed}/{epoch}/{shard}/{ordinal}").randrange(variants)


def decode_sample(row: dict, rng: random.Random | None, aesthetic_score: float, stage: str = "backbone",
                  sketch_index: int | None = None) -> dict:
    """One stored row → per-sample tensors (no batch dimension). The sketch variant is ``sketch_index``,
    else drawn from ``rng``."""
    dtype = row["tensor_dtype"]
    sketches = list(row["sketches"])
    sketch = image_from_cell(sketches[sketch_index] if sketch_index is not None else rng.choice(sketches))
    sample = {
        "bucket": (int(row["width"]), int(row["height"])),
        "latents": bytes_to_tensor(row["latents"], row["latents_shape"], dtype),
        "sketch": torch.from_numpy(sketch.astype(np.float32))[None] / 127.5 - 1,  # stored inverted already
        "tagger_tokens": bytes_to_tensor(row["tagger_tokens"], row["tagger_tokens_shape"], dtype),
        "clip_tokens": bytes_to_tensor(row["clip_tokens"], row["clip_tokens_shape"], dtype),
        "vector_condition": vector_condition(row["source_height"], row["source_width"], aesthetic_score)[0],
    }
    if stage == "plugin":
        if row.get("background_latents") is None:
            raise ValueError("the plugin stage needs the background picture's latents and tokens: preprocess with "
                             "--latent-views target,background")
        sample["background_latents"] = bytes_to_tensor(row["background_latents"], row["latents_shape"], dtype)
        sample["background_tagger_tokens"] = bytes_to_tensor(row["background_tagger_tokens"],
                                                             row["tagger_tokens_shape"], dtype)
        sample["background_clip_tokens"] = bytes_to_tensor(row["background_clip_tokens"], row["clip_tokens_shape"], dtype)
        sample["crop"] = torch.tensor([float(v) for v in row["crop"]], dtype=torch.float32)
        sample["sketch_mask"] = mask_from_cell(row["sketch_mask"])
        sample["reference_mask"] = mask_from_cell(row["reference_mask"])
    return sample


@dataclass(frozen=True)
class DecodeSettings:
    """What :func:`decode_rows` needs besides the rows: the stage's fields, the vector condition's
    aesthetic score and the run seed (for the sketch draw)."""

    stage: str
    aesthetic_score: float
    seed: int


BUCKET_COLUMNS = ("bucket_width", "bucket_height")  # decoded rows: the aspect bucket, as two int columns


def decode_rows(batch: dict, settings: DecodeSettings, epoch: int) -> dict:
    """A Ray Data ``map_batches`` function: a numpy batch of stored rows (with ``shard`` and ``ordinal``)
    → a numpy batch of decoded samples, one column per :class:`TrainingBatch` field (float32 arrays, the
    exact values :func:`decode_sample` gives), the two bucket columns and the position columns. Rows of
    several buckets have several shapes; Ray Data holds such columns as variable-shaped tensors."""
    count = len(batch["shard"])
    columns: dict[str, list] = {}
    for i in range(count):
        row = {k: v[i] for k, v in batch.items()}
        shard, ordinal = int(row["shard"]), int(row["ordinal"])
        index = sketch_variant(settings.seed, epoch, shard, ordinal, len(row["sketches"]))
        sample = decode_sample(row, None, settings.aesthetic_score, settings.stage, sketch_index=index)
        width, height = sample.pop("bucket")
        values = {k: v.numpy() for k, v in sample.items()}
        values |= {"bucket_width": width, "bucket_height": height, "shard": shard, "ordinal": ordinal}
        for key, value in values.items():
            columns.setdefault(key, []).append(value)
    return {k: _column(v) for k, v in columns.items()}


def _column(values: list):
    """A list of per-row values as one numpy column: stacked when the shapes agree, else an object array
    of arrays (which Ray Data stores as a variable-shaped tensor column)."""
    if all(np.isscalar(v) for v in values):
        return np.asarray(values)
    if len({v.shape for v in values}) == 1:
        return np.stack(values)
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def decoded_sample(row: dict) -> dict:
    """A decoded row (from :func:`decode_rows`, one row of a Ray Data batch) → the per-sample tensors that
    :class:`BucketBatcher` stacks; no copy of the arrays."""
    sample = {"bucket": (int(row["bucket_width"]), int(row["bucket_height"]))}
    for key, value in row.items():
        if key not in BUCKET_COLUMNS and key not in ("shard", "ordinal"):
            sample[key] = torch.as_tensor(value)
    return sample


def mask_from_cell(data: bytes) -> torch.Tensor:
    """A stored 8-bit mask → (1, H, W) float in [0, 1] (soft masks stay soft)."""
    return torch.from_numpy(image_from_cell(data).astype(np.float32) / 255)[None]


def collate(samples: list[dict]) -> TrainingBatch:
    """Stack samples of one bucket into a batch."""
    buckets = {s["bucket"] for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
    stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "bucket"}
    return TrainingBatch(**stacked)


class BucketBatcher:
    """Per-bucket buffers of decoded samples; a batch is ready when its bucket holds ``batch_size``.
    Buffers persist across epochs, so rows left over at an epoch's end are used in the next one."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: dict[tuple[int, int], list[dict]] = {}

    def add(self, sample: dict) -> None:
        self.pending.setdefault(sample["bucket"], []).append(sample)

    def pop(self) -> TrainingBatch | None:
        for bucket, samples in self.pending.items():
            if len(samples) >= self.batch_size:
                self.pending[bucket] = samples[self.batch_size:]
                return collate(samples[: self.batch_size])
        return None


def steps_per_epoch(rows_per_worker: int, buckets: int, batch_size: int) -> int:
    """Batches every worker can surely form from one epoch of its split, whatever the bucket mix: at most
    ``batch_size - 1`` rows per bucket can be left over. Data-parallel workers step in lockstep, and Ray
    Data starts a split's next epoch only when all workers ask for it, so every worker takes exactly
    this many batches per epoch (and keeps the rest for the next)."""
    steps = (rows_per_worker - buckets * (batch_size - 1)) // batch_size
    if steps < 1:
        raise ValueError(f"{rows_per_worker} rows per worker in {buckets} buckets cannot guarantee a batch of "
                         f"{batch_size} per epoch: lower the batch size or use fewer workers")
    return steps


def epoch_batches(rows: Iterable[dict], batcher: BucketBatcher, steps: int, *, rng: random.Random,
                  aesthetic_score: float, stage: str = "backbone") -> Iterator[TrainingBatch]:
    """Exactly ``steps`` single-bucket batches from one epoch of rows (plus what earlier epochs left);
    the epoch is read to its end either way, as Ray Data's split iterators require."""
    produced = 0
    for row in rows:
        batcher.add(decode_sample(row, rng, aesthetic_score, stage))
        while produced < steps and (batch := batcher.pop()) is not None:
            produced += 1
            yield batch
    while produced < steps and (batch := batcher.pop()) is not None:
        produced += 1
        yield batch
    if produced < steps:
        raise RuntimeError(f"an epoch gave {produced} batches, fewer than the {steps} promised")


def rows_of(batches: Iterable[dict]) -> Iterator[dict]:
    """Ray Data numpy/pyarrow-style column batches → row dicts."""
    for batch in batches:
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))
