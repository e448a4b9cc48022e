"""The ``TorchTrainer`` of one training stage: config, resources and storage in, a trainer out.

:func:`make_trainer` is what ``jobs/train.py``, the ablation and the demo call, with typed arguments, so
a training option is declared once (in :class:`TrainConfig`) and never passes through a command line
between Python modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.data.batches import check_dataset_for, steps_per_epoch
from pipelines.data.layout import finished_manifest
from pipelines.training.loop import TrainConfig, local_rank_environment, train_loop_per_worker
from pipelines.training.tracking import tracking_uri


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URIs (``s3://``) as they are."""
    return path if "://" in path else str(Path(path).resolve())


@dataclass(frozen=True)
class WorkerResources:
    """How many Ray Train workers, and what each one holds."""

    workers: int = 1
    gpu: bool = False  # one GPU per worker (bf16)
    cpus_per_worker: float = 1.0

    def __post_init__(self):
        if self.workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError(f"workers must be ≥ 1 and cpus_per_worker > 0, got {self.workers}, {self.cpus_per_worker}")


def torch_trainer(loop, loop_config: dict, resources: WorkerResources, name: str, storage: str,
                  max_failures: int = 3) -> TorchTrainer:
    """The ``TorchTrainer`` every stage runs under (the colorizer's stages and the VAE's): ``resources``
    workers, each with its CPUs and one GPU when asked, the run ``name`` under ``storage`` (a rerun of the
    same name resumes), ``max_failures`` restarts, the last two checkpoints kept, and each worker told its
    local rank (DeepSpeed reads it)."""
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": 1} if resources.gpu else {})
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=absolute(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": local_rank_environment()},
        ),
    )


DATA_STREAM_CPUS = 1.0  # what each worker's Ray Data read and decode tasks need besides the workers


def check_cpus_left_for_data(resources: WorkerResources, cluster_cpus: float) -> None:
    """Refuse workers that take every CPU of a cluster that already has room for them: their Ray Data
    read and decode tasks would then wait for a CPU forever, and the job would hang at its first batch.

    A cluster with fewer CPUs than the workers ask for is left to Ray (an autoscaler adds nodes, or Ray
    says what it waits for), so a submission to an autoscaling cluster is never refused here."""
    taken = resources.workers * resources.cpus_per_worker
    if taken <= cluster_cpus < taken + DATA_STREAM_CPUS:
        raise ValueError(f"{resources.workers} worker(s) × {resources.cpus_per_worker:g} CPUs take {taken:g} of the "
                         f"cluster's {cluster_cpus:g} CPUs, leaving less than {DATA_STREAM_CPUS:g} for the Ray Data "
                         "tasks that read and decode the training rows, so training would wait for data forever: "
                         "lower --cpus-per-worker or --workers, or start Ray with more CPUs")


def with_dataset_shards(cfg: TrainConfig, workers: int) -> TrainConfig:
    """``cfg`` with the dataset's shard-file count from its manifest (the workers deal the files among
    themselves), after refusing a dataset too small for this many workers and this batch size."""
    manifest = finished_manifest(cfg.dataset)
    check_dataset_for(cfg.stage, manifest, cfg.dataset)
    if manifest["shards"] < workers:
        raise ValueError(f"{cfg.dataset} has {manifest['shards']} shard files for {workers} workers: every worker "
                         "reads whole files; preprocess with a smaller --shard-size or train with fewer workers")
    steps_per_epoch(manifest["rows"] // workers, len(manifest["buckets"]), cfg.batch_size)  # raises if too few rows
    return dataclasses.replace(cfg, shards=manifest["shards"])


def make_trainer(cfg: TrainConfig, resources: WorkerResources, storage: str, max_failures: int = 3) -> TorchTrainer:
    """A trainer for one stage; rerunning with the same ``run_name`` and ``storage`` resumes from its last
    checkpoint (step, λ schedule, optimizer state, data position and the MLflow run), at any worker count.

    The workers read the dataset themselves (:mod:`pipelines.training.data_stream`), so no Ray Dataset
    is handed to the trainer: its file order and position have to survive restarts."""
    cfg = dataclasses.replace(cfg, model=absolute(cfg.model), dataset=absolute(cfg.dataset),
                              export=absolute(cfg.export), mlflow_tracking_uri=tracking_uri(cfg.mlflow_tracking_uri),
                              extra_params={"workers": resources.workers, "gpu": resources.gpu,
                                            "global_batch": cfg.batch_size * resources.workers} | cfg.extra_params)
    cfg = with_dataset_shards(cfg, resources.workers)
    if ray.is_initialized():
        check_cpus_left_for_data(resources, ray.cluster_resources().get("CPU", 0.0))
    return torch_trainer(train_loop_per_worker, asdict(cfg), resources, name=f"{cfg.run_name}-{cfg.stage}",
                         storage=storage, max_failures=max_failures)
