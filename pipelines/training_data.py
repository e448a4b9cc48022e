"""From preprocessed rows to training batches.

The trainer streams the preprocess dataset (Ray Data ``read_parquet`` → ``get_dataset_shard``) and turns
rows into :class:`model.objective.TrainingBatch` es here. Two rules:

* every batch comes from one aspect bucket, so latents and sketches stack without padding: rows are
  buffered per bucket and a batch leaves as soon as its bucket has ``batch_size`` rows;
* the sketch of each sample is one of its stored variants, drawn at random each time the row is seen,
  so the model meets every line style of every image over the epochs.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from model.objective import TrainingBatch
from pipelines.tensors import bytes_to_tensor

STAGE1_COLUMNS = ["width", "height", "source_width", "source_height", "sketches", "latents", "latents_shape",
                  "tagger_tokens", "tagger_tokens_shape", "clip_tokens", "clip_tokens_shape", "tensor_dtype"]
STAGE2_COLUMNS = STAGE1_COLUMNS + ["reference_latents", "sketch_mask", "reference_mask"]


def columns_for(stage: str) -> list[str]:
    if stage not in ("backbone", "plugin"):
        raise ValueError(f"stage must be 'backbone' or 'plugin', got {stage!r}")
    return STAGE1_COLUMNS if stage == "backbone" else STAGE2_COLUMNS


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_sample(row: dict, rng: random.Random, aesthetic_score: float, stage: str = "backbone") -> dict:
    """One stored row → per-sample tensors (no batch dimension)."""
    dtype = row["tensor_dtype"]
    sketch = _png(rng.choice(list(row["sketches"])))
    sample = {
        "bucket": (int(row["width"]), int(row["height"])),
        "latents": bytes_to_tensor(row["latents"], row["latents_shape"], dtype),
        "sketch": torch.from_numpy(sketch.astype(np.float32))[None] / 127.5 - 1,  # stored inverted already
        "tagger_tokens": bytes_to_tensor(row["tagger_tokens"], row["tagger_tokens_shape"], dtype),
        "clip_tokens": bytes_to_tensor(row["clip_tokens"], row["clip_tokens_shape"], dtype),
        "vector_condition": torch.tensor([float(row["source_width"] * row["source_height"]) ** 0.5,
                                          aesthetic_score]),
    }
    if stage == "plugin":
        if row.get("reference_latents") is None:
            raise ValueError("the plugin stage needs reference latents: preprocess with --latent-views target,reference")
        sample["reference_latents"] = bytes_to_tensor(row["reference_latents"], row["latents_shape"], dtype)
        sample["sketch_mask"] = torch.from_numpy(_png(row["sketch_mask"]) > 127)[None].float()
        sample["reference_mask"] = torch.from_numpy(_png(row["reference_mask"]) > 127)[None].float()
    return sample


def collate(samples: list[dict]) -> TrainingBatch:
    """Stack samples of one bucket into a batch."""
    buckets = {s["bucket"] for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
    stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "bucket"}
    return TrainingBatch(**stacked)


def bucketed_batches(rows: Iterable[dict], batch_size: int, *, seed: int, aesthetic_score: float = 7.0,
                     stage: str = "backbone") -> Iterator[TrainingBatch]:
    """Single-bucket batches from a stream of rows; leftovers smaller than a batch are dropped at the end
    of the stream (they come back in the next epoch, shuffled differently)."""
    rng = random.Random(seed)
    pending: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        sample = decode_sample(row, rng, aesthetic_score, stage)
        group = pending.setdefault(sample["bucket"], [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            pending[sample["bucket"]] = []


def rows_of(batches: Iterable[dict]) -> Iterator[dict]:
    """Ray Data numpy/pyarrow-style column batches → row dicts."""
    for batch in batches:
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))
