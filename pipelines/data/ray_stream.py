"""The preprocess job as a Ray Data stream over shards.

    shards (from the plan, minus finished ones)
      → prepare_shard   tasks, CPU          decode, bucket, crop, classic sketches, masks
      → ShardEncoder    actor pool, GPU     neural sketches, WD/CLIP tokens, VAE latents
      → write_shard     tasks, CPU          data + errors Parquet, then the marker

Each row is one shard (its prepared table travels as Arrow IPC bytes, the pixels in it as lossless PNG), so
nothing is materialized: at any moment only the shards in flight are in the object store, and every file is
written by a worker. Every task declares the memory it holds (:func:`prepare_memory_bytes`,
:func:`write_memory_bytes`, :func:`encoder_memory_bytes`), so Ray places no more of them on a node than its
memory allows; ``ClusterOptions.prepare_tasks`` caps the prepare tasks cluster-wide besides. A shard whose
temporary failures outlive their retries (:mod:`pipelines.data.retries`) passes the stages as ``deferred``:
nothing is written for it, and the next run does it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial

import ray

from pipelines.data.layout import (check_config, completed_shards, load_or_create_plan, write_manifest,
                                   write_marker_index)
from model.config import get_preset
from model.geometry import buckets_for
from pipelines.data.shards import (ENCODED_IMAGE_BYTES, PreprocessConfig, ShardEncoder, bytes_to_table, prepare_shard_bytes,
                                   stored_bytes_per_image, table_to_bytes, write_shard)
from pipelines.data.corpus import InputItem
from pipelines.data.retries import DEFAULT_RETRIES, RetryPolicy, TransientFailure, call_with_retries


@dataclass(frozen=True)
class ClusterOptions:
    """How the stages map onto the cluster."""

    encoder_actors: int = 1  # upper bound of the GPU actor pool (one per GPU is typical)
    gpus_per_encoder: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_prepare: float = 1.0
    cpus_per_encoder: float = 1.0
    prepare_tasks: int | None = None  # at most this many prepare tasks at once, cluster-wide (None: no cap but memory)
    prepare_memory: int | None = None  # bytes declared per prepare task (None: prepare_memory_bytes(cfg))
    retry: RetryPolicy = DEFAULT_RETRIES  # temporary failures (reads, CUDA out of memory): tries and backoff


ACTOR_PROCESS_BYTES = 1 << 30  # the actor's own footprint (Python, torch, OpenCV): 0.63–0.65 GiB RSS measured


def encoder_memory_bytes(preset: str) -> int:
    """Host memory an encoder actor needs: the process itself plus its frozen models in float32, twice
    (load, then move); Ray Data warns when the declaration is far below what the actor uses.

    Declaring it also keeps Ray Data from fusing the CPU task stage into the encoder actors on CPU-only
    clusters (fusion needs equal resource requests); fused, all CPU work would queue behind the pool.
    """
    import torch

    from model.colorizer import Colorizer
    from model.config import get_preset

    with torch.device("meta"):
        model = Colorizer(get_preset(preset))
    frozen = sum(p.numel() for name in ("tagger", "clip", "vae") for p in getattr(model, name).parameters())
    return ACTOR_PROCESS_BYTES + 2 * 4 * frozen


# A prepared image's two lossless PNG cells at most this fraction of its raw RGB: 0.02 on flat colour, 0.58
# on grain-like noise (level-1 PNG of a one-megapixel textured illustration, measured).
PNG_RATIO_BOUND = 0.6


def prepared_bytes_per_image(preset: str) -> int:
    """Upper estimate of one input in a prepared shard at the preset's largest bucket: the encoded images
    plus the target and reference as PNG (:data:`PNG_RATIO_BOUND` of their raw RGB)."""
    pixels = max(w * h for w, h in buckets_for(get_preset(preset)))
    return ENCODED_IMAGE_BYTES + int(2 * 3 * pixels * PNG_RATIO_BOUND)


def prepare_memory_bytes(cfg: PreprocessConfig) -> int:
    """Host memory one prepare task declares, so that Ray places no more of them on a node than it holds
    (before, nothing capped them: up to 180 per pod at 6 GB each). The process itself, four working copies
    of the largest source it may decode (``max_pixels`` RGB: decoded, converted, resized, the sketches'
    intermediates), and twice the prepared shard: the peak measured 1.5 times its bytes (the IPC stream
    grows batch by batch, plus the batch being built and the allocator's slack), 7.8 MB per textured
    one-megapixel image against 23 MB with raw pixels and whole-shard tables."""
    return (ACTOR_PROCESS_BYTES + 4 * 3 * cfg.max_pixels
            + 2 * cfg.shard_size * prepared_bytes_per_image(cfg.preset))


def write_memory_bytes(cfg: PreprocessConfig) -> int:
    """A write task holds the encoded shard and its Parquet bytes."""
    return ACTOR_PROCESS_BYTES + 2 * cfg.shard_size * stored_bytes_per_image(cfg.preset, cfg.latent_views)


def _items_json(items: list[InputItem]) -> str:
    return json.dumps([[it.source, it.path, it.row] for it in items])


def _prepare(batch: dict, cfg: PreprocessConfig, retry: RetryPolicy = DEFAULT_RETRIES) -> dict:
    """A shard whose reads kept failing for a temporary reason travels on as ``deferred`` (its reason) with
    no table: no stage records anything for it, and the next run does it again."""
    out = {"shard": [], "inputs": [], "table": [], "deferred": []}
    for shard, items_json in zip(batch["shard"], batch["items"]):
        items = [InputItem(*entry) for entry in json.loads(items_json)]
        out["shard"].append(int(shard))
        out["inputs"].append(len(items))
        try:
            out["table"].append(prepare_shard_bytes(int(shard), items, cfg, retry))
            out["deferred"].append("")
        except TransientFailure as err:
            out["table"].append(b"")
            out["deferred"].append(str(err))
    return out


class _EncoderActor(ShardEncoder):
    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "inputs": [], "table": [], "deferred": []}
        for shard, inputs, table, deferred in zip(batch["shard"], batch["inputs"], batch["table"], batch["deferred"]):
            if not deferred:
                try:
                    table = table_to_bytes(self.encode(bytes_to_table(table)))
                except TransientFailure as err:  # e.g. CUDA out of memory on every retry
                    table, deferred = b"", str(err)
            out["shard"].append(int(shard))
            out["inputs"].append(int(inputs))
            out["table"].append(table)
            out["deferred"].append(str(deferred))
        return out


def _write(batch: dict, output: str, retry: RetryPolicy = DEFAULT_RETRIES) -> dict:
    """Writes each shard (its files are rewritten whole on a retry, the marker last); one whose writes keep
    failing for a temporary reason stays unmarked."""
    out = {"shard": [], "rows": [], "errors": [], "inputs": [], "deferred": [], "marker": []}
    for shard, table, inputs, deferred in zip(batch["shard"], batch["table"], batch["inputs"], batch["deferred"]):
        marker = None
        if not deferred:
            write = partial(write_shard, output, int(shard), bytes_to_table(table), int(inputs))
            try:
                marker = call_with_retries(write, retry, f"writing shard {int(shard)}")
            except TransientFailure as err:
                deferred = str(err)
        counts = marker or {"rows": 0, "errors": 0}
        for key, value in (("shard", int(shard)), ("rows", counts["rows"]), ("errors", counts["errors"]),
                           ("inputs", int(inputs)), ("deferred", str(deferred)),
                           ("marker", json.dumps(marker) if marker else "")):
            out[key].append(value)
    return out


# How often a long run saves its markers into the index (``markers.parquet``), so that a run after a kill
# reads one file plus at most this long's worth of markers.
INDEX_EVERY_SECONDS = 600.0


def run_preprocess(input_uri: str, output: str, cfg: PreprocessConfig, options: ClusterOptions = ClusterOptions(),
                   *, kind: str = "auto", id_column: str | None = None, max_shards: int | None = None,
                   relist: bool = False) -> dict:
    """Process every unfinished shard; returns the manifest. ``max_shards`` stops early (partial runs).

    The corpus is listed at the first run only (``relist`` lists it again and appends what is new, see
    :func:`pipelines.data.layout.load_or_create_plan`); finished shards come from one listing of the markers
    and their index, and the markers this run writes come back through the stream, so the driver never reads
    the markers one by one."""
    started = time.perf_counter()
    check_config(output, cfg)
    plan = load_or_create_plan(input_uri, output, cfg, kind=kind, id_column=id_column, relist=relist)
    done = completed_shards(output, keep_index=True)
    pending = [k for k in range(len(plan.shards)) if k not in done]
    if max_shards is not None:
        pending = pending[:max_shards]
    total = sum(len(s) for s in plan.shards)
    listed = "listed now" if plan.relisted else f"listed {plan.listed_at or 'at the first run'}, --relist to list again"
    print(f"[preprocess] {total} inputs in {len(plan.shards)} shards ({plan.listing_kind}, {listed}); "
          f"{len(done)} shards already done, {len(pending)} to process"
          + (f"; {plan.ignored} non-image files ignored" if plan.ignored else ""), flush=True)
    if plan.new_inputs:
        print(f"[preprocess] the re-list found {plan.new_inputs} new inputs: appended as new shards", flush=True)
    if plan.missing_inputs:
        print(f"[preprocess] {plan.missing_inputs} planned inputs are gone from the corpus: finished shards keep "
              "their rows, unfinished ones record them as unreadable", flush=True)

    markers = dict(done)

    if pending:
        gpus = options.gpus_per_encoder
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        shards = ray.data.from_items(
            [{"shard": k, "items": _items_json(plan.shards[k])} for k in pending],
            override_num_blocks=len(pending),
        )
        prepared = shards.map_batches(
            _prepare, fn_kwargs={"cfg": cfg, "retry": options.retry}, batch_size=1, num_cpus=options.cpus_per_prepare,
            memory=options.prepare_memory or prepare_memory_bytes(cfg),
            compute=ray.data.TaskPoolStrategy(size=options.prepare_tasks),
        )
        encoded = prepared.map_batches(
            _EncoderActor, fn_constructor_kwargs={"cfg": cfg, "retry": options.retry}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, options.encoder_actors)),
            num_gpus=gpus, num_cpus=options.cpus_per_encoder, memory=encoder_memory_bytes(cfg.preset),
        )
        written = encoded.map_batches(_write, fn_kwargs={"output": output, "retry": options.retry}, batch_size=1,
                                      num_cpus=0.5,
                                      memory=write_memory_bytes(cfg))
        deferred, indexed_at = 0, time.monotonic()
        for row in written.iter_rows():
            if row["deferred"]:
                deferred += 1
                print(f"[preprocess] shard {row['shard']}: left for the next run ({row['deferred']})", flush=True)
                continue
            markers[int(row["shard"])] = json.loads(row["marker"])
            print(f"[preprocess] shard {row['shard']}: {row['rows']} rows, {row['errors']} errors "
                  f"of {row['inputs']} inputs", flush=True)
            if time.monotonic() - indexed_at > INDEX_EVERY_SECONDS:
                write_marker_index(output, markers)
                indexed_at = time.monotonic()
        if deferred:
            print(f"[preprocess] {deferred} shards met temporary failures beyond their retries and are not marked "
                  "done: run the job again to finish them", flush=True)

    if markers.keys() != done.keys():
        write_marker_index(output, markers)
    manifest = write_manifest(output, cfg, plan, markers)
    seconds = time.perf_counter() - started
    print(f"[preprocess] done in {seconds:.1f} s: {manifest['rows']} rows + {manifest['errors']} errors = "
          f"{manifest['rows'] + manifest['errors']} of {manifest['inputs']} inputs "
          f"({manifest['shards_done']}/{manifest['shards']} shards)", flush=True)
    return manifest
