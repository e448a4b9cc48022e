"""An evaluation in MLflow: its own run, linked to the run that trained the model.

Each evaluation gets a new run (so evaluations at different settings never overwrite each other) in the
training run's experiment, nested under it (``mlflow.parentRunId``) and tagged ``colorize.evaluates`` with
its id. The aggregates are also logged onto the training run as ``eval/<setting>/<metric>``, so the
training run's page shows every evaluation of its model. The training run is found the way the trainer
finds it again (``pipelines.train_loop.Tracker``): by the tags ``colorize.run_name`` and
``colorize.stage`` from the model folder's ``training.json``. The evaluation run deliberately does not
carry those two tags, or a resumed training would take it for its own run.

A base folder (``jobs/init_model.py``, no ``training.json``) or a training run that is not in the
tracking store gets a standalone evaluation run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.evaluation.protocol import EvaluationReport

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "colorize-xl"


def training_record(model_folder: str | Path) -> dict | None:
    """The folder's ``training.json`` (the TrainConfig of the run that exported it), if any."""
    path = Path(model_folder) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tracking_uri_for(model_folder: str | Path, tracking_uri: str | None = None) -> str:
    """The explicit URI, else the training run's, else MLflow's local default."""
    record = training_record(model_folder) or {}
    return tracking_uri or record.get("mlflow_tracking_uri") or DEFAULT_TRACKING_URI


def _experiment_id(client, name: str, model_folder: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = model_folder.resolve().parent / "mlartifacts"  # where the trainer puts them too
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


def find_training_run(client, experiment_id: str, record: dict) -> str | None:
    runs = client.search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`colorize.run_name` = '{record['run_name']}' and tags.`colorize.stage` = '{record['stage']}'")
    return runs[0].info.run_id if runs else None


def log_to_mlflow(report: EvaluationReport, model_folder: str | Path, tracking_uri: str | None = None,
                  experiment: str | None = None) -> str:
    """Log ``report`` as a new evaluation run (returns its id); see the module docstring for the links."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    folder = Path(model_folder)
    record = training_record(folder)
    client = MlflowClient(tracking_uri=tracking_uri_for(folder, tracking_uri))
    name = experiment or (record or {}).get("mlflow_experiment") or DEFAULT_EXPERIMENT
    experiment_id = _experiment_id(client, name, folder)
    training_run = find_training_run(client, experiment_id, record) if record else None

    setting = report.settings["setting"]
    tags = {"colorize.kind": "evaluation", "colorize.model_folder": str(folder.resolve()),
            "colorize.dataset": str(report.settings["dataset"]), "colorize.eval.setting": setting,
            "colorize.eval.fid_extractor": report.extractors["fid"],
            "colorize.eval.clip_extractor": report.extractors["clip"],
            "mlflow.note.content": report.markdown()}
    if training_run:
        tags |= {"colorize.evaluates": training_run, "mlflow.parentRunId": training_run}
    elif record:
        tags["colorize.evaluates_missing"] = f"{record['run_name']}/{record['stage']} not found in this store"
    run = client.create_run(experiment_id, run_name=f"eval-{report.method}-{setting}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = {k: str(v)[:500] for k, v in report.settings.items()}
    params |= {"fid_extractor": report.extractors["fid"], "clip_extractor": report.extractors["clip"]}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in report.metrics.items()],
                     params=[Param(k, v) for k, v in params.items()])
    client.log_text(run_id, report.markdown(), "metrics.md")
    client.log_dict(run_id, report.to_json(), "metrics.json")
    client.set_terminated(run_id, "FINISHED")
    if training_run:
        client.log_batch(training_run, metrics=[Metric(f"eval/{setting}/{k}", float(v), now, 0)
                                                for k, v in report.metrics.items()])
    return run_id
