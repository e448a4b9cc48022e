"""Train the colorizer with Ray Train + DeepSpeed ZeRO-2, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/train.py --stage backbone \\
        --model /mnt/models/base --data s3://bucket/datasets/v1 --out /mnt/models/stage1 \\
        --workers 8 --gpu --batch-size 16 --train-steps 70000 --storage /mnt/shared/runs --run-name xl-v1
    ray job submit --working-dir . -- python jobs/train.py --stage plugin \\
        --model /mnt/models/stage1 --data s3://bucket/datasets/v1 --out /mnt/models/stage2 ...

Stage 2 (``--stage plugin``) trains exactly the published set, the ReferenceNet and the background LoRA
(``--plugin-rank``, 4 as published), from a stage-1 export or an imported model folder; a folder that
already has ``plugin/`` trains that plug-in further. Its dataset needs the stage-2 columns
(``jobs/preprocess.py --latent-views target,background``).
    python jobs/train.py --stage backbone --model outputs/base --data outputs/dataset --out outputs/stage1 \\
        --workers 2 --train-steps 20 --batch-size 2                              # tiny, local Ray, CPU

Rerunning with the same --run-name and --storage resumes from the last checkpoint (step count, λ
schedule, optimizer state, data position and the MLflow run); a failed worker is restarted from it
(--max-failures). Checkpoints are made every --checkpoint-every steps and/or --checkpoint-minutes, upload in
the background, and one is made at once when Ray reports a node of the run as being preempted (a drain,
e.g. a KubeRay pod's SIGTERM); Ray Train then restarts the run from it. Every epoch reads the shard files in an order drawn from --seed and the epoch, and a
resume continues that epoch with the data it has not given yet. The rerun may use another --workers: the
checkpoint is then converted to a DeepSpeed universal checkpoint and re-sharded.
The work is pipelines/training/ (make_trainer, the loop, the stages, tracking).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from model.objective import STAGES  # noqa: E402
from pipelines.training.loop import TrainConfig  # noqa: E402
from pipelines.training.stages import DEFAULT_PLUGIN_RANK  # noqa: E402
from pipelines.training.trainer import make_trainer  # noqa: E402
from pipelines.training.tracking import tracking_uri  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--model", required=True, help="model folder to start from")
    p.add_argument("--data", required=True, help="preprocess output folder")
    p.add_argument("--out", required=True, help="consolidated model folder written at the end")
    flags.add_training(p)
    flags.add_workers(p)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every this many steps (0 = by the clock only)")
    p.add_argument("--checkpoint-minutes", type=float, default=0.0,
                   help="checkpoint every this many minutes of wall clock, decided on rank 0 (0 = by steps only); with "
                        "--checkpoint-every, whichever comes first")
    p.add_argument("--sync-checkpoints", action="store_true",
                   help="upload every checkpoint before training goes on (default: in the background, one at a time)")
    p.add_argument("--preemption-poll-seconds", type=float, default=10.0,
                   help="ask Ray Train this often whether a node of the run is being preempted (drained), and then "
                        "checkpoint at once (0 = never)")
    p.add_argument("--decode-prefetch", type=int, default=4,
                   help="batches of 16 rows Ray Data decodes ahead of the training thread")
    p.add_argument("--sample-every", type=int, default=500, help="sample grid + Gram maps to MLflow (0 = at the end)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every this many steps")
    p.add_argument("--metrics-every", type=int, default=10,
                   help="send the per-step metrics to MLflow every this many steps, in one asynchronous batch")
    p.add_argument("--plugin-rank", type=int, default=DEFAULT_PLUGIN_RANK,
                   help="stage 2: rank of the background LoRA (default %(default)s, the published rank); a model that "
                        "already has a plug-in must be trained at its own rank")
    p.add_argument("--gram-weight", type=float, default=None,
                   help="stage 1's Gram-loss weight λ after the warm-up (default: the model config's, 1; 0 = ablation)")
    p.add_argument("--run-name", default="colorize-xl")
    flags.add_mlflow(p)
    flags.add_ray(p)
    return p


def config_from(args) -> TrainConfig:
    return TrainConfig(
        stage=args.stage, model=args.model, dataset=args.data, export=args.out, steps=args.train_steps,
        batch_size=args.batch_size, lr=args.lr, gradient_checkpointing=not args.no_gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
        checkpoint_async=not args.sync_checkpoints, preemption_poll_seconds=args.preemption_poll_seconds,
        decode_prefetch_batches=args.decode_prefetch, sample_every=args.sample_every, log_every=args.log_every,
        metrics_every=args.metrics_every, seed=args.seed, plugin_rank=args.plugin_rank, gram_weight=args.gram_weight,
        mlflow_tracking_uri=tracking_uri(args.mlflow_uri), mlflow_experiment=args.experiment, run_name=args.run_name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with flags.job_errors("train"):
        cfg = config_from(args)
    return flags.fit_and_print("train", functools.partial(make_trainer, cfg), args)


if __name__ == "__main__":
    raise SystemExit(main())
