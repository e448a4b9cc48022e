"""`make demo`: the main job, end to end on a local Ray with the tiny preset.

Today's chain: build a tiny colorizer (random init; the training job replaces this with a trained one),
save it as a model folder, load that folder inside a Ray task, and colorize a generated sketch/reference
pair into a PNG. Later stages (preprocess, train, evaluate, serve) join this chain as they land.

    python jobs/demo.py --out outputs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python jobs/demo.py` anywhere

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def build_model_folder(folder: Path, preset: str, seed: int) -> Path:
    """A model folder to serve the chain; reused when it exists."""
    from model.colorizer import Colorizer
    from model.config import get_preset

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    return Colorizer.from_config(get_preset(preset)).save_pretrained(folder)


def colorize_generated_pair(model_folder: str, out_dir: str, seed: int, steps: int) -> dict:
    """Colorize one synthetic pair; writes the result and a sketch | reference | result strip."""
    from model.colorizer import Colorizer
    from pipelines.synthetic import synthetic_illustration

    torch.set_num_threads(2)
    model = Colorizer.from_pretrained(model_folder)
    reference = synthetic_illustration(seed=seed, width=128, height=128)
    drawing = synthetic_illustration(seed=seed + 1, width=128, height=128)  # a different drawing: real use
    started = time.perf_counter()
    result = model.colorize(drawing.sketch, reference.color, steps=steps, seed=seed)
    seconds = time.perf_counter() - started
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "colorized.png"
    result.save(result_path)
    height = result.size[1]
    panels = [Image.fromarray(drawing.sketch).convert("RGB"), Image.fromarray(reference.color), result]
    strip = np.concatenate([np.asarray(p.resize((p.size[0] * height // p.size[1], height))) for p in panels], axis=1)
    Image.fromarray(strip).save(out / "strip.png")
    return {"image": str(result_path), "strip": str(out / "strip.png"), "size": list(result.size),
            "steps": steps, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where the model folder and images go")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    model_folder = build_model_folder(out / "model", args.preset, args.seed)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        task = ray.remote(num_cpus=2)(colorize_generated_pair)
        report = ray.get(task.remote(str(model_folder), str(out), args.seed, args.steps))
    finally:
        ray.shutdown()
    report["model_folder"] = str(model_folder)
    print(json.dumps(report, indent=2))
    print(f"\ncolorized image: {report['image']}\nsketch | reference | result: {report['strip']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
