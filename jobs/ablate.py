"""Run the paper's ablation ladder (no Gram loss → Gram loss → + plugin) as sibling MLflow runs, evaluate
each the same way, and print one table with the spatial-entanglement measures.

    ray job submit --working-dir . -- python jobs/ablate.py --model /mnt/models/base \\
        --data s3://bucket/datasets/v1 --eval-data s3://bucket/datasets/val --out /mnt/shared/ablation \\
        --steps 10000 --plugin-steps 2000 --workers 8 --gpu --batch-size 16 --samples 5000 \\
        --inception-weights /mnt/weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-weights /mnt/weights/open_clip_pytorch_model.bin --mlflow-uri http://mlflow:5000
    python jobs/ablate.py --model outputs/demo/base --data outputs/demo/dataset --out outputs/ablation \\
        --steps 40 --plugin-steps 10 --workers 2 --cpus-per-worker 0.5 --batch-size 2 --samples 8 \\
        --eval-steps 4 --fid-extractor substitute:clip --clip-extractor substitute:model   # tiny, local Ray

Rungs already exported under --out are not trained again (a killed ablation resumes rung by rung, and
inside a rung from Ray Train's last checkpoint). The rungs (pipelines/experiments/ablation.py) are MLflow runs
``<name>-<rung>`` in --experiment; compare them with ``python jobs/compare.py --experiment <experiment>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.evaluate import ray_runner  # noqa: E402
from jobs.train import absolute, make_trainer, tracking_uri  # noqa: E402
from jobs.train import build_parser as train_parser  # noqa: E402
from pipelines.experiments.ablation import (AblationSettings, RungResult, ablation_table, rung,  # noqa: E402
                                write_results)
from pipelines.evaluation.protocol import EvaluationConfig, evaluate  # noqa: E402
from pipelines.evaluation.metrics import CLIP_EXTRACTORS, FID_EXTRACTORS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (jobs/init_model.py)")
    p.add_argument("--data", required=True, help="training dataset (jobs/preprocess.py output)")
    p.add_argument("--eval-data", default=None, help="held-out dataset (default: --data, which then is not held out)")
    p.add_argument("--out", required=True, help="rung exports and the ablation table go here")
    p.add_argument("--name", default="ablation", help="run-name prefix: <name>-<rung>")
    p.add_argument("--experiment", default="ablation", help="MLflow experiment holding the sibling runs")
    p.add_argument("--rungs", nargs="+", default=None, help="a subset of no-gram gram gram-plugin")
    p.add_argument("--steps", type=int, default=1000, help="stage-1 steps of each backbone rung")
    p.add_argument("--plugin-steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16, help="per worker")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--storage", default=None, help="Ray Train storage (default: <out>/runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=None, help="evaluation samples (default: every held-out row)")
    p.add_argument("--eval-steps", type=int, default=None, help="sampling steps of the evaluation")
    p.add_argument("--size", default=None, help="evaluation size, N or WxH (default: each row's bucket size)")
    p.add_argument("--fid-extractor", choices=FID_EXTRACTORS, default="inception")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--clip-extractor", choices=CLIP_EXTRACTORS, default="openclip")
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--entanglement-pairs", type=int, default=8, help="held-out pairs for the entanglement measures")
    p.add_argument("--local-eval", action="store_true", help="evaluate in this process instead of Ray Data actors")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="default: sqlite:///mlflow.db in the working directory")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"))
    return p


def settings_from_args(args) -> AblationSettings:
    defaults = AblationSettings(model="", data="", eval_data="", out="")
    return AblationSettings(model=absolute(args.model), data=absolute(args.data),
                            eval_data=absolute(args.eval_data or args.data), out=absolute(args.out), name=args.name,
                            experiment=args.experiment, steps=args.steps, plugin_steps=args.plugin_steps,
                            rungs=tuple(args.rungs) if args.rungs else defaults.rungs)


def train_rung(settings: AblationSettings, name: str, args, store: str) -> None:
    """Train one rung with the same code as ``jobs/train.py`` (skipped when its export exists)."""
    if (Path(settings.export(name)) / "config.json").is_file():
        print(f"[ablate] {name}: already exported at {settings.export(name)}", flush=True)
        return
    flags = settings.train_args(rung(name)) + [
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--workers", str(args.workers),
        "--cpus-per-worker", str(args.cpus_per_worker), "--seed", str(args.seed),
        "--storage", absolute(args.storage or str(Path(settings.out) / "runs")), "--mlflow-uri", store,
        "--checkpoint-every", str(max(1, args.steps // 4)), "--sample-every", "0"] + (["--gpu"] if args.gpu else [])
    print(f"[ablate] {name}: training ({' '.join(flags)})", flush=True)
    make_trainer(train_parser().parse_args(flags)).fit()


def measure_rung(settings: AblationSettings, name: str, config: EvaluationConfig, runner, pairs: int,
                 store: str) -> RungResult:
    """Table 1 metrics and the entanglement measures of one rung's export, logged to MLflow."""
    import mlflow

    from model.colorizer import Colorizer
    from pipelines.data.layout import read_all
    from pipelines.evaluation.entanglement import spatial_entanglement
    from pipelines.evaluation.mlflow_report import find_training_run, log_to_mlflow, training_record

    export = settings.export(name)
    report = evaluate(export, settings.eval_data, replace(config, method=name), runner=runner)
    report.write(Path(settings.out) / "eval" / name)
    evaluation_run = log_to_mlflow(report, export, tracking_uri=store, experiment=settings.experiment)

    rows = read_all(settings.eval_data, columns=["image", "sketches", "sketch_extractors"]).slice(0, pairs).to_pylist()
    model = Colorizer.from_pretrained(export)
    entanglement = spatial_entanglement(model, rows, seed=config.seed, steps=config.steps).to_json()
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(settings.experiment)
    training_run = find_training_run(client, experiment.experiment_id, training_record(export))
    for target in filter(None, (training_run, evaluation_run)):
        for key in ("gram_distance", "line_agreement", "line_agreement_aligned"):
            client.log_metric(target, f"entanglement/{key}", float(entanglement[key]))
    return RungResult(rung=name, description=rung(name).description, export=export, training_run=training_run,
                      evaluation_run=evaluation_run, metrics=report.metrics, labels=report.labels,
                      entanglement=entanglement)


