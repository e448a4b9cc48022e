"""Preprocessing benchmarks, printed as JSON lines (no Ray needed).

    python bench/preprocess.py                                  # CPU stages at sdxl crop sizes, 1 thread
    python bench/preprocess.py --encoders-only --preset sdxl --device cuda --batch 32

* ``cpu_stage``: images/s per core of each CPU step (decode, bucket crop + letterbox, each classic
  sketch extractor, each mask, the PNG/JPEG encodes) and of the whole per-image prepare step, on
  synthetic illustrations at the preset's bucket sizes; OpenCV is held to one thread so the figure is
  per core. Ratios are against the whole prepare step.
* ``encoder_stage``: images/s of the frozen encoders (WD-Tagger, OpenCLIP, VAE encode) and of the three
  together at the preset's sizes, random init (speed does not depend on weight values).
* ``bytes``: stored bytes per image per column at the preset's sizes, and the total for a corpus.
* ``resubmit`` and ``shard_write`` (``--storage-only``; issue 18, points 4 and 8): what a resubmission costs
  before it starts work (listing the corpus, finding finished shards) and what writing one shard costs, in
  requests and seconds, the code before those points against today's, in the same run, on fsspec's
  in-memory store (an object store's stand-in: ``--latency-ms`` per request, a listing paged by 1,000 keys
  as S3's) and on the local disk. See :mod:`bench.storage`.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.config import get_preset  # noqa: E402
from model.geometry import buckets_for, crop_to_bucket, letterbox, nearest_bucket  # noqa: E402
from model.image_io import decode_image  # noqa: E402
from model.masks import reference_foreground, sketch_foreground  # noqa: E402
from pipelines.data.shards import PreprocessConfig, _prepare_one, jpeg_bytes, png_bytes  # noqa: E402
from model.line_art import CLASSIC_EXTRACTORS, invert  # noqa: E402
from pipelines.data.corpus import InputItem  # noqa: E402
from pipelines.data.synthetic import synthetic_illustration  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def per_item_seconds(fn, items, repeats: int) -> float:
    for item in items[:2]:
        fn(item)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        runs.append((time.perf_counter() - start) / len(items))
    return statistics.median(runs)


def bench_cpu(args, preset: str) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    config = get_preset(preset)
    buckets = buckets_for(config)
    source_side = int(config.data.bucket_area ** 0.5 * 1.4)  # sources a bit larger than the crops, as in corpora
    pictures = [synthetic_illustration(seed=i, width=source_side, height=int(source_side * 0.8)).color
                for i in range(args.images)]
    files = []
    for picture in pictures:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    bucket = nearest_bucket(pictures[0].shape[1], pictures[0].shape[0], buckets)
    crops = [crop_to_bucket(p, bucket) for p in pictures]
    drawings = [CLASSIC_EXTRACTORS["xdog"](c) for c in crops]
    cfg = PreprocessConfig(preset=preset)
    steps = {
        "decode_png": (lambda data: decode_image(data), files),
        "crop_and_letterbox": (lambda p: (crop_to_bucket(p, bucket), letterbox(p, bucket)), pictures),
        **{f"sketch_{name}": (fn, crops) for name, fn in CLASSIC_EXTRACTORS.items()},
        "mask_reference": (reference_foreground, crops),
        "mask_sketch": (sketch_foreground, drawings),
        "encode_png_sketch": (lambda d: png_bytes(invert(d)), drawings),
        "encode_jpeg_image": (lambda c: jpeg_bytes(c, 95), crops),
        "prepare_one_image": (lambda p: _prepare_one(0, InputItem("x", "x"), "id", p, buckets, cfg), pictures),
    }
    timings = {name: per_item_seconds(fn, items, args.repeats) for name, (fn, items) in steps.items()}
    whole = timings["prepare_one_image"] + timings["decode_png"]
    for name, seconds in timings.items():
        emit({"bench": "cpu_stage", "step": name, "preset": preset, "crop": list(bucket),
              "source": [source_side, int(source_side * 0.8)], "images_per_s_per_core": round(1 / seconds, 2),
              "share_of_prepare": round(seconds / whole, 3)})
    emit({"bench": "cpu_stage", "step": "decode_and_prepare", "preset": preset,
          "images_per_s_per_core": round(1 / whole, 2)})


def bench_encoders(args, preset: str) -> None:
    from model.colorizer import Colorizer
    from model.vae import encode_latents

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = get_preset(preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = Colorizer(config)
    model = model.to(dtype).eval()
    width, height = max(buckets_for(config), key=lambda wh: wh[0] * wh[1] * (wh[0] == wh[1]))
    images = torch.rand(args.batch, 3, height, width, device=device, dtype=dtype)

    def timed(fn) -> float:
        with torch.no_grad():
            for _ in range(2):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    parts = {
        "tagger": lambda: model.tagger(images),
        "clip": lambda: model.clip(images),
        "vae_encode": lambda: encode_latents(model.vae, images * 2 - 1),
    }
    single = list(parts.values())
    parts["all_three"] = lambda: [fn() for fn in single]
    for name, fn in parts.items():
        seconds = timed(fn)
        emit({"bench": "encoder_stage", "part": name, "preset": preset, "device": device.type,
              "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "size": [width, height],
              "images_per_s": round(args.batch / seconds, 2)})


def bench_bytes(args, preset: str) -> None:
    config = get_preset(preset)
    side = int(config.data.bucket_area ** 0.5)
    latent = side // config.latent_stride
    tensors = {
        "latents": config.unet.latent_channels * latent * latent * 2,
        "tagger_tokens": config.tagger.num_tokens * config.tagger.token_dim * 2,
        "clip_tokens": config.clip.num_tokens * config.clip.embed_dim * 2,
        "background_latents (stage-2 view)": config.unet.latent_channels * latent * latent * 2,
        "background_tagger_tokens (stage-2 view)": config.tagger.num_tokens * config.tagger.token_dim * 2,
        "background_clip_tokens (stage-2 view)": config.clip.num_tokens * config.clip.embed_dim * 2,
    }
    picture = synthetic_illustration(seed=1, width=side, height=side).color
    drawings = [fn(picture) for fn in CLASSIC_EXTRACTORS.values()]
    encoded = {
        "image (JPEG q95, synthetic)": len(jpeg_bytes(picture, 95)),
        "sketches (4 PNG, synthetic)": sum(len(png_bytes(invert(d))) for d in drawings),
        "masks (2 PNG, synthetic)": 2 * len(png_bytes(reference_foreground(picture))),
    }
    total = sum(v for k, v in tensors.items() if "optional" not in k) + sum(encoded.values())
    emit({"bench": "bytes", "preset": preset, "size": [side, side], "fp16_bytes_per_image": tensors,
          "encoded_bytes_per_image": encoded, "total_bytes_per_image": total,
          "corpus_images": args.corpus, "corpus_terabytes": round(total * args.corpus / 1e12, 2)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl", help="sizes of crops and encoders (sdxl: 1 MP crops)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--corpus", type=int, default=6_000_000)
    parser.add_argument("--encoders-only", action="store_true")
    parser.add_argument("--encoder-preset", default=None, help="preset of the encoder bench (default: tiny on CPU)")
    parser.add_argument("--storage-only", action="store_true", help="only the resubmit and shard_write benches")
    parser.add_argument("--keys", type=int, default=100_000, help="corpus files of the storage bench")
    parser.add_argument("--keys-per-shard", type=int, default=10, help="(10: 10,000 shards of 100,000 keys)")
    parser.add_argument("--latency-ms", type=float, default=1.0, help="modelled round trip of one store request")
    parser.add_argument("--stores", default="memory,local", help="comma-separated: memory, local")
    args = parser.parse_args(argv)
    if args.storage_only:
        from bench.storage import bench_storage

        bench_storage(args, emit)
        return 0
    bench_bytes(args, args.preset)
    if not args.encoders_only:
        bench_cpu(args, args.preset)
    encoder_preset = args.encoder_preset or (args.preset if args.device == "cuda" else "tiny")
    bench_encoders(args, encoder_preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
