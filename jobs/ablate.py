"""Run the paper's ablation ladder (no Gram loss → Gram loss → + plugin) as sibling MLflow runs, evaluate
each the same way, and print one table with the spatial-entanglement measures.

    ray job submit --working-dir . -- python jobs/ablate.py --model /mnt/models/base \\
        --data s3://bucket/datasets/v1 --eval-data s3://bucket/datasets/val --out /mnt/shared/ablation \\
        --train-steps 10000 --plugin-train-steps 2000 --workers 8 --gpu --batch-size 16 --samples 5000 \\
        --inception-weights /mnt/weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-weights /mnt/weights/open_clip_pytorch_model.bin --mlflow-uri http://mlflow:5000
    python jobs/ablate.py --model outputs/demo/base --data outputs/demo/dataset --out outputs/ablation \\
        --train-steps 120 --plugin-train-steps 30 --workers 1 --cpus-per-worker 1 --batch-size 8 --lr 3e-4 \\
        --samples 8 --steps 8 --fid-extractor substitute:vae --clip-extractor substitute:model --seeds 0 1 2 \\
        --local-eval                                                                 # tiny, local Ray

With ``--seeds 0 1 2`` the whole ladder runs once per training seed, and the table says which differences
between rungs exceed the seed noise. Rungs already exported under --out are not trained again (a killed
ablation resumes rung by rung, and inside a rung from Ray Train's last checkpoint). The rungs
(pipelines/experiments/ablation.py) are MLflow runs ``<name>-<rung>-seed<k>`` in --experiment; compare
them with ``python jobs/compare.py --experiment <experiment>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

import ray  # noqa: E402

from jobs import flags  # noqa: E402
from pipelines.evaluation.protocol import EvaluationConfig  # noqa: E402
from pipelines.evaluation.ray_runner import ray_runner  # noqa: E402
from pipelines.experiments.ablation import AblationSettings, run_ablation  # noqa: E402
from pipelines.training.trainer import absolute  # noqa: E402
from pipelines.training.tracking import tracking_uri  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--model", required=True, help="base model folder (jobs/init_model.py)")
    p.add_argument("--data", required=True, help="training dataset (jobs/preprocess.py output)")
    p.add_argument("--eval-data", default=None, help="held-out dataset (default: --data, which then is not held out)")
    p.add_argument("--out", required=True, help="rung exports and the ablation table go here")
    p.add_argument("--name", default="ablation", help="run-name prefix: <name>-<rung>")
    p.add_argument("--rungs", nargs="+", default=None, help="a subset of no-gram gram gram-plugin")
    flags.add_training(p)
    p.add_argument("--plugin-train-steps", type=int, default=250, help="optimizer steps of the plugin rung")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds: the ladder runs once per seed and the table gives mean ± std over them "
                        "(default: --seed alone; --seed stays the evaluation's seed)")
    flags.add_workers(p)
    flags.add_evaluation(p)
    p.add_argument("--entanglement-pairs", type=int, default=8, help="held-out pairs for the entanglement measures")
    p.add_argument("--local-eval", action="store_true", help="evaluate in this process instead of Ray Data actors")
    flags.add_mlflow(p, experiment="ablation", experiment_help="MLflow experiment holding the sibling runs")
    flags.add_ray(p)
    return p


def settings_from(args) -> AblationSettings:
    rungs = {"rungs": tuple(args.rungs)} if args.rungs else {}
    return AblationSettings(model=absolute(args.model), data=absolute(args.data),
                            eval_data=absolute(args.eval_data or args.data), out=absolute(args.out), name=args.name,
                            experiment=args.experiment, train_steps=args.train_steps,
                            plugin_train_steps=args.plugin_train_steps, seeds=tuple(args.seeds or (args.seed,)),
                            **rungs)


def evaluation_from(args) -> EvaluationConfig:
    return EvaluationConfig(samples=args.samples, seed=args.seed, steps=args.steps, size=args.size,
                            fid_extractor=args.fid_extractor, inception_weights=args.inception_weights,
                            clip_extractor=args.clip_extractor, clip_weights=args.clip_weights,
                            device=None if args.gpu else "cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tracking = tracking_uri(args.mlflow_uri)
    with flags.job_errors("ablate"):
        settings, evaluation, resources = settings_from(args), evaluation_from(args), flags.workers_from(args)
        ray.init(address=args.ray_address)
        try:
            runner = None if args.local_eval else ray_runner(args.workers, args.gpu, args.cpus_per_worker)
            results, markdown = run_ablation(
                settings, evaluation, resources, tracking=tracking,
                storage=absolute(args.storage or str(Path(settings.out) / "runs")), batch_size=args.batch_size,
                lr=args.lr, entanglement_pairs=args.entanglement_pairs, runner=runner)
        finally:
            ray.shutdown()
    print(markdown)
    print(json.dumps({"experiment": args.experiment,
                      "runs": {settings.run_name(r.rung, r.seed): r.training_run for r in results},
                      "table": str(Path(settings.out) / "ablation.md"),
                      "compare": f"python jobs/compare.py --experiment {args.experiment} --mlflow-uri {tracking}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
