"""``jobs/colorize.py``: one pair from the command line, on the tiny model (in-process through ``main``, and
once as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import colorize as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from model.assembly import init_model

    return init_model(tmp_path_factory.mktemp("colorize-cli") / "tiny", "tiny", seed=0)


@pytest.fixture()
def files(tmp_path, drawing_pair):
    """The pair as PNG files: sketch (dark lines on white, RGB), reference (the colored picture), and a
    background picture (the reference flipped)."""
    sketch = np.repeat(drawing_pair.sketch[..., None], 3, axis=2)
    paths = {"sketch": tmp_path / "sketch.png", "reference": tmp_path / "reference.png",
             "background": tmp_path / "background.png"}
    Image.fromarray(sketch).save(paths["sketch"])
    Image.fromarray(drawing_pair.color).save(paths["reference"])
    Image.fromarray(np.ascontiguousarray(drawing_pair.color[:, ::-1])).save(paths["background"])
    return paths


@pytest.fixture(scope="module")
def script_run(model_folder, tmp_path_factory):
    """``python jobs/colorize.py ...`` in a subprocess, started as soon as the model folder exists and
    collected by the last test, so that its imports (most of its time) overlap the in-process tests."""
    from pipelines.data.synthetic import synthetic_illustration

    root = tmp_path_factory.mktemp("colorize-script")
    drawing = synthetic_illustration(seed=4, width=96, height=96)
    Image.fromarray(drawing.sketch).save(root / "sketch.png")  # gray: the decoder makes it RGB
    Image.fromarray(drawing.color).save(root / "reference.png")
    out = root / "out" / "script.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "colorize.py"), "--model", str(model_folder), "--sketch",
         str(root / "sketch.png"), "--reference", str(root / "reference.png"), "--out", str(out), "--size", "64x64",
         "--steps", "2", "--seed", "3", "--device", "cpu", "--progress", "lines"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, out
    if process.poll() is None:  # a selection of tests that never collected it
        process.kill()
        process.communicate()


def call(argv: list[str]) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own usage errors
        return stop.code


def base_args(model_folder, files, out) -> list:
    return ["--model", model_folder, "--sketch", files["sketch"], "--reference", files["reference"], "--out", out,
            "--device", "cpu"]


def json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


@pytest.mark.usefixtures("script_run")  # starts the subprocess run now (see script_run)
def test_same_pixels_as_the_library_with_progress_and_parameters(model_folder, files, tmp_path, capsys,
                                                                  monkeypatch):
    from model.options import ColorizeOptions

    loaded = []
    load_model = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    out = tmp_path / "sub" / "out.png"
    rc = call([*base_args(model_folder, files, out), "--size", "128x64", "--steps", "3", "--seed", "7",
               "--reference-guidance", "3.5", "--sketch-guidance", "1.5", "--reference-strength", "0.8",
               "--sketch-strengths", "1,0.5,1,1", "--sampler", "euler", "--progress", "lines",
               "--channels-last", "unet", "--attention", "math"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for step in (1, 2, 3):
        assert f"colorize: step {step}/3" in captured.err
    report = json_line(captured.out)
    assert (report["width"], report["height"], report["seed"], report["steps"]) == (128, 64, 7, 3)
    assert report["sampler"] == "euler" and report["sketch_strengths"] == [1.0, 0.5, 1.0, 1.0]
    assert report["plugin"] is False and report["out"] == str(out)
    assert report["seconds"] > 0 and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["acceleration"] == {"compile": "off", "attention": "math", "channels_last": ["unet"]}

    with Image.open(out) as image:
        assert image.size == (128, 64) and image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
        stored = json.loads(image.text["parameters"])
        assert image.text["seed"] == "7" and image.text["sampler"] == "euler"
    assert {k: stored[k] for k in ("seed", "steps", "width", "height", "reference_guidance")} == {
        "seed": 7, "steps": 3, "width": 128, "height": 64, "reference_guidance": 3.5}

    model, = loaded  # the library's own call on the model the command loaded (from model_folder, float32, cpu)
    assert model.acceleration.channels_last == ("unet",) and model.acceleration.attention == "math"
    options = ColorizeOptions(size=(128, 64), steps=3, reference_guidance=3.5, sketch_guidance=1.5,
                              reference_strength=0.8, sketch_strengths=(1, 0.5, 1, 1), sampler="euler")
    sketch = np.asarray(Image.open(files["sketch"]).convert("RGB"))
    reference = np.asarray(Image.open(files["reference"]).convert("RGB"))
    expected = np.asarray(model.colorize(sketch, reference, options, seed=7))
    np.testing.assert_array_equal(pixels, expected)


def test_background_enhance_with_a_background_picture_and_extracted_lines(model_folder, files, tmp_path, capsys,
                                                                          drawing_pair):
    from model.config import tiny
    from model.sizes import fit_size

    out = tmp_path / "bg.png"
    rc = call([*base_args(model_folder, files, out), "--background", files["background"], "--background-enhance",
               "--merge-scale", "0.3", "--foreground-strength", "1.5", "--extract-lines", "--line-extractor", "canny",
               "--steps", "2", "--seed", "1", "--progress", "none"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "step" not in captured.err
    report = json_line(captured.out)
    height, width = drawing_pair.sketch.shape
    s = tiny().sampling
    expected = fit_size(width, height, area=s.default_area, multiple=tiny().size_multiple, min_side=s.min_side,
                        max_side=s.max_side)  # no --size: the sketch's aspect, as the API
    assert (report["width"], report["height"]) == expected
    assert report["background_enhance"] is True and report["background_reference"] is True
    assert report["line_extractor"] == "canny" and report["merge_scale"] == 0.3
    assert report["reference_masker"] == "weight-free"
    with Image.open(out) as image:
        assert image.size == expected


def corrupt(files):
    Path(files["sketch"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return []


@pytest.mark.parametrize("case, extra, expected", [
    ("missing file", ["--reference", "/nowhere/ref.png"], "--reference /nowhere/ref.png: no such file"),
    ("corrupt png", "corrupt", "--sketch "),
    ("zero steps", ["--steps", "0"], "--steps 0 is outside [1, 200]"),
    ("size syntax", ["--size", "12x"], "--size: size must be N or WxH"),
    ("size off the grid", ["--size", "100x64"], "width 100 is not a multiple of 32 (try 96 or 128)"),
    ("size out of range", ["--size", "512x64"], "width 512 is outside [64, 256]"),
    ("guidance", ["--reference-guidance", "31"], "--reference-guidance 31.0 is outside [0, 30]"),
    ("strength count", ["--sketch-strengths", "1,1"], "--sketch-strengths needs 4 values"),
    ("strength syntax", ["--sketch-strengths", "1,x"], "--sketch-strengths must be numbers"),
    ("no plugin", ["--plugin"], "plugin=True needs a model with a plugin"),
    ("background alone", ["--background", "BG"], "--background needs the plug-in on or --background-enhance"),
    ("not a model", ["--model", "/nowhere/model"], "--model: /nowhere/model is not a colorize-xl model folder"),
    ("not a png name", ["--out", "OUT.jpg"], "the output is a PNG"),
    ("sampler", ["--sampler", "plms"], "argument --sampler: invalid choice"),
    ("steps syntax", ["--steps", "two"], "argument --steps: invalid int value"),
    ("masker weights", ["--background-enhance", "--sketch-masker-weights", "/nowhere/s.safetensors"],
     "--sketch-masker-weights /nowhere/s.safetensors: no such file"),
    ("device", ["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ("seed", ["--seed", "-1"], "--seed -1 is outside"),
    ("channels_last part", ["--channels-last", "unet,text_encoder"], "channels_last parts must be among"),
])
def test_bad_input_exits_2_with_one_line(model_folder, files, tmp_path, capsys, case, extra, expected):
    if extra == "corrupt":
        extra = corrupt(files)
    extra = [str(files["background"]) if a == "BG" else str(tmp_path / "x.jpg") if a == "OUT.jpg" else a
             for a in extra]
    out = tmp_path / "out.png"
    rc = call([*base_args(model_folder, files, out), "--steps", "1", *extra])
    captured = capsys.readouterr()
    assert rc == 2, (case, captured)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("colorize: "), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_the_entry_point_runs_as_a_script(script_run):
    process, out = script_run
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert json_line(stdout)["seed"] == 3
    assert "colorize: step 2/2" in stderr
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_reference_maskers_are_the_segmenters():
    from model.segmenter import MASKERS

    assert set(cli.REFERENCE_MASKERS) == set(MASKERS) - {cli.SKETCH_MASKER}
