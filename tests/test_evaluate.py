"""Evaluation (paper's Table 1 protocol) and the spatial-entanglement measures, tiny preset, CPU.

Extractors are random-init networks saved in their published file formats: the FID Inception as a plain
state_dict, the CLIP tower inside an OpenCLIP whole-model checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from pipelines.evaluation.deform import deform_reference, draw_deformation  # noqa: E402
from pipelines.data.layout import read_rows  # noqa: E402
from pipelines.evaluation.protocol import EvaluationConfig, evaluate, plan_evaluation  # noqa: E402
from pipelines.evaluation.metrics import (PSNR_CAP_DB, PixelMetrics, build_extractor, choose_clip_extractor,  # noqa: E402
                               choose_fid_extractor, fid_sample_warning, frechet_distance, ms_ssim_settings)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base model, a 6-row dataset (2 shards), and a "trained" copy of the model whose training
    run exists in an sqlite MLflow store (as jobs/train.py leaves it)."""
    from model.assembly import init_model
    from pipelines.data.synthetic import write_corpus
    from pipelines.data.shards import PreprocessConfig, ShardEncoder, process_shard
    from pipelines.data.corpus import list_inputs, plan_shards
    from pipelines.training.loop import TrainConfig, Tracker

    root = tmp_path_factory.mktemp("evaluate")
    write_corpus(root / "corpus", count=6, with_bad_files=False)
    base = init_model(root / "base", "tiny", seed=0)
    cfg = PreprocessConfig(preset="tiny", shard_size=3, encoders=str(base))
    encoder = ShardEncoder(cfg)
    for shard, items in enumerate(plan_shards(list_inputs(str(root / "corpus")).items, 3)):
        process_shard(str(root / "dataset"), shard, items, cfg, encoder)

    trained = root / "stage1"
    shutil.copytree(base, trained)
    train_cfg = TrainConfig(stage="backbone", model=str(base), dataset=str(root / "dataset"), export=str(trained),
                            mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}", run_name="evaltest")
    tracker = Tracker(train_cfg, None, active=True)
    tracker.metrics({"loss": 1.0}, step=1)
    tracker.close()
    (trained / "training.json").write_text(json.dumps(asdict(train_cfg), indent=2))
    return {"root": root, "base": base, "trained": trained, "dataset": root / "dataset",
            "tracking": train_cfg.mlflow_tracking_uri, "training_run": tracker.run_id}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-init FID Inception saved as the published file is: a plain state_dict."""
    from pipelines.evaluation.inception import PUBLISHED_FILE, FIDInceptionV3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / PUBLISHED_FILE
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def openclip_file(tmp_path_factory):
    """The tiny preset's CLIP tower (random init) in an OpenCLIP whole-model checkpoint, text keys included."""
    from model.config import tiny
    from model.reference_encoders import ClipImageEncoder

    torch.manual_seed(1)
    encoder = ClipImageEncoder(tiny().clip)
    state = {f"visual.{k}": v for k, v in encoder.visual.state_dict().items()}
    state |= {"token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(4.6)}
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    return path, encoder.eval()


def _textured(seed: int, side: int = 128) -> np.ndarray:
    from pipelines.data.synthetic import synthetic_illustration

    return np.ascontiguousarray(synthetic_illustration(seed=seed, width=side, height=side).color)


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------ metric cases
def test_identical_images_score_the_cap_and_one_and_a_shift_scores_worse():
    settings = ms_ssim_settings(128)
    assert (len(settings.betas), settings.kernel_size) == (4, 11) and abs(sum(settings.betas) - 1) < 1e-5
    assert ms_ssim_settings(1024).description.startswith("5 scales, 11-px")
    assert len(ms_ssim_settings(96).betas) == 3
    metrics = PixelMetrics(settings)
    images = _tensor([_textured(1), _textured(2)]).float() / 255
    same = metrics(images, images)
    assert torch.equal(same["psnr"], torch.full((2,), PSNR_CAP_DB))
    # 1 up to float32 rounding (MS-SSIM runs in float32: flat regions put near-zero variances in its ratios)
    torch.testing.assert_close(same["ms_ssim"], torch.ones(2), atol=1e-4, rtol=0)
    shifted = metrics(torch.roll(images, shifts=3, dims=-1), images)
    assert (shifted["psnr"] < 40).all() and (shifted["ms_ssim"] < 0.95).all()
    more = metrics(torch.roll(images, shifts=8, dims=-1), images)
    assert (more["psnr"] < shifted["psnr"]).all() and (more["ms_ssim"] < shifted["ms_ssim"]).all()

    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure  # float32 stays close to float64

    in_float64 = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=settings.kernel_size,
                                                            betas=settings.betas, reduction="none")
    reference = in_float64(torch.roll(images, shifts=3, dims=-1).double(), images.double())
    torch.testing.assert_close(shifted["ms_ssim"].double(), reference, atol=1e-4, rtol=0)


