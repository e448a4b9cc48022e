"""When the training loop checkpoints, agreed by every worker, and how the checkpoint leaves the worker.

Three triggers, any of which makes a checkpoint:

* a step count (``every_steps`` since the last checkpoint);
* the wall clock (``every_minutes`` since the last checkpoint): a stage-1 checkpoint is tens of GB, so a
  cadence in steps that suits 8 GPUs writes far too often at 64, while minutes stay the same;
* a preemption notice: Ray Train's ``get_preemption_info()`` turns non-None once Ray Core marks a node of
  the run as draining (a spot reclaim, or a KubeRay pod's SIGTERM, which ``ray start`` turns into a
  PREEMPTION drain), and a just-in-time checkpoint then saves the steps since the last one.

``ray.train.report`` and ``get_preemption_info`` are barriers: every worker must call them on the same
steps. Clocks differ between workers, so rank 0 alone decides (:class:`CheckpointSchedule`) and the
decision travels to the others with one small broadcast per step (:func:`agree`).

Checkpoints upload asynchronously (Ray Train's ``CheckpointUploadMode.ASYNC``): the worker writes its
DeepSpeed shard to local disk, reports, and trains on while one background thread per worker uploads and
then deletes the local copy. Ray runs one upload thread per worker, so two uploads of one run never
overlap; a failed upload is raised into the training thread and fails the worker group, which Ray Train
restarts from the last committed checkpoint. Rank 0 also postpones a checkpoint while its previous upload
is still running, so local copies cannot pile up when storage is slower than the cadence. The final and
the just-in-time checkpoints upload synchronously: the run (or the node) may be gone right after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often to checkpoint; 0 turns a trigger off (the last step always checkpoints)."""

    every_steps: int = 100
    every_minutes: float = 0.0
    preemption_poll_seconds: float = 10.0  # how often to ask Ray Train for a preemption notice (0 = never)
    asynchronous: bool = True  # upload in the background (the final and preemption checkpoints never are)

    def __post_init__(self):
        if self.every_steps < 0 or self.every_minutes < 0 or self.preemption_poll_seconds < 0:
            raise ValueError(f"checkpoint cadences must be ≥ 0 (0 = off), got every_steps={self.every_steps}, "
                             f"every_minutes={self.every_minutes}, preemption_poll_seconds={self.preemption_poll_seconds}")


@dataclass(frozen=True)
class Decision:
    """What every worker does after a step: checkpoint (and why), ask about preemption."""

    checkpoint: bool = False
    poll_preemption: bool = False
    reason: str = ""  # one of REASONS, for the log line and the upload mode

    def encode(self) -> list[int]:
        return [int(self.checkpoint), int(self.poll_preemption), REASONS.index(self.reason)]

    @classmethod
    def decode(cls, values: list[int]) -> Decision:
        return cls(bool(values[0]), bool(values[1]), REASONS[int(values[2])])


REASONS = ("", "steps", "minutes", "last", "preemption")


@dataclass
class CheckpointSchedule:
    """Rank 0's view: the step and the time of the last checkpoint and of the last preemption poll.

    ``busy()`` says whether the previous asynchronous upload is still running; a due checkpoint waits
    until it is not (the last step never waits: its upload is synchronous and queues behind)."""

    policy: CheckpointPolicy
    total_steps: int
    last_step: int = 0
    clock: object = time.monotonic
    last_time: float = field(default=0.0)
    last_poll: float = field(default=0.0)

    def __post_init__(self):
        self.last_time = self.last_poll = self.clock()

    def decide(self, step: int, busy: bool = False) -> Decision:
        now = self.clock()
        poll = self.policy.preemption_poll_seconds > 0 and now - self.last_poll >= self.policy.preemption_poll_seconds
        if poll:
            self.last_poll = now
        if step >= self.total_steps:
            return Decision(True, poll, "last")
        reason = ""
        if self.policy.every_steps and step - self.last_step >= self.policy.every_steps:
            reason = "steps"
        elif self.policy.every_minutes and now - self.last_time >= 60 * self.policy.every_minutes:
            reason = "minutes"
        return Decision(bool(reason) and not busy, poll, reason if not busy else "")

    def saved(self, step: int) -> None:
        """A checkpoint was made at ``step`` (by any trigger): the cadences count from here."""
        self.last_step, self.last_time = step, self.clock()


def agree(decision: Decision | None, rank: int, device) -> Decision:
    """Rank 0's ``decision`` on every rank (one broadcast of three integers over the process group)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return decision
    values = torch.tensor(decision.encode() if rank == 0 else [0, 0, 0], dtype=torch.int64, device=device)
    dist.broadcast(values, src=0)
    return Decision.decode(values.tolist())


class CheckpointUploads:
    """This worker's checkpoint folders on local disk, each kept until Ray Train has uploaded it.

    ``folder()`` gives a new local folder for DeepSpeed to save into; ``report`` hands it to
    ``ray.train.report`` with the upload mode, and Ray deletes it once uploaded. ``busy()`` is true while
    the last folder still exists, i.e. its asynchronous upload has not finished."""

    def __init__(self, root: str | None = None):
        self.root = root
        self.last: str | None = None

    def folder(self) -> str:
        return tempfile.mkdtemp(prefix="colorize-checkpoint-", dir=self.root)

    def busy(self) -> bool:
        return self.last is not None and os.path.exists(self.last)

    def report(self, folder: str, metrics: dict, asynchronous: bool) -> float:
        """Report ``folder`` as this worker's part of a checkpoint; returns the seconds the call blocked."""
        import ray.train

        mode = ray.train.CheckpointUploadMode.ASYNC if asynchronous else ray.train.CheckpointUploadMode.SYNC
        started = time.perf_counter()
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.last = folder
        return time.perf_counter() - started
