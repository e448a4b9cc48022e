"""Compare runs of one MLflow experiment side by side: params that differ, final and best metrics (with the
metrics of their evaluation runs), and overlaid loss curves.

    python jobs/compare.py --experiment colorize-xl                        # every finished or running run
    python jobs/compare.py --experiment ablation-gram --runs xl-lam0-backbone xl-lam1-backbone 3f2a9c1e
    python jobs/compare.py --experiment colorize-xl --filter "params.stage = 'plugin'" --out outputs/cmp
    mlflow ui --backend-store-uri sqlite:///mlflow.db                        # the same runs in a browser

Prints the table as Markdown and writes <out>/comparison.md, <out>/comparison.csv (long form, full
precision) and one PNG per metric group (<out>/loss_curves.png, schedules.png, throughput.png and
eval_curves.png where such metrics exist). --log-to-mlflow also stores them as artifacts of a new run
named "comparison" (tagged colorize.kind=comparison, so later comparisons skip it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from pipelines.experiments.compare import (  # noqa: E402
    find_experiment,
    log_comparison,
    open_store,
    select_runs,
    summarize_runs,
    write_comparison,
)
from pipelines.training.tracking import tracking_uri  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                   help="run ids, id prefixes (>= 6 characters) or run names, in column order "
                        "(default: every finished or running run, evaluation runs shown with their runs)")
    p.add_argument("--filter", default="", help="MLflow filter string, e.g. \"params.lr = '1e-05'\"")
    p.add_argument("--out", default="outputs/comparison", help="folder for comparison.md/.csv and the PNGs")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA factor of the smoothed curves, in [0, 1)")
    flags.add_mlflow(p, experiment=None, experiment_help="experiment name (or id)")
    p.add_argument("--log-to-mlflow", action="store_true",
                   help="also log the table and plots as artifacts of a new 'comparison' run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.experiment is None:
        build_parser().error("--experiment is required")
    with flags.job_errors("compare", LookupError):  # no such experiment or run
        client = open_store(tracking_uri(args.mlflow_uri))
        experiment = find_experiment(client, args.experiment)
        runs = select_runs(client, experiment.experiment_id, args.runs, args.filter)
        summaries = summarize_runs(client, runs)
        result = write_comparison(summaries, experiment.name, Path(args.out), args.smoothing)
    print(result["markdown"])
    report = {"runs": [s.run_id for s in summaries], "files": [str(p) for p in result["files"]]}
    if args.log_to_mlflow:
        report["comparison_run"] = log_comparison(client, experiment.experiment_id, summaries, result["files"])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