def test_inception_loads_from_its_published_format_and_fid_behaves(inception_file, tmp_path):
    extractor = build_extractor(choose_fid_extractor("inception", str(inception_file)))
    images = [_textured(seed, side=96) for seed in range(4)]
    real = extractor(_tensor(images))
    assert real.shape == (4, 2048) and torch.isfinite(real).all() and real.std() > 0
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6 * float((real**2).sum()))
    shifted = extractor(_tensor([np.roll(im, 16, axis=1) for im in images]))
    assert frechet_distance(real, shifted) > 1e-3 * float(real.var(0).sum())

    broken = tmp_path / "not_inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, broken)
    with pytest.raises(ValueError, match="missing from the file"):
        build_extractor(choose_fid_extractor("inception", str(broken)))


def test_the_vae_substitute_compares_colors_and_layout_and_says_what_it_is(workspace):
    """FID on the model's own (trained) VAE latents, pooled to a 4×4 grid: the same set scores 0, recoloring
    the pictures (RGB → BGR) moves it far more than a 2-px shift, which the pooling barely sees."""
    from model.colorizer import Colorizer
    from pipelines.evaluation.metrics import LATENT_GRID, fid_metric_name

    choice = choose_fid_extractor("substitute:vae", None)
    assert fid_metric_name(choice) == ("fid_substitute_model_vae", "FID (substitute: model VAE encoder)")
    assert "VAE encoder" in choice.label() and "substitute" in choice.label()
    with pytest.raises(ValueError, match="no model was given"):
        build_extractor(choice)
    model = Colorizer.from_pretrained(workspace["base"], components=("vae",))
    extractor = build_extractor(choice, model)
    images = [_textured(seed, side=96) for seed in range(6)]
    real = extractor(_tensor(images))
    channels = model.vae.config.latent_channels
    assert real.shape == (6, channels * LATENT_GRID**2) and torch.isfinite(real).all() and real.std() > 0
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6 * float((real**2).sum()))
    shifted = frechet_distance(real, extractor(_tensor([np.roll(im, 2, axis=1) for im in images])))
    recolored = frechet_distance(real, extractor(_tensor([np.ascontiguousarray(im[..., ::-1]) for im in images])))
    assert recolored > 5 * shifted, (recolored, shifted)  # measured 236 vs 16.6


def test_openclip_checkpoint_loads_with_its_shape_read_off_the_file(openclip_file):
    path, original = openclip_file
    with pytest.raises(ValueError, match="--clip-heads"):
        build_extractor(choose_clip_extractor("openclip", str(path)))
    extractor = build_extractor(choose_clip_extractor("openclip", str(path), heads=2))
    images = _tensor([_textured(3), _textured(4)])
    expected = original(images.float() / 255)[:, 0]
    torch.testing.assert_close(extractor(images), expected)


