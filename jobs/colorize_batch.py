"""Colorize many pairs: a manifest, or a folder of sketches after one reference (Ray Data).

    ray job submit --working-dir . -- python jobs/colorize_batch.py --model /mnt/shared/models/stage2 \\
        --manifest s3://bucket/eval/pairs.parquet --out s3://bucket/colorized/eval-v1 --workers 8 --gpu
    ray job submit --working-dir . -- python jobs/colorize_batch.py --model /mnt/shared/models/stage2 \\
        --sketches s3://bucket/cut-042/lines --reference s3://bucket/sheets/hero.png \\
        --out s3://bucket/colorized/cut-042 --size 1024x768 --steps 20 --seed 7 --workers 8 --gpu
    python jobs/colorize_batch.py --model outputs/demo/stage2 --sketches outputs/lines --reference ref.png \\
        --out outputs/colorized --size 128 --steps 4        # a local Ray, CPU actors

Manifest (CSV or Parquet): sketch, reference (required), background, seed, id and per-row settings
(steps, size, guidance, reference_guidance, sketch_guidance, reference_strength, sketch_strengths,
sampler, plugin, background_enhance, extract_lines, line_extractor, ...: pipelines/inference/pairs.py);
an empty cell takes the flag's value. Paths are fsspec URIs, relative ones from the manifest's folder.

Output under --out: images/<id>.png, index.parquet (pair id, inputs, parameters, output path, seconds),
errors.parquet (pair id, input, stage, reason): rows + errors = pairs. A rerun skips finished units and,
when all are done, starts no Ray and writes nothing; a killed run resumes where it stopped. A pair's
picture depends on its seed and settings only, not on how it was batched. Layout:
pipelines/inference/layout.py; the work: pipelines/inference/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags
from model.line_art import CLASSIC_EXTRACTORS
from model.options import SAMPLERS
from pipelines.inference.layout import BatchConfig
from pipelines.inference.pairs import parse_seed, parse_settings
from pipelines.inference.ray_stream import RunOptions, run_colorize_batch


def absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in other directories); URIs (``s3://``) as they are."""
    return path if path is None or "://" in path else str(Path(path).resolve())


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--model", required=True, help="model folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV or Parquet file (or folder of Parquet files), one row per pair")
    source.add_argument("--sketches", help="folder of sketches (recursive), all colored after --reference")
    p.add_argument("--reference", default=None, help="with --sketches: the reference for every sketch")
    p.add_argument("--background", default=None, help="with --sketches: one background picture for every sketch "
                                                      "(needs the plug-in or --background-enhance)")
    p.add_argument("--out", required=True, help="output prefix (any fsspec URI)")
    g = p.add_argument_group("settings (a manifest's per-row values override these)")
    g.add_argument("--size", type=flags.parse_size, default=None,
                   help="N or WxH (default: each sketch's aspect at the preset's default area)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the pairs without their own")
    g.add_argument("--reference-guidance", type=float, default=None)
    g.add_argument("--sketch-guidance", type=float, default=None)
    g.add_argument("--reference-strength", type=float, default=None)
    g.add_argument("--sketch-strengths", default=None, help="comma-separated, one per injection point")
    g.add_argument("--sampler", choices=SAMPLERS, default=None)
    g.add_argument("--plugin", action=argparse.BooleanOptionalAction, default=None,
                   help="the stage-2 plug-in (default: on when the model has one)")
    g.add_argument("--background-enhance", action="store_true", default=None)
    g.add_argument("--extract-lines", action="store_true", default=None,
                   help="the sketches are colored or photographed drawings: extract their lines first")
    g.add_argument("--line-extractor", choices=tuple(CLASSIC_EXTRACTORS), default=None, help="default xdog")
    g.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other setting (e.g. merge_scale=0.5); repeatable")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=8, help="pairs per colorize call")
    r.add_argument("--unit-size", type=int, default=64, help="pairs per unit (work item, resume granularity)")
    flags.add_workers(r, what="colorizer actors (Ray Data actor pool; one per GPU with --gpu)")
    r.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bf16 on a GPU, fp32 on CPU")
    r.add_argument("--context-cache", type=int, default=64, help="reference contexts each actor keeps")
    r.add_argument("--max-units", type=int, default=None, help="stop after this many units (a partial run)")
    r.add_argument("--in-process", action="store_true", help="run the stages in this process, without Ray")
    flags.add_ray(p)
    flags.add_acceleration(p)
    return p


def config_from(args) -> BatchConfig:
    raw = {"size": list(args.size) if args.size else None, "steps": args.steps,
           "reference_guidance": args.reference_guidance, "sketch_guidance": args.sketch_guidance,
           "reference_strength": args.reference_strength, "sketch_strengths": args.sketch_strengths,
           "sampler": args.sampler, "plugin": args.plugin, "background_enhance": args.background_enhance,
           "extract_lines": args.extract_lines, "line_extractor": args.line_extractor}
    for name, value in flags.parse_pairs(args.set).items():
        if raw.get(name) is not None:
            raise ValueError(f"--set {name}=... repeats a flag that is already given")
        raw[name] = value
    defaults = parse_settings({k: v for k, v in raw.items() if v is not None})
    return BatchConfig(model=absolute(args.model), manifest=absolute(args.manifest), sketches=absolute(args.sketches),
                       reference=absolute(args.reference), background=absolute(args.background),
                       defaults=defaults, seed=parse_seed(args.seed, 0), unit_size=args.unit_size)


def options_from(args) -> RunOptions:
    acceleration = {"compile": args.compile, "channels_last": args.channels_last, "attention": args.attention,
                    "compile_mode": args.compile_mode, "compile_cache": args.compile_cache}
    flags.acceleration_from(args, "cpu")  # refuse unknown values here, not in every actor
    return RunOptions(batch_size=args.batch_size, actors=args.workers, gpus_per_actor=1.0 if args.gpu else 0.0,
                      cpus_per_actor=args.cpus_per_worker, dtype=args.dtype, context_cache=args.context_cache,
                      acceleration=acceleration)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with flags.job_errors("colorize_batch"):
        cfg = config_from(args)
        manifest = run_colorize_batch(cfg, absolute(args.out), options_from(args), max_units=args.max_units,
                                      in_process=args.in_process, ray_address=args.ray_address)
    print(json.dumps({k: manifest[k] for k in ("inputs", "rows", "errors", "errors_by_stage", "units", "units_done",
                                               "complete")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
