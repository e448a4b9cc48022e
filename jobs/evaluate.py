"""Evaluate a model folder on a validation dataset with the paper's Table 1 protocol; log it to MLflow.

    ray job submit --working-dir . -- python jobs/evaluate.py --model /mnt/models/stage2 \\
        --data s3://bucket/datasets/val --samples 50000 --size 1024 --steps 20 --workers 8 --gpu \\
        --inception-weights /mnt/weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-weights /mnt/weights/open_clip_pytorch_model.bin --out outputs/eval/stage2
    python jobs/evaluate.py --model outputs/demo/stage2 --data outputs/demo/dataset --samples 8 --steps 4 \\
        --fid-extractor substitute:vae --clip-extractor substitute:model --local       # tiny, one process

FID uses randomly drawn references, PSNR / MS-SSIM / CLIP references deformed from the ground truth
(pipelines/evaluation/protocol.py). Without --inception-weights or --clip-weights the job stops and says
so; a substitute extractor is used only when asked for, and is then named in every label and key. Ray
Data actors (one GPU each with --gpu) color and measure the batches (pipelines/evaluation/ray_runner.py);
the driver computes the aggregates (FID needs every feature). Small runs (--local, or at most
--local-below samples) run the same functions in this process. The table is printed and written to
<out>/metrics.md and metrics.json.

Per-sample scores and FID features are written to <out>/samples/part-*.parquet as they arrive (a part per
--part-size samples); rerunning the same command after a kill or preemption evaluates only the samples
not there yet, and the report is computed from the parts (pipelines/evaluation/results.py). The stage-2
plug-in is off unless --plugin (the paper scores Table 1 without it); the report says which. A CLIP
checkpoint trained with QuickGELU is detected from its name and metadata (--clip-activation overrides).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from model.colorizer import read_config  # noqa: E402
from pipelines.evaluation.metrics import CLIP_ACTIVATIONS  # noqa: E402
from pipelines.evaluation.mlflow_report import log_to_mlflow  # noqa: E402
from pipelines.evaluation.protocol import EvaluationConfig, evaluate  # noqa: E402
from pipelines.training.tracking import tracking_uri_for  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--model", required=True, help="model folder (a training export or a base folder)")
    p.add_argument("--data", required=True, help="validation dataset (jobs/preprocess.py output)")
    p.add_argument("--out", default=None, help="where metrics.json and metrics.md go (default: <model>/eval/<setting>)")
    flags.add_evaluation(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sketch-extractor", default=None, help="stored sketch variant (default: random per row)")
    p.add_argument("--clip-heads", type=int, default=None, help="attention heads of an unusual CLIP tower")
    p.add_argument("--clip-activation", choices=CLIP_ACTIVATIONS, default="auto",
                   help="the CLIP tower's MLP activation (default: from the checkpoint's name and metadata)")
    p.add_argument("--plugin", action="store_true",
                   help="color with the stage-2 plug-in (off by default: the paper's Table 1 is scored without it)")
    p.add_argument("--part-size", type=int, default=256, help="samples per results part written under <out>/samples")
    p.add_argument("--batch-size", type=int, default=4, help="rows per colorize call")
    p.add_argument("--reference-pool", type=int, default=1024, help="rows the random references come from")
    p.add_argument("--method", default=None, help="row label in the table (default: the model folder's name)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--local-below", type=int, default=16, help="runs of at most this many samples run locally")
    flags.add_workers(p, what="Ray Data actors")
    flags.add_mlflow(p, experiment=None, experiment_help="MLflow experiment (default: the training run's)")
    p.add_argument("--no-mlflow", action="store_true")
    flags.add_ray(p)
    return p


def config_from(args) -> EvaluationConfig:
    return EvaluationConfig(
        samples=args.samples, seed=args.seed, steps=args.steps, size=args.size, sketch_extractor=args.sketch_extractor,
        fid_extractor=args.fid_extractor, inception_weights=args.inception_weights,
        clip_extractor=args.clip_extractor, clip_weights=args.clip_weights, clip_heads=args.clip_heads,
        clip_activation=args.clip_activation, plugin=args.plugin, batch_size=args.batch_size,
        reference_pool=args.reference_pool, method=args.method,
        device=None if args.gpu or args.local else "cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local = args.local or (args.samples is not None and args.samples <= args.local_below)
    with flags.job_errors("evaluate"):
        config = config_from(args)
        config.choices()  # a missing extractor stops the job before any work
        steps = read_config(args.model).sampling.steps if config.steps is None else config.steps
        out = Path(args.out) if args.out else Path(args.model) / "eval" / config.setting(steps)
        resumable = dict(results_dir=out / "samples", part_size=args.part_size)
        if local:
            report = evaluate(args.model, args.data, config, **resumable)
        else:
            import ray

            from pipelines.evaluation.ray_runner import ray_runner

            ray.init(address=args.ray_address)
            try:
                report = evaluate(args.model, args.data, config,
                                  runner=ray_runner(args.workers, args.gpu, args.cpus_per_worker), **resumable)
            finally:
                ray.shutdown()
    paths = report.write(out)
    run_id = None
    if not args.no_mlflow:
        run_id = log_to_mlflow(report, args.model, tracking_uri=args.mlflow_uri, experiment=args.experiment)
    print(report.markdown())
    for warning in report.warnings:
        print(f"evaluate: warning: {warning}", file=sys.stderr)
    print(json.dumps({"metrics": report.metrics, "resumed_samples": report.settings["resumed_samples"],
                      "files": {k: str(v) for k, v in paths.items()},
                      "mlflow_run": run_id, "mlflow_uri": None if args.no_mlflow else
                      tracking_uri_for(args.model, args.mlflow_uri), "local": local}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
