"""jobs/compare.py over a real sqlite MLflow store: two training runs of an ablation that differ only in
``lr`` (params and tags as ``Tracker`` logs them, a few steps of the training metrics), an evaluation run
for each (tags and keys as ``pipelines.evaluation.mlflow_report`` logs them), and a failed run that a default
comparison must leave out."""

from __future__ import annotations

import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from jobs.compare import main  # noqa: E402
from pipelines.experiments.compare import (  # noqa: E402
    build_table,
    ema,
    find_experiment,
    metric_direction,
    open_store,
    select_runs,
    summarize_runs,
)

EXPERIMENT = "ablation-lr"
SHARED_PARAMS = {"stage": "backbone", "model": "/models/base", "dataset": "/data/v1", "export": "/models/out",
                 "steps": "5", "batch_size": "2", "seed": "0", "workers": "2", "gpu": "False", "preset": "tiny"}
# run A dips lowest (0.35 at step 3) but ends higher; run B ends lowest (0.43): the final and the best row
# must mark different runs.
LOSS = {"a": [1.0, 0.6, 0.35, 0.5, 0.45], "b": [1.0, 0.7, 0.5, 0.42, 0.43]}
EVAL = {"a": {"fid": 12.5, "psnr": 20.1, "clip_cosine": 0.81}, "b": {"fid": 10.0, "psnr": 19.0, "clip_cosine": 0.84}}
SETTING = "bucket-16n-4steps-seed0"


def _log_training_run(client, experiment_id: str, name: str, lr: str, losses: list[float], status="FINISHED"):
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=f"{name}-backbone",
                            tags={"colorize.run_name": name, "colorize.stage": "backbone"})
    metrics = []
    for step, loss in enumerate(losses, start=1):
        values = {"loss": loss, "diffusion_loss": loss * 0.8, "gram_loss": loss * 0.2 + 0.01 * step,
                  "gram_weight": step / len(losses), "lr": float(lr), "samples_per_s": 3.0 + step,
                  "gpu_memory_gib": 0.0}
        metrics += [Metric(k, v, 1_000 * step, step) for k, v in values.items()]
    params = [Param(k, v) for k, v in (SHARED_PARAMS | {"lr": lr}).items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def _log_evaluation_run(client, experiment_id: str, evaluates: str, name: str, values: dict, copy_to_training: bool):
    """As pipelines.evaluation.mlflow_report does: a run of its own, linked by tag, optionally with the aggregates also
    logged onto the training run as eval/<setting>/<metric>."""
    from mlflow.entities import Metric

    tags = {"colorize.kind": "evaluation", "colorize.eval.setting": SETTING, "colorize.evaluates": evaluates,
            "mlflow.parentRunId": evaluates}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 9_000, 0) for k, v in values.items()])
    client.set_terminated(run.info.run_id)
    if copy_to_training:
        client.log_batch(evaluates, metrics=[Metric(f"eval/{SETTING}/{k}", v, 9_000, 0) for k, v in values.items()])
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    ids = {"a": _log_training_run(client, experiment_id, "lr-high", "0.001", LOSS["a"]),
           "b": _log_training_run(client, experiment_id, "lr-low", "0.0001", LOSS["b"])}
    ids["failed"] = _log_training_run(client, experiment_id, "lr-crash", "0.1", [1.0, float("nan")], status="FAILED")
    for key in ("a", "b"):
        ids[f"eval-{key}"] = _log_evaluation_run(client, experiment_id, ids[key], f"eval-{key}", EVAL[key],
                                                 copy_to_training=key == "a")
    return {"uri": uri, "root": root, "ids": ids, "client": client, "experiment_id": experiment_id}


