"""The ``Colorizer`` API: sizes, determinism, guidance, and the model-folder round trip."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.colorizer import Colorizer
from model.guidance import Guidance, guided_prediction
from model.options import ColorizeOptions
from model.sizes import fit_size, validate_size


def pixels(image):
    return np.asarray(image).astype(np.int16)


def test_colorize_returns_the_requested_size(tiny_colorizer, drawing_pair):
    image = tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, ColorizeOptions(size=(160, 96), steps=2),
                                   seed=0)
    assert image.size == (160, 96) and image.mode == "RGB"


def test_colorize_fits_the_sketch_aspect_when_no_size_is_given(tiny_colorizer, drawing_pair):
    image = tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, ColorizeOptions(steps=2), seed=0)
    width, height = image.size
    assert width % 32 == 0 and height % 32 == 0
    assert width > height  # the 128x96 drawing is landscape
    assert abs(width / height - 128 / 96) < 0.35


def test_sampling_is_deterministic_under_a_seed(tiny_colorizer, drawing_pair):
    options = ColorizeOptions(size=(96, 64), steps=3)
    run = lambda seed: pixels(tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, options, seed=seed))
    first, again, other = run(7), run(7), run(8)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_batched_items_match_their_single_runs(tiny_colorizer, drawing_pair):
    pair = drawing_pair
    options = ColorizeOptions(size=(64, 64), steps=2)
    batched = tiny_colorizer.colorize_batch([pair.sketch, pair.sketch], [pair.color, pair.color[::-1].copy()],
                                            options, seeds=[1, 2])
    single = tiny_colorizer.colorize(pair.sketch, pair.color[::-1].copy(), options, seed=2)
    assert np.abs(pixels(batched[1]) - pixels(single)).max() <= 1


def test_sketch_and_reference_both_change_the_result(tiny_colorizer, drawing_pair):
    pair = drawing_pair
    options = ColorizeOptions(size=(64, 64), steps=2)
    base = pixels(tiny_colorizer.colorize(pair.sketch, pair.color, options, seed=0))
    blank = np.full_like(pair.sketch, 255)
    no_lines = pixels(tiny_colorizer.colorize(blank, pair.color, options, seed=0))
    other_ref = pixels(tiny_colorizer.colorize(pair.sketch, 255 - pair.color, options, seed=0))
    assert np.abs(base - no_lines).mean() > 0.1
    assert np.abs(base - other_ref).mean() > 0.1


@pytest.mark.parametrize("size,message", [
    ((100, 64), "width 100 is not a multiple of 32 \\(try 96 or 128\\)"),
    ((64, 70), "height 70 is not a multiple of 32"),
    ((512, 64), "width 512 is outside \\[64, 256\\]"),
    ((64.5, 64), "width must be an integer"),
])
def test_sizes_off_the_grid_are_refused_with_the_reason(tiny_colorizer, drawing_pair, size, message):
    with pytest.raises(ValueError, match=message):
        tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, ColorizeOptions(size=size, steps=1))


def test_size_fitting_snaps_to_the_grid():
    assert fit_size(1920, 1080, area=1024 * 1024, multiple=32, min_side=768, max_side=1536) == (1376, 768)
    assert fit_size(1000, 1000, area=1024 * 1024, multiple=32, min_side=768, max_side=1536) == (1024, 1024)
    assert validate_size(1024, 768, multiple=32, min_side=768, max_side=1536) == (1024, 768)


def test_bad_controls_are_refused(tiny_colorizer, drawing_pair):
    pair = drawing_pair
    with pytest.raises(ValueError, match="steps 0"):
        tiny_colorizer.colorize(pair.sketch, pair.color, ColorizeOptions(steps=0))
    with pytest.raises(ValueError, match="4 values"):
        tiny_colorizer.colorize(pair.sketch, pair.color, ColorizeOptions(steps=1, sketch_strengths=[1.0]))
    with pytest.raises(ValueError, match="reference guidance"):
        Guidance(reference=-1.0)


def test_guidance_combines_only_what_it_needs():
    full, no_ref, no_sketch = torch.full((1,), 3.0), torch.full((1,), 1.0), torch.full((1,), 2.0)
    assert Guidance(1.0, 1.0).conditions == ("full",)
    assert Guidance(4.0, 1.0).conditions == ("full", "no_reference")
    assert guided_prediction({"full": full, "no_reference": no_ref}, Guidance(4.0, 1.0)).item() == 1.0 + 4.0 * 2.0
    both = guided_prediction({"full": full, "no_reference": no_ref, "no_sketch": no_sketch}, Guidance(4.0, 2.0))
    assert both.item() == pytest.approx(((1.0 + 8.0) + (2.0 + 2.0)) / 2)


def test_model_folder_round_trip_reproduces_the_output(tiny_colorizer, drawing_pair, tmp_path):
    folder = tiny_colorizer.save_pretrained(tmp_path / "model")
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "tagger/model.safetensors", "tagger/selected_tags.csv", "clip/model.safetensors",
                 "sketch_encoder/model.safetensors", "projector/model.safetensors"):
        assert (folder / part).is_file(), part
    assert json.loads((folder / "config.json").read_text())["format"] == "colorize-xl"

    loaded = Colorizer.from_pretrained(folder)
    for name, tensor in tiny_colorizer.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    args = dict(options=ColorizeOptions(size=(64, 96), steps=2), seed=5)
    assert np.array_equal(pixels(loaded.colorize(drawing_pair.sketch, drawing_pair.color, **args)),
                          pixels(tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, **args)))


def test_loading_a_folder_with_a_damaged_component_names_the_file(tiny_colorizer, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_colorizer.save_pretrained(tmp_path / "model")
    path = folder / "projector" / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as error:
        Colorizer.from_pretrained(folder)
    assert str(path) in str(error.value) and name in str(error.value)

    with pytest.raises(FileNotFoundError, match="not a colorize-xl model folder"):
        Colorizer.from_pretrained(tmp_path / "nowhere")


def test_colorize_runs_in_bfloat16(tiny_colorizer, drawing_pair, tmp_path):
    folder = tiny_colorizer.save_pretrained(tmp_path / "model")
    half = Colorizer.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    options = ColorizeOptions(size=(64, 64), steps=2)
    image = half.colorize(drawing_pair.sketch, drawing_pair.color, options, seed=0)
    reference = tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, options, seed=0)
    assert image.size == (64, 64)
    assert np.abs(pixels(image) - pixels(reference)).mean() < 12  # same picture up to bf16 rounding


def test_a_partial_load_reads_only_the_named_parts(tiny_colorizer, tmp_path):
    folder = tiny_colorizer.save_pretrained(tmp_path / "model")
    encoders = Colorizer.from_pretrained(folder, components=("tagger", "clip", "vae"))
    assert all(p.is_meta for p in encoders.unet.parameters())
    for name in ("tagger", "clip", "vae", "sketch_encoder", "projector"):
        for key, tensor in getattr(tiny_colorizer, name).state_dict().items():
            assert torch.equal(getattr(encoders, name).state_dict()[key], tensor), f"{name}.{key}"
    with pytest.raises(ValueError, match="loaded without \\['unet'\\]"):
        encoders.save_pretrained(tmp_path / "copy")
    with pytest.raises(ValueError, match="can be left out"):
        Colorizer.from_config(tiny_colorizer.config, placeholders=("projector",))


def test_precomputed_contexts_and_step_reports(tiny_colorizer, drawing_pair):
    pair = drawing_pair
    options = ColorizeOptions(size=(64, 64), steps=3)
    steps = []
    direct = tiny_colorizer.colorize_batch([pair.sketch], [pair.color], options, seeds=[4],
                                           on_step=lambda done, total: steps.append((done, total)))
    from model.images import image_to_tensor

    context = tiny_colorizer.encode_reference([image_to_tensor(pair.color)])
    cached = tiny_colorizer.colorize_batch([pair.sketch], [pair.color], options, seeds=[4], contexts=context)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(np.asarray(direct[0]), np.asarray(cached[0]))
    with pytest.raises(ValueError, match="precomputed contexts"):
        tiny_colorizer.colorize_batch([pair.sketch], [pair.color], replace(options, background_enhance=True),
                                      seeds=[4], contexts=context)