def test_quickgelu_checkpoints_are_detected_and_built_with_quickgelu(openclip_file, tmp_path):
    """The activation is not in the weights' shapes: it comes from open_clip_config.json, the name, or
    OpenAI's keys, and the tower then computes what open_clip's quick_gelu=True tower computes."""
    import copy

    from open_clip.transformer import QuickGELU, VisionTransformer

    path, original = openclip_file
    state = torch.load(path)
    marked = {"config": tmp_path / "hub" / "open_clip_pytorch_model.bin",
              "name": tmp_path / "ViT-B-32-quickgelu" / "weights.bin",
              "openai": tmp_path / "plain" / "clip.pt"}
    for kind, file in marked.items():
        file.parent.mkdir()
        torch.save(state | ({"input_resolution": torch.tensor(32)} if kind == "openai" else {}), file)
    (marked["config"].parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    cfg = original.cfg
    quick = copy.deepcopy(original)
    quick.visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                     layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                     output_dim=cfg.embed_dim, act_layer=QuickGELU)
    quick.visual.load_state_dict(original.visual.state_dict())
    images = _tensor([_textured(3), _textured(4)])
    with torch.no_grad():
        expected, with_gelu = quick(images.float() / 255)[:, 0], original(images.float() / 255)[:, 0]
    assert (expected - with_gelu).abs().max() > 1e-4  # the activation matters for these weights
    for kind, file in marked.items():
        choice = choose_clip_extractor("openclip", str(file), heads=2)
        assert choice.quick_gelu and "QuickGELU" in choice.label(), kind
        torch.testing.assert_close(build_extractor(choice)(images), expected)

    plain = choose_clip_extractor("openclip", str(path), heads=2)
    assert not plain.quick_gelu and "GELU assumed" in plain.label()
    with pytest.raises(ValueError, match="--clip-activation gelu contradicts the checkpoint.*quick_gelu=true"):
        choose_clip_extractor("openclip", str(marked["config"]), heads=2, activation="gelu")
    forced = choose_clip_extractor("openclip", str(path), heads=2, activation="quick_gelu")
    assert forced.quick_gelu and "--clip-activation quick_gelu" in forced.label()


def test_missing_extractors_stop_with_a_clear_message_unless_a_substitute_is_asked(workspace, capsys):
    with pytest.raises(ValueError, match="--inception-weights PATH.*substitute:clip"):
        EvaluationConfig(clip_extractor="substitute:model").choices()
    with pytest.raises(ValueError, match="--clip-weights PATH.*substitute:model"):
        EvaluationConfig(fid_extractor="substitute:clip").choices()
    from jobs.evaluate import main

    with pytest.raises(SystemExit, match="^evaluate: .*FID needs the FID Inception-v3 weights"):
        main(["--model", str(workspace["base"]), "--data", str(workspace["dataset"]), "--local"])


# ------------------------------------------------------------------------------------ protocol parts
def test_plan_is_deterministic_and_never_uses_a_rows_own_reference(workspace):
    config = EvaluationConfig(samples=5, seed=3, fid_extractor="substitute:clip", clip_extractor="substitute:model")
    plan = plan_evaluation(str(workspace["dataset"]), config)
    again = plan_evaluation(str(workspace["dataset"]), config)
    assert plan.specs == again.specs and len({s.row_id for s in plan.specs}) == 5
    assert all(s.reference_id != s.row_id for s in plan.specs)
    other = plan_evaluation(str(workspace["dataset"]), EvaluationConfig(samples=5, seed=4))
    assert [s.seed for s in other.specs] != [s.seed for s in plan.specs]
    with pytest.raises(ValueError, match="only 6 distinct rows"):
        plan_evaluation(str(workspace["dataset"]), EvaluationConfig(samples=7))

    image = _textured(5)
    deformation = draw_deformation(np.random.default_rng(0))
    deformed = deform_reference(image, deformation)
    assert np.array_equal(deformed, deform_reference(image, deformation)) and deformed.shape == image.shape
    difference = np.abs(deformed.astype(int) - image.astype(int)).mean()
    assert 1 < difference < 80  # perturbed, yet the same picture:
    unrelated = np.abs(_textured(6).astype(int) - image.astype(int)).mean()
    assert difference < unrelated / 1.5  # much closer to its source than another picture is


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cli_run(workspace, inception_file, openclip_file):
    """jobs/evaluate.py on the trained folder: 4 samples, 2 steps, one process, logged to MLflow."""
    from jobs.evaluate import main

    out = workspace["root"] / "eval"
    argv = ["--model", str(workspace["trained"]), "--data", str(workspace["dataset"]), "--samples", "4",
            "--steps", "2", "--batch-size", "2", "--out", str(out), "--local",
            "--inception-weights", str(inception_file), "--clip-weights", str(openclip_file[0]), "--clip-heads", "2"]
    assert main(argv) == 0
    return out, argv


