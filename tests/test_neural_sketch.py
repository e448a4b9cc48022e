"""Neural line extractors: published key layouts, strict loading from local files, and the wrapper's I/O contract.

Nothing is downloaded: each test writes tiny random weights in the published container format and loads them
back; the published-size architectures are only built on the meta device (no memory).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from pipelines.data.neural_lines import (
    NEURAL_EXTRACTORS,
    Anime2SketchUNet,
    LineExtractor,
    build_line_network,
    load_line_extractor,
)

NAMES = ("anime2sketch", "manga_line", "sketchkeras", "informative_drawings")
TINY = {
    "anime2sketch": {"base_channels": 2},
    "manga_line": {"base_channels": 2, "head_channels": 2},
    "sketchkeras": {"base_channels": 2},
    "informative_drawings": {"base_channels": 2},
}


def _tiny_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny weights, BatchNorm statistics included (so a load that skipped buffers would show)."""
    torch.manual_seed(seed)
    net = build_line_network(name, **TINY[name])
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("running_mean"):
            value = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            value = torch.rand_like(value) + 0.5
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(int(torch.randint(1, 1000, ())))
        state[key] = value.detach().clone()
    return state


def _image(height: int = 45, width: int = 70, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


def _check_drawing(drawing: torch.Tensor, batch: int = 1, height: int = 45, width: int = 70) -> None:
    assert drawing.shape == (batch, 1, height, width)
    assert drawing.dtype == torch.float32
    assert torch.isfinite(drawing).all()
    assert drawing.min() >= 0.0 and drawing.max() <= 1.0


# ---------------------------------------------------------------------------------------- round trips per network


@pytest.mark.parametrize(
    "name,suffix,prefix",
    [
        ("anime2sketch", ".pth", "module."),  # netG.pth as published carries DataParallel's prefix
        ("manga_line", ".pth", ""),
        ("sketchkeras", ".pth", ""),
        ("informative_drawings", ".pth", ""),
        ("manga_line", ".safetensors", ""),
    ],
)
def test_load_published_format_and_run(tmp_path, name, suffix, prefix):
    saved = _tiny_state(name)
    path = tmp_path / f"weights{suffix}"
    on_disk = {prefix + key: value for key, value in saved.items()}
    if suffix == ".safetensors":
        save_file(on_disk, str(path))
    else:
        torch.save(on_disk, path)

    extractor = load_line_extractor(name, path, **TINY[name])

    assert isinstance(extractor, LineExtractor) and extractor.name == name
    assert not extractor.training and not extractor.net.training
    assert all(not p.requires_grad for p in extractor.parameters())
    loaded = extractor.net.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key

    _check_drawing(extractor(_image()))


def test_weights_directory_resolves_published_file_name(tmp_path):
    saved = _tiny_state("informative_drawings")
    torch.save(saved, tmp_path / "sk_model.pth")
    extractor = load_line_extractor("informative_drawings", tmp_path, **TINY["informative_drawings"])
    assert torch.equal(extractor.net.state_dict()["model4.1.weight"], saved["model4.1.weight"])


def test_batchnorm_counters_absent_from_older_exports_are_filled(tmp_path):
    saved = _tiny_state("manga_line")
    trimmed = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    assert len(trimmed) < len(saved)
    torch.save(trimmed, tmp_path / "erika.pth")
    extractor = load_line_extractor("manga_line", tmp_path / "erika.pth", **TINY["manga_line"])
    loaded = extractor.net.state_dict()
    assert all(loaded[k].item() == 0 for k in saved if k.endswith("num_batches_tracked"))
    assert torch.equal(loaded["conv15.model.0.running_var"], saved["conv15.model.0.running_var"])


def test_dtype_device_and_batch(tmp_path):
    torch.save(_tiny_state("sketchkeras"), tmp_path / "model.pth")
    extractor = load_line_extractor("sketchkeras", tmp_path / "model.pth", device="cpu", dtype=torch.float64,
                                    **TINY["sketchkeras"])
    assert {p.dtype for p in extractor.parameters()} == {torch.float64}
    _check_drawing(extractor(_image(batch=2)), batch=2)  # output follows the input's dtype
    with pytest.raises(ValueError, match="floating"):
        load_line_extractor("sketchkeras", tmp_path / "model.pth", dtype=torch.int32, **TINY["sketchkeras"])


# ------------------------------------------------------------------- published architectures (meta device only)


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _meta_net(name: str, **knobs) -> nn.Module:
    with torch.device("meta"):
        return build_line_network(name, **knobs)


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_anime2sketch_published_layout():
    net = _meta_net("anime2sketch")
    state = net.state_dict()
    # Counted from the reference UnetGenerator(3, 1, 8, 64), InstanceNorm(affine=False) => every conv has a bias.
    expected = (_conv(3, 64, 4) + _conv(128, 1, 4) + _conv(64, 128, 4) + _conv(256, 64, 4)
                + _conv(128, 256, 4) + _conv(512, 128, 4) + _conv(256, 512, 4) + _conv(1024, 256, 4)
                + 3 * (_conv(512, 512, 4) + _conv(1024, 512, 4)) + 2 * _conv(512, 512, 4))
    assert _params(net) == expected == 54_405_505
    assert len(state) == 32  # 16 convolutions, weight + bias, no norm state
    assert state["model.model.0.weight"].shape == (64, 3, 4, 4)
    assert state["model.model.3.weight"].shape == (128, 1, 4, 4)  # outermost ConvTranspose (in, out, k, k)
    innermost = "model.model.1" + ".model.3" * 6
    assert state[innermost + ".model.1.weight"].shape == (512, 512, 4, 4)
    assert state[innermost + ".model.3.weight"].shape == (512, 512, 4, 4)
    assert innermost + ".model.3.model.1.weight" not in state  # 8 levels, no deeper


def test_anime2sketch_layout_matches_pix2pix_unet256_count():
    """The same layout with BatchNorm (no conv biases except the last, affine norms) and 3 outputs is pix2pix's
    unet_256, which pix2pix reports as 54.414 M parameters (54,413,955)."""
    with torch.device("meta"):
        net = Anime2SketchUNet(out_channels=3)
    biases = sum(p.numel() for n, p in net.named_parameters() if n.endswith(".bias") and n != "model.model.3.bias")
    norms = sum(2 * m.num_features for m in net.modules() if isinstance(m, nn.InstanceNorm2d))
    assert _params(net) - biases + norms == 54_413_955


def test_unet_skip_carries_leaky_relu_of_its_input():
    """The published U-Net was trained with an in-place LeakyReLU heading each inner level, so the skip half of
    the concatenation is leaky_relu(x), not x. The port reproduces that and leaves the caller's tensor alone."""
    from pipelines.data.neural_lines import _UNetLevel

    level = _UNetLevel(4, 8, child=_UNetLevel(8, 8, role="innermost")).eval()
    x = torch.randn(1, 4, 8, 8)
    before = x.clone()
    out = level(x)
    assert out.shape == (1, 8, 8, 8)
    assert torch.equal(out[:, :4], torch.nn.functional.leaky_relu(before, 0.2))
    assert torch.equal(x, before)


def test_manga_line_published_layout():
    net = _meta_net("manga_line")
    state = net.state_dict()
    assert _params(net) == 43_100_147
    units = 2 + 3 + 5 + 7 + 12 + 7 + 5 + 3 + 2 + 2  # block0..block9, two BatchNorms each, plus conv15's
    assert sum(1 for k in state if k.endswith("num_batches_tracked")) == 2 * units + 1
    assert state["block0.model.0.conv1.model.0.weight"].shape == (1,)  # BN over the 1-channel input
    assert state["block0.model.0.shortcut.model.0.weight"].shape == (24, 1, 1, 1)
    assert "block0.model.1.shortcut.model.0.weight" not in state  # same width, stride 1: plain sum
    assert state["block4.model.11.conv1.model.2.weight"].shape == (384, 384, 3, 3)  # last unit downsamples
    assert state["block4.model.11.shortcut.model.0.weight"].shape == (384, 384, 1, 1)
    assert "block4.model.10.shortcut.model.0.weight" not in state
    assert state["block5.model.0.conv1.model.2.weight"].shape == (192, 384, 3, 3)
    assert state["block5.model.0.shortcut.model.0.weight"].shape == (192, 384, 1, 1)
    assert state["block9.model.0.shortcut.model.0.weight"].shape == (16, 24, 1, 1)
    assert state["conv15.model.2.weight"].shape == (1, 16, 1, 1)
    assert not any(k.startswith("res") for k in state)  # res1..res4 are weightless sums
    assert {m.eps for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def test_sketchkeras_published_layout():
    net = _meta_net("sketchkeras")
    state = net.state_dict()
    convs = (_conv(1, 32, 3) + _conv(32, 64, 4) + _conv(64, 64, 3) + _conv(64, 128, 4) + _conv(128, 128, 3)
             + _conv(128, 256, 4) + _conv(256, 256, 3) + _conv(256, 512, 4) + _conv(512, 512, 3)
             + _conv(1024, 512, 4) + _conv(512, 256, 3) + _conv(512, 256, 4) + _conv(256, 128, 3)
             + _conv(256, 128, 4) + _conv(128, 64, 3) + _conv(128, 64, 4) + _conv(64, 32, 3) + _conv(64, 1, 3))
    bn_channels = 32 + 64 * 2 + 128 * 2 + 256 * 2 + 512 * 2 + (512 + 256) + (256 + 128) + (128 + 64) + (64 + 32)
    assert _params(net) == convs + 2 * bn_channels == 18_637_601
    assert state["downblock_1.1.weight"].shape == (32, 1, 3, 3)
    assert state["downblock_2.5.weight"].shape == (64, 64, 3, 3)
    assert state["downblock_5.1.weight"].shape == (512, 256, 4, 4)
    assert state["downblock_6.2.running_var"].shape == (512,)
    assert state["upblock_1.2.weight"].shape == (512, 1024, 4, 4)
    assert state["upblock_1.6.weight"].shape == (256, 512, 3, 3)
    assert state["upblock_4.7.weight"].shape == (32,)
    assert state["last_conv.weight"].shape == (1, 64, 3, 3)
    assert {m.eps for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def test_informative_drawings_published_layout():
    net = _meta_net("informative_drawings")
    state = net.state_dict()
    expected = (_conv(3, 64, 7) + _conv(64, 128, 3) + _conv(128, 256, 3) + 3 * 2 * _conv(256, 256, 3)
                + _conv(256, 128, 3) + _conv(128, 64, 3) + _conv(64, 1, 7))
    assert _params(net) == expected == 4_290_945
    assert len(state) == 24  # Generator(3, 1, 3) keys, no wrapper prefix, InstanceNorm without state
    assert state["model0.1.weight"].shape == (64, 3, 7, 7)
    assert state["model2.2.conv_block.5.weight"].shape == (256, 256, 3, 3)
    assert "model2.3.conv_block.1.weight" not in state
    assert state["model3.0.weight"].shape == (256, 128, 3, 3)  # ConvTranspose (in, out, k, k)
    assert state["model4.1.weight"].shape == (1, 64, 7, 7)


def test_registry_names_files():
    assert set(NEURAL_EXTRACTORS) == set(NAMES)
    assert {s.published_file for s in NEURAL_EXTRACTORS.values()} == {"netG.pth", "erika.pth", "model.pth",
                                                                      "sk_model.pth"}


# ----------------------------------------------------------------- conventions (the network replaced by a probe)


def _probe(name: str, fn):
    """Tiny extractor whose network forward is ``fn``; records the padded input shapes."""
    extractor = LineExtractor(name, build_line_network(name, **TINY[name]).eval())
    seen = []

    def forward(x):
        seen.append(tuple(x.shape))
        return fn(x)

    extractor.net.forward = forward
    return extractor, seen


def test_anime2sketch_convention():
    extractor, seen = _probe("anime2sketch", lambda x: x.mean(dim=1, keepdim=True))  # net sees [-1, 1]
    image = _image()
    drawing = extractor(image)
    assert seen == [(1, 3, 256, 256)]
    torch.testing.assert_close(drawing, image.mean(dim=1, keepdim=True))  # tanh-space output -> (y + 1) / 2
    extractor(_image(height=260, width=70))
    assert seen[-1] == (1, 3, 512, 256)  # eight stride-2 levels: multiples of 256


def test_manga_line_convention():
    extractor, seen = _probe("manga_line", lambda x: x)  # net sees one channel in [0, 255]
    image = _image()
    assert torch.allclose(extractor(image), image[:, :1], atol=1e-6)  # the reference's channel 0
    assert seen == [(1, 1, 48, 80)]
    extractor.net.gray = "luma"
    luma = 0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]
    torch.testing.assert_close(extractor(image), luma)


def test_informative_drawings_convention():
    extractor, seen = _probe("informative_drawings", lambda x: x.mean(dim=1, keepdim=True) / 255.0)
    image = _image()
    torch.testing.assert_close(extractor(image), image.mean(dim=1, keepdim=True))  # sigmoid output used as is
    assert seen == [(1, 3, 48, 72)]


def test_sketchkeras_convention_and_batch_regrouping():
    # The probe marks dark strokes: line strength = -(high-pass), like the trained net on a dark line.
    extractor, seen = _probe("sketchkeras", lambda x: -x)
    lined = torch.ones(3, 45, 70)
    lined[:, :, 40:42] = 0.1  # a dark vertical stroke
    flat = torch.full((3, 45, 70), 0.6)
    drawing = extractor(torch.stack([lined, flat]))
    _check_drawing(drawing, batch=2)
    assert seen == [(6, 1, 48, 80)]  # each RGB channel is its own one-channel image
    assert drawing[0, 0, :, 40:42].max() < 0.5  # the stroke is dark
    assert torch.all(drawing[0, 0, :, :25] == 1.0)  # far from it: white (beyond the blur radius)
    assert torch.all(drawing[1] == 1.0)  # the flat image has no lines, whatever its neighbour in the batch


def test_sketchkeras_threshold():
    extractor, _ = _probe("sketchkeras", lambda x: torch.full_like(x, 0.05))
    assert torch.all(extractor(_image()) == 1.0)  # below the reference threshold 0.1: no line
    extractor, _ = _probe("sketchkeras", lambda x: torch.full_like(x, 0.3))
    torch.testing.assert_close(extractor(_image()), torch.full((1, 1, 45, 70), 0.7))


def test_forward_rejects_wrong_layout():
    extractor = LineExtractor("informative_drawings", build_line_network("informative_drawings", base_channels=2))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extractor(torch.rand(1, 1, 16, 16))


# ---------------------------------------------------------------------------------------------------- errors


def test_misshaped_key_names_key_and_both_shapes(tmp_path):
    state = _tiny_state("informative_drawings")
    state["model0.1.weight"] = torch.zeros(2, 3, 5, 5)
    path = tmp_path / "sk_model.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_line_extractor("informative_drawings", path, **TINY["informative_drawings"])
    message = str(info.value)
    assert str(path) in message and "'informative_drawings'" in message
    assert "model0.1.weight: expected (2, 3, 7, 7), found (2, 3, 5, 5)" in message


def test_missing_and_unexpected_keys_listed_up_to_ten(tmp_path):
    state = _tiny_state("anime2sketch")
    state = {k: v for i, (k, v) in enumerate(state.items()) if i % 2 == 0}  # drop every bias
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "netG.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    with pytest.raises(ValueError) as info:
        load_line_extractor("anime2sketch", path, **TINY["anime2sketch"])
    message = str(info.value)
    assert "16 missing from the file" in message and "1 unexpected in the file" in message
    assert "model.model.0.bias: expected (2,)" in message and "extra.weight: found (3,)" in message
    assert len(re.findall(r"^    \S+: expected \(", message, flags=re.M)) == 10
    assert "... and 6 more" in message


def test_published_size_refuses_tiny_weights(tmp_path):
    torch.save(_tiny_state("sketchkeras"), tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"downblock_1\.1\.weight: expected \(32, 1, 3, 3\), found \(2, 1, 3, 3\)"):
        load_line_extractor("sketchkeras", tmp_path / "model.pth")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pth"))):
        load_line_extractor("anime2sketch", tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "erika.pth"))):
        load_line_extractor("manga_line", tmp_path)  # a directory without the published file


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(ValueError) as info:
        load_line_extractor("hed", tmp_path / "whatever.pth")
    assert "'hed'" in str(info.value)
    assert all(name in str(info.value) for name in NAMES)


class _NotWeights:
    pass


def test_unreadable_files_are_value_errors(tmp_path):
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=re.escape(str(other))):
        load_line_extractor("anime2sketch", other)
    pickled = tmp_path / "weights.pt"
    torch.save({"model0.1.weight": _NotWeights()}, pickled)  # refused by torch.load(weights_only=True)
    with pytest.raises(ValueError, match="cannot read weights"):
        load_line_extractor("informative_drawings", pickled)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_line_extractor("informative_drawings", listed)
