"""Train the colorizer with Ray Train + DeepSpeed ZeRO-2, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/train.py --stage backbone \\
        --model /mnt/models/base --data s3://bucket/datasets/v1 --export /mnt/models/stage1 \\
        --workers 8 --gpu --batch-size 16 --steps 70000 --storage /mnt/shared/runs --run-name xl-v1
    ray job submit --working-dir . -- python jobs/train.py --stage plugin \\
        --model /mnt/models/stage1 --data s3://bucket/datasets/v1 --export /mnt/models/stage2 ...
    python jobs/train.py --stage backbone --model outputs/base --data outputs/dataset --export outputs/stage1 \\
        --workers 2 --steps 20 --batch-size 2                                    # tiny, local Ray, CPU

Rerunning with the same --run-name and --storage resumes from the last checkpoint (step count, λ
schedule, optimizer state and the MLflow run); a failed worker is restarted from it (--max-failures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from pipelines.training.loop import STAGES, TrainConfig, local_rank_environment, train_loop_per_worker  # noqa: E402
from pipelines.data.batches import columns_for, steps_per_epoch  # noqa: E402


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def tracking_uri(given: str | None) -> str:
    """The MLflow store every process agrees on: Ray workers run in other directories, so a relative
    ``sqlite:///file.db`` is made absolute here, and its folder created (default: ``mlflow.db`` in the
    working directory)."""
    uri = given or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        database = Path(uri[len(prefix):]).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)  # sqlite would fail with "unable to open" instead
        uri = prefix + str(database)
    return uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--model", required=True, help="model folder to start from")
    p.add_argument("--data", required=True, help="preprocess output folder")
    p.add_argument("--export", required=True, help="consolidated model folder written at the end")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="per worker")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--plugin-rank", type=int, default=16)
    p.add_argument("--gram-weight", type=float, default=None,
                   help="stage 1's Gram-loss weight λ after the warm-up (default: the model config's, 1; 0 = ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default="outputs/runs", help="Ray Train storage_path (shared on clusters)")
    p.add_argument("--run-name", default="colorize-xl")
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="default: sqlite:///mlflow.db in the working directory")
    p.add_argument("--experiment", default="colorize-xl")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"))
    return p


def read_manifest(dataset: str) -> dict:
    import fsspec

    with fsspec.open(f"{dataset.rstrip('/')}/manifest.json", "rb") as f:
        manifest = json.loads(f.read())
    if not manifest.get("complete"):
        raise SystemExit(f"{dataset} is not a finished dataset ({manifest.get('shards_done')}/{manifest.get('shards')} "
                         "shards): finish jobs/preprocess.py first")
    return manifest


def make_trainer(args) -> TorchTrainer:
    manifest = read_manifest(absolute(args.data))
    tracking = tracking_uri(args.mlflow_uri)
    cfg = TrainConfig(
        stage=args.stage, model=absolute(args.model), dataset=absolute(args.data), export=absolute(args.export),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, gradient_checkpointing=not args.no_gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, seed=args.seed,
        plugin_rank=args.plugin_rank, gram_weight=args.gram_weight, mlflow_tracking_uri=tracking, mlflow_experiment=args.experiment,
        run_name=args.run_name, extra_params={"workers": args.workers, "gpu": args.gpu,
                                              "global_batch": args.batch_size * args.workers},
    )
    cfg.steps_per_epoch = steps_per_epoch(manifest["rows"] // args.workers, len(manifest["buckets"]), args.batch_size)
    dataset = ray.data.read_parquet(f"{cfg.dataset.rstrip('/')}/data", columns=columns_for(cfg.stage))
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": 1} if args.gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{args.run_name}-{args.stage}", storage_path=absolute(args.storage),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": local_rank_environment()},
        ),
        datasets={"train": dataset},
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ray.init(address=args.ray_address)
    try:
        result = make_trainer(args).fit()
    finally:
        ray.shutdown()
    print(json.dumps({"metrics": result.metrics, "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
                      "export": absolute(args.export)}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