def test_evaluation_lands_in_mlflow_linked_to_the_training_run(workspace, cli_run, capsys):
    from mlflow.tracking import MlflowClient

    out, _ = cli_run
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"fid", "psnr", "ms_ssim", "clip_cosine"}
    assert all(np.isfinite(v) for v in report["metrics"].values())
    assert 0 < report["metrics"]["psnr"] <= PSNR_CAP_DB and -1 <= report["metrics"]["ms_ssim"] <= 1
    assert len(report["samples"]) == 4 and report["settings"]["steps"] == 2

    markdown = (out / "metrics.md").read_text()
    assert markdown.startswith("| Method | FID↓ | PSNR↑ | MS-SSIM↑ | CLIP↑ |")
    assert "| Paper (Table 1) | 8.28 | 28.83 | 0.700 | 0.912 |" in markdown
    assert "pt_inception-2015-12-05-6726825d.pth" in markdown and "open_clip_pytorch_model.bin" in markdown
    assert "4 samples" in markdown

    import torchmetrics  # every convention that moves a number is in the report

    conventions = report["conventions"]
    assert conventions["torchmetrics"] == torchmetrics.__version__
    assert "TensorFlow-1" in conventions["fid_resize"] and "antialias=True" in conventions["fid_resize"]
    assert "arithmetic mean of the per-image dB" in conventions["psnr"] and "float32" in conventions["ms_ssim"]
    assert report["metrics"]["psnr"] == pytest.approx(np.mean([s["psnr"] for s in report["samples"]]))
    assert report["settings"]["plugin"].startswith("off") and "Plug-in off" in markdown
    assert report["warnings"] == [fid_sample_warning(4)] and "> **Warning:** FID over n=4 is biased" in markdown
    assert fid_sample_warning(10_000) is None and "50,000" in fid_sample_warning(9_999)

    client = MlflowClient(tracking_uri=workspace["tracking"])
    training = workspace["training_run"]
    evaluations = client.search_runs([client.get_run(training).info.experiment_id],
                                     filter_string=f"tags.`colorize.evaluates` = '{training}'")
    assert len(evaluations) == 1
    run = evaluations[0]
    assert run.data.metrics["fid"] == pytest.approx(report["metrics"]["fid"])
    assert "colorize.run_name" not in run.data.tags  # the trainer must never resume into this run
    assert run.data.params["fid_extractor"].startswith("Inception-v3 FID weights")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.md", "metrics.json"} <= artifacts
    assert run.data.params["convention.torchmetrics"] == report["conventions"]["torchmetrics"]
    assert "biased upward" in run.data.tags["colorize.eval.warnings"]
    assert len(list((out / "samples").glob("part-*.parquet"))) == 1  # per-sample parts, for a rerun to resume
    setting = report["settings"]["setting"]
    on_training = client.get_run(training).data.metrics
    assert on_training[f"eval/{setting}/psnr"] == pytest.approx(report["metrics"]["psnr"])


