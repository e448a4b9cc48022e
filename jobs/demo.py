"""`make demo`: the main job, end to end on a local Ray with the tiny preset.

The chain so far, each step skipped when its output already exists:

1. make a synthetic corpus (with a few damaged files, as real corpora have);
2. assemble the base model folder (tiny preset, random init; holds the frozen encoders);
3. preprocess the corpus with Ray Data (sketches, masks, tokens, latents → Parquet shards);
4. train stage 1 (backbone with the Gram loss) and stage 2 (plugin) with Ray Train + DeepSpeed on two
   CPU workers, tracked in MLflow (``outputs/demo/mlflow.db``);
5. serve the trained model with Ray Serve and send it one HTTP request: a dataset sketch after another
   image's reference; the returned PNG is saved (``--keep-serving`` leaves the app and its web page up).

Evaluation joins this chain as that job lands. A tiny model trained for a minute learns
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
from PIL import Image  # noqa: E402

from jobs.init_model import init_model  # noqa: E402
from jobs.train import build_parser as train_parser  # noqa: E402
from jobs.train import make_trainer  # noqa: E402
from jobs.make_corpus import make_corpus  # noqa: E402
from pipelines.dataset import read_all  # noqa: E402
from pipelines.preprocess import PreprocessConfig  # noqa: E402
from pipelines.ray_preprocess import run_preprocess  # noqa: E402


def demo_pair(dataset: str) -> tuple[dict, bytes, bytes]:
    """The first row's sketch (as a drawing, PNG) and the last row's image as its reference (JPEG bytes)."""
    from pipelines.sketches import invert

    rows = read_all(dataset, columns=["source", "image", "sketches"]).to_pylist()
    sketch_row, reference_row = rows[0], rows[-1]
    drawing = invert(np.asarray(Image.open(io.BytesIO(sketch_row["sketches"][0]))))
    buffer = io.BytesIO()
    Image.fromarray(drawing).save(buffer, format="PNG")
    where = {"sketch_from": sketch_row["source"], "reference_from": reference_row["source"]}
    return where, buffer.getvalue(), reference_row["image"]


def serve_and_request(model_folder: str, dataset: str, out_dir: str, seed: int, steps: int, port: int,
                      keep_serving: bool) -> dict:
    """Deploy the Serve app of ``serve/app.py`` on the running local Ray, send one HTTP request with a dataset
    sketch and another image's reference, save the returned PNG and a sketch | reference | result strip."""
    import requests
    from ray import serve

    from serve.app import build_app

    where, sketch_png, reference_jpeg = demo_pair(dataset)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model_folder, "num_cpus": 1, "max_batch_size": 2}), name="colorize",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/colorize", timeout=600, files={
        "sketch": ("sketch.png", sketch_png, "image/png"), "reference": ("reference.jpg", reference_jpeg, "image/jpeg"),
    }, data={"seed": str(seed), "steps": str(steps)})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"the served model answered HTTP {response.status_code}: {response.text}")
    out = Path(out_dir)
    result_path = out / "colorized.png"
    result_path.write_bytes(response.content)
    result = Image.open(result_path).convert("RGB")
    height = result.size[1]
    panels = [Image.open(io.BytesIO(sketch_png)).convert("RGB"), Image.open(io.BytesIO(reference_jpeg)).convert("RGB"),
              result]
    strip = np.concatenate([np.asarray(p.resize((p.size[0] * height // p.size[1], height))) for p in panels], axis=1)
    Image.fromarray(strip).save(out / "strip.png")
    parameters = {k[2:].lower().replace("-", "_"): v for k, v in response.headers.items() if k.lower().startswith("x-")}
    if keep_serving:
        print(f"[demo] serving at {url}/ (the artists' page; API docs at {url}/docs). Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    return {"image": str(result_path), "strip": str(out / "strip.png"), "size": list(result.size),
            "url": f"{url}/v1/colorize", "seconds": round(seconds, 3), "parameters": parameters, **where}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where everything goes")
    parser.add_argument("--images", type=int, default=32, help="size of the synthetic corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="sampling steps of the final colorization")
    parser.add_argument("--train-steps", type=int, default=40, help="stage-1 steps (stage 2 runs a quarter)")
    parser.add_argument("--port", type=int, default=8000, help="the Serve HTTP port (loopback only)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave the app up at the end (open http://127.0.0.1:PORT/ for the artists' page)")
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
        print("[demo] 5/5 serving the trained model with Ray Serve and sending it one HTTP request")
        report = serve_and_request(str(trained), str(dataset), str(out), args.seed, args.steps, args.port,
                                   args.keep_serving)
    finally:
        ray.shutdown()

    summary = {
        "dataset": str(dataset), "rows": manifest["rows"], "errors": manifest["errors"], "inputs": manifest["inputs"],
        "models": {"base": str(base), **runs}, "colorized": report, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    print(f"\n[demo] dataset: {dataset} ({manifest['rows']} rows, {manifest['errors']} errors in "
          f"{dataset / 'errors'})\n[demo] colorized image: {report['image']}\n[demo] sketch | reference | result: "
          f"{report['strip']}\n[demo] serve it again: serve run serve/config.yaml (model: {trained})"
          f"\n[demo] experiments: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}"
          f"\n[demo] on a cluster: ray job submit --working-dir . -- python jobs/preprocess.py "
          f"--input <corpus> --output <dataset> --encoders <model folder> --preset sdxl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
