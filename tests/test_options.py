"""``ColorizeOptions``: each value checked with its name, the model's defaults filled in one place, and the
options object driving ``colorize`` and ``colorize_batch`` alike."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.config import tiny
from model.options import ColorizeOptions
from model.plugin import PluginConfig


def pixels(image):
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps 0 is outside \\[1, 200\\]"),
    ({"steps": 201}, "steps 201 is outside"),
    ({"steps": 2.5}, "steps must be an integer, got 2.5"),
    ({"steps": True}, "steps must be an integer"),
    ({"size": (64,)}, "size must be \\(width, height\\), got \\(64,\\)"),
    ({"size": 64}, "size must be \\(width, height\\), got 64"),
    ({"reference_guidance": 31.0}, "reference_guidance 31.0 is outside \\[0, 30\\]"),
    ({"sketch_guidance": -1}, "sketch_guidance -1 is outside \\[0, 30\\]"),
    ({"reference_strength": -0.5}, "reference_strength -0.5 is outside \\[0, inf\\)"),
    ({"reference_strength": math.nan}, "reference_strength must be a finite number, got nan"),
    ({"sketch_strengths": [1.0, "strong"]}, "sketch_strengths\\[1\\] must be a finite number, got 'strong'"),
    ({"sketch_strengths": 1.0}, "sketch_strengths must be a sequence of numbers"),
    ({"aesthetic_score": math.inf}, "aesthetic_score must be a finite number, got inf"),
    ({"plugin": "yes"}, "plugin must be True, False or None"),
    ({"foreground_strength": 11}, "foreground_strength 11 is outside \\[0, 10\\]"),
    ({"background_strength": -1.0}, "background_strength -1.0 is outside \\[0, 10\\]"),
    ({"sketch_mask_threshold": 1.0}, "sketch_mask_threshold 1.0 is outside \\[0, 1\\)"),
    ({"reference_mask_threshold": 1.5}, "reference_mask_threshold 1.5 is outside \\[0, 1\\]"),
    ({"merge_scale": 2}, "merge_scale 2 is outside \\[0, 1\\]"),
    ({"background_enhance": 1}, "background_enhance must be True or False"),
])
def test_bad_values_are_refused_with_the_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        ColorizeOptions(**fields)


def test_equal_settings_make_equal_hashable_options():
    """The Serve app groups requests by their options, so spellings of the same settings must be one key."""
    listed = ColorizeOptions(size=[64, 96], steps=np.int64(3), reference_strength=1, sketch_strengths=[1, 0.5])
    tupled = ColorizeOptions(size=(64, 96), steps=3, reference_strength=1.0, sketch_strengths=(1.0, 0.5))
    assert listed == tupled and hash(listed) == hash(tupled)
    assert type(listed.steps) is int and listed.size == (64, 96)
    assert len({listed: 1, tupled: 2, ColorizeOptions(size=(64, 96), steps=4): 3}) == 2


def test_resolved_fills_the_model_defaults_from_its_config():
    config = tiny()
    s = config.sampling
    resolved = ColorizeOptions().resolved(config)
    assert (resolved.steps, resolved.reference_guidance, resolved.sketch_guidance, resolved.aesthetic_score,
            resolved.sampler) == (s.steps, s.reference_guidance, s.sketch_guidance, s.aesthetic_score, s.sampler)
    assert resolved.plugin is False and not resolved.splits_attention  # no plugin: off
    assert (resolved.sketch_mask_threshold, resolved.reference_mask_threshold) == (0.05, 0.5)  # as published
    assert resolved.size is None  # its default depends on the sketch (Colorizer.output_size)
    assert resolved.resolved(config) == resolved

    with_plugin = ColorizeOptions().resolved(config, PluginConfig())
    assert with_plugin.plugin is True and with_plugin.splits_attention
    assert ColorizeOptions(background_enhance=True).resolved(config).splits_attention
    chosen = ColorizeOptions(size=(96, 64), steps=3, reference_guidance=2.0, sketch_guidance=1.5, aesthetic_score=5.0,
                             plugin=False, sketch_mask_threshold=0.6, merge_scale=0.3, sampler="ddim")
    assert chosen.resolved(config, PluginConfig()) == chosen  # what is given is kept


def test_resolved_refuses_what_the_model_cannot_do():
    config = tiny()
    with pytest.raises(ValueError, match="plugin=True needs a model with a plugin"):
        ColorizeOptions(plugin=True).resolved(config)
    with pytest.raises(ValueError, match="width 100 is not a multiple of 32"):
        ColorizeOptions(size=(100, 64)).resolved(config)


def test_an_aesthetic_score_of_zero_is_honoured(tiny_colorizer, drawing_pair):
    assert ColorizeOptions(aesthetic_score=0.0).resolved(tiny_colorizer.config).aesthetic_score == 0.0

    def run(**fields):
        options = ColorizeOptions(size=(64, 64), steps=1, **fields)
        return pixels(tiny_colorizer.colorize(drawing_pair.sketch, drawing_pair.color, options, seed=0))

    default = run()
    assert np.array_equal(run(aesthetic_score=tiny_colorizer.config.sampling.aesthetic_score), default)
    assert not np.array_equal(run(aesthetic_score=0.0), default)  # 0 is a score, not "use the default"


def test_colorize_is_colorize_batch_of_one(tiny_colorizer, drawing_pair):
    pair = drawing_pair
    options = ColorizeOptions(size=(96, 64), steps=2, reference_guidance=3.0, sketch_guidance=1.5,
                              reference_strength=0.8, aesthetic_score=6.0)
    single = tiny_colorizer.colorize(pair.sketch, pair.color, options, seed=11)
    (batched,) = tiny_colorizer.colorize_batch([pair.sketch], [pair.color], options, seeds=[11])
    assert np.array_equal(pixels(single), pixels(batched))
    assert np.array_equal(pixels(tiny_colorizer.colorize(pair.sketch, pair.color)),
                          pixels(tiny_colorizer.colorize(pair.sketch, pair.color, ColorizeOptions(), seed=0)))
