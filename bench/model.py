"""Model benchmarks, printed as JSON lines (no Ray needed).

    python bench/model.py                      # tiny preset on CPU: parameter counts, step and sampling times
    python bench/model.py --preset sdxl --device cuda --dtype bfloat16 --size 1024 --batch 4

Figures:
* ``params``: parameter counts per component (built on the meta device, so ``sdxl`` costs no memory);
* ``train_step``: forward + backward of the stage-1 step (sketch encoder, projector, U-Net; no optimizer,
  which DeepSpeed owns) in three variants measured in the same run: ``plain`` (λ = 0, no second branch),
  ``fused`` (ours: shared prefix, misaligned half stopped after the last Gram layer) and ``naive`` (two
  full U-Net forwards). Reports samples/s, peak memory and ratios against ``plain``;
* ``colorize``: end-to-end latency of ``Colorizer.colorize`` (encoders + steps + VAE decode).

Random init is fine for speed. Timings are medians after warm-up, with the device synchronized.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.colorizer import Colorizer  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.gram import gram_loss  # noqa: E402
from model.objective import TrainingBatch, training_step  # noqa: E402
from model.options import ColorizeOptions  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def parameter_counts(preset: str) -> dict:
    with torch.device("meta"):
        model = Colorizer(get_preset(preset))
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("unet", "sketch_encoder", "projector", "tagger", "clip", "vae")}
    counts["trainable"] = sum(p.numel() for p in model.trainable_parameters())
    return counts


def random_batch(model: Colorizer, batch: int, size: int, device, dtype) -> TrainingBatch:
    cfg = model.config
    latent = size // cfg.latent_stride
    return TrainingBatch(
        latents=torch.randn(batch, cfg.unet.latent_channels, latent, latent),
        sketch=torch.rand(batch, 1, size, size) * 2 - 1,
        clip_tokens=torch.randn(batch, cfg.clip.num_tokens, cfg.clip.embed_dim),
        tagger_tokens=torch.randn(batch, cfg.tagger.num_tokens, cfg.tagger.token_dim),
        vector_condition=torch.tensor([[float(size), 7.0]] * batch),
    ).to(device, dtype)


def naive_dual_branch_step(model, batch, scheduler, cfg, gram_weight):
    """Baseline: the misaligned branch as a second, complete U-Net forward."""
    noise = torch.randn_like(batch.latents)
    t = torch.randint(0, cfg.num_train_timesteps, (batch.latents.shape[0],), device=batch.latents.device)
    noisy = scheduler.add_noise(batch.latents, noise, t)
    target = scheduler.get_velocity(batch.latents, noise, t)
    residuals = model.sketch_encoder(batch.sketch)
    context = model.projector(batch.clip_tokens, batch.tagger_tokens)
    aligned = model.unet(noisy, t, context, batch.vector_condition, residuals, capture_gram_features=True)
    misaligned = model.unet(noisy, t, torch.roll(context, 1, 0), batch.vector_condition, residuals,
                            capture_gram_features=True)
    diffusion = F.mse_loss(aligned.prediction.float(), target.float())
    return diffusion + gram_weight * gram_loss(aligned.aligned_features, misaligned.aligned_features)


def bench_training(model, args, device, dtype):
    cfg = model.config
    batch = random_batch(model, args.batch, args.size, device, dtype)
    scheduler = model.noise_scheduler
    variants = {
        "plain": lambda: training_step(model, batch, scheduler, cfg.diffusion, gram_weight=0.0).loss,
        "fused": lambda: training_step(model, batch, scheduler, cfg.diffusion, gram_weight=1.0).loss,
        "naive": lambda: naive_dual_branch_step(model, batch, scheduler, cfg.diffusion, 1.0),
    }
    results = {}
    for name, loss_fn in variants.items():
        def step():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()

        reset_peak(device)
        seconds = median_seconds(step, device, args.warmup, args.iters)
        results[name] = {"seconds": seconds, "peak_gib": peak_gib(device)}
    base = results["plain"]
    for name, r in results.items():
        record = {"bench": "train_step", "variant": name, "preset": args.preset, "device": device.type,
                  "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "size": args.size,
                  "gradient_checkpointing": args.gradient_checkpointing,
                  "seconds": round(r["seconds"], 4), "samples_per_s": round(args.batch / r["seconds"], 3),
                  "time_vs_plain": round(r["seconds"] / base["seconds"], 3), "peak_gib": r["peak_gib"]}
        if r["peak_gib"] is not None and base["peak_gib"]:
            record["memory_vs_plain"] = round(r["peak_gib"] / base["peak_gib"], 3)
        emit(record)


def bench_colorize(model, args, device):
    rng = np.random.default_rng(0)
    sketch = rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)
    reference = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    options = ColorizeOptions(size=(args.size, args.size), steps=args.steps)
    run = lambda: model.colorize(sketch, reference, options, seed=0)
    reset_peak(device)
    seconds = median_seconds(run, device, 1, max(1, args.iters // 2))
    emit({"bench": "colorize", "preset": args.preset, "device": device.type, "size": args.size, "steps": args.steps,
          "seconds": round(seconds, 4), "seconds_per_step": round(seconds / args.steps, 4),
          "peak_gib": peak_gib(device)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--size", type=int, default=None, help="square side in pixels (default: preset's area)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: preset's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--only", choices=("params", "train", "colorize"), action="append")
    args = parser.parse_args(argv)

    cfg = get_preset(args.preset)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.size = args.size or int(cfg.sampling.default_area ** 0.5)
    args.steps = args.steps or cfg.sampling.steps
    only = set(args.only or ("params", "train", "colorize"))
    torch.backends.cuda.matmul.allow_tf32 = True

    if "params" in only:
        for preset in sorted({args.preset, "tiny", "sdxl"}):
            emit({"bench": "params", "preset": preset, **parameter_counts(preset)})
    if not only & {"train", "colorize"}:
        return 0

    torch.manual_seed(0)
    with torch.device(device):
        model = Colorizer(cfg)
    model = model.to(dtype)
    if "train" in only:
        model.train()
        if args.gradient_checkpointing:
            model.unet.unet.enable_gradient_checkpointing()
        bench_training(model, args, device, dtype)
        model.zero_grad(set_to_none=True)
    if "colorize" in only:
        model.eval()
        with torch.no_grad():
            bench_colorize(model, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
