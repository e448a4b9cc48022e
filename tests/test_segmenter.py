"""Learned foreground segmenter: published ISNet-DIS layout, weight loading, input/output conventions.

No published weights are needed: a tiny random model (width 8, same key names) is saved in the published
formats and loaded back; the published layout is checked on the meta device, which allocates nothing.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.birefnet import BiRefNetConfig
from model.segmenter import (
    MASKERS,
    SEGMENTERS,
    ForegroundSegmenter,
    ISNetDIS,
    Masker,
    build_masker,
    build_segmenter,
    load_masker,
    load_segmenter,
    reference_mask,
    sketch_mask,
)

TINY = 8

# Facts of the published isnetis / sketch-segment ISNetDIS (ColorizeDiffusionXL preprocessor/anime_segment.py,
# SkyTNT anime-segmentation model/isnet.py), worked out from the constructor arguments there.
PUBLISHED_PARAMETERS = 44_046_790
PUBLISHED_TENSORS = 798  # parameters plus BatchNorm running_mean / running_var / num_batches_tracked
# Stage constructor arguments in the reference: (RSU depth, in_ch, mid_ch, out_ch).
REFERENCE_STAGES = {
    "stage1": (7, 64, 32, 64), "stage2": (6, 64, 32, 128), "stage3": (5, 128, 64, 256),
    "stage4": (4, 256, 128, 512), "stage5": (4, 512, 256, 512), "stage6": (4, 512, 256, 512),
    "stage5d": (4, 1024, 256, 512), "stage4d": (4, 1024, 128, 256), "stage3d": (5, 512, 64, 128),
    "stage2d": (6, 256, 32, 64), "stage1d": (7, 128, 16, 64),
}
REFERENCE_SIDES = {"side1": 64, "side2": 64, "side3": 128, "side4": 256, "side5": 512, "side6": 512}
DISTINCTIVE_SHAPES = {
    "conv_in.weight": (64, 3, 3, 3),
    "conv_in.bias": (64,),
    "stage1.rebnconvin.conv_s1.weight": (64, 64, 3, 3),
    "stage1.rebnconv7.conv_s1.weight": (32, 32, 3, 3),
    "stage5d.rebnconvin.conv_s1.weight": (512, 1024, 3, 3),
    "stage6.rebnconv4.bn_s1.running_var": (256,),
    "stage1d.rebnconv1.conv_s1.weight": (16, 64, 3, 3),
    "stage1d.rebnconv1d.conv_s1.weight": (64, 32, 3, 3),
    "stage4d.rebnconv3d.bn_s1.num_batches_tracked": (),
    "side1.weight": (1, 64, 3, 3),
    "side6.weight": (1, 512, 3, 3),
}


def _conv_bn(cin: int, cout: int) -> int:
    return cin * cout * 9 + cout + 2 * cout  # conv weight + bias, BN weight + bias


def _rsu_parameters(depth: int, cin: int, mid: int, cout: int) -> int:
    encoder = _conv_bn(cin, cout) + _conv_bn(cout, mid) + (depth - 1) * _conv_bn(mid, mid)
    decoder = (depth - 2) * _conv_bn(2 * mid, mid) + _conv_bn(2 * mid, cout)
    return encoder + decoder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny nets run hundreds of small ops; one thread avoids thread-sync stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def published_state():
    with torch.device("meta"):
        net = ISNetDIS()
    return net, net.state_dict()


def _tiny_net(seed: int = 0) -> ISNetDIS:
    """Random tiny net with non-trivial BatchNorm statistics, so a round trip compares real values."""
    torch.manual_seed(seed)
    net = ISNetDIS(TINY)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_mean"):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(7)
    return net.eval()


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ------------------------------------------------------------------------------------- published layout


def test_published_layout_on_meta_device(published_state):
    net, state = published_state
    assert all(tensor.is_meta for tensor in state.values())
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMETERS
    assert len(state) == PUBLISHED_TENSORS
    for key, shape in DISTINCTIVE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    # No fused output conv (commented out in the reference) and no weights for pools.
    assert not [key for key in state if key.startswith(("outconv", "pool"))]
    top_level = {key.split(".", 1)[0] for key in state}
    assert top_level == {"conv_in", *REFERENCE_STAGES, *REFERENCE_SIDES}


def test_published_parameter_count_follows_reference_constructor_arguments(published_state):
    net, state = published_state
    # Independent of our module: count from the reference's stage arguments.
    total = 3 * 64 * 9 + 64  # conv_in
    total += sum(_rsu_parameters(*args) for args in REFERENCE_STAGES.values())
    total += sum(cin * 9 + 1 for cin in REFERENCE_SIDES.values())
    assert total == PUBLISHED_PARAMETERS
    for stage, args in REFERENCE_STAGES.items():
        ours = sum(p.numel() for p in getattr(net, stage).parameters())
        assert ours == _rsu_parameters(*args), stage
        depth = args[0]
        # RSU-L: rebnconvin, rebnconv1..L, rebnconv(L-1)d..1d; 7 tensors each (conv weight and bias, BN
        # weight, bias, running_mean, running_var, num_batches_tracked).
        assert sum(1 for key in state if key.startswith(f"{stage}.")) == 7 * (1 + depth + depth - 1), stage
    assert 7 * sum(2 * args[0] for args in REFERENCE_STAGES.values()) + 2 + 2 * 6 == PUBLISHED_TENSORS


def test_tiny_width_keeps_published_key_names(published_state):
    _, state = published_state
    tiny = ISNetDIS(TINY).state_dict()
    assert list(tiny) == list(state)
    assert tiny["conv_in.weight"].shape == (TINY, 3, 3, 3)
    assert tiny["stage5d.rebnconvin.conv_s1.weight"].shape == (8 * TINY, 16 * TINY, 3, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        ISNetDIS(6)


def test_all_side_outputs_are_input_sized_logits():
    net = _tiny_net()
    x = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        sides = net(x, all_sides=True)
        first = net(x)
    assert len(sides) == 6
    assert all(side.shape == (1, 1, 45, 61) for side in sides)
    assert torch.equal(sides[0], first)
    assert (first < 0).any() or (first > 1).any()  # logits, not probabilities


def _hashed_uniform(count: int, salt: int) -> torch.Tensor:
    """Deterministic values in [-0.5, 0.5) from integer arithmetic: the same on every torch build."""
    i = torch.arange(count, dtype=torch.int64)
    h = (i * 1103515245 + 12345 + salt * 7919) % 2**31
    h = (h * 1103515245 + 12345) % 2**31
    return h.double() / 2**31 - 0.5


def _hashed_fill(net: ISNetDIS) -> None:
    with torch.no_grad():
        for salt, (name, tensor) in enumerate(net.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue
            u = _hashed_uniform(tensor.numel(), salt).reshape(tensor.shape)
            if name.endswith("running_var"):
                value = 1.0 + u.abs()
            elif name.endswith("running_mean"):
                value = 0.1 * u
            elif name.endswith("bn_s1.weight"):
                value = 1.0 + 0.2 * u
            elif name.endswith("bias"):
                value = 0.1 * u
            else:  # conv weights, variance 2 / fan_in
                value = u * (24.0 / (tensor.numel() // tensor.shape[0])) ** 0.5
            tensor.copy_(value.to(tensor.dtype))


def test_forward_matches_reference_implementation():
    """Logits of the width-8 net against values computed once with the public reference code.

    Golden values: SkyTNT anime-segmentation ``model/isnet.py`` (all six sides) and ColorizeDiffusionXL
    ``preprocessor/anime_segment.py`` (side 1), their ``ISNetDIS.forward`` and RSU blocks with every channel
    count divided by 8, loaded with these weights; both agreed with this module to 0.0.
    """
    net = ISNetDIS(TINY).eval()
    _hashed_fill(net)
    # Large enough that every RSU's deepest (dilated) level is wider than one pixel.
    rows = torch.arange(160, dtype=torch.float64)[:, None]
    cols = torch.arange(136, dtype=torch.float64)[None, :]
    image = torch.stack([0.5 + 0.5 * torch.sin(0.3 * rows + 0.2 * cols + c) for c in range(3)])[None].float()
    with torch.no_grad():
        sides = net(image, all_sides=True)
    points = [(0, 0), (5, 7), (77, 101), (131, 2), (159, 135)]
    found = torch.tensor([sides[0][0, 0, r, c].item() for r, c in points])
    expected = torch.tensor([-0.14726, -0.21894, -0.02968, -0.02236, 0.02579])
    assert torch.allclose(found, expected, atol=2e-4), found
    means = torch.tensor([side.mean().item() for side in sides])
    expected_means = torch.tensor([-0.05300, 0.08162, -0.02164, 0.02159, 0.00942, -0.02063])
    assert torch.allclose(means, expected_means, atol=2e-4), means


# ------------------------------------------------------------------------------------------- loading


def test_safetensors_round_trip(tmp_path):
    net = _tiny_net()
    path = tmp_path / "isnetis.safetensors"
    save_file(net.state_dict(), str(path))
    segmenter = load_segmenter("isnetis", path, width=TINY)
    assert isinstance(segmenter, ForegroundSegmenter)
    _assert_same_state(segmenter.net.state_dict(), net.state_dict())
    assert not segmenter.training and not segmenter.net.training
    assert not any(p.requires_grad for p in segmenter.parameters())


def test_lightning_checkpoint_round_trip(tmp_path):
    net = _tiny_net(seed=1)
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    # An isnet_is training run also saves its frozen ground-truth encoder; it is not part of the segmenter.
    state["gt_encoder.conv_in.conv.weight"] = torch.zeros(16, 1, 3, 3)
    path = tmp_path / "isnetis.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    segmenter = load_segmenter("isnetis", path, width=TINY)
    _assert_same_state(segmenter.net.state_dict(), net.state_dict())


def test_plain_torch_state_dict_and_dtype(tmp_path):
    net = _tiny_net(seed=2)
    path = tmp_path / "isnetis.pth"
    torch.save({f"module.{key}": value for key, value in net.state_dict().items()}, path)
    segmenter = load_segmenter("isnetis", path, dtype=torch.bfloat16, width=TINY, input_size=32)
    assert segmenter.net.conv_in.weight.dtype == torch.bfloat16
    assert segmenter.net.stage1.rebnconv1.bn_s1.num_batches_tracked.dtype == torch.long
    images = torch.rand(1, 3, 20, 30)
    probs = segmenter(images)
    assert probs.dtype == torch.float32 and probs.shape == (1, 1, 20, 30)


def test_missing_batch_counters_are_tolerated(tmp_path):
    net = _tiny_net(seed=3)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "converted.safetensors"
    save_file(state, str(path))
    segmenter = load_segmenter("isnetis", path, width=TINY)
    loaded = segmenter.net.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------------------ input / output


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_forward_odd_non_square(name):
    torch.manual_seed(0)
    assert build_segmenter(name, width=TINY).input_size == 1024  # the published training size
    segmenter = build_segmenter(name, width=TINY, input_size=64).eval()
    images = torch.rand(2, 3, 37, 53)
    probs = segmenter(images)
    assert probs.shape == (2, 1, 37, 53)
    assert probs.dtype == images.dtype
    assert torch.isfinite(probs).all()
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs.std() > 0  # a map, not a constant
    cut = probs.median().item()
    mask = segmenter.mask(images, threshold=cut)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 37, 53)
    assert torch.equal(mask, probs > cut)


def _net_input(segmenter: ForegroundSegmenter, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = segmenter.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        segmenter(images)
    finally:
        handle.remove()
    return seen[0]


def test_isnetis_letterboxes_onto_black_without_inverting():
    segmenter = build_segmenter("isnetis", width=TINY, input_size=32).eval()
    canvas = _net_input(segmenter, torch.full((1, 3, 20, 40), 0.25))  # fits as 16 x 32, rows 8..23
    assert canvas.shape == (1, 3, 32, 32)
    assert torch.allclose(canvas[:, :, 8:24], torch.tensor(0.25))
    assert (canvas[:, :, :8] == 0).all() and (canvas[:, :, 24:] == 0).all()


def test_isnet_sketch_squashes_and_feeds_the_references_white_sketch():
    """The reference feeds ``white_sketch = -sketch``, sketch in [-1, 1]: 0.25 → 2 * 0.25 - 1 → 0.5."""
    segmenter = build_segmenter("isnet-sketch", width=TINY, input_size=32).eval()
    canvas = _net_input(segmenter, torch.full((1, 3, 20, 40), 0.25))
    assert canvas.shape == (1, 3, 32, 32)
    assert torch.allclose(canvas, torch.tensor(0.5))


def test_isnet_sketch_segmenter_equals_sketch_mask():
    torch.manual_seed(0)
    segmenter = build_segmenter("isnet-sketch", width=TINY, input_size=64).eval()
    masker = Masker("isnet-sketch", "isnet", segmenter.net, 64)
    drawing = torch.rand(2, 3, 37, 53)  # dark lines on white, [0, 1]
    assert torch.allclose(segmenter(drawing), sketch_mask(masker, 1 - 2 * drawing), atol=1e-5)


def test_output_covers_only_the_image_area():
    """The letterbox crop maps the image area of the canvas back onto the image, not the padding."""
    segmenter = build_segmenter("isnetis", width=TINY, input_size=32).eval()
    # The 20 x 40 image fits the 32-square as 16 x 32 on rows 8..23. Foreground on canvas rows 0..11 is
    # the image's rows 0..3 of 16, i.e. its top fifth once back at 20 rows (the rest would be the padding's).
    segmenter.net = _TopRows(12)
    probs = segmenter(torch.rand(1, 3, 20, 40))
    assert probs.shape == (1, 1, 20, 40)
    assert (probs[..., :4, :] > 0.99).all() and (probs[..., 6:, :] < 0.01).all()


class _TopRows(torch.nn.Module):
    """Stands in for the net: probability 1 on the canvas's top ``rows`` rows, 0 below."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows
        self.conv_in = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        logits = torch.full_like(x[:, :1], -50.0)
        logits[:, :, : self.rows] = 50.0
        return logits


