"""Batch colorization throughput: the job's Ray Data stream against a plain loop over ``colorize_batch``,
on the same pairs in the same run. Prints JSON lines.

    python bench/colorize_batch.py                                   # tiny preset, CPU: 32 pairs at 64², 2 steps
    python bench/colorize_batch.py --modes loop in_process           # without Ray
    python bench/colorize_batch.py --model /mnt/shared/models/stage2 --device cuda --dtype bfloat16 \\
        --pairs 64 --size 1024 --steps 20 --batch-size 8

The pairs: ``--pairs`` synthetic drawings colored after one shared reference (a cut after its character
sheet), each with its own seed, at ``--size``. Modes:

* ``loop``: the model loaded once, then for each ``--batch-size`` pairs: decode the PNGs, one
  ``Colorizer.colorize_batch`` call, encode and write the PNGs; one process, nothing else. Reported warm
  (after one untimed call) and with the load.
* ``in_process``: the job's stages (``pipelines/inference``: plan, prepare, colorize with the reference
  context encoded once, write with markers, index) in this process, on the loop's loaded model.
* ``ray``: the job's Ray Data stream on a local Ray (``ray.init`` not counted; the actors' start and model
  load are), ``--workers`` actors (one GPU each on ``--device cuda``).

Each line has ``pairs_per_s``; ``in_process`` and ``ray`` carry ``ratio_vs_loop`` (over the warm loop) and
``ratio_vs_loop_with_load`` (over the loop counting its model load, as the job counts its actors'). On a
small CPU machine the Ray actors, the prepare tasks and the writer share the cores the loop had to itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from model.config import PRESETS  # noqa: E402

MODES = ("loop", "in_process", "ray")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: a random-init --preset folder, made here)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="without --model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--pairs", type=int, default=None, help="default: 32 at tiny, 16 otherwise")
    p.add_argument("--size", type=int, default=None, help="output side (default: 64 at tiny, 1024 otherwise)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 2 at tiny, 20 otherwise)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per colorize_batch call (loop and job)")
    p.add_argument("--unit-size", type=int, default=None, help="pairs per unit of the job (default: 2 batches)")
    p.add_argument("--workers", type=int, default=1, help="actors of the Ray stream")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder)")
    return p


def make_inputs(folder: Path, pairs: int, side: int) -> tuple[Path, Path]:
    """``pairs`` drawings and one reference, as PNG files at the output's size."""
    from pipelines.data.synthetic import synthetic_illustration

    sketches = folder / "sketches"
    sketches.mkdir(parents=True, exist_ok=True)
    for i in range(pairs):
        Image.fromarray(synthetic_illustration(seed=100 + i, width=side, height=side).sketch).save(
            sketches / f"frame_{i:05d}.png")
    reference = folder / "sheet.png"
    Image.fromarray(synthetic_illustration(seed=1, width=side, height=side).color).save(reference)
    return sketches, reference


