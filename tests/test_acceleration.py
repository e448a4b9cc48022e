"""The inference switches of model/acceleration.py: each leaves the numbers as they were (within float
rounding), does what it says to the modules, and refuses what it does not know. Speed is bench/gpu_check.py's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model.acceleration import (Acceleration, regional_blocks, save_compile_cache, use_compile_cache)
from model.options import ColorizeOptions

OPTIONS = ColorizeOptions(size=(64, 64), steps=2, reference_guidance=2.0, sketch_guidance=1.5)


@pytest.fixture()
def model(tiny_colorizer):
    return copy.deepcopy(tiny_colorizer)


def _colorize(model, drawing_pair):
    image = model.colorize(drawing_pair.sketch, drawing_pair.color, OPTIONS, seed=3)
    return torch.from_numpy(np.asarray(image).copy()).float()


@pytest.fixture()
def eager_image(tiny_colorizer, drawing_pair):
    return _colorize(tiny_colorizer, drawing_pair)


def test_switches_are_checked():
    with pytest.raises(ValueError, match="compile"):
        Acceleration(compile="everything")
    with pytest.raises(ValueError, match="attention"):
        Acceleration(attention="fastest")
    with pytest.raises(ValueError, match="channels_last"):
        Acceleration(channels_last=("unet", "text_encoder"))
    assert Acceleration.for_device("cpu") == Acceleration()
    assert Acceleration.for_device("cuda").channels_last == ("unet",)
    flags = Acceleration.from_flags(compile="blocks", channels_last="unet,vae_decoder", attention="math")
    assert flags.channels_last == ("unet", "vae_decoder") and flags.compile == "blocks"
    assert Acceleration.from_flags(channels_last="none", device="cuda").channels_last == ()


def test_channels_last_changes_the_layout_not_the_picture(model, drawing_pair, eager_image):
    report = model.accelerate(Acceleration(channels_last=("unet", "vae_decoder")))
    assert report["channels_last"] == ["unet", "vae_decoder"]
    convs = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    encoder_conv = next(m for m in model.vae.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert not encoder_conv.weight.is_contiguous(memory_format=torch.channels_last)  # not asked for
    image = _colorize(model, drawing_pair)
    assert (image - eager_image).abs().max() <= 1  # uint8 pixels: rounding at most


def test_the_attention_kernel_is_the_one_asked_for(model, drawing_pair, eager_image):
    model.accelerate(Acceleration(attention="math"))
    assert (_colorize(model, drawing_pair) - eager_image).abs().max() <= 1
    # The CPU has no memory-efficient kernel: asking for it alone must fail, which shows the choice is applied.
    model.accelerate(Acceleration(attention="efficient"))
    with pytest.raises(RuntimeError):
        _colorize(model, drawing_pair)


def test_regional_compile_keeps_keys_and_numbers(model, drawing_pair, eager_image):
    keys = list(model.state_dict())
    report = model.accelerate(Acceleration(compile="blocks", compile_backend="eager"))
    blocks = regional_blocks(model.unet)
    assert report["compiled_modules"] == len(blocks) > 0
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert list(model.state_dict()) == keys  # saving and loading see the same modules
    torch._dynamo.reset()
    assert (_colorize(model, drawing_pair) - eager_image).abs().max() <= 1


def test_compile_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert use_compile_cache(tmp_path / "cache") is False  # nothing saved yet
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    (tmp_path / "cache" / "torch-compile-artifacts.bin").write_bytes(b"not a cache")
    assert use_compile_cache(tmp_path / "cache") is False  # a foreign file costs a recompile, not a crash
    written = save_compile_cache(tmp_path / "saved")
    assert written == 0 or (tmp_path / "saved" / "torch-compile-artifacts.bin").stat().st_size == written


def test_bf16_runs_end_to_end(tiny_colorizer, drawing_pair):
    """With the model in bf16, every convolution, linear layer and norm of every part computes in bf16: no
    part silently runs in float32 (the sampler's own state stays float32 by design)."""
    model = copy.deepcopy(tiny_colorizer).to(torch.bfloat16)
    seen: dict[str, set] = {}

    def record(module, args):
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        seen.setdefault(type(module).__name__, set()).update(str(t.dtype) for t in tensors)

    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GroupNorm)
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, kinds)]
    try:
        image = model.colorize(drawing_pair.sketch, drawing_pair.color, OPTIONS, seed=3)
    finally:
        for hook in hooks:
            hook.remove()
    assert np.asarray(image).shape == (64, 64, 3)
    assert set(seen) >= {"Conv2d", "Linear", "LayerNorm", "GroupNorm"}
    assert all(dtypes == {"torch.bfloat16"} for dtypes in seen.values()), seen