def test_no_gradient_and_bad_inputs():
    segmenter = build_segmenter("isnetis", width=TINY, input_size=32).eval()
    images = torch.rand(1, 3, 10, 12, requires_grad=True)
    probs = segmenter(images)
    assert not probs.requires_grad
    assert torch.equal(segmenter.mask(images), probs > 0.5)  # default threshold
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        segmenter(torch.rand(1, 1, 10, 12))
    with pytest.raises(ValueError, match="threshold"):
        segmenter.mask(torch.rand(1, 3, 10, 12), threshold=1.5)


# -------------------------------------------------------------------------------------------- errors


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    state = _tiny_net().state_dict()
    state["side3.weight"] = torch.zeros(1, 5, 3, 3)  # expected (1, 16, 3, 3) at width 8
    del state["side2.bias"]
    state["outconv.weight"] = torch.zeros(1, 6, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as info:
        load_segmenter("isnetis", path, width=TINY)
    message = str(info.value)
    assert str(path) in message
    assert "side3.weight: expected (1, 16, 3, 3), found (1, 5, 3, 3)" in message
    assert "side2.bias: expected (1,)" in message
    assert "outconv.weight: found (1, 6, 1, 1)" in message


def test_published_weights_into_tiny_model_list_at_most_ten(tmp_path):
    with torch.device("meta"):
        big = ISNetDIS()
    state = {key: torch.zeros(value.shape, dtype=value.dtype) for key, value in ISNetDIS(12).state_dict().items()}
    assert set(state) == set(big.state_dict())
    path = tmp_path / "wide.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as info:
        load_segmenter("isnetis", path, width=TINY)
    message = str(info.value)
    listed = re.findall(r"^    \S+: expected .*, found .*$", message, flags=re.MULTILINE)
    assert len(listed) == 10
    assert re.search(r"\.\.\. and \d+ more", message)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "isnetis.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_segmenter("isnetis", path)


def test_registry_names():
    assert {"isnetis", "isnet", "isnet-sketch"} <= set(SEGMENTERS)
    assert SEGMENTERS["isnet"] == SEGMENTERS["isnetis"]
    assert not SEGMENTERS["isnetis"].invert and SEGMENTERS["isnet-sketch"].invert


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError) as info:
        load_segmenter("u2net", tmp_path / "isnetis.safetensors")
    message = str(info.value)
    assert "u2net" in message
    for name in SEGMENTERS:
        assert name in message


