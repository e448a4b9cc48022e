"""The batch colorization job (jobs/colorize_batch.py): its plan, its stages in one process (partial run, a
simulated kill, resume, a rerun that does nothing) and its Ray Data stream on a local Ray (2 CPUs), tiny
preset, 64×64, 2 steps. Every picture equals a direct ``colorize_batch`` call with the same seed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.image_io import decode_image
from pipelines.data.synthetic import synthetic_illustration
from pipelines.inference.layout import (
    BatchConfig,
    check_config,
    finished_units,
    load_or_create_plan,
    marker_path,
    read_errors,
    read_index,
)
from pipelines.inference.pairs import parse_settings, plan_units
from model.line_art import extract_drawing
from pipelines.inference.stages import UnitColorizer

DEFAULTS = {"size": 64, "steps": 2}
GOOD = {"f0", "f1", "f2", "f3", "colored", "bg"}
BAD = {"broken": "decode", "missing": "read", "badsteps": "input", "badref": "read"}


def _png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder, two references, five drawings, a colored picture, a truncated PNG, and a CSV
    manifest of 10 pairs (relative paths) of which 4 cannot be colored."""
    from model.assembly import init_model

    root = tmp_path_factory.mktemp("colorize_batch")
    model = init_model(root / "model", "tiny", seed=0)
    inputs = root / "inputs"
    _png(synthetic_illustration(seed=1, width=96, height=96).color, inputs / "refs" / "sheet.png")
    _png(synthetic_illustration(seed=2, width=80, height=96).color, inputs / "refs" / "other.png")
    for i in range(4):
        _png(synthetic_illustration(seed=10 + i, width=96, height=80).sketch, inputs / "lines" / f"f{i}.png")
    _png(synthetic_illustration(seed=20, width=96, height=96).color, inputs / "lines" / "colored.png")
    whole = (inputs / "lines" / "f0.png").read_bytes()
    (inputs / "broken.png").write_bytes(whole[: len(whole) // 3])
    rows = [  # id, sketch, reference, seed, settings
        ("f0", "lines/f0.png", "refs/sheet.png", 11, {}),
        ("f1", "lines/f1.png", "refs/sheet.png", 12, {}),
        ("f2", "lines/f2.png", "refs/sheet.png", 13, {}),
        ("f3", "lines/f3.png", "refs/other.png", 14, {}),
        ("colored", "lines/colored.png", "refs/sheet.png", 15, {"extract_lines": "true", "line_extractor": "canny"}),
        ("bg", "lines/f1.png", "refs/sheet.png", 16, {"background_enhance": "true", "background": "refs/other.png"}),
        ("broken", "broken.png", "refs/sheet.png", 17, {}),
        ("missing", "lines/nowhere.png", "refs/sheet.png", 18, {}),
        ("badsteps", "lines/f0.png", "refs/sheet.png", 19, {"steps": "0"}),
        ("badref", "lines/f2.png", "refs/nowhere.png", "", {}),
    ]
    columns = ["id", "sketch", "reference", "background", "seed", "steps", "extract_lines", "line_extractor",
               "background_enhance"]
    with open(inputs / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for pair_id, sketch, reference, seed, settings in rows:
            writer.writerow({"id": pair_id, "sketch": sketch, "reference": reference, "seed": seed, **settings})
    config = BatchConfig(model=str(model), manifest=str(inputs / "pairs.csv"), defaults=parse_settings(DEFAULTS),
                         unit_size=3)
    return {"root": root, "model": model, "inputs": inputs, "config": config}


@pytest.fixture(scope="module")
def colorizer(workspace):
    return UnitColorizer.load(str(workspace["model"]), device="cpu", batch_size=4)


def test_the_plan_reads_the_manifest_and_groups_units_by_settings(workspace, tmp_path):
    cfg = workspace["config"]
    pairs = {p.pair_id: p for p in cfg.pairs()}
    assert set(pairs) == GOOD | set(BAD)
    assert pairs["f0"].sketch == str(workspace["inputs"] / "lines" / "f0.png") and pairs["f0"].seed == 11
    assert pairs["badref"].seed == 0  # an empty seed cell takes --seed
    assert "steps 0 is outside" in pairs["badsteps"].invalid and pairs["f0"].invalid is None
    assert json.loads(pairs["colored"].settings) == {"size": [64, 64], "steps": 2, "extract_lines": True,
                                                    "line_extractor": "canny"}
    units = plan_units(list(pairs.values()), 3)
    assert all(len({p.settings for p in unit}) == 1 and len(unit) <= 3 for unit in units)
    assert sum(len(u) for u in units) == 10
    output = str(tmp_path / "out")
    check_config(output, cfg)
    assert load_or_create_plan(output, cfg).inputs == 10
    from dataclasses import replace

    with pytest.raises(ValueError, match="seed differ"):
        check_config(output, replace(cfg, seed=5))
    with pytest.raises(ValueError, match="unknown column.*colour"):
        bad = tmp_path / "bad.csv"
        bad.write_text("sketch,reference,colour\na.png,b.png,red\n")
        replace(cfg, manifest=str(bad)).pairs()
    with pytest.raises(ValueError, match="size must be N or WxH"):
        parse_settings({"size": "big"})


def test_a_folder_of_sketches_after_one_reference(workspace):
    inputs = workspace["inputs"]
    cfg = BatchConfig(model=str(workspace["model"]), sketches=str(inputs / "lines"),
                      reference=str(inputs / "refs" / "sheet.png"), defaults=parse_settings(DEFAULTS), seed=3)
    pairs = cfg.pairs()
    assert [p.pair_id for p in pairs] == ["colored", "f0", "f1", "f2", "f3"]
    assert {p.reference for p in pairs} == {str(inputs / "refs" / "sheet.png")} and {p.seed for p in pairs} == {3}
    with pytest.raises(ValueError, match="needs --reference"):
        BatchConfig(model="m", sketches=str(inputs / "lines"))


def direct_picture(model, pair: dict) -> np.ndarray:
    """The pair colored by a plain ``colorize_batch`` call of one."""
    from model.options import ColorizeOptions

    params = json.loads(pair["parameters"])
    sketch = decode_image(Path(pair["sketch"]).read_bytes())
    if params["line_extractor"]:
        sketch = extract_drawing(sketch, params["line_extractor"])
    background = None if pair["background"] is None else [decode_image(Path(pair["background"]).read_bytes())]
    options = ColorizeOptions(size=(64, 64), steps=2, background_enhance=params["background_enhance"])
    image = model.colorize_batch([sketch], [decode_image(Path(pair["reference"]).read_bytes())], options,
                                 seeds=[pair["seed"]], background_references=background)[0]
    return np.asarray(image).astype(int)


def check_finished(output: str, workspace) -> dict:
    index = {r["pair_id"]: r for r in read_index(output).to_pylist()}
    errors = {r["pair_id"]: r for r in read_errors(output).to_pylist()}
    assert set(index) == GOOD and {k: e["stage"] for k, e in errors.items()} == BAD
    assert errors["badref"]["input"].endswith("refs/nowhere.png") and errors["missing"]["reason"] == "not found"
    assert "truncated" in errors["broken"]["reason"] or "corrupt" in errors["broken"]["reason"]
    for row in index.values():
        assert Path(row["output"]).is_file() and (row["width"], row["height"]) == (64, 64) and row["seconds"] > 0
    assert json.loads(index["colored"]["parameters"])["line_extractor"] == "canny"
    assert sorted(p.name for p in (Path(output) / "images").iterdir()) == sorted(f"{k}.png" for k in GOOD)
    assert not list(Path(output).rglob("*.tmp"))
    return index


def test_in_process_partial_run_kill_resume_and_rerun(workspace, colorizer, tmp_path):
    from pipelines.inference.ray_stream import run_colorize_batch

    cfg, output = workspace["config"], str(tmp_path / "out")
    partial = run_colorize_batch(cfg, output, max_units=2, colorizer=colorizer)
    assert partial["units_done"] == 2 and not partial["complete"]
    first = min(finished_units(output))
    Path(marker_path(output, first)).unlink()  # killed after its PNGs were written, before its marker
    assert len(finished_units(output)) == 1

    manifest = run_colorize_batch(cfg, output, colorizer=colorizer)
    assert manifest["complete"] and manifest["rows"] + manifest["errors"] == manifest["inputs"] == 10
    assert manifest["rows"] == 6 and manifest["errors_by_stage"] == {"decode": 1, "input": 1, "read": 2}
    index = check_finished(output, workspace)
    assert colorizer.stats["contexts_encoded"] == 2  # sheet and other, each once, across the resumed run
    assert colorizer.stats["contexts_reused"] >= 2

    files = sorted(p for p in Path(output).rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    calls = colorizer.stats["calls"]
    assert run_colorize_batch(cfg, output, colorizer=colorizer) == manifest
    assert colorizer.stats["calls"] == calls  # nothing colored again
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files} == before
    assert sorted(p for p in Path(output).rglob("*") if p.is_file()) == files

    for pair_id in ("f0", "colored", "bg"):  # batched with others, lines extracted, split attention
        stored = np.asarray(Image.open(index[pair_id]["output"])).astype(int)
        assert np.abs(stored - direct_picture(colorizer.model, index[pair_id])).max() <= 1, pair_id
    assert index["f0"]["batch"] > 1


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_the_ray_stream_resumes_a_partial_output_and_a_rerun_starts_nothing(workspace, colorizer, local_ray,
                                                                           tmp_path, capsys):
    """The job's entry point on a local Ray, other batching (2 per call), resuming an output whose first unit
    was written in this process: the pictures equal the direct calls' and the in-process run's."""
    import importlib

    from pipelines.inference.ray_stream import run_colorize_batch

    job = importlib.import_module("jobs.colorize_batch")
    cfg, output = workspace["config"], str(tmp_path / "out")
    run_colorize_batch(cfg, output, max_units=1, colorizer=colorizer)
    common = ["--model", cfg.model, "--manifest", cfg.manifest, "--out", output, "--size", "64", "--unit-size", "3"]
    argv = [*common, "--steps", "2", "--batch-size", "2", "--workers", "1"]
    assert job.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["rows"] == 6 and summary["errors"] == 4 and summary["inputs"] == 10
    index = check_finished(output, workspace)
    for pair_id in ("f1", "f3"):
        stored = np.asarray(Image.open(index[pair_id]["output"])).astype(int)
        assert np.abs(stored - direct_picture(colorizer.model, index[pair_id])).max() <= 1, pair_id

    files = sorted(p for p in Path(output).rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert job.main(argv) == 0
    assert "0 to process" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == before
    with pytest.raises(SystemExit, match="colorize_batch: .*other settings \\(defaults differ\\)"):
        job.main([*common, "--steps", "3"])
