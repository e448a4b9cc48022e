"""`make demo`: the main job, end to end on a local Ray with the tiny preset.

The chain so far, each step skipped when its output already exists:

1. make a synthetic corpus (with a few damaged files, as real corpora have);
2. assemble the base model folder (tiny preset, random init; holds the frozen encoders);
3. preprocess the corpus with Ray Data (sketches, masks, tokens, latents → Parquet shards);
4. train stage 1 (backbone with the Gram loss) and stage 2 (plugin) with Ray Train + DeepSpeed on two
   CPU workers, tracked in MLflow (``outputs/demo/mlflow.db``);
5. colorize one sketch from the dataset after another image's reference, in a Ray task.

Evaluation and serving join this chain as those jobs land. A tiny model trained for a minute learns
colors and coarse layout at best; the point is the whole system running, not the picture.

    python jobs/demo.py --out outputs/demo
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from jobs.init_model import init_model  # noqa: E402
from jobs.train import build_parser as train_parser  # noqa: E402
from jobs.train import make_trainer  # noqa: E402
from jobs.make_corpus import make_corpus  # noqa: E402
from pipelines.dataset import read_all  # noqa: E402
from pipelines.preprocess import PreprocessConfig  # noqa: E402
from pipelines.ray_preprocess import run_preprocess  # noqa: E402


def colorize_from_dataset(model_folder: str, dataset: str, out_dir: str, seed: int, steps: int) -> dict:
    """Sketch of the first dataset row, reference = the image of the last row; writes a result strip."""
    from model.colorizer import Colorizer
    from pipelines.sketches import invert

    torch.set_num_threads(2)
    model = Colorizer.from_pretrained(model_folder)
    rows = read_all(dataset, columns=["source", "image", "sketches"]).to_pylist()
    sketch_row, reference_row = rows[0], rows[-1]
    drawing = invert(np.asarray(Image.open(io.BytesIO(sketch_row["sketches"][0]))))
    reference = np.asarray(Image.open(io.BytesIO(reference_row["image"])).convert("RGB"))
    started = time.perf_counter()
    result = model.colorize(drawing, reference, steps=steps, seed=seed)
    seconds = time.perf_counter() - started
    out = Path(out_dir)
    result_path = out / "colorized.png"
    result.save(result_path)
    height = result.size[1]
    panels = [Image.fromarray(drawing).convert("RGB"), Image.fromarray(reference), result]
    strip = np.concatenate([np.asarray(p.resize((p.size[0] * height // p.size[1], height))) for p in panels], axis=1)
    Image.fromarray(strip).save(out / "strip.png")
    return {"image": str(result_path), "strip": str(out / "strip.png"), "size": list(result.size),
            "sketch_from": sketch_row["source"], "reference_from": reference_row["source"],
            "steps": steps, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where everything goes")
    parser.add_argument("--images", type=int, default=32, help="size of the synthetic corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="sampling steps of the final colorization")
    parser.add_argument("--train-steps", type=int, default=40, help="stage-1 steps (stage 2 runs a quarter)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = out / "corpus"
    if not corpus.is_dir():
        print("[demo] 1/5 making a synthetic corpus:", json.dumps(make_corpus(corpus, args.images, True, args.seed)))
    else:
        print(f"[demo] 1/5 corpus exists: {corpus}")
    base = init_model(out / "base", "tiny", seed=args.seed)
    print(f"[demo] 2/5 base model folder: {base}")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        dataset = out / "dataset"
        print(f"[demo] 3/5 preprocessing {corpus} → {dataset}")
        cfg = PreprocessConfig(preset="tiny", shard_size=8, encoders=str(base), latent_views=("target", "reference"))
        manifest = run_preprocess(str(corpus), str(dataset), cfg)
        trained = base
        runs = {}
        for stage, steps in (("backbone", args.train_steps), ("plugin", max(1, args.train_steps // 4))):
            export = out / ("stage1" if stage == "backbone" else "stage2")
            if (export / "config.json").is_file():
                print(f"[demo] 4/5 {stage} stage already trained: {export}")
            else:
                print(f"[demo] 4/5 training the {stage} stage for {steps} steps (Ray Train + DeepSpeed, 2 workers)")
                train_args = train_parser().parse_args([
                    "--stage", stage, "--model", str(trained), "--data", str(dataset), "--export", str(export),
                    "--steps", str(steps), "--batch-size", "2", "--workers", "2", "--cpus-per-worker", "0.5",
                    "--checkpoint-every", str(max(1, steps // 2)), "--sample-every", "0",
                    "--storage", str(out / "runs"), "--run-name", "demo",
                    "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}"])
                make_trainer(train_args).fit()
            runs[stage] = str(export)
            trained = export
        print("[demo] 5/5 colorizing a dataset sketch after another image's reference (in a Ray task)")
        task = ray.remote(num_cpus=2)(colorize_from_dataset)
        report = ray.get(task.remote(str(trained), str(dataset), str(out), args.seed, args.steps))
    finally:
        ray.shutdown()

    summary = {
        "dataset": str(dataset), "rows": manifest["rows"], "errors": manifest["errors"], "inputs": manifest["inputs"],
        "models": {"base": str(base), **runs}, "colorized": report, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    print(f"\n[demo] dataset: {dataset} ({manifest['rows']} rows, {manifest['errors']} errors in "
          f"{dataset / 'errors'})\n[demo] colorized image: {report['image']}\n[demo] sketch | reference | result: "
          f"{report['strip']}\n[demo] experiments: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}"
          f"\n[demo] on a cluster: ray job submit --working-dir . -- python jobs/preprocess.py "
          f"--input <corpus> --output <dataset> --encoders <model folder> --preset sdxl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
