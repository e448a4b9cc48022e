"""Evaluate a model folder on a validation dataset with the paper's Table 1 protocol; log it to MLflow.

    ray job submit --working-dir . -- python jobs/evaluate.py --model /mnt/models/stage2 \\
        --data s3://bucket/datasets/val --samples 50000 --size 1024 --steps 20 --workers 8 --gpu \\
        --inception-weights /mnt/weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-weights /mnt/weights/open_clip_pytorch_model.bin --out outputs/eval/stage2
    python jobs/evaluate.py --model outputs/demo/stage2 --data outputs/demo/dataset --samples 8 --steps 4 \\
        --fid-extractor substitute:clip --clip-extractor substitute:model --local      # tiny, one process

FID uses randomly drawn references, PSNR / MS-SSIM / CLIP references deformed from the ground truth
(pipelines/evaluation/protocol.py). Without --inception-weights or --clip-weights the job stops and says so;
a substitute extractor is used only when asked for, and is then named in every label and key. Ray
Data actors (one GPU each with --gpu) color and measure the batches; the driver computes the
aggregates (FID needs every feature). Small runs (--local, or at most --local-below samples) run the
same functions in this process. The table is printed and written to <out>/metrics.md and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipelines.evaluation.mlflow_report import log_to_mlflow, tracking_uri_for  # noqa: E402
from pipelines.evaluation.protocol import (ROW_COLUMNS, BatchEvaluator, EvaluationConfig, EvaluationPlan,  # noqa: E402
                                  SampleSpec, evaluate, shard_paths)
from pipelines.evaluation.metrics import CLIP_EXTRACTORS, FID_EXTRACTORS  # noqa: E402


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``1024`` → (1024, 1024); ``1152x896`` → (1152, 896) as (width, height)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}")
    return (values[0], values[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (a training export or a base folder)")
    p.add_argument("--data", required=True, help="validation dataset (jobs/preprocess.py output)")
    p.add_argument("--out", default=None, help="where metrics.json and metrics.md go (default: <model>/eval)")
    p.add_argument("--samples", type=int, default=None, help="rows to evaluate (default: all)")
    p.add_argument("--size", type=parse_size, default=None, help="N or WxH (default: each row's bucket size)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sketch-extractor", default=None, help="stored sketch variant (default: random per row)")
    p.add_argument("--fid-extractor", choices=FID_EXTRACTORS, default="inception")
    p.add_argument("--inception-weights", default=None, help="FID Inception state_dict (pt_inception-2015-12-05)")
    p.add_argument("--clip-extractor", choices=CLIP_EXTRACTORS, default="openclip")
    p.add_argument("--clip-weights", default=None, help="OpenCLIP checkpoint for the CLIP score")
    p.add_argument("--clip-heads", type=int, default=None, help="attention heads of an unusual CLIP tower")
    p.add_argument("--batch-size", type=int, default=4, help="rows per colorize call")
    p.add_argument("--reference-pool", type=int, default=1024, help="rows the random references come from")
    p.add_argument("--method", default=None, help="row label in the table (default: the model folder's name)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--local-below", type=int, default=16, help="runs of at most this many samples run locally")
    p.add_argument("--workers", type=int, default=1, help="Ray Data actors")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="default: the model's training.json, else sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None, help="default: the training run's experiment")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"))
    return p


def config_from_args(args) -> EvaluationConfig:
    return EvaluationConfig(
        samples=args.samples, seed=args.seed, steps=args.steps, size=args.size, sketch_extractor=args.sketch_extractor,
        fid_extractor=args.fid_extractor, inception_weights=args.inception_weights,
        clip_extractor=args.clip_extractor, clip_weights=args.clip_weights, clip_heads=args.clip_heads,
        batch_size=args.batch_size, reference_pool=args.reference_pool, method=args.method,
        device=None if args.gpu or args.local else "cpu")


# ---------------------------------------------------------------------------------------- Ray Data
class EvaluationActor:
    """A Ray Data actor: one :class:`BatchEvaluator` (model + metric networks) serving many batches."""

    def __init__(self, model_folder: str, config: EvaluationConfig, specs: list[dict], sizes: dict,
                 min_side: int, references_ref: list):
        import ray

        self.specs = {s["row_id"]: SampleSpec.from_json(s) for s in specs}
        self.sizes = {k: tuple(v) for k, v in sizes.items()}
        self.evaluator = BatchEvaluator(model_folder, config, min_side, ray.get(references_ref[0]))

    def __call__(self, batch):
        rows = [r for r in batch.to_pylist() if r["id"] in self.specs]
        results = self.evaluator(rows, [self.specs[r["id"]] for r in rows], self.sizes) if rows else []
        return {
            "index": np.array([r["index"] for r in results], np.int64),
            "psnr": np.array([r["psnr"] for r in results], np.float64),
            "ms_ssim": np.array([r["ms_ssim"] for r in results], np.float64),
            "clip_cosine": np.array([r["clip_cosine"] for r in results], np.float64),
            "fid_real": np.stack([r["fid_real"] for r in results]) if results else np.zeros((0, 1), np.float32),
            "fid_fake": np.stack([r["fid_fake"] for r in results]) if results else np.zeros((0, 1), np.float32),
            "meta": np.array([json.dumps({k: r[k] for k in ("row_id", "reference_id", "sketch_variant", "width",
                                                            "height")}) for r in results], dtype=str),
        }


def ray_runner(workers: int, gpu: bool, cpus_per_worker: float):
    """A runner for :func:`pipelines.evaluation.evaluate` that spreads the batches over Ray Data actors."""

    def run(model_folder: str, dataset: str, config: EvaluationConfig, plan: EvaluationPlan,
            references: dict[str, bytes]) -> list[dict]:
        import ray

        planned = pa.array(sorted({s.row_id for s in plan.specs}), pa.string())
        rows = ray.data.read_parquet(shard_paths(dataset), columns=ROW_COLUMNS)
        rows = rows.map_batches(lambda batch: batch.filter(pc.is_in(batch["id"], value_set=planned)),
                                batch_format="pyarrow")  # only planned rows travel on to the actors
        results = rows.map_batches(
            EvaluationActor, batch_format="pyarrow", batch_size=config.batch_size,
            fn_constructor_kwargs=dict(model_folder=model_folder, config=config,
                                       specs=[s.to_json() for s in plan.specs], sizes=plan.sizes,
                                       min_side=plan.min_side, references_ref=[ray.put(references)]),
            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if gpu else 0, num_cpus=cpus_per_worker)
        out = []
        for row in results.iter_rows():
            out.append({"index": int(row["index"]), "psnr": float(row["psnr"]), "ms_ssim": float(row["ms_ssim"]),
                        "clip_cosine": float(row["clip_cosine"]), "fid_real": np.asarray(row["fid_real"]),
                        "fid_fake": np.asarray(row["fid_fake"]), **json.loads(row["meta"])})
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        config.choices()
    except (ValueError, FileNotFoundError) as err:
        print(f"[evaluate] {err}", file=sys.stderr)
        return 2
    local = args.local or (args.samples is not None and args.samples <= args.local_below)
    if local:
        report = evaluate(args.model, args.data, config)
    else:
        import ray

        ray.init(address=args.ray_address)
        try:
            report = evaluate(args.model, args.data, config, runner=ray_runner(args.workers, args.gpu,
                                                                               args.cpus_per_worker))
        finally:
            ray.shutdown()
    out = Path(args.out) if args.out else Path(args.model) / "eval" / report.settings["setting"]
    paths = report.write(out)
    run_id = None
    if not args.no_mlflow:
        run_id = log_to_mlflow(report, args.model, tracking_uri=args.mlflow_uri, experiment=args.experiment)
    print(report.markdown())
    print(json.dumps({"metrics": report.metrics, "files": {k: str(v) for k, v in paths.items()},
                      "mlflow_run": run_id, "mlflow_uri": None if args.no_mlflow else
                      tracking_uri_for(args.model, args.mlflow_uri), "local": local}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
