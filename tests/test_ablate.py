"""The ablation ladder end to end on a local Ray (``jobs/ablate.py`` as a subprocess, as ``ray job submit``
runs it): three sibling MLflow runs, each trained with Ray Train + DeepSpeed, evaluated, measured for
entanglement, and comparable with ``jobs/compare.py``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ladder_settings_are_checked_before_any_work(tmp_path):
    from pipelines.experiments.ablation import AblationSettings, rung

    settings = AblationSettings(model="m", data="d", eval_data="d", out=str(tmp_path), rungs=("gram-plugin",))
    with pytest.raises(ValueError, match="starts from gram"):
        settings.rung_names()
    with pytest.raises(ValueError, match="unknown rungs"):
        AblationSettings(model="m", data="d", eval_data="d", out=str(tmp_path), rungs=("big",)).rung_names()
    with pytest.raises(ValueError, match="distinct training seeds"):
        AblationSettings(model="m", data="d", eval_data="d", out=str(tmp_path), seeds=(1, 1))
    settings = AblationSettings(model="m", data="d", eval_data="d", out=str(tmp_path), train_steps=7,
                                plugin_train_steps=3, seeds=(0, 5))
    no_gram = settings.rung_config(rung("no-gram"), 5, batch_size=2)
    assert (no_gram.gram_weight, no_gram.steps, no_gram.model, no_gram.batch_size, no_gram.seed) == (0.0, 7, "m", 2, 5)
    plugin = settings.rung_config(rung("gram-plugin"), 5)
    assert (plugin.stage, plugin.steps, plugin.model, plugin.run_name, plugin.export) == (
        "plugin", 3, str(tmp_path / "seed5" / "gram"), "ablation-gram-plugin-seed5",
        str(tmp_path / "seed5" / "gram-plugin"))
    # a plugin-only ladder needs the gram rung of every seed already exported
    with pytest.raises(ValueError, match="seed0/gram, .*seed5/gram"):
        AblationSettings(model="m", data="d", eval_data="d", out=str(tmp_path), rungs=("gram-plugin",),
                         seeds=(0, 5)).rung_names()


def _result(rung_name: str, seed: int, psnr: float, fid: float, gram: float, lines: float):
    from pipelines.experiments.ablation import RungResult

    return RungResult(rung=rung_name, seed=seed, description=rung_name, export="", training_run=None,
                      evaluation_run=None, metrics={"fid_substitute_model_clip": fid, "psnr": psnr},
                      labels={"fid_substitute_model_clip": "FID (substitute)", "psnr": "PSNR"},
                      entanglement={"gram_distance": gram, "line_agreement": lines, "line_agreement_aligned": 0.5})


def test_the_table_gives_mean_and_spread_over_seeds_and_says_what_exceeds_the_noise():
    from pipelines.experiments.ablation import ablation_table, separations, summarize

    results = [_result("no-gram", s, psnr, 30.0 + s, 0.50 + 0.01 * s, 0.40)
               for s, psnr in enumerate((10.0, 11.0, 12.0))]
    results += [_result("gram", s, psnr, 31.0 - s, 0.20 + 0.01 * s, 0.40)
                for s, psnr in enumerate((14.0, 15.0, 16.0))]
    summary = summarize(results)
    assert summary["no-gram"]["psnr"].mean == pytest.approx(11.0)
    assert summary["no-gram"]["psnr"].std == pytest.approx(1.0)
    verdicts = {v["measure"]: v for v in separations(summary)}
    # the aligned line agreement is a baseline, with no better direction
    assert set(verdicts) == {"fid_substitute_model_clip", "psnr", "gram_distance", "line_agreement"}
    assert verdicts["psnr"]["separated"] and verdicts["psnr"]["better"]  # +4 dB against a spread of 1 + 1
    assert verdicts["gram_distance"]["separated"] and verdicts["gram_distance"]["better"]  # lower is better
    assert not verdicts["fid_substitute_model_clip"]["separated"]  # -1 against a spread of 1 + 1
    assert verdicts["fid_substitute_model_clip"]["better"]
    assert not verdicts["line_agreement"]["separated"]  # no change at all
    table = ablation_table(results, "caption")
    assert "| no-gram | no-gram | 0, 1, 2 | 31.000 ± 1.000 | 11.000 ± 1.000 |" in table
    assert "no-gram → gram, PSNR: Δ +4.0000 (noise 2.0000): separated, better" in table
    assert "FID (substitute)" in table and "within seed noise" in table

    one_seed = ablation_table([r for r in results if r.seed == 0], "caption")
    assert "| no-gram | no-gram | 0 | 30.000 | 10.000 |" in one_seed
    assert "Not assessed: one training seed" in one_seed and "separated" not in one_seed


def test_a_plugin_rung_on_data_without_the_background_view_stops_before_any_training(tmp_path):
    from pipelines.data.layout import MANIFEST_FILE, SCHEMA_VERSION
    from pipelines.evaluation.protocol import EvaluationConfig
    from pipelines.experiments.ablation import AblationSettings, run_ablation
    from pipelines.training.trainer import WorkerResources

    data = tmp_path / "data"
    data.mkdir()
    (data / MANIFEST_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "complete": True,
                                                  "config": {"latent_views": ["target"]}}))
    settings = AblationSettings(model=str(tmp_path / "no-model"), data=str(data), eval_data=str(data),
                                out=str(tmp_path / "out"))
    evaluation = EvaluationConfig(fid_extractor="substitute:clip", clip_extractor="substitute:model")
    with pytest.raises(ValueError, match="--latent-views target;.*target,background"):
        run_ablation(settings, evaluation, WorkerResources(), tracking="sqlite:///unused.db",
                     storage=str(tmp_path / "runs"), batch_size=2)
    with pytest.raises(ValueError, match="--entanglement-pairs 1: the measures need at least 2 pairs"):
        run_ablation(settings, evaluation, WorkerResources(), tracking="sqlite:///unused.db",
                     storage=str(tmp_path / "runs"), batch_size=2, entanglement_pairs=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_relative_sqlite_stores_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    from pipelines.training.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path / 'runs' / 'x.db'}"
    assert (tmp_path / "runs").is_dir()
    assert tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


@pytest.fixture(scope="module")
def ablation(tiny_dataset):
    # one worker: the ladder is what this checks (ZeRO-2 across ranks is test_train's and the demo's); each
    # 2-worker fit on 2 cores took about twice as long, its second rank's Ray Data queued behind the first's
    root = tiny_dataset
    out = root / "ablation"
    uri = f"sqlite:///{root / 'ablation.db'}"
    command = [sys.executable, str(ROOT / "jobs" / "ablate.py"), "--model", str(root / "base"),
               "--data", str(root / "dataset"), "--out", str(out), "--name", "abl", "--experiment", "abl",
               "--train-steps", "3", "--plugin-train-steps", "1", "--workers", "1", "--cpus-per-worker", "1",
               "--batch-size", "2", "--samples", "2", "--steps", "2", "--entanglement-pairs", "2",
               "--fid-extractor", "substitute:clip", "--clip-extractor", "substitute:model", "--local-eval",
               "--mlflow-uri", uri]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, uri, done.stdout


@pytest.mark.slow
def test_three_sibling_runs_trained_evaluated_and_measured(ablation):
    import mlflow

    out, uri, stdout = ablation
    table = (out / "ablation.md").read_text()
    assert table in stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| Rung", "| ---"))]
    assert [r.split("|")[1].strip() for r in rows] == ["no-gram", "gram", "gram-plugin"]
    saved = json.loads((out / "ablation.json").read_text())
    results = {r["rung"]: r for r in saved["runs"]}
    assert set(saved["summary"]) == set(results) and all(r["seed"] == 0 for r in results.values())
    for result in results.values():
        values = list(result["metrics"].values()) + [result["entanglement"][k] for k in
                                                     ("gram_distance", "line_agreement", "line_agreement_aligned")]
        assert all(math.isfinite(v) for v in values), result
        assert 0 <= result["entanglement"]["line_agreement"] <= 1
        assert "fid_substitute_model_clip" in result["metrics"]  # the substitute is named, never plain "fid"

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("abl")
    runs = {r.data.tags["colorize.run_name"]: r for r in client.search_runs([experiment.experiment_id])
            if "colorize.run_name" in r.data.tags}
    assert set(runs) == {"abl-no-gram-seed0", "abl-gram-seed0", "abl-gram-plugin-seed0"}
    assert {k: runs[k].info.run_id for k in runs} == {f"abl-{k}-seed0": v["training_run"] for k, v in results.items()}
    runs = {name.removesuffix("-seed0"): run for name, run in runs.items()}
    assert runs["abl-no-gram"].data.params["gram_weight"] == "0.0"
    assert runs["abl-gram"].data.params["gram_weight"] == "None"  # the model config's λ
    assert runs["abl-gram-plugin"].data.params["model"] == str(out / "seed0" / "gram")

    def history(run, key):
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    assert set(history(runs["abl-no-gram"], "gram_weight")) == {0.0}
    assert set(history(runs["abl-no-gram"], "gram_loss")) == {0.0}  # the misaligned branch never ran
    assert history(runs["abl-gram"], "gram_weight")[-1] == 1.0
    for run in runs.values():
        metrics = client.get_run(run.info.run_id).data.metrics
        assert any(k.startswith("eval/") and k.endswith("/psnr") for k in metrics), metrics
        assert "entanglement/gram_distance" in metrics and "entanglement/line_agreement" in metrics


@pytest.mark.slow
def test_compare_lines_the_rungs_up(ablation, tmp_path, capsys):
    from jobs.compare import main as compare

    _, uri, _ = ablation
    assert compare(["--experiment", "abl", "--mlflow-uri", uri, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "comparison.md").read_text()
    for differing in ("gram_weight", "stage", "run_name"):
        assert differing in table
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_plugin_rung_trains_only_the_plugin_and_adapters(ablation):
    """Stage 2 keeps every stage-1 weight bit-identical and adds the published plug-in (ReferenceNet and a
    rank-4 background LoRA on every cross-attention's q/k/v) whose LoRA has moved off its zero init; the
    plug-in changes the picture and can be switched off."""
    import numpy as np
    import torch

    from model.colorizer import Colorizer
    from model.options import ColorizeOptions
    from pipelines.data.synthetic import synthetic_illustration

    out, _, _ = ablation
    before = Colorizer.from_pretrained(out / "seed0" / "gram")
    after = Colorizer.from_pretrained(out / "seed0" / "gram-plugin")
    assert before.plugin is None and after.plugin is not None
    old, new = before.state_dict(), after.state_dict()
    for name, tensor in old.items():
        assert torch.equal(new[name], tensor), f"frozen weight {name} changed in stage 2"
    adapters = {k: v for k, v in new.items() if ".processor." in k and k.endswith(".up.weight")}
    assert adapters and all(v.abs().sum() > 0 for v in adapters.values())
    assert all(".attn2.processor.to_" in k and v.shape[1] == 4 for k, v in adapters.items())
    assert {k.split(".processor.")[1].split(".")[0] for k in adapters} == {"to_q", "to_k", "to_v"}
    assert after.plugin.config.lora_rank == 4

    picture = synthetic_illustration(seed=2, width=96, height=96)
    on = np.asarray(after.colorize(picture.sketch, picture.color,
                                   ColorizeOptions(size=(96, 96), steps=2, plugin=True)))
    off = np.asarray(after.colorize(picture.sketch, picture.color,
                                    ColorizeOptions(size=(96, 96), steps=2, plugin=False)))
    assert not np.array_equal(on, off)
