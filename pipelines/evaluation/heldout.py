"""Held-out diffusion loss: the training objective, measured on rows the model did not train on.

Why: the demo trains a tiny model for a few minutes, and for a long time its samples are still noise, so
the pictures cannot tell whether anything was learned. The v-prediction loss on held-out rows can: it is
the number training lowers, it is computed without sampling, and it is exactly reproducible, so the
same number before and after training (same rows, same seed, same noise, timesteps and dropout draws)
shows learning, or its absence, long before the pictures do.

The loss is the training stage's own (:mod:`pipelines.training.stages`: stage 1 with λ = 0, so no Gram
term; stage 2 with the ReferenceNet bank, the background LoRA and the soft split attention, on the
background picture, crop and masks the dataset caches), evaluated under ``torch.no_grad`` with
a seeded generator on the first ``samples`` rows of a preprocessed dataset, each with its first sketch
variant, batched by aspect bucket as training batches them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from model.colorizer import Colorizer
from model.objective import STAGES, TrainingBatch
from pipelines.data.batches import collate, columns_for, decode_sample
from pipelines.data.layout import read_all
from pipelines.training.stages import TrainingStage, build_stage


def heldout_diffusion_loss(model_folder: str, dataset: str, *, stage: str = "backbone", samples: int = 8,
                           batch_size: int = 4, seed: int = 0, device: str | None = None) -> float:
    """Mean v-prediction diffusion loss of the model in ``model_folder`` over the first ``samples`` rows of
    the preprocessed ``dataset`` (sample-weighted over single-bucket batches of at most ``batch_size``).

    ``stage``: "backbone" (stage 1's loss, no Gram term) or "plugin" (stage 2's loss with the plug-in and
    split attention; a folder without a plug-in gets a fresh one of the published rank, as stage-2 training
    starts from; the dataset needs the stage-2 columns, ``--latent-views target,background``).
    ``device``: None = CUDA when available, else CPU. The same model, rows and ``seed`` give the same number.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be positive, got {samples} and {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Colorizer.from_pretrained(model_folder, device=device, components=("unet", "vae"))
    # The stage module attaches a fresh plugin where there is none; λ = 0 leaves the Gram term out.
    rank = {"plugin_rank": model.plugin.config.lora_rank} if model.plugin is not None else {}
    objective = build_stage(model, stage, total_steps=1, gram_weight=0.0, gradient_checkpointing=False, **rank)
    rows = first_rows(dataset, stage, samples)
    batches = heldout_batches(rows, stage, batch_size, seed, model.config.sampling.aesthetic_score)
    return mean_diffusion_loss(objective, batches, seed, model.device, model.dtype)


def first_rows(dataset: str, stage: str, samples: int) -> list[dict]:
    """The dataset's first ``samples`` rows (shard order), each keeping only its first sketch variant, so
    the held-out set does not depend on a random variant draw."""
    table = read_all(dataset, columns=columns_for(stage))
    if table.num_rows == 0:
        raise ValueError(f"{dataset} has no finished rows to hold out")
    rows = table.slice(0, samples).to_pylist()
    return [row | {"sketches": list(row["sketches"])[:1]} for row in rows]


def heldout_batches(rows: list[dict], stage: str, batch_size: int, seed: int,
                    aesthetic_score: float) -> Iterator[TrainingBatch]:
    """Single-bucket batches of at most ``batch_size`` rows, buckets in order of first appearance (the
    last batch of a bucket may be smaller: every row counts)."""
    rng = random.Random(seed)
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        sample = decode_sample(row, rng, aesthetic_score, stage)
        by_bucket.setdefault(sample["bucket"], []).append(sample)
    for bucket_samples in by_bucket.values():
        for start in range(0, len(bucket_samples), batch_size):
            yield collate(bucket_samples[start:start + batch_size])


@torch.no_grad()
def mean_diffusion_loss(objective: TrainingStage, batches: Iterator[TrainingBatch], seed: int,
                        device: torch.device, dtype: torch.dtype) -> float:
    """Sample-weighted mean of the stage's diffusion loss; one generator, seeded once, draws the noise,
    timesteps and dropout of every batch in turn."""
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device, dtype)
        loss = objective(batch, 0, generator=generator).diffusion_loss
        size = batch.latents.shape[0]
        total += float(loss) * size
        count += size
    return total / count
