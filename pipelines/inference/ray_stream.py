"""The batch job as a Ray Data stream over units (or, for small jobs and tests, one process).

    units (from the plan, minus finished ones)
      → prepare_unit    tasks, CPU          read, decode, extract lines
      → UnitColorizer   actor pool          colorize_batch per (options, size), contexts per reference
                        (one GPU each with gpus_per_actor > 0)
      → write_unit      tasks, CPU          PNGs, then the unit's marker

Each Ray Data row is one unit (pickled between stages), so nothing is materialized: only the units in
flight are in the object store, and every file is written by a worker. The driver plans, then gathers the
markers into the index, the errors table and the manifest (:func:`pipelines.inference.layout.finalize`).
A run with nothing left to do starts no Ray at all.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass, field

from pipelines.inference.layout import BatchConfig, check_config, finalize, finished_units, load_or_create_plan
from pipelines.inference.pairs import pair_from_json, pair_to_json
from pipelines.inference.stages import UnitColorizer, prepare_unit, process_unit, write_unit

ACTOR_PROCESS_BYTES = 1 << 30  # the actor's own footprint (Python, torch, OpenCV), as the preprocess job's


@dataclass(frozen=True)
class RunOptions:
    """How the job runs (nothing here changes a picture, apart from ``dtype`` and the device)."""

    batch_size: int = 8  # pairs per colorize_batch call
    actors: int = 1  # upper bound of the actor pool (one per GPU is typical)
    gpus_per_actor: float = 0.0  # 0: CPU actors
    cpus_per_actor: float = 1.0
    cpus_per_prepare: float = 1.0
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    context_cache: int = 64  # reference contexts each actor keeps
    max_pixels: int | None = None  # decode cap per input image (None: model.image_io's default)
    # model.acceleration.Acceleration.from_flags arguments but the device (each actor knows its own); none
    # given: the device's default
    acceleration: dict = field(default_factory=dict)


def actor_memory_bytes(model: str) -> int:
    """Host memory a colorizer actor needs: the process plus the model in float32, twice (load, then move).
    Declaring it also keeps Ray Data from fusing the CPU prepare tasks into the actors on CPU-only
    clusters (fusion needs equal resource requests), as in the preprocess job."""
    import torch

    from model.colorizer import Colorizer, read_config

    with torch.device("meta"):
        model_ = Colorizer(read_config(model))
    return ACTOR_PROCESS_BYTES + 2 * 4 * sum(p.numel() for p in model_.parameters())


def _prepare(batch: dict, max_pixels: int | None) -> dict:
    out = {"unit": [], "payload": []}
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    for unit, pairs in zip(batch["unit"], batch["pairs"]):
        prepared = prepare_unit(int(unit), [pair_from_json(p) for p in json.loads(pairs)], **kwargs)
        out["unit"].append(int(unit))
        out["payload"].append(pickle.dumps(prepared, protocol=5))
    return out


class _ColorizeActor:
    def __init__(self, model: str, options: RunOptions):
        self.colorizer = UnitColorizer.load(model, device="cuda" if options.gpus_per_actor > 0 else "cpu",
                                            dtype=options.dtype, batch_size=options.batch_size,
                                            context_cache=options.context_cache, acceleration=options.acceleration)

    def __call__(self, batch: dict) -> dict:
        out = {"unit": [], "payload": []}
        for unit, payload in zip(batch["unit"], batch["payload"]):
            out["unit"].append(int(unit))
            out["payload"].append(pickle.dumps(self.colorizer.colorize(pickle.loads(payload)), protocol=5))
        return out


def _write(batch: dict, output: str) -> dict:
    counts = [write_unit(output, pickle.loads(payload)) for payload in batch["payload"]]
    return {key: [c[key] for c in counts] for key in ("unit", "inputs", "rows", "errors")}


def run_colorize_batch(cfg: BatchConfig, output: str, options: RunOptions = RunOptions(), *,
                       max_units: int | None = None, in_process: bool = False, colorizer: UnitColorizer | None = None,
                       ray_address: str | None = None) -> dict:
    """Colorize every unfinished unit; returns the manifest. ``max_units`` stops after that many units (a
    partial run). ``in_process`` (or a given ``colorizer``) runs the stages here, without Ray; otherwise
    the stream runs on the Ray that is initialized, or on ``ray_address`` (None: a local Ray), which is then
    shut down at the end."""
    started = time.perf_counter()
    check_config(output, cfg)
    plan = load_or_create_plan(output, cfg)
    done = finished_units(output)
    pending = [k for k in range(len(plan.units)) if k not in done]
    if max_units is not None:
        pending = pending[:max_units]
    print(f"[colorize_batch] {plan.inputs} pairs in {len(plan.units)} units; {len(done)} units already done, "
          f"{len(pending)} to process", flush=True)
    if plan.new_pairs:
        print(f"[colorize_batch] {plan.new_pairs} pairs appeared in the input after this output was planned and are "
              "not part of it; colorize them into a new --out", flush=True)
    if pending and (in_process or colorizer is not None):
        colorizer = colorizer or UnitColorizer.load(cfg.model, dtype=options.dtype, batch_size=options.batch_size,
                                                    context_cache=options.context_cache,
                                                    acceleration=options.acceleration)
        kwargs = {} if options.max_pixels is None else {"max_pixels": options.max_pixels}
        for k in pending:
            _report(process_unit(output, k, plan.units[k], colorizer, **kwargs))
    elif pending:
        _run_stream(cfg, output, options, plan, pending, ray_address)
    manifest = finalize(output, plan)
    seconds = time.perf_counter() - started
    print(f"[colorize_batch] done in {seconds:.1f} s: {manifest['rows']} rows + {manifest['errors']} errors = "
          f"{manifest['rows'] + manifest['errors']} of {manifest['inputs']} pairs "
          f"({manifest['units_done']}/{manifest['units']} units)", flush=True)
    return manifest


def _report(counts: dict) -> None:
    print(f"[colorize_batch] unit {counts['unit']}: {counts['rows']} pictures, {counts['errors']} errors "
          f"of {counts['inputs']} pairs", flush=True)


def _run_stream(cfg: BatchConfig, output: str, options: RunOptions, plan, pending: list[int],
                ray_address: str | None) -> None:
    import ray

    owned = not ray.is_initialized()
    if owned:
        ray.init(address=ray_address, log_to_driver=True)
    try:
        units = ray.data.from_items(
            [{"unit": k, "pairs": json.dumps([pair_to_json(p) for p in plan.units[k]])} for k in pending],
            override_num_blocks=len(pending),
        )
        prepared = units.map_batches(_prepare, fn_kwargs={"max_pixels": options.max_pixels}, batch_size=1,
                                     num_cpus=options.cpus_per_prepare)
        colored = prepared.map_batches(
            _ColorizeActor, fn_constructor_kwargs={"model": cfg.model, "options": options}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, options.actors)),
            num_gpus=options.gpus_per_actor, num_cpus=options.cpus_per_actor, memory=actor_memory_bytes(cfg.model),
        )
        written = colored.map_batches(_write, fn_kwargs={"output": output}, batch_size=1, num_cpus=0.5)
        for row in written.iter_rows():
            _report(row)
    finally:
        if owned:
            ray.shutdown()
