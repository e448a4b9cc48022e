"""Training-step benchmark (no Ray): the whole optimizer step of stage 1 in three variants, one run.

    python bench/train.py                                   # tiny on CPU
    python bench/train.py --preset sdxl --size 1024 --batch 8 --gradient-checkpointing   # one H100

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.model import emit, median_seconds, naive_dual_branch_step, peak_gib, random_batch, reset_peak  # noqa: E402
from model.colorizer import Colorizer  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.objective import training_step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    raise SystemExit(main())