def _compare(store, out: Path, *args: str) -> list[dict]:
    assert main(["--mlflow-uri", store["uri"], "--experiment", EXPERIMENT, "--out", str(out), *args]) == 0
    with open(out / "comparison.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def default_comparison(store, tmp_path_factory):
    """One default run of the command (shared: each run draws three PNGs), with what it printed."""
    out = tmp_path_factory.mktemp("comparison")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = _compare(store, out)
    return {"rows": rows, "out": out, "printed": printed.getvalue()}


def _library_table(store, wanted=None, filter_string=""):
    """The same steps without drawing, for selection checks that need no files."""
    client = open_store(store["uri"])
    experiment = find_experiment(client, EXPERIMENT)
    runs = select_runs(client, experiment.experiment_id, wanted, filter_string)
    return build_table(summarize_runs(client, runs), EXPERIMENT)


def _cell(rows, run_id: str, name: str, statistic: str) -> dict:
    found = [r for r in rows if r["run_id"] == run_id and r["name"] == name and r["statistic"] == statistic]
    assert len(found) == 1, (name, statistic, found)
    return found[0]


def test_table_shows_the_differing_param_logged_values_and_best_runs(store, default_comparison):
    ids, rows = store["ids"], default_comparison["rows"]
    markdown = (default_comparison["out"] / "comparison.md").read_text(encoding="utf-8")
    assert markdown in default_comparison["printed"]

    # default selection: the two finished training runs, oldest first; no failed or evaluation columns
    assert [r["run_id"] for r in rows if r["name"] == "loss" and r["statistic"] == "final"] == [ids["a"], ids["b"]]
    assert {r["name"] for r in rows if r["section"] == "param"} == {"lr"}
    params_section = markdown.split("## Params that differ")[1].split("## Metrics")[0]
    table_lines = [line for line in params_section.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table_lines] == ["param", "lr"]
    assert f"Same in every run ({len(SHARED_PARAMS)})" in params_section

    for key, losses in LOSS.items():
        assert float(_cell(rows, ids[key], "loss", "final")["value"]) == losses[-1]
        best = _cell(rows, ids[key], "loss", "best")
        assert (float(best["value"]), int(best["step"])) == (min(losses), losses.index(min(losses)) + 1)
    assert _cell(rows, ids["b"], "loss", "final")["is_best"] == "1"  # 0.43 < 0.45
    assert _cell(rows, ids["a"], "loss", "final")["is_best"] == "0"
    assert _cell(rows, ids["a"], "loss", "best")["is_best"] == "1"  # 0.35 @ 3 < 0.42 @ 4
    assert _cell(rows, ids["a"], "samples_per_s", "final")["direction"] == "max"
    assert not [r for r in rows if r["name"] == "gram_weight" and r["statistic"] == "best"]  # no direction
    assert [_cell(rows, ids[k], "gpu_memory_gib", "final")["is_best"] for k in "ab"] == ["0", "0"]  # a tie

    # evaluation metrics land in the column of the run they evaluate, in one row per metric whether or not
    # the training run also carries a copy; lower FID, higher PSNR and CLIP cosine win
    assert not [r for r in rows if r["name"].startswith("eval/") and not r["name"].startswith(f"eval/{SETTING}/")]
    for key in ("a", "b"):
        for metric, value in EVAL[key].items():
            cell = _cell(rows, ids[key], f"eval/{SETTING}/{metric}", "final")
            assert float(cell["value"]) == value and cell["source_run_id"] == ids[f"eval-{key}"]
    assert _cell(rows, ids["b"], f"eval/{SETTING}/fid", "final")["is_best"] == "1"
    assert _cell(rows, ids["a"], f"eval/{SETTING}/psnr", "final")["is_best"] == "1"
    assert _cell(rows, ids["b"], f"eval/{SETTING}/clip_cosine", "final")["is_best"] == "1"
    assert f"| eval/{SETTING}/fid ↓ final" in markdown and "**10**" in markdown
    assert f"lr-high-backbone ({ids['a'][:8]}) ← eval-a ({ids['eval-a'][:8]})" in markdown


def test_loss_plot_is_a_readable_png(default_comparison):
    tmp_path = default_comparison["out"]
    path = tmp_path / "loss_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 600 and pixels.shape[1] > 600  # three stacked subplots
    packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 100 and pixels.std() > 10  # curves, text and anti-aliasing, not a blank
    for name in ("schedules.png", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert not (tmp_path / "eval_curves.png").exists()  # evaluation metrics have one point each


def test_runs_are_selected_by_name_or_short_id_in_the_order_given(store, tmp_path):
    ids = store["ids"]
    rows = _compare(store, tmp_path, "--runs", "lr-low-backbone", ids["a"][:8], "lr-crash-backbone")
    order = [r["run_id"] for r in rows if r["name"] == "loss" and r["statistic"] == "final"]
    assert order == [ids["b"], ids["a"], ids["failed"]]
    crash_best = _cell(rows, ids["failed"], "loss", "best")
    assert (float(crash_best["value"]), int(crash_best["step"])) == (1.0, 1)  # NaN is never the best
    lr = {r["run_id"]: r["value"] for r in rows if r["name"] == "lr" and r["section"] == "param"}
    assert lr == {ids["b"]: "0.0001", ids["a"]: "0.001", ids["failed"]: "0.1"}


def test_an_evaluation_run_named_in_runs_is_a_column_aligned_with_the_merged_metrics(store):
    ids = store["ids"]
    table = _library_table(store, ["eval-a", "lr-low-backbone"])
    assert [r.run_id for r in table.runs] == [ids["eval-a"], ids["b"]]
    fid = [r for r in table.metric_rows if r.name == f"eval/{SETTING}/fid"]
    assert len(fid) == 1 and fid[0].values == [EVAL["a"]["fid"], EVAL["b"]["fid"]] and fid[0].best == [False, True]


def test_filter_narrows_the_default_selection(store):
    table = _library_table(store, filter_string="params.lr = '0.0001'")
    assert [r.run_id for r in table.runs] == [store["ids"]["b"]]
    assert not table.param_rows and len(table.same_params) == len(SHARED_PARAMS) + 1  # one run: nothing differs


def test_clear_errors_for_a_missing_experiment_run_store_or_bad_filter(store, tmp_path):
    base = ["--mlflow-uri", store["uri"], "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=f"no experiment named 'nope'.*{EXPERIMENT}"):
        main([*base, "--experiment", "nope"])
    with pytest.raises(SystemExit, match="no run with id or name 'lr-mid-backbone'.*lr-high-backbone"):
        main([*base, "--experiment", EXPERIMENT, "--runs", "lr-mid-backbone"])
    with pytest.raises(SystemExit, match="MLflow rejected the filter"):
        main([*base, "--experiment", EXPERIMENT, "--filter", "params.lr ~~ 3"])
    missing = tmp_path / "absent.db"
    with pytest.raises(SystemExit, match="no MLflow store at"):
        main(["--mlflow-uri", f"sqlite:///{missing}", "--experiment", EXPERIMENT, "--out", str(tmp_path)])
    assert not missing.exists()


def test_log_to_mlflow_stores_artifacts_in_a_run_later_comparisons_skip(store, tmp_path):
    client = store["client"]
    _compare(store, tmp_path / "first", "--log-to-mlflow")
    logged = client.search_runs([store["experiment_id"]], "tags.`colorize.kind` = 'comparison'")
    assert len(logged) == 1 and logged[0].info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(logged[0].info.run_id)}
    assert {"comparison.md", "comparison.csv", "loss_curves.png"} <= names
    assert [r.run_id for r in _library_table(store).runs] == [store["ids"]["a"], store["ids"]["b"]]


def test_command_line_runs_as_a_script(store, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare.py"), "--mlflow-uri", store["uri"],
                           "--experiment", EXPERIMENT, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| lr " in done.stdout and (tmp_path / "loss_curves.png").is_file()


def test_metric_directions_and_smoothing():
    names = ("loss", "gram_loss", "eval/fid", "fid_10k", "psnr", "eval/ms_ssim", "clip_score", "lr", "gram_weight",
             "samples_per_s", "gpu_memory_gib")
    assert [metric_direction(n) for n in names] == ["min", "min", "min", "min", "max", "max", "max", None, None,
                                                    "max", "min"]
    assert ema([4.0, 2.0], 0.0) == [4.0, 2.0]
    assert ema([4.0, 2.0], 0.5)[0] == 4.0  # bias-corrected: the first point is the first value
    assert ema([4.0, 2.0], 0.5)[1] == pytest.approx((0.25 * 4.0 + 0.5 * 2.0) / 0.75)
    with pytest.raises(ValueError, match="smoothing factor"):
        ema([1.0], 1.0)


def test_a_resumed_run_keeps_the_latest_value_logged_at_each_step(store):
    """After a restart the training loop logs the steps since its last checkpoint again."""
    from mlflow.entities import Metric

    from pipelines.experiments.compare import metric_histories

    client = store["client"]
    experiment_id = client.create_experiment("resumed", artifact_location=(store["root"] / "resumed").as_uri())
    run = client.create_run(experiment_id, run_name="resumed-backbone")
    # the re-logged step 3 carries the later timestamp even though it is inserted first
    client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.25, 5_000, 3), Metric("loss", 0.2, 6_000, 4)])
    first_attempt = [Metric("loss", v, 1_000 * s, s) for s, v in [(1, 0.9), (2, 0.5), (3, 0.3)]]
    client.log_batch(run.info.run_id, metrics=first_attempt)
    series = metric_histories(client, client.get_run(run.info.run_id))["loss"]
    assert (series.steps, series.values) == ([1, 2, 3, 4], [0.9, 0.5, 0.25, 0.2])
