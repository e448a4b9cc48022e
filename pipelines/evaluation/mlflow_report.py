"""An evaluation in MLflow: its own run, linked to the run that trained the model.

Each evaluation gets a new run (so evaluations at different settings never overwrite each other) in the
training run's experiment, nested under it (``mlflow.parentRunId``) and tagged ``colorize.evaluates`` with
its id. The aggregates are also logged onto the training run as ``eval/<setting>/<metric>``, so the
training run's page shows every evaluation of its model. The training run is found the way the trainer
finds it again (:mod:`pipelines.training.tracking`): by the tags ``colorize.run_name`` and
``colorize.stage`` from the model folder's ``training.json``. The evaluation run deliberately does not
carry those two tags, or a resumed training would take it for its own run.

The report's conventions (library versions, FID resize, averaging) become ``convention.<name>`` params, the
plug-in's state the ``plugin`` param, and its warnings (FID at small n) the tag ``colorize.eval.warnings``.

A base folder (``jobs/init_model.py``, no ``training.json``) or a training run that is not in the
tracking store gets a standalone evaluation run.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.evaluation.protocol import EvaluationReport
from pipelines.training.tracking import (DEFAULT_EXPERIMENT, EVALUATES_TAG, EVALUATION_KIND, KIND_TAG, SETTING_TAG,
                                         experiment_id, find_training_run, tracking_uri_for, training_record)


def log_to_mlflow(report: EvaluationReport, model_folder: str | Path, tracking_uri: str | None = None,
                  experiment: str | None = None) -> str:
    """Log ``report`` as a new evaluation run (returns its id); see the module docstring for the links."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    folder = Path(model_folder)
    record = training_record(folder)
    client = MlflowClient(tracking_uri=tracking_uri_for(folder, tracking_uri))
    name = experiment or (record or {}).get("mlflow_experiment") or DEFAULT_EXPERIMENT
    experiment = experiment_id(client, name, folder)
    training_run = find_training_run(client, experiment, record) if record else None

    setting = report.settings["setting"]
    tags = {KIND_TAG: EVALUATION_KIND, "colorize.model_folder": str(folder.resolve()),
            "colorize.dataset": str(report.settings["dataset"]), SETTING_TAG: setting,
            "colorize.eval.fid_extractor": report.extractors["fid"],
            "colorize.eval.clip_extractor": report.extractors["clip"],
            "mlflow.note.content": report.markdown()}
    if report.warnings:
        tags["colorize.eval.warnings"] = " | ".join(report.warnings)[:5000]
    if training_run:
        tags |= {EVALUATES_TAG: training_run, "mlflow.parentRunId": training_run}
    elif record:
        tags["colorize.evaluates_missing"] = f"{record['run_name']}/{record['stage']} not found in this store"
    run = client.create_run(experiment, run_name=f"eval-{report.method}-{setting}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = {k: str(v)[:500] for k, v in report.settings.items()}
    params |= {"fid_extractor": report.extractors["fid"][:500], "clip_extractor": report.extractors["clip"][:500]}
    params |= {f"convention.{k}": v[:500] for k, v in report.conventions.items()}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in report.metrics.items()],
                     params=[Param(k, v) for k, v in params.items()])
    client.log_text(run_id, report.markdown(), "metrics.md")
    client.log_dict(run_id, report.to_json(), "metrics.json")
    client.set_terminated(run_id, "FINISHED")
    if training_run:
        client.log_batch(training_run, metrics=[Metric(f"eval/{setting}/{k}", float(v), now, 0)
                                                for k, v in report.metrics.items()])
    return run_id