@pytest.mark.slow
def test_ray_data_actors_give_the_single_process_numbers(workspace, cli_run):
    """The same plan through Ray Data actors (2 CPUs, in-process Ray), with substitute extractors named."""
    import ray

    from jobs.evaluate import build_parser, config_from
    from pipelines.evaluation.ray_runner import ray_runner

    out, argv = cli_run
    local = json.loads((out / "metrics.json").read_text())
    config = config_from(build_parser().parse_args(argv))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = evaluate(str(workspace["trained"]), str(workspace["dataset"]), config,
                          runner=ray_runner(workers=1, gpu=False, cpus_per_worker=1))
    finally:
        ray.shutdown()
    for key, value in local["metrics"].items():
        assert report.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
    assert [s["row_id"] for s in report.samples] == [s["row_id"] for s in local["samples"]]


def test_substitutes_are_named_in_keys_labels_and_table(workspace):
    config = EvaluationConfig(samples=2, steps=1, fid_extractor="substitute:clip", clip_extractor="substitute:model")
    report = evaluate(str(workspace["base"]), str(workspace["dataset"]), config)
    assert set(report.metrics) == {"fid_substitute_model_clip", "psnr", "ms_ssim", "clip_cosine_substitute_model_clip"}
    table = report.markdown()
    assert "FID (substitute: model CLIP tower)↓" in table and "| FID↓" not in table
    assert "| Paper (Table 1) | — | 28.83 | 0.700 | — |" in table
    vae = evaluate(str(workspace["base"]), str(workspace["dataset"]),
                   EvaluationConfig(samples=2, steps=1, fid_extractor="substitute:vae", clip_extractor="substitute:model"))
    assert set(vae.metrics) == {"fid_substitute_model_vae", "psnr", "ms_ssim", "clip_cosine_substitute_model_clip"}
    assert "FID (substitute: model VAE encoder)↓" in vae.markdown()
    assert vae.metrics["psnr"] == report.metrics["psnr"]  # the extractor changes the FID only


# ---------------------------------------------------------------------------------- entanglement
def test_entanglement_is_zero_for_the_own_reference_and_finite_otherwise(workspace, tiny_colorizer):
    from pipelines.evaluation.entanglement import line_f_score, spatial_entanglement

    lines = np.zeros((32, 32), bool)
    lines[10, 4:28] = True
    assert line_f_score(lines, lines, 1) == 1.0
    assert line_f_score(np.roll(lines, 1, axis=0), lines, 1) == 1.0
    assert line_f_score(np.roll(lines, 12, axis=0), lines, 1) == 0.0

    rows = read_rows(str(workspace["dataset"]), None, ["image", "sketches", "sketch_extractors"]).to_pylist()[:2]
    own = spatial_entanglement(tiny_colorizer, rows, shift=0, timesteps=(500,), steps=1)
    assert own.gram_distance == pytest.approx(0.0, abs=1e-10) and len(own.gram_distance_per_layer) == 2
    assert own.line_agreement == own.line_agreement_aligned
    other = spatial_entanglement(tiny_colorizer, rows, shift=1, timesteps=(250, 750), steps=1)
    assert np.isfinite(other.gram_distance) and other.gram_distance > 0
    assert 0 <= other.line_agreement <= 1 and 0 <= other.line_agreement_aligned <= 1
    assert other.pairs == 2 and set(other.line_extractors) <= {"xdog", "blur_difference", "canny", "highpass"}
    assert other.skipped == {} and other.degenerate is None and other.plugin is False


def test_degenerate_entanglement_pairs_give_nan_with_a_reason_not_a_perfect_score(workspace, tiny_colorizer):
    """One row (``--entanglement-pairs 1``) or duplicate rows would pair an image with itself: Gram distance
    0, equal line agreements. They are left out, and with nothing left the measures are NaN."""
    from pipelines.evaluation.entanglement import spatial_entanglement

    rows = read_rows(str(workspace["dataset"]), None, ["id", "image", "sketches", "sketch_extractors"]).to_pylist()
    one = spatial_entanglement(tiny_colorizer, rows[:1], timesteps=(500,), steps=1)
    assert np.isnan(one.gram_distance) and np.isnan(one.line_agreement) and np.isnan(one.line_agreement_aligned)
    assert one.pairs == 0 and "paired with itself" in one.degenerate and "at least 2 distinct rows" in one.degenerate
    copy = {k: v for k, v in rows[0].items() if k != "id"}  # same image, no id to give it away
    duplicates = spatial_entanglement(tiny_colorizer, [rows[0], copy], timesteps=(500,), steps=1)
    assert np.isnan(duplicates.gram_distance) and duplicates.skipped == {
        "paired with a copy of its own image (duplicate rows)": 2}
    wrapped = spatial_entanglement(tiny_colorizer, rows[:2], shift=2, timesteps=(500,), steps=1)
    assert np.isnan(wrapped.gram_distance) and "paired with itself" in wrapped.degenerate


