"""Training benchmarks, each comparing variants in one run (JSON lines, ratios).

    python bench/train.py                                   # the step: tiny on CPU
    python bench/train.py --preset sdxl --size 1024 --batch 8 --gradient-checkpointing   # one H100
    python bench/train.py --part data                       # input: decoding on the training thread vs in Ray Data
    python bench/train.py --part checkpoint --checkpoint-mb 512   # a checkpoint's blocking time, sync vs async

``--part data`` trains the tiny model (no DeepSpeed) on a tiny preprocessed dataset it writes, reading it
through the training data stream in two ways: the rows decoded on the training thread (as before) and
decoded inside Ray Data with prefetch (as the loop does now); each step's time includes waiting for its
batch. It also times one sample's decode at the ``sdxl`` sizes (a 1 MP sketch PNG and the stored tokens),
the work the training thread no longer does. ``--part checkpoint`` runs one Ray Train worker that reports
a checkpoint folder of ``--checkpoint-mb`` with a synchronous and then an asynchronous upload, and prints
how long ``ray.train.report`` held the training thread each way.

``--part step`` (default), the whole optimizer step of stage 1 in three variants (no Ray):

Variants, measured back to back on the same model and batch:
* ``plain``: λ = 0, the diffusion loss only (the step without the Gram branch);
* ``naive``: the misaligned branch as a second, complete U-Net forward;
* ``fused``: ours, the shared prefix computed once and the misaligned half stopped at the last Gram layer.
Each prints samples/s and peak memory and their ratios to ``plain``; the paper reports +30% time and +10%
memory for its Gram branch. The step includes AdamW (fused on CUDA) over the trainable parameters, in the
preset's training dtype (bf16 weights on GPU, as DeepSpeed's bf16 mode holds them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.model import emit, median_seconds, naive_dual_branch_step, peak_gib, random_batch, reset_peak  # noqa: E402
from model.colorizer import Colorizer  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.objective import training_step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("step", "data", "checkpoint"), default="step")
    parser.add_argument("--steps", type=int, default=12, help="--part data: timed steps per variant")
    parser.add_argument("--checkpoint-mb", type=int, default=256, help="--part checkpoint: size of the folder")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.part == "data":
        return bench_data(args)
    if args.part == "checkpoint":
        return bench_checkpoint(args)

    cfg = get_preset(args.preset)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = args.size or int(cfg.sampling.default_area ** 0.5)
    torch.manual_seed(0)
    with torch.device(device):
        model = Colorizer(cfg)
    for frozen in ("tagger", "clip", "vae"):  # the step reads cached tokens and latents: free their memory
        getattr(model, frozen).to("meta")
    model = model.to(dtype).train()
    if args.gradient_checkpointing:
        model.unet.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = random_batch(model, args.batch, size, device, dtype)
    scheduler, diffusion = model.noise_scheduler, cfg.diffusion
    variants = {
        "plain": lambda: training_step(model, batch, scheduler, diffusion, gram_weight=0.0).loss,
        "naive": lambda: naive_dual_branch_step(model, batch, scheduler, diffusion, 1.0),
        "fused": lambda: training_step(model, batch, scheduler, diffusion, gram_weight=1.0).loss,
    }
    results = {}
    for name, loss_fn in variants.items():
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        reset_peak(device)
        seconds = median_seconds(step, device, args.warmup, args.iters)
        results[name] = (seconds, peak_gib(device))
    base_seconds, base_memory = results["plain"]
    for name, (seconds, memory) in results.items():
        record = {"bench": "train_step_with_optimizer", "variant": name, "preset": args.preset,
                  "device": device.type, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
                  "size": size, "gradient_checkpointing": args.gradient_checkpointing,
                  "samples_per_s": round(args.batch / seconds, 3), "time_vs_plain": round(seconds / base_seconds, 3),
                  "peak_gib": memory}
        if memory is not None and base_memory:
            record["memory_vs_plain"] = round(memory / base_memory, 3)
        emit(record)
    return 0


# ----------------------------------------------------------------------------------- --part data
def bench_data(args) -> int:
    import ray

    from model.assembly import init_model
    from pipelines.data.batches import (BucketBatcher, DecodeSettings, columns_for, decode_sample, decoded_sample)
    from pipelines.data.layout import completed_shards, load_or_create_plan, write_manifest
    from pipelines.data.shards import PreprocessConfig, ShardEncoder, process_shard
    from pipelines.data.synthetic import write_corpus
    from pipelines.training.data_stream import DataStream, ray_data_reader
    from pipelines.training.stages import build_stage

    emit({"bench": "decode_one_sample", "preset": "sdxl", "ms": round(1000 * sdxl_decode_seconds(), 2)})
    root = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    write_corpus(root / "corpus", count=48)
    base = init_model(root / "base", args.preset, seed=0)
    prep = PreprocessConfig(preset=args.preset, shard_size=12, encoders=str(base))
    plan = load_or_create_plan(str(root / "corpus"), str(root / "dataset"), prep)
    encoder = ShardEncoder(prep)
    for k, shard in enumerate(plan.shards):
        process_shard(str(root / "dataset"), k, shard, prep, encoder)
    manifest = write_manifest(str(root / "dataset"), prep, plan, completed_shards(str(root / "dataset")))

    torch.manual_seed(0)
    colorizer = Colorizer.from_pretrained(base, components=("unet", "vae"))
    stage = build_stage(colorizer, "backbone", total_steps=10**6, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-5)
    score, columns = colorizer.config.sampling.aesthetic_score, columns_for("backbone")
    settings = DecodeSettings(stage="backbone", aesthetic_score=score, seed=0)

    def on_thread():
        import random

        rng, batcher = random.Random(0), BucketBatcher(args.batch)
        for row in DataStream(ray_data_reader(str(root / "dataset"), columns), shards=manifest["shards"], seed=0):
            batcher.add(decode_sample(row, rng, score))
            while (batch := batcher.pop()) is not None:
                yield batch

    def in_ray_data():
        batcher = BucketBatcher(args.batch)
        read = ray_data_reader(str(root / "dataset"), columns, decode=settings, prefetch_batches=4)
        for row in DataStream(read, shards=manifest["shards"], seed=0):
            batcher.add(decoded_sample(row))
            while (batch := batcher.pop()) is not None:
                yield batch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        times = {"decode_on_training_thread": ([], []), "decode_in_ray_data_prefetch": ([], [])}
        for _ in range(2):  # the variants alternate, so a change in the machine's load hits both
            for name, batches in (("decode_on_training_thread", on_thread), ("decode_in_ray_data_prefetch", in_ray_data)):
                stream, (steps, waits) = batches(), times[name]
                for i in range(args.warmup + args.steps):
                    started = time.perf_counter()
                    batch = next(stream)
                    waited = time.perf_counter() - started
                    optimizer.zero_grad(set_to_none=True)
                    stage(batch, 10).loss.backward()
                    optimizer.step()
                    if i >= args.warmup:
                        steps.append(time.perf_counter() - started)
                        waits.append(waited)
        results = {name: (statistics.median(steps), statistics.median(waits)) for name, (steps, waits) in times.items()}
    finally:
        ray.shutdown()
    base_step = results["decode_on_training_thread"][0]
    for name, (step, wait) in results.items():
        emit({"bench": "train_input", "variant": name, "preset": args.preset, "batch": args.batch,
              "step_ms_median": round(1000 * step, 1), "batch_wait_ms_median": round(1000 * wait, 2),
              "step_time_vs_on_thread": round(step / base_step, 3)})
    return 0


def sdxl_decode_seconds(iters: int = 5) -> float:
    """One stored row at the ``sdxl`` sizes (1024² sketch PNG, 128² latents, WD and CLIP tokens) decoded
    as the training thread used to: the per-sample cost that now runs in Ray Data."""
    import random

    import cv2
    import numpy as np

    from pipelines.data.batches import decode_sample
    from pipelines.data.synthetic import synthetic_illustration
    from pipelines.data.tensor_cells import tensor_to_bytes

    sketch = np.asarray(synthetic_illustration(seed=0, width=1024, height=1024).sketch, np.uint8)
    sketch = sketch if sketch.ndim == 2 else sketch[..., 0]
    sketches = [cv2.imencode(".png", 255 - sketch)[1].tobytes()] * 4
    cells = {name: tensor_to_bytes(torch.randn(shape)) for name, shape in
             (("latents", (4, 128, 128)), ("tagger_tokens", (196, 1024)), ("clip_tokens", (257, 1280)))}
    row = {"width": 1024, "height": 1024, "source_width": 1400, "source_height": 1400, "sketches": sketches,
           "tensor_dtype": "float16"} | {k: v[0] for k, v in cells.items()} | {f"{k}_shape": v[1] for k, v in cells.items()}
    rng = random.Random(0)
    return median_seconds(lambda: decode_sample(row, rng, 6.0), torch.device("cpu"), 1, iters)


# ----------------------------------------------------------------------------- --part checkpoint
def bench_checkpoint(args) -> int:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = Path(tempfile.mkdtemp(prefix="bench-train-checkpoint-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(checkpoint_blocking_times,
                     train_loop_config={"mb": args.checkpoint_mb, "iters": 3, "out": str(storage / "times.json")},
                     scaling_config=ray.train.ScalingConfig(num_workers=1),
                     run_config=ray.train.RunConfig(name="bench", storage_path=str(storage))).fit()
    finally:
        ray.shutdown()
    times = json.loads((storage / "times.json").read_text())
    sync, asynchronous = times["sync_s"], times["async_s"]
    for name, seconds in (("sync", sync), ("async", asynchronous)):
        emit({"bench": "checkpoint_report_blocking", "upload": name, "checkpoint_mb": args.checkpoint_mb,
              "blocked_s": round(seconds, 4), "vs_sync": round(seconds / sync, 4)})
    return 0


def checkpoint_blocking_times(config: dict) -> None:
    """Inside a Ray Train worker: the median time ``report`` blocks for a folder of ``mb`` MB (a DeepSpeed
    shard stands in as one file), uploaded synchronously, then asynchronously; the async uploads are
    waited for between reports so each starts from an idle uploader."""
    from pipelines.training.checkpointing import CheckpointUploads

    uploads, times = CheckpointUploads(), {"sync_s": [], "async_s": []}
    payload = torch.randint(0, 255, (config["mb"] * 2**20,), dtype=torch.uint8)
    for key, asynchronous in (("sync_s", False), ("async_s", True)):
        for _ in range(config["iters"]):
            folder = uploads.folder()
            torch.save(payload, Path(folder) / "shard.pt")
            times[key].append(uploads.report(folder, {"kind": key}, asynchronous))
            while uploads.busy():
                time.sleep(0.05)
    Path(config["out"]).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))


if __name__ == "__main__":
    raise SystemExit(main())