def test_unreadable_formats(tmp_path):
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"conv_in.weight": torch.zeros(1)}, "hook": _TopRows}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_segmenter("isnetis", pickled, width=TINY)
    onnx = tmp_path / "isnetis.onnx"
    onnx.write_bytes(b"not weights")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_segmenter("isnetis", onnx, width=TINY)


# ------------------------------------------------------------------- reference-convention maskers

PARITY = Path(__file__).parent / "fixtures" / "parity_masks"


@pytest.fixture(scope="module")
def parity():
    """Inputs/outputs of the reference's rmbg_proceed and ISNetDIS.proceed (see make_fixtures.py)."""
    spec = importlib.util.spec_from_file_location("parity_masks_make_fixtures", PARITY / "make_fixtures.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe, load_file(PARITY / "parity_masks.safetensors")


@pytest.fixture(scope="module")
def parity_isnet(parity):
    """The published-width ISNet filled by the recipe, at the fixture's square."""
    recipe, fx = parity
    masker = build_masker("isnet", input_size=recipe.MASKER_SIDE)
    filled = recipe.seeded_state(masker.net.state_dict())
    assert recipe.checksum(filled) == pytest.approx(fx["isnet_checksum"].item(), rel=1e-12)
    masker.net.load_state_dict(filled, strict=False)
    return masker


@pytest.mark.parametrize("dilate", [True, False])
def test_reference_mask_matches_rmbg_proceed(parity, dilate):
    recipe, fx = parity
    swin = recipe.TINY_SWIN
    cfg = BiRefNetConfig(embed_dim=swin["embed_dim"], depths=tuple(swin["depths"]),
                         num_heads=tuple(swin["num_heads"]), window_size=swin["window_size"], patch_order="channel")
    masker = build_masker("birefnet", birefnet_config=cfg, input_size=recipe.MASKER_SIDE)
    masker.net.load_state_dict(recipe.seeded_state(masker.net.state_dict()), strict=False)
    mask = reference_mask(masker, fx["rmbg_input"], dilate=dilate)
    expected = fx[f"rmbg_mask_dilate{int(dilate)}"]
    assert mask.shape == expected.shape == (2, 1, 48, 40)
    assert torch.equal(mask, expected)  # measured: identical
    assert 0 < expected.mean() < 1


def test_reference_mask_matches_isnet_proceed_crop(parity, parity_isnet):
    """ISNet as reference masker: proceed(crop=True, dilate=True), then the app's binarisation at 0.5."""
    _, fx = parity
    mask = reference_mask(parity_isnet, fx["isnet_input"])
    assert torch.equal(mask, fx["isnet_mask_dilate1"])
    # The soft map before binarising, with and without the dilation (the real check: values, not 0/1).
    from model.segmenter import _dilate, _isnet_crop_probability

    soft = _isnet_crop_probability(parity_isnet, fx["isnet_input"])
    assert (soft - fx["isnet_soft_dilate0"]).abs().max() < 1e-5  # measured: 0.0
    assert (_dilate(soft) - fx["isnet_soft_dilate1"]).abs().max() < 1e-5


def test_sketch_mask_matches_isnet_proceed_without_crop(parity, parity_isnet):
    _, fx = parity
    soft = sketch_mask(parity_isnet, fx["sketch_input"], 50, 66)
    expected = fx["sketch_mask"]
    assert soft.shape == expected.shape == (1, 1, 50, 66)
    assert (soft - expected).abs().max() < 1e-5  # measured: 0.0
    assert expected.std() > 0  # soft, not thresholded


def test_masker_registry_and_errors(tmp_path):
    assert set(MASKERS) == {"rmbg-2.0", "birefnet", "birefnet-hr", "isnet", "isnet-sketch"}
    assert MASKERS["birefnet-hr"].input_size == 2048 and MASKERS["rmbg-2.0"].input_size == 1024
    with pytest.raises(ValueError, match="unknown masker"):
        build_masker("u2net")
    masker = build_masker("isnet-sketch", width=TINY, input_size=32)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reference_mask(masker, torch.zeros(1, 1, 8, 8))
    tiny = build_masker("birefnet", birefnet_config=BiRefNetConfig.tiny(), input_size=32)
    with pytest.raises(ValueError, match="sketch's size"):
        sketch_mask(tiny, torch.zeros(1, 3, 32, 32), 40, 40)


def test_isnet_masker_loads_published_files(tmp_path):
    torch.manual_seed(0)
    net = _tiny_net()
    path = tmp_path / "sketch-segment.safetensors"
    save_file(net.state_dict(), path)
    masker = load_masker("isnet-sketch", path, width=TINY, input_size=32)
    white = torch.rand(1, 3, 24, 30) * 2 - 1
    soft = sketch_mask(masker, white)
    assert soft.shape == (1, 1, 24, 30) and 0 <= soft.min() and soft.max() <= 1
    binary = reference_mask(load_masker("isnet", path, width=TINY, input_size=32), white, dilate=False)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    broken = dict(net.state_dict())
    broken.pop("side1.weight")
    save_file(broken, path)
    with pytest.raises(ValueError, match="side1.weight") as err:
        load_masker("isnet", path, width=TINY)
    assert str(path) in str(err.value)