# ------------------------------------------------------------------------------ resume and plug-in
@pytest.fixture(scope="module")
def plugin_model(workspace):
    """The tiny base model with a stage-2 plug-in (rank 2), saved as a stage-2 export is."""
    from model.colorizer import Colorizer
    from model.plugin import PluginConfig, attach_plugin

    model = Colorizer.from_pretrained(workspace["base"])
    attach_plugin(model, PluginConfig(lora_rank=2))
    return model.save_pretrained(workspace["root"] / "with-plugin")


def test_an_interrupted_evaluation_resumes_from_its_parts_with_the_plugin_off(workspace, plugin_model, tmp_path):
    """A run killed after its first batch leaves that batch on disk; the rerun evaluates only the rest,
    and the report comes from the parts. The plug-in is off by default and the report says so."""
    from pipelines.evaluation.protocol import run_single_process
    from pipelines.evaluation.results import ResultStore

    config = EvaluationConfig(samples=2, steps=1, batch_size=1, fid_extractor="substitute:clip",
                              clip_extractor="substitute:model")
    asked: list[list[int]] = []

    def preempted_after(count: int):
        def runner(model_folder, dataset, config, plan, references):
            asked.append([s.index for s in plan.specs])
            for done, result in enumerate(run_single_process(model_folder, dataset, config, plan, references), 1):
                yield result
                if done == count:
                    raise RuntimeError("preempted")
        return runner

    folder, dataset, parts = str(plugin_model), str(workspace["dataset"]), tmp_path / "samples"
    with pytest.raises(RuntimeError, match="preempted"):
        evaluate(folder, dataset, config, runner=preempted_after(1), results_dir=parts, part_size=1)
    assert len(list(parts.glob("part-*.parquet"))) == 1 and asked == [[0, 1]]

    report = evaluate(folder, dataset, config, runner=preempted_after(99), results_dir=parts, part_size=1)
    assert asked[1] == [1] and report.settings["resumed_samples"] == 1
    assert [s["index"] for s in report.samples] == [0, 1] and all(np.isfinite(list(report.metrics.values())))
    assert report.settings["plugin"] == "off (Table 1's protocol), though the model has one"

    again = evaluate(folder, dataset, config, runner=preempted_after(99), results_dir=parts)
    assert len(asked) == 2 and again.metrics == report.metrics  # nothing left to do: read back, same numbers
    with pytest.raises(ValueError, match="another evaluation plan"):
        evaluate(folder, dataset, EvaluationConfig(**{**asdict(config), "seed": 1}), results_dir=parts)
    assert ResultStore(parts, _fingerprint_of(parts)).done() == {0, 1}

    on = evaluate(folder, dataset, EvaluationConfig(**{**asdict(config), "plugin": True, "batch_size": 2}))
    assert on.settings["plugin"].startswith("on") and on.settings["setting"].endswith("-plugin")
    assert [s["row_id"] for s in on.samples] == [s["row_id"] for s in report.samples]
    assert any(abs(a["psnr"] - b["psnr"]) > 1e-3 for a, b in zip(on.samples, report.samples))
    with pytest.raises(ValueError, match="has no plugin/ folder"):
        evaluate(str(workspace["base"]), dataset, EvaluationConfig(**{**asdict(config), "plugin": True}))


def _fingerprint_of(parts: Path) -> str:
    return json.loads((parts / "plan.json").read_text())["fingerprint"]
