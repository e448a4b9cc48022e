"""The preprocess job through the real ``ray job submit`` client against a local ``ray start --head``:
an uninterrupted run, and a run stopped midway then resubmitted, which must end with the same dataset.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    dashboard = free_port()
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--temp-dir", str(temp), "--disable-usage-stats"], env=env, check=True, capture_output=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 60
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if time.time() > deadline:
                raise RuntimeError("the Ray job server did not come up")
            time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for script, args in (("make_corpus.py", ["--out", str(root / "corpus"), "--count", "12", "--with-bad-files"]),
                         ("init_model.py", ["--out", str(root / "base"), "--preset", "tiny"])):
        subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], check=True, capture_output=True)
    return root


def job_args(inputs: Path, output: Path) -> list[str]:
    return ["--", "python", "jobs/preprocess.py", "--input", str(inputs / "corpus"), "--out", str(output),
            "--encoders", str(inputs / "base"), "--shard-size", "1"]


def submit(cluster, args, wait=True) -> subprocess.CompletedProcess | str:
    command = [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", str(ROOT)]
    if not wait:
        command.append("--no-wait")
    done = subprocess.run(command + args, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if wait:
        return done
    return next(line.split("'")[1] for line in done.stdout.splitlines() if "submitted successfully" in line)


def dataset_rows(output: Path) -> list[dict]:
    from pipelines.data.layout import read_all

    table = read_all(str(output))
    return sorted(table.to_pylist(), key=lambda row: row["source"])


def test_job_submit_runs_the_job_and_a_stopped_job_resumes_to_the_same_dataset(cluster, inputs, tmp_path):
    whole = tmp_path / "whole"
    done = submit(cluster, job_args(inputs, whole))
    assert "17 inputs in 17 shards" in done.stdout
    assert "12 rows + 5 errors = 17 of 17 inputs" in done.stdout

    resumed = tmp_path / "resumed"
    job_id = submit(cluster, job_args(inputs, resumed), wait=False)
    markers = resumed / "markers"
    deadline = time.time() + 300
    while not (markers.is_dir() and len(list(markers.glob("*.json"))) >= 3):
        assert time.time() < deadline, "the job wrote no shard in time"
        time.sleep(0.2)
    subprocess.run([RAY, "job", "stop", "--address", cluster["address"], job_id], env=cluster["env"],
                   check=True, capture_output=True, timeout=120)
    finished_before_restart = len(list(markers.glob("*.json")))
    assert 3 <= finished_before_restart < 17, "the job must be stopped midway for this test to mean anything"
    assert not (resumed / "manifest.json").exists()

    done = submit(cluster, job_args(inputs, resumed))
    assert f"{finished_before_restart} shards already done" in done.stdout or "shards already done" in done.stdout
    assert "12 rows + 5 errors = 17 of 17 inputs" in done.stdout
    assert dataset_rows(resumed) == dataset_rows(whole)
    assert not list(resumed.rglob("*.tmp"))
    shutil.rmtree(whole)
