"""One colorization step of the full-size ``sdxl`` preset on the CPU, in bf16, with random weights.

    python bench/sdxl_cpu_step.py                 # 256x256 pixels, one sampling step
    python bench/sdxl_cpu_step.py --size 512 --steps 2

The real preset's code path (2.6B-parameter U-Net, CLIP ViT-bigG, SwinV2 tagger, the published sketch
encoder and projector, the sampler, the VAE) runs end to end where the CI can afford it, rather than only
on the meta device. The model is built directly in bf16 (the default dtype is bf16 while modules are
made), so no fp32 copy ever exists. Prints JSON lines: the build (seconds, peak RSS), then the
colorization (seconds, peak RSS, output statistics). Peak RSS is the process's high-water mark (VmHWM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.colorizer import Colorizer  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.options import ColorizeOptions  # noqa: E402


def peak_rss_gib() -> float:
    """The process's peak resident set (VmHWM), in GiB; Linux only, as the CI is."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    raise RuntimeError("no VmHWM in /proc/self/status")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (a multiple of 32)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with default_dtype(torch.bfloat16):
        model = Colorizer.from_config(get_preset(args.preset)).eval()
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"bench": "sdxl_cpu_step", "phase": "build", "preset": args.preset, "dtype": "bfloat16",
                      "parameters": params, "seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_gib": peak_rss_gib()}), flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    sketch = torch.rand(1, 3, args.size, args.size, generator=generator) * 2 - 1
    reference = torch.rand(1, 3, 300, 200, generator=generator)
    start = time.perf_counter()
    images = model.colorize_tensors(sketch, reference, ColorizeOptions(steps=args.steps, plugin=False), seeds=[args.seed])
    print(json.dumps({"bench": "sdxl_cpu_step", "phase": "colorize", "size": args.size, "steps": args.steps,
                      "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": peak_rss_gib(),
                      "shape": list(images.shape), "dtype": str(images.dtype).removeprefix("torch."),
                      "finite": bool(torch.isfinite(images.float()).all()),
                      "std": round(float(images.float().std()), 4)}), flush=True)


if __name__ == "__main__":
    main()
