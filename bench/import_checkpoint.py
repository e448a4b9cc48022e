"""Full-size import of a ColorizeDiffusionXL checkpoint: wall time and peak memory, printed as JSON lines.

    python bench/import_checkpoint.py                    # synthesize under /tmp, import to bf16, load it back
    python bench/import_checkpoint.py --dtype fp16 --keep --workdir /scratch/cdxl-bench

The published files are not needed: the benchmark writes files with their exact key names and shapes
(tests/fixtures/cdxl/, random values) under ``--workdir``: an ``sdxl`` checkpoint (fp16, the DDPM buffers
set to our schedule so the import accepts it), a transformers-layout CLIP ViT-bigG-14 vision tower (fp32,
as laion publishes it) and the WD SwinV2 tagger (fp32, 9083 tags). It then runs, each in a fresh child
process that reports its own peak RSS (``ru_maxrss``):

* ``import``: :func:`model.cdxl_checkpoint.import_checkpoint` to a model folder at ``--dtype``;
* ``load``: ``Colorizer.from_pretrained`` of that folder at ``--dtype``.

The synthesized files were just written, so they are read from the page cache: a cold read from disk adds
its own time. Everything under ``--workdir`` is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures" / "cdxl"
CLIP_PREFIX, TAGGER_PREFIX = "cond_stage_model.model.", "img_embedder.model."


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def write_random(shapes: dict, path: Path, dtype, fixed: dict | None = None) -> int:
    """A safetensors file with these keys and shapes, random normal values (``fixed`` ones as given)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if fixed and key in fixed:
            tensors[key] = fixed[key]
        else:
            tensors[key] = torch.randn(shape, generator=generator, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path.stat().st_size


def synthesize(workdir: Path) -> dict:
    import torch

    from model.cdxl_checkpoint import reference_schedule_buffers
    from model.config import sdxl

    checkpoint = json.loads((FIXTURES / "cdxl-checkpoint-keys.json").read_text())["sdxl"]
    encoders = json.loads((FIXTURES / "cdxl-encoder-keys.json").read_text())
    schedule = reference_schedule_buffers(sdxl().diffusion)
    paths = {"cdxl": workdir / "sdxl.safetensors", "clip": workdir / "clip" / "model.safetensors",
             "tagger_weights": workdir / "tagger" / "model.safetensors",
             "tagger_tags": workdir / "tagger" / "selected_tags.csv"}
    start = time.perf_counter()
    sizes = {"cdxl": write_random(checkpoint, paths["cdxl"], torch.float16, fixed=schedule)}
    clip = {k[len(CLIP_PREFIX):]: v for k, v in encoders.items() if k.startswith(CLIP_PREFIX)}
    sizes["clip"] = write_random(clip, paths["clip"], torch.float32)
    tagger = {k[len(TAGGER_PREFIX):]: v for k, v in encoders.items() if k.startswith(TAGGER_PREFIX)}
    sizes["tagger"] = write_random(tagger, paths["tagger_weights"], torch.float32)
    tags = tagger["head.fc.weight"][0]
    paths["tagger_tags"].write_text("tag_id,name,category,count\n" + "".join(f"{i},tag_{i},0,1\n" for i in range(tags)))
    emit({"bench": "synthesize", "seconds": round(time.perf_counter() - start, 1),
          "gib": {name: gib(size) for name, size in sizes.items()}})
    return {name: str(path) for name, path in paths.items()}


def child(args: argparse.Namespace) -> None:
    """One measured step in this (fresh) process; prints its wall time and its own peak RSS."""
    import torch

    from model.cdxl_checkpoint import DTYPES, import_checkpoint
    from model.colorizer import Colorizer

    start = time.perf_counter()
    if args.child == "import":
        paths = json.loads(args.paths)
        report = import_checkpoint(paths["cdxl"], paths["clip"], paths["tagger_weights"], paths["tagger_tags"],
                                   args.out, dtype=DTYPES[args.dtype], log=lambda line: None)
        extra = {"loaded": report.loaded, "dropped": sum(report.dropped.values())}
    else:
        model = Colorizer.from_pretrained(args.out, dtype=DTYPES[args.dtype])
        extra = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                 "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    emit({"bench": args.child, "dtype": args.dtype, "seconds": round(seconds, 1), "peak_rss_gib": gib(peak_kib * 1024),
          "threads": torch.get_num_threads(), **extra})


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/cdxl-import-bench", help="where the synthesized files go")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--keep", action="store_true", help="keep the synthesized files and the imported folder")
    p.add_argument("--child", choices=("import", "load"), help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(args.workdir)
    if workdir.exists():
        raise SystemExit(f"{workdir} exists; remove it or choose another --workdir")
    out = workdir / "imported"
    try:
        paths = synthesize(workdir)
        for step in ("import", "load"):
            subprocess.run([sys.executable, __file__, "--child", step, "--paths", json.dumps(paths),
                            "--out", str(out), "--dtype", args.dtype], check=True)
        emit({"bench": "folder", "gib": gib(folder_size(out))})
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
