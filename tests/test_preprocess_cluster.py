"""The preprocess job through the real ``ray job submit`` client against a local ``ray start --head``: a run
stopped midway then resubmitted must end with the dataset an uninterrupted run makes (computed here in-process
by the same stage functions instead of by a second job) and without re-listing the corpus.
The cluster is this test's own (``--block``, stopped by signalling its process), never every Ray on the machine.
"""

from __future__ import annotations

import os
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
    # no drain on SIGTERM: nothing is serving, and the drain waited 30 s at every teardown
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    dashboard = free_port()
    temp = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--temp-dir", str(temp), "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError("the Ray job server did not come up")
            time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM, and only those
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


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


def uninterrupted_rows(inputs: Path) -> list[dict]:
    """The dataset an uninterrupted run makes: every shard of the same plan through the same stage functions,
    in this process."""
    import torch

    from pipelines.data.corpus import list_inputs, plan_shards
    from pipelines.data.layout import DATA_COLUMNS
    from pipelines.data.shards import PreprocessConfig, ShardEncoder, encoded_schema, prepare_shard

    cfg = PreprocessConfig(preset="tiny", shard_size=1, encoders=str(inputs / "base"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task with one CPU runs it: the same order of float sums
    try:
        encoder = ShardEncoder(cfg)
        tables = [encoder.encode(prepare_shard(k, items, cfg)) for k, items in
                  enumerate(plan_shards(list_inputs(str(inputs / "corpus")).items, 1))]
    finally:
        torch.set_num_threads(threads)
    rows = [row for t in tables for row in t.cast(encoded_schema()).to_pylist() if row["error"] is None]
    return sorted(({c: row[c] for c in DATA_COLUMNS} for row in rows), key=lambda row: row["source"])


def test_a_stopped_job_resubmitted_ends_with_the_uninterrupted_dataset_without_listing_again(cluster, inputs,
                                                                                               tmp_path):
    expected = uninterrupted_rows(inputs)
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

    (inputs / "corpus" / "late.png").write_bytes((inputs / "corpus" / "set0" / "img_00000.png").read_bytes())
    done = submit(cluster, job_args(inputs, resumed))
    assert "17 inputs in 17 shards (folder, listed 20" in done.stdout  # the plan's listing: late.png not seen
    assert "shards already done" in done.stdout
    assert "12 rows + 5 errors = 17 of 17 inputs" in done.stdout
    assert dataset_rows(resumed) == expected
    assert not list(resumed.rglob("*.tmp"))
