"""The training job on a local Ray: 2 CPU workers, DeepSpeed ZeRO-2 with gloo, tiny preset, MLflow in
sqlite, checkpoints uploaded in the background. A worker is killed midway (FailureConfig restarts from the
checkpoint and the data position), then a rerun with the same run name and one worker continues the step
count, the data and the MLflow run, checkpointing by the wall clock only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tiny_dataset):
    return tiny_dataset


class Job:
    """``jobs/train.py`` in its own session (so its local Ray's processes are told from others' on a shared
    machine), its output collected line by line while it runs."""

    def __init__(self, root: Path, *args: str, env: dict | None = None):
        command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--model", str(root / "base"),
                   "--data", str(root / "dataset"), "--workers", "2", "--cpus-per-worker", "0.5",
                   "--batch-size", "2", "--storage", str(root / "runs"), "--run-name", "tiny",
                   "--mlflow-uri", f"sqlite:///{root / 'mlflow.db'}", "--sample-every", "0", *args]
        env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1") | (env or {})
        self.process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.time() + timeout
        while not (found := re.search(pattern, self.output)):
            assert self.process.poll() is None and time.time() < deadline, f"no {pattern!r}:\n{self.output[-4000:]}"
            time.sleep(0.2)
        return found

    def finish(self, timeout: float = 600) -> str:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        assert self.process.returncode == 0, self.output[-4000:]
        return self.output

    def session_processes(self, name: str = "") -> dict[int, str]:
        """Processes of this job's session whose command line has ``name`` (its Ray's, not another's)."""
        found = subprocess.run(["pgrep", "-s", str(self.process.pid), "-a", "-f", name or "."], capture_output=True,
                               text=True)
        return {int(line.split(" ", 1)[0]): line for line in found.stdout.splitlines()}


def train(root: Path, *args: str, timeout: int = 600, kill_worker_after_checkpoint: bool = False):
    job = Job(root, *args)
    killed = None
    if kill_worker_after_checkpoint:
        deadline = time.time() + timeout
        while len(list((root / "runs").glob("*/checkpoint_*"))) < 2:  # the first one is surely registered
            assert job.process.poll() is None and time.time() < deadline, "no checkpoint before the job ended"
            time.sleep(0.2)
        workers = job.session_processes("RayTrainWorker")
        assert workers, "no Ray Train worker process found in the job's session"
        killed = list(workers)[-1]
        os.kill(killed, signal.SIGKILL)
    return job.finish(timeout), killed


def mlflow_runs(root: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("colorize-xl")
    return client, client.search_runs([experiment.experiment_id])


def test_backbone_stage_survives_a_killed_worker_and_resumes_on_rerun(data):
    export = data / "stage1"
    output, killed = train(data, "--stage", "backbone", "--train-steps", "9", "--checkpoint-every", "3",
                           "--out", str(export), kill_worker_after_checkpoint=True)
    assert killed is not None
    # the restarted worker group continued from a checkpoint, and from where the data stood in the epoch
    resumed = re.search(r"\[train\] resumed from step (\d+) of 9 \(2 workers then, 2 now\); data: epoch (\d+), "
                        r"(\d+) of 2 files done, (\d+) rows of partly read files skipped", output)
    assert resumed, output[-4000:]
    assert int(resumed[1]) >= 3 and int(resumed[3]) + int(resumed[4]) > 0  # not back to the first file

    client, runs = mlflow_runs(data)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["stage"] == "backbone" and run.data.params["workers"] == "2"
    assert run.data.params["preset"] == "tiny" and run.data.params["global_batch"] == "4"
    gram = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "gram_loss")}
    weight = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "gram_weight")}
    assert max(gram) == 9
    assert all(weight[s] == 0.0 and gram[s] == 0.0 for s in (1, 2))  # λ = 0 for the first 33% of 9 steps
    assert all(weight[s] == 1.0 and gram[s] >= 0.0 for s in range(3, 10))
    # positive on average: a single step can be 0 when reference dropout zeroes both contexts of a pair
    assert sum(gram[s] for s in range(3, 10)) > 0.0
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert losses and all(np.isfinite(losses))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/step_0000009.png" in artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "gram")} == {"gram/step_0000009.png"}

    from model.colorizer import Colorizer
    from model.options import ColorizeOptions
    from pipelines.data.synthetic import synthetic_illustration

    picture = synthetic_illustration(seed=1, width=96, height=96)
    image = Colorizer.from_pretrained(export).colorize(picture.sketch, picture.color,
                                                       ColorizeOptions(size=(96, 96), steps=2))
    assert image.size == (96, 96)

    # ZeRO-2 state of 2 workers, re-sharded for 1; checkpoints by the wall clock only (no step count)
    output, _ = train(data, "--stage", "backbone", "--train-steps", "12", "--checkpoint-every", "0",
                      "--checkpoint-minutes", "0.02", "--out", str(export), "--workers", "1")
    assert "the checkpoint was saved by 2 workers, this run has 1: converting it" in output
    assert "[train] resumed from step 9 of 12 (2 workers then, 1 now)" in output
    assert re.search(r"\[train\] checkpoint at step (10|11) \(minutes\), uploading in the background", output)
    assert "[train] checkpoint at step 12 (last), uploaded" in output and "(steps)" not in output
    client, runs = mlflow_runs(data)
    assert len(runs) == 1 and runs[0].info.run_id == run.info.run_id
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 12