def run_loop(model, sketches: list[Path], reference: Path, out: Path, size: int, steps: int,
             batch_size: int) -> dict:
    """The plain loop: decode, ``colorize_batch``, encode and write, ``batch_size`` pairs at a time."""
    import torch

    from model.image_io import decode_image
    from model.options import ColorizeOptions
    from pipelines.inference.stages import png_bytes

    options = ColorizeOptions(size=(size, size), steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    warm = decode_image(sketches[0].read_bytes())
    model.colorize_batch([warm], [decode_image(reference.read_bytes())], options, seeds=[0])  # untimed
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started, model_seconds = time.perf_counter(), 0.0
    for start in range(0, len(sketches), batch_size):
        chunk = sketches[start:start + batch_size]
        drawings = [decode_image(p.read_bytes()) for p in chunk]
        references = [decode_image(reference.read_bytes()) for _ in chunk]
        called = time.perf_counter()
        images = model.colorize_batch(drawings, references, options, seeds=list(range(start, start + len(chunk))))
        model_seconds += time.perf_counter() - called
        for path, image in zip(chunk, images):
            (out / f"{path.stem}.png").write_bytes(png_bytes(np.asarray(image)))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "model_seconds": round(model_seconds, 3),
            "pairs_per_s": round(len(sketches) / seconds, 4)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from model.assembly import init_model
    from model.colorizer import Colorizer, read_config
    from model.config import preset_name
    from pipelines.inference.layout import BatchConfig
    from pipelines.inference.pairs import parse_settings
    from pipelines.inference.ray_stream import RunOptions, run_colorize_batch
    from pipelines.inference.stages import UnitColorizer, resolve_device

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-colorize-batch-"))
    model_dir = Path(args.model) if args.model else init_model(work / f"model-{args.preset}", args.preset, seed=0)
    preset = preset_name(read_config(model_dir))
    tiny = preset == "tiny"
    size = args.size or (64 if tiny else 1024)
    steps = args.steps or (2 if tiny else 20)
    args.pairs = args.pairs or (32 if tiny else 16)
    unit_size = args.unit_size or 2 * args.batch_size
    sketch_dir, reference = make_inputs(work / f"inputs-{size}-{args.pairs}", args.pairs, size)
    sketches = sorted(sketch_dir.glob("*.png"))
    device, dtype = resolve_device(args.device, args.dtype)
    common = {"bench": "colorize_batch", "preset": preset, "device": str(device), "dtype": str(dtype).split(".")[-1],
              "pairs": args.pairs, "size": size, "steps": steps, "batch_size": args.batch_size, "cpus": os.cpu_count()}

    loaded = time.perf_counter()
    model = Colorizer.from_pretrained(model_dir, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - loaded
    loop = None
    if "loop" in args.modes:
        loop = run_loop(model, sketches, reference, work / "loop-out", size, steps, args.batch_size)
        loop["pairs_per_s_with_load"] = round(args.pairs / (loop["seconds"] + load_seconds), 4)
        emit({**common, "mode": "loop", "load_seconds": round(load_seconds, 3), **loop})

    def ratios(pairs_per_s: float) -> dict:
        if loop is None:
            return {}
        return {"ratio_vs_loop": round(pairs_per_s / loop["pairs_per_s"], 3),
                "ratio_vs_loop_with_load": round(pairs_per_s / loop["pairs_per_s_with_load"], 3)}

    cfg = BatchConfig(model=str(model_dir.resolve()), sketches=str(sketch_dir.resolve()),
                      reference=str(reference.resolve()), defaults=parse_settings({"size": size, "steps": steps}),
                      unit_size=unit_size)
    options = RunOptions(batch_size=args.batch_size, actors=args.workers,
                         gpus_per_actor=1.0 if device.type == "cuda" else 0.0, dtype=args.dtype)
    if "in_process" in args.modes:
        colorizer = UnitColorizer(model, batch_size=args.batch_size)
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the job's progress lines: stdout stays JSON lines
            manifest = run_colorize_batch(cfg, str(work / f"job-in-process-{time.time_ns()}"), options,
                                          colorizer=colorizer)
        seconds = time.perf_counter() - started
        rate = manifest["rows"] / seconds
        emit({**common, "mode": "in_process", "unit_size": unit_size, "seconds": round(seconds, 3),
              "rows": manifest["rows"], "errors": manifest["errors"], "pairs_per_s": round(rate, 4),
              "contexts_encoded": colorizer.stats["contexts_encoded"], **ratios(rate)})
        del colorizer
    del model  # the actors load their own
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    if "ray" in args.modes:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                manifest = run_colorize_batch(cfg, str(work / f"job-ray-{time.time_ns()}"), options)
            seconds = time.perf_counter() - started
        finally:
            ray.shutdown()
        rate = manifest["rows"] / seconds
        emit({**common, "mode": "ray", "unit_size": unit_size, "workers": args.workers, "seconds": round(seconds, 3),
              "rows": manifest["rows"], "errors": manifest["errors"], "pairs_per_s": round(rate, 4), **ratios(rate)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
