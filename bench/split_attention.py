"""Split attention: memory and time of our exact two-call form against the dense-mask forms, at the ``sdxl``
layer sizes, printed as JSON lines (no Ray, no model weights).

    python bench/split_attention.py                         # CPU: 512² output (reduced), batch 2
    python bench/split_attention.py --resolution 1024 --batch 16 --device cuda --dtype bfloat16

Each line is one (layer, form). Layers are the published model's split layers at the output resolution:
``self_64`` / ``self_32`` the decoder self-attention with the ReferenceNet bank at the 1/16 and 1/32 grids
(640 and 1280 channels; N own tokens + N bank tokens), ``cross_64`` the cross-attention over the
[reference ‖ background] context (2 × 196 tokens). Forms:

* ``dense_bool``: one SDPA call with a (B, 1, N, N + M) boolean mask: the split attention this project used
  before the published design (its baseline);
* ``dense_additive``: one SDPA call with the (B, heads, N, N + M) additive mask the reference code builds
  (``create_masked_attention_bias``);
* ``two_calls``: ours (:mod:`model.split_attention`): two attention calls, no mask, and a per-query select.

``mask_bytes`` is the size of the mask tensor the form materializes (exact); ``peak_bytes`` the peak device
memory of one call (CUDA only); ``ms`` the median time of a call; ``time_ratio`` and ``mask_ratio`` are
against ``dense_bool`` in the same run. ``max_abs_diff`` is each form's largest difference from
``dense_bool``: the forms are the same function.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from model.split_attention import attend

HEAD_DIM = 64
CONTEXT_TOKENS = 196


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def layers(resolution: int) -> dict[str, tuple[int, int, int]]:
    """name → (query tokens N, other tokens M, channels) at an output of ``resolution``²."""
    grid64, grid32 = resolution // 16, resolution // 32
    return {"self_64": (grid64 ** 2, grid64 ** 2, 640), "self_32": (grid32 ** 2, grid32 ** 2, 1280),
            "cross_64": (grid64 ** 2, CONTEXT_TOKENS, 640)}


def forms(query, own_k, own_v, other_k, other_v, foreground, heads):
    """The three forms as closures returning (output, mask tensor or None)."""
    keys, values = torch.cat([own_k, other_k], dim=1), torch.cat([own_v, other_v], dim=1)
    n_own = own_k.shape[1]
    first = torch.arange(keys.shape[1], device=query.device) < n_own

    def dense_bool():
        mask = (foreground[:, :, None] == first[None, None, :])[:, None]
        return attend(heads, query, keys, values, mask), mask

    def dense_additive():
        allowed = foreground[:, :, None] == first[None, None, :]
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
        bias = bias[:, None].repeat_interleave(heads, dim=1)
        return attend(heads, query, keys, values, bias), bias

    def two_calls():
        own = attend(heads, query, own_k, own_v)
        other = attend(heads, query, other_k, other_v)
        return torch.where(foreground[..., None], own, other), None

    return {"dense_bool": dense_bool, "dense_additive": dense_additive, "two_calls": two_calls}


def measure(fn, device: torch.device, repeats: int) -> tuple[float, int | None, torch.Tensor, int]:
    out, mask = fn()  # warm-up, and the result
    mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()
    del mask
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, peak, out, mask_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512, help="output side in pixels (sdxl layer sizes follow)")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (items x guidance conditions)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", nargs="+", default=None, help="a subset of self_64 self_32 cross_64")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    for name, (tokens, other_tokens, channels) in layers(args.resolution).items():
        if args.layers and name not in args.layers:
            continue
        heads = channels // HEAD_DIM
        make = lambda n: torch.randn(args.batch, n, channels, device=device, dtype=dtype)  # noqa: E731
        query, own_k, own_v = make(tokens), make(tokens), make(tokens)
        if name.startswith("cross"):  # a cross-attention reads two context halves, not own tokens
            own_k, own_v = make(other_tokens), make(other_tokens)
        other_k, other_v = make(other_tokens), make(other_tokens)
        side = int(tokens ** 0.5)
        mask = F.interpolate(torch.rand(args.batch, 1, side // 4, side // 4, device=device), size=(side, side))
        foreground = mask.flatten(1) > 0.5
        results = {}
        for form, fn in forms(query, own_k, own_v, other_k, other_v, foreground, heads).items():
            with torch.no_grad():
                results[form] = measure(fn, device, args.repeats)
        base_ms, _, base_out, base_mask = results["dense_bool"]
        for form, (ms, peak, out, mask_bytes) in results.items():
            emit({"layer": name, "form": form, "resolution": args.resolution, "batch": args.batch,
                  "tokens": tokens, "other_tokens": other_tokens, "heads": heads, "device": args.device,
                  "dtype": args.dtype, "ms": round(ms, 3), "time_ratio": round(ms / base_ms, 3),
                  "mask_bytes": mask_bytes, "mask_ratio": round(mask_bytes / base_mask, 3) if base_mask else None,
                  "peak_bytes": peak, "max_abs_diff": float((out.float() - base_out.float()).abs().max())})


if __name__ == "__main__":
    main()
