"""Training on Ray Train + DeepSpeed ZeRO-2, tracked in MLflow (``jobs/train.py`` is a shell over it).

- ``loop.py``: the per-worker loop (DeepSpeed engine, checkpoints through ``ray.train.report``, export);
- ``trainer.py``: :func:`make_trainer`, the ``TorchTrainer`` for a :class:`TrainConfig` and its resources;
- ``tracking.py``: the MLflow contract: tags, default URI and experiment, finding a model's training run.
"""
