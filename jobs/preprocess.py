"""Preprocess an illustration corpus into the training dataset (Ray Data).

    ray job submit --working-dir . -- python jobs/preprocess.py \\
        --input s3://bucket/illustrations --out s3://bucket/datasets/v1 --encoders models/base
    python jobs/preprocess.py --input outputs/corpus --out outputs/dataset --encoders outputs/base   # local Ray

Inputs: a folder tree of images, or Parquet files with image bytes (``--image-column``) and an id/path
column. Output layout and schema: pipelines/data/layout.py and docs in README. Reruns skip finished shards;
a killed run resumes where it stopped. The corpus is listed once, at the first run, into plan.parquet;
``--relist`` lists it again and appends new inputs as new shards. The work is pipelines/data/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

import ray  # noqa: E402

from jobs import flags  # noqa: E402
from model.colorizer import read_config  # noqa: E402
from model.config import PRESETS, preset_name  # noqa: E402
from model.line_art import DEFAULT_EXTRACTORS  # noqa: E402
from pipelines.data.ray_stream import ClusterOptions, run_preprocess  # noqa: E402
from pipelines.data.retries import RetryPolicy  # noqa: E402
from pipelines.data.shards import DEFAULT_SHARD_SIZE, LATENT_VIEWS, PreprocessConfig  # noqa: E402
from pipelines.training.trainer import absolute  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--input", required=True, help="folder, Parquet file or folder of Parquet files (any fsspec URI)")
    p.add_argument("--out", required=True, help="dataset folder (any fsspec URI)")
    p.add_argument("--encoders", required=True, help="colorize-xl model folder with the frozen encoders (its preset "
                                                     "decides the buckets)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="aspect buckets and encoder shapes (default: the --encoders folder's preset)")
    p.add_argument("--input-kind", choices=("auto", "folder", "parquet"), default="auto")
    p.add_argument("--image-column", default="image")
    p.add_argument("--id-column", default=None)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"inputs per shard (default {DEFAULT_SHARD_SIZE}): about 0.8 GB of Parquet per shard at the "
                        "sdxl preset (1.5 MB per image; 1.4 GB with the background view) and 11,719 shards for 6M images; fewer, bigger shards cost "
                        "prepare-task memory and lose more work to a kill, more and smaller ones cost listing and "
                        "file opens (64 made 93,750)")
    p.add_argument("--sketch-extractors", default=",".join(DEFAULT_EXTRACTORS),
                   help="comma-separated; classic: xdog, blur_difference, canny, highpass; neural: anime2sketch, "
                        "manga_line, sketchkeras, informative_drawings (need --extractor-weights)")
    p.add_argument("--extractor-weights", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--segmenter", default=None, help="learned mask model (e.g. isnet); default: weight-free masks")
    p.add_argument("--segmenter-weights", default=None)
    p.add_argument("--latent-views", default="target",
                   help=f"comma-separated from {LATENT_VIEWS}; 'background' adds what stage 2 reads (the background "
                        "picture's latents and tokens): target,background for a stage-2 dataset")
    p.add_argument("--storage-dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--encode-batch-size", type=int, default=16)
    p.add_argument("--max-pixels", type=int, default=PreprocessConfig.max_pixels)
    p.add_argument("--encoder-actors", type=int, default=1, help="GPU actor pool size (typically the GPU count)")
    p.add_argument("--gpus-per-encoder", type=float, default=None)
    p.add_argument("--prepare-tasks", type=int, default=None,
                   help="at most this many CPU prepare tasks at once, cluster-wide (default: as many as CPUs and the "
                        "declared memory allow)")
    p.add_argument("--prepare-memory-gb", type=float, default=None,
                   help="memory each prepare task declares to Ray, which caps how many run per node (default: "
                        "estimated from the preset, --shard-size and --max-pixels; about 5.7 GiB at sdxl and 512)")
    p.add_argument("--read-attempts", type=int, default=RetryPolicy.attempts,
                   help="tries of a read or an encoder batch that fails for a temporary reason (S3 503, reset "
                        "connection, timeout, CUDA out of memory), with doubling waits from 1 s; a shard whose "
                        "tries run out is left unmarked and redone by the next run")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (partial run)")
    p.add_argument("--relist", action="store_true",
                   help="list the corpus again instead of reusing the listing stored in <out>/plan.parquet at the "
                        "first run: new inputs are appended as new shards (finished shards never change), inputs "
                        "gone from the corpus are counted and recorded as unreadable in unfinished shards")
    flags.add_ray(p)
    return p


def config_from(args) -> PreprocessConfig:
    encoders = absolute(args.encoders)
    preset = args.preset or preset_name(read_config(encoders))
    if preset not in PRESETS:
        raise ValueError(f"{encoders} holds a custom config; name the preset whose buckets to use with --preset")
    return PreprocessConfig(
        preset=preset, shard_size=args.shard_size,
        sketch_extractors=tuple(s for s in args.sketch_extractors.split(",") if s),
        extractor_weights=flags.parse_pairs(args.extractor_weights), segmenter=args.segmenter,
        segmenter_weights=args.segmenter_weights, encoders=encoders,
        latent_views=tuple(v for v in args.latent_views.split(",") if v), storage_dtype=args.storage_dtype,
        encode_batch_size=args.encode_batch_size, max_pixels=args.max_pixels, image_column=args.image_column,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with flags.job_errors("preprocess"):
        cfg = config_from(args)
        memory = None if args.prepare_memory_gb is None else int(args.prepare_memory_gb * 2**30)
        options = ClusterOptions(encoder_actors=args.encoder_actors, gpus_per_encoder=args.gpus_per_encoder,
                                 prepare_tasks=args.prepare_tasks, prepare_memory=memory,
                                 retry=RetryPolicy(attempts=args.read_attempts))
        ray.init(address=args.ray_address, log_to_driver=True)
        try:
            manifest = run_preprocess(args.input, args.out, cfg, options, kind=args.input_kind,
                                      id_column=args.id_column, max_shards=args.max_shards, relist=args.relist)
        finally:
            ray.shutdown()
    print(json.dumps({k: manifest[k] for k in ("inputs", "rows", "errors", "shards", "shards_done", "complete")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