def plugin_tensors(model) -> dict:
    """The plug-in's tensors as its folder holds them (ReferenceNet and background LoRA)."""
    from model.plugin import _weights_view

    return {k: v.detach().clone() for k, v in _weights_view(model).state_dict().items()}


def test_plugin_stage_trains_only_the_published_set_from_a_model_with_or_without_a_plugin(data):
    """Stage 2 through the trainer (2 workers, ZeRO-2): from a folder without plugin/ it attaches the
    published plug-in (rank 4) and trains the ReferenceNet and the background LoRA; everything else leaves
    bit-identical; a folder that has plugin/ (here that export) trains its plug-in further (1 worker)."""
    import torch

    from model.colorizer import Colorizer
    from model.plugin import PluginConfig, attach_plugin

    uri = f"sqlite:///{data / 'plugin.db'}"
    first, second = data / "plugin-a", data / "plugin-b"
    common = ("--stage", "plugin", "--train-steps", "2", "--checkpoint-every", "2", "--mlflow-uri", uri)
    train(data, *common, "--run-name", "tiny-plugin-a", "--out", str(first))
    # the second on one worker (the later flags win): what it checks is the plug-in a folder already has
    train(data, *common, "--run-name", "tiny-plugin-b", "--model", str(first), "--out", str(second),
          "--workers", "1", "--cpus-per-worker", "1")

    base, started = Colorizer.from_pretrained(data / "base"), Colorizer.from_pretrained(data / "base")
    attach_plugin(started, PluginConfig(lora_rank=4))  # what stage 2 starts from
    trained, further = Colorizer.from_pretrained(first), Colorizer.from_pretrained(second)
    for model in (trained, further):
        assert model.plugin is not None and model.plugin.config == PluginConfig(lora_rank=4)
        state = model.state_dict()
        for key, value in base.state_dict().items():  # the backbone and the encoders: untouched
            assert torch.equal(state[key], value), key

    dead = {"reference_net." + n.removeprefix("unet.") for n in started.plugin.reference_net._dead_names}
    for before, after in ((plugin_tensors(started), plugin_tensors(trained)),
                          (plugin_tensors(trained), plugin_tensors(further))):
        assert before.keys() == after.keys()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("reference_net.") for k in changed)
        assert {k.rsplit(".", 3)[-3] for k in changed if k.startswith("background_lora.")} >= {"to_q", "to_k", "to_v"}
        assert not changed & dead  # the ReferenceNet's tail after the last bank layer never trains

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("colorize-xl").experiment_id])
    assert len(runs) == 2 and {r.data.params["stage"] for r in runs} == {"plugin"}
    assert {r.data.params["plugin_rank"] for r in runs} == {"4"}
    assert all(np.isfinite(m.value) for r in runs for m in client.get_metric_history(r.info.run_id, "loss"))