def run_ablation(args) -> tuple[list[RungResult], str]:
    """Train, then measure, every chosen rung; Ray must already be initialized."""
    from jobs.evaluate import parse_size

    settings = settings_from_args(args)
    names = settings.rung_names()
    tracking = tracking_uri(args.mlflow_uri)
    config = EvaluationConfig(samples=args.samples, seed=args.seed, steps=args.eval_steps, size=parse_size(args.size),
                              fid_extractor=args.fid_extractor, inception_weights=args.inception_weights,
                              clip_extractor=args.clip_extractor, clip_weights=args.clip_weights,
                              device=None if args.gpu else "cpu")
    config.choices()  # a missing extractor stops the ablation before any training
    for name in names:
        train_rung(settings, name, args, tracking)
    runner = None if args.local_eval else ray_runner(args.workers, args.gpu, args.cpus_per_worker)
    results = [measure_rung(settings, name, config, runner, args.entanglement_pairs, tracking) for name in names]
    budget = f"{settings.steps} stage-1 steps per backbone rung, {settings.plugin_steps} plugin steps"
    caption = (f"{budget}, {args.workers} worker(s) × batch {args.batch_size}; evaluated on {settings.eval_data} "
               f"({len(names)} rungs, the same samples and seed for each). Entanglement over "
               f"{args.entanglement_pairs} held-out pairs: Gram distance between the aligned and misaligned branches; "
               f"line agreement = F-score of the output's lines against the sketch, with another image's reference "
               f"(misaligned) and with the image's own (aligned).")
    markdown = ablation_table(results, caption)
    write_results(settings.out, results, markdown)
    return results, markdown


def main(argv: list[str] | None = None) -> int:
    import ray

    args = build_parser().parse_args(argv)
    ray.init(address=args.ray_address)
    try:
        results, markdown = run_ablation(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"[ablate] {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(markdown)
    uri = tracking_uri(args.mlflow_uri)
    print(json.dumps({"experiment": args.experiment, "runs": {r.rung: r.training_run for r in results},
                      "table": str(Path(absolute(args.out)) / "ablation.md"),
                      "compare": f"python jobs/compare.py --experiment {args.experiment} --mlflow-uri {uri}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
