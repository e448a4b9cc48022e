"""The MLflow contract: tag names, default store and experiment, and how a model's training run is found.

Every process that writes or reads runs takes them from here: the trainer (one run per ``run_name`` and
stage, found again after any restart by its two tags), the evaluation (a run nested under the training
run it measured), the comparison and the demo. A training run is tagged ``colorize.run_name`` and
``colorize.stage``; an exported model folder carries its :class:`TrainConfig` as ``training.json``, which is
how an evaluation finds the run that trained it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.training.loop import TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # relative to the working directory; see tracking_uri()
DEFAULT_EXPERIMENT = "colorize-xl"
RUN_NAME_TAG = "colorize.run_name"  # training runs: the --run-name shared by both stages
STAGE_TAG = "colorize.stage"  # training runs: backbone | plugin
KIND_TAG = "colorize.kind"  # runs that are not training runs: evaluation | comparison
EVALUATION_KIND = "evaluation"
COMPARISON_KIND = "comparison"
EVALUATES_TAG = "colorize.evaluates"  # evaluation runs: the id of the training run they measured
SETTING_TAG = "colorize.eval.setting"  # evaluation runs: the setting, as in eval/<setting>/<metric>
TRAINING_RECORD = "training.json"  # in an exported model folder: the TrainConfig of the run that made it


def tracking_uri(given: str | None = None) -> str:
    """The MLflow store every process agrees on: Ray workers run in other directories, so a relative
    ``sqlite:///file.db`` is made absolute here, and its folder created (default: ``mlflow.db`` in the
    working directory)."""
    uri = given or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        database = Path(uri[len(prefix):]).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)  # sqlite would fail with "unable to open" instead
        uri = prefix + str(database)
    return uri


def training_record(model_folder: str | Path) -> dict | None:
    """The folder's ``training.json`` (the TrainConfig of the run that exported it), if any."""
    path = Path(model_folder) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def tracking_uri_for(model_folder: str | Path, given: str | None = None) -> str:
    """The explicit URI, else the store of the run that trained the model, else the default store."""
    record = training_record(model_folder) or {}
    return tracking_uri(given or record.get("mlflow_tracking_uri"))


def experiment_id(client, name: str, near: str | Path) -> str:
    """The experiment's id, creating it with its artifacts in ``mlartifacts/`` beside ``near`` (where the
    trainer, the evaluation and the demo all put them)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = Path(near).resolve().parent / "mlartifacts"
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


def training_run_filter(run_name: str, stage: str | None = None) -> str:
    """An MLflow search filter for the training runs of ``run_name`` (one stage, or both)."""
    where = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    return where + (f" and tags.`{STAGE_TAG}` = '{stage}'" if stage else "")


def find_training_run(client, experiment: str, record: dict) -> str | None:
    """The id of the run a ``training.json`` record describes, in experiment (id) ``experiment``."""
    runs = client.search_runs([experiment], max_results=1,
                              filter_string=training_run_filter(record["run_name"], record["stage"]))
    return runs[0].info.run_id if runs else None


class Tracker:
    """MLflow from rank 0 only; one run per ``run_name`` and stage, found again after any restart.

    Metrics are buffered and sent every ``every`` steps as one batch, asynchronously (MLflow's
    ``synchronous=False``): every step keeps its point on the curves, but the training thread no longer
    waits for the store at each step. :meth:`flush` (at checkpoints and at the end) sends what is
    buffered and waits for everything sent, so a checkpoint never gets ahead of its metrics."""

    def __init__(self, cfg: TrainConfig, run_id: str | None, active: bool, extra_params: dict | None = None,
                 every: int = 10):
        if every < 1:
            raise ValueError(f"every must be positive, got {every}")
        self.active, self.every = active, every
        self.run_id = run_id
        self.buffered: list = []  # mlflow Metric entities not sent yet
        self.sent: list = []  # RunOperations not waited for yet
        if not active:
            return
        import mlflow  # heavy; imported only on the rank that logs

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        client = mlflow.MlflowClient()
        self.client = client
        experiment = experiment_id(client, cfg.mlflow_experiment, cfg.export)
        if run_id is None:
            run_id = find_training_run(client, experiment, {"run_name": cfg.run_name, "stage": cfg.stage})
        if run_id is None:
            run = mlflow.start_run(experiment_id=experiment, run_name=f"{cfg.run_name}-{cfg.stage}",
                                   tags={RUN_NAME_TAG: cfg.run_name, STAGE_TAG: cfg.stage})
            params = {k: v for k, v in asdict(cfg).items() if k != "extra_params"} | (extra_params or {}) | cfg.extra_params
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        else:
            run = mlflow.start_run(run_id=run_id)
        self.run_id = run.info.run_id

    def metrics(self, values: dict, step: int) -> None:
        """Buffer ``values`` at ``step``; send the buffer when ``step`` is on the cadence."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffered += [Metric(k, float(v), now, step) for k, v in values.items()]
        if step % self.every == 0:
            self.send()

    def send(self) -> None:
        """Send the buffered metrics in the background (MLflow takes at most 1000 per batch)."""
        while self.active and self.buffered:
            batch, self.buffered = self.buffered[:1000], self.buffered[1000:]
            self.sent.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self) -> None:
        """Send the buffer and wait until the store holds everything sent."""
        self.send()
        for operations in self.sent:
            operations.wait()
        self.sent = []

    def image(self, image, name: str) -> None:
        if self.active:
            self.mlflow.log_image(image, artifact_file=name)

    def close(self) -> None:
        if self.active:
            self.flush()
            self.mlflow.end_run()
