"""The published ColorizeDiffusionXL semantics that are ours to keep: the multi-scale sketch attention, the
reference strength as a cross-attention output scale, the encoders' input preparation, the sketch
letterbox, and the dataset schema version that the encoders' new inputs forced. Numbers against the
authors' code itself are in test_parity.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.images import sketch_to_tensor
from model.sketch_encoder import MultiScaleAttention, apply_rope, rope_angles


def test_each_scale_sees_only_the_global_token_coarser_scales_and_itself():
    torch.manual_seed(0)
    attention = MultiScaleAttention(dim=32, head_dim=8)
    grids = [(2, 3), (4, 6), (8, 12)]
    lengths = [1 + 6, 24, 96]  # the global token shares the first block with the coarsest scale
    tokens = torch.randn(2, sum(lengths), 32)
    out = attention(tokens, grids)
    changed = tokens.clone()
    changed[:, lengths[0] + lengths[1]:] += torch.randn(2, lengths[2], 32)  # only the finest scale
    out_changed = attention(changed, grids)
    torch.testing.assert_close(out_changed[:, : lengths[0] + lengths[1]], out[:, : lengths[0] + lengths[1]])
    assert not torch.allclose(out_changed[:, lengths[0] + lengths[1]:], out[:, lengths[0] + lengths[1]:])
    changed = tokens.clone()
    changed[:, 0] += 1.0  # the global token reaches every scale
    assert not torch.allclose(attention(changed, grids)[:, -1], out[:, -1])


def test_rotary_positions_make_scores_depend_on_the_offset_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    angles = rope_angles(5, 7, 16, "cpu")

    def score(qi, ki):
        return (apply_rope(q, angles[qi:qi + 1]) * apply_rope(k, angles[ki:ki + 1])).sum()

    # token (row 1, col 2) against (row 3, col 5), and the same offset shifted to (2, 1) against (4, 4)
    torch.testing.assert_close(score(1 * 7 + 2, 3 * 7 + 5), score(2 * 7 + 1, 4 * 7 + 4))
    assert not torch.allclose(score(1 * 7 + 2, 3 * 7 + 5), score(1 * 7 + 2, 3 * 7 + 4))
    # the rotation keeps norms, and position (0, 0) is the identity
    torch.testing.assert_close(apply_rope(q, angles[9:10]).norm(), q.norm())
    torch.testing.assert_close(apply_rope(q, angles[:1]), q)


def test_reference_strength_scales_the_cross_attention_output_not_the_context(tiny_colorizer):
    cfg = tiny_colorizer.config
    unet = tiny_colorizer.unet
    torch.manual_seed(0)
    latents = torch.randn(1, cfg.unet.latent_channels, 8, 8)
    timesteps = torch.tensor([500.0])
    context = torch.randn(1, cfg.context_tokens, cfg.unet.cross_attention_dim)
    vector = torch.tensor([[128.0, 7.0]])

    def predict(ctx, strength=1.0):
        return unet(latents, timesteps, ctx, vector, reference_strength=strength).prediction

    full = predict(context)
    torch.testing.assert_close(predict(context, 1.0), full)
    # zero strength = no reference: a zero context gives zero attention output (bias-free values)
    torch.testing.assert_close(predict(context, 0.0), predict(torch.zeros_like(context)), rtol=1e-5, atol=1e-5)
    half = predict(context, 0.5)
    assert not torch.allclose(half, predict(context * 0.5), atol=1e-4)  # what the old semantics computed
    assert not torch.allclose(half, full, atol=1e-4)
    # the strength is per call: nothing stays behind in the hooks
    torch.testing.assert_close(predict(context), full)


def test_the_tagger_gets_bgr_in_minus_one_to_one_and_clip_a_stretched_image(tiny_colorizer):
    red = torch.zeros(1, 3, 30, 50)
    red[:, 0] = 1.0
    prepared = tiny_colorizer.tagger.prepare(red)
    size = tiny_colorizer.config.tagger.image_size
    assert prepared.shape == (1, 3, size, size)
    torch.testing.assert_close(prepared[:, 2], torch.ones(1, size, size))  # red sits in the last channel
    torch.testing.assert_close(prepared[:, 0], -torch.ones(1, size, size))
    # stretched, not padded: a half-black, half-white image keeps its split in the middle
    split = torch.zeros(1, 3, 20, 60)
    split[..., 30:] = 1.0
    clip_input = tiny_colorizer.clip.prepare(split)
    left, right = clip_input[0, 0, :, : clip_input.shape[-1] // 2 - 2], clip_input[0, 0, :, clip_input.shape[-1] // 2 + 2:]
    assert left.max() < 0 < right.min()
    # a list of images of different sizes gives what each gives alone
    batch = tiny_colorizer.clip.prepare([red, split])
    torch.testing.assert_close(batch[1:], clip_input)


def test_a_sketch_is_letterboxed_inverted_rgb():
    drawing = np.full((40, 40, 3), 255, np.uint8)
    drawing[:, 18:22] = 0  # one vertical stroke
    drawing[5:10, :, 0] = 200  # a cyan band (less red): the channels stay apart
    tensor = sketch_to_tensor(drawing, (96, 64))
    assert tensor.shape == (1, 3, 64, 96)
    # a square drawing in a wide frame: 16-pixel empty margins (-1) left and right
    torch.testing.assert_close(tensor[..., :16], -torch.ones(1, 3, 64, 16))
    torch.testing.assert_close(tensor[..., -16:], -torch.ones(1, 3, 64, 16))
    assert tensor[0, :, 32, 48].min() > 0.9  # the stroke is bright
    band = tensor[0, :, 12, 20]
    assert band[0] > band[1] == -1.0  # the darker red channel is the brighter one once inverted


def test_refuses_datasets_of_another_schema_version(tmp_path):
    from pipelines.data.layout import SCHEMA_VERSION, check_config, check_schema, finished_manifest
    from pipelines.data.shards import PreprocessConfig

    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"schema_version": 1, "complete": True}))
    with pytest.raises(ValueError, match="schema version 1.*Preprocess the corpus again"):
        finished_manifest(str(old))
    with pytest.raises(ValueError, match="schema version 1"):
        check_schema(str(old))
    in_progress = tmp_path / "in_progress"
    in_progress.mkdir()
    cfg = PreprocessConfig()
    (in_progress / "config.json").write_text(json.dumps(cfg.to_json()))  # version 1 wrote no version
    with pytest.raises(ValueError, match="schema version 1"):
        check_config(str(in_progress), cfg)
    fresh = tmp_path / "fresh"
    check_config(str(fresh), cfg)
    assert json.loads((fresh / "config.json").read_text())["schema_version"] == SCHEMA_VERSION
    check_config(str(fresh), cfg)  # a rerun with the same settings is fine


def test_model_folders_of_the_old_architecture_are_refused_and_the_demo_starts_them_over(tmp_path):
    from jobs.demo import start_over_if_stale
    from model.colorizer import read_config

    out = tmp_path / "demo"
    for name in ("base", "stage1", "corpus", "runs"):
        (out / name).mkdir(parents=True)
    (out / "base" / "config.json").write_text(json.dumps({"format": "colorize-xl", "version": 1, "config": {}}))
    with pytest.raises(ValueError, match="format version 1.*published model's"):
        read_config(out / "base")
    assert start_over_if_stale(out) is not None
    assert sorted(p.name for p in out.iterdir()) == ["corpus"]  # the corpus stays; models and checkpoints go
    assert start_over_if_stale(out) is None
