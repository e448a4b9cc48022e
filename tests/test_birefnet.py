"""BiRefNet (RMBG-2.0 / ZhengPeng7 BiRefNet): published layout, parity with the upstream code, loading.

No published weights are needed: the published layout is checked on the meta device; parity uses the
fixture written by tests/fixtures/parity_masks/make_fixtures.py from the upstream code (a reduced Swin, the
published decoder, weights from a seeded recipe that both sides apply to the same key names).
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.birefnet import BiRefNet, BiRefNetConfig, image_patches
from model.segmenter import MASKERS, load_masker, reference_mask

FIXTURES = Path(__file__).parent / "fixtures" / "parity_masks"

# Facts of the published models, from the upstream constructors (Swin-L, the published decoder config).
PUBLISHED_PARAMETERS = 220_202_578  # learned tensors; about 881 MB in float32, as RMBG-2.0's file
DISTINCTIVE_SHAPES = {
    "bb.patch_embed.proj.weight": (192, 3, 4, 4),
    "bb.layers.2.blocks.17.attn.relative_position_bias_table": (529, 24),
    "bb.layers.2.downsample.reduction.weight": (1536, 3072),
    "bb.norm3.weight": (1536,),
    "squeeze_module.0.conv_in.weight": (64, 3072 + 1536 + 768 + 384, 3, 3),
    "squeeze_module.0.dec_att.aspp_deforms.2.atrous_conv.offset_conv.weight": (98, 64, 7, 7),
    "squeeze_module.0.dec_att.global_avg_pool.1.weight": (256, 64, 1, 1),
    "squeeze_module.0.dec_att.conv1.weight": (64, 1280, 1, 1),
    "decoder.ipt_blk5.conv1.weight": (64, 3072, 3, 3),
    "decoder.ipt_blk5.conv_out.weight": (384, 64, 3, 3),
    "decoder.ipt_blk1.conv_out.weight": (48, 64, 3, 3),
    "decoder.decoder_block4.conv_in.weight": (64, 3072 + 384, 3, 3),
    "decoder.decoder_block1.conv_out.weight": (192, 64, 3, 3),
    "decoder.lateral_block4.conv.weight": (1536, 1536, 1, 1),
    "decoder.gdt_convs_4.1.running_var": (16,),
    "decoder.gdt_convs_attn_2.0.weight": (1, 16, 1, 1),
    "decoder.conv_out1.0.weight": (1, 192 + 48, 1, 1),
}


def fixture_recipe():
    """make_fixtures.py as a module (its seeded weight recipe); the upstream code is not imported."""
    spec = importlib.util.spec_from_file_location("parity_masks_make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def published_state():
    with torch.device("meta"):
        return BiRefNet().state_dict()


def test_published_layout_on_meta_device(published_state):
    params = sum(v.numel() for k, v in published_state.items()
                 if not k.endswith((".relative_position_index", ".num_batches_tracked")))
    assert params == PUBLISHED_PARAMETERS  # about 221M: RMBG-2.0's 885 MB of float32
    for key, shape in DISTINCTIVE_SHAPES.items():
        assert tuple(published_state[key].shape) == shape, key
    assert not any(k.startswith(("cls_head", "refiner", "stem_layer", "dec_end")) for k in published_state)


def test_tiny_config_keeps_published_key_names(published_state):
    tiny = BiRefNet(BiRefNetConfig.tiny()).state_dict()
    assert set(tiny) <= set(published_state)  # fewer Swin blocks, the same names

    def pattern(key: str) -> str:
        return re.sub(r"blocks\.\d+\.", "blocks.*.", key)

    assert {pattern(k) for k in tiny} == {pattern(k) for k in published_state}


@pytest.mark.parametrize(("name", "order"), [("birefnet", "channel"), ("birefnet_old", "column")])
def test_matches_upstream_code(name, order):
    """Logits against upstream ``BiRefNet`` (GitHub, at the two patch orders) on the same weights."""
    recipe = fixture_recipe()
    fx = load_file(FIXTURES / "parity_masks.safetensors")
    swin = recipe.TINY_SWIN
    cfg = BiRefNetConfig(embed_dim=swin["embed_dim"], depths=tuple(swin["depths"]),
                         num_heads=tuple(swin["num_heads"]), window_size=swin["window_size"], patch_order=order)
    net = BiRefNet(cfg).eval()
    state = net.state_dict()
    # Same module tree as upstream: identical key list, and the recipe reproduced bit for bit.
    assert len(state) == fx[f"{name}_tensors"].item()
    assert zlib.crc32("\n".join(sorted(state)).encode()) == fx[f"{name}_keys_crc"].item()
    filled = recipe.seeded_state(state)
    assert recipe.checksum(filled) == pytest.approx(fx[f"{name}_checksum"].item(), rel=1e-12)
    net.load_state_dict(filled, strict=False)
    with torch.no_grad():
        logits = net(fx["birefnet_input"])
    expected = fx[f"{name}_logits"]
    assert logits.shape == expected.shape == (2, 1, 64, 64)
    error = (logits - expected).abs().max().item()
    assert error < 1e-4, error  # measured: 0.0 (channel, SDPA path), 3.6e-7 (column, explicit softmax)


def test_patch_orders():
    image = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    like = torch.zeros(1, 1, 2, 3)  # a 2 x 2 grid of 2 x 3 cells
    cell = {(r, c): image[0, :, 2 * r:2 * r + 2, 3 * c:3 * c + 3] for r in range(2) for c in range(2)}
    column = image_patches(image, like, "column")[0]
    channel = image_patches(image, like, "channel")[0]
    # column: cells column by column, top to bottom, each cell's channels together
    assert torch.equal(column, torch.cat([cell[(0, 0)], cell[(1, 0)], cell[(0, 1)], cell[(1, 1)]]))
    # channel: channel-major, cells row by row
    expected = torch.stack([cell[rc][ch] for ch in range(2) for rc in [(0, 0), (0, 1), (1, 0), (1, 1)]])
    assert torch.equal(channel, expected)
    with pytest.raises(ValueError, match="multiple of 32"):
        image_patches(torch.zeros(1, 3, 5, 6), like, "column")


def test_config_validation():
    with pytest.raises(ValueError, match="four backbone levels"):
        BiRefNetConfig(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="patch_order"):
        BiRefNetConfig(patch_order="rows")
    assert MASKERS["rmbg-2.0"].patch_order == "column" and MASKERS["birefnet"].patch_order == "channel"


# ------------------------------------------------------------------------------------------- loading


def _tiny_file(folder: Path) -> tuple[BiRefNet, Path]:
    torch.manual_seed(0)
    net = BiRefNet(BiRefNetConfig.tiny()).eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return net, path


def test_tiny_published_layout_loads_from_hf_folder_and_runs(tmp_path):
    net, _ = _tiny_file(tmp_path / "RMBG-2.0")
    masker = load_masker("rmbg-2.0", tmp_path / "RMBG-2.0", birefnet_config=BiRefNetConfig.tiny(), input_size=64)
    for key, value in net.state_dict().items():
        assert torch.equal(masker.net.state_dict()[key], value), key
    assert not any(p.requires_grad for p in masker.parameters()) and not masker.training
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    mask = reference_mask(masker, images, dilate=False)
    assert mask.shape == (2, 1, 40, 56) and set(mask.unique().tolist()) <= {0.0, 1.0}
    dilated = reference_mask(masker, images)
    assert (dilated >= mask).all()  # the max-pool only widens


def test_recomputable_buffers_may_be_absent(tmp_path):
    net, path = _tiny_file(tmp_path)
    state = {k: v for k, v in net.state_dict().items()
             if not k.endswith((".relative_position_index", ".num_batches_tracked"))}
    save_file(state, path)
    masker = load_masker("birefnet", path, birefnet_config=BiRefNetConfig.tiny())
    assert torch.equal(masker.net.bb.layers[0].blocks[0].attn.relative_position_index,
                       net.bb.layers[0].blocks[0].attn.relative_position_index)


def test_missing_and_misshaped_keys_name_the_file(tmp_path):
    net, path = _tiny_file(tmp_path)
    state = dict(net.state_dict())
    del state["decoder.conv_out1.0.weight"]
    state["decoder.ipt_blk5.conv1.weight"] = torch.zeros(3, 3)
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        load_masker("birefnet", path, birefnet_config=BiRefNetConfig.tiny())
    message = str(err.value)
    assert str(path) in message
    for key in ("decoder.conv_out1.0.weight", "decoder.ipt_blk5.conv1.weight", "decoder.extra.weight"):
        assert key in message
    with pytest.raises(FileNotFoundError, match="not found"):
        load_masker("birefnet", tmp_path / "empty_folder_that_is_missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        load_masker("birefnet", tmp_path / "empty")
