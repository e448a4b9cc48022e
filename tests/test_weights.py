"""Reading weight files and loading them strictly (model/weights.py).

Every file here is written in its real format (safetensors, torch's zip format, torch's legacy format) from
a tiny random state dict and read back, so a test fails if a tensor, a key or a dtype changes on the way.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from model.weights import (
    MAX_LISTED,
    WRAPPER_KEYS,
    LoadReport,
    TensorShapes,
    check_and_load,
    listing,
    read_state_dict,
    under_prefix,
)


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few tensors of different dtypes and ranks, with values no default init would produce."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "encoder.conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "encoder.conv.bias": torch.randn(4, generator=generator).half(),
        "decoder.proj.weight": torch.randn(2, 4, generator=generator).to(torch.bfloat16),
        "decoder.norm.num_batches_tracked": torch.tensor(417),
    }


def save(state: dict[str, torch.Tensor], path, legacy: bool = False):
    if path.suffix.lower() == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(found) == sorted(expected)  # safetensors stores keys sorted
    for key, value in expected.items():
        assert found[key].dtype == value.dtype, key
        assert torch.equal(found[key], value), key


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "w.pth", "w.bin", "w.ckpt", "W.PTH", "w.SafeTensors"])
def test_each_format_round_trips(tmp_path, name):
    state = random_state()
    assert_same_tensors(read_state_dict(save(state, tmp_path / name)), state)


def test_legacy_torch_format_round_trips(tmp_path):
    """torch's pre-1.6 format is not a zip, so it is read without mmap."""
    state = random_state(seed=1)
    assert_same_tensors(read_state_dict(save(state, tmp_path / "old.pth", legacy=True)), state)


@pytest.mark.parametrize("wrapper", WRAPPER_KEYS)
def test_training_checkpoint_containers_are_unwrapped(tmp_path, wrapper):
    state = random_state(seed=2)
    checkpoint = {wrapper: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    assert_same_tensors(read_state_dict(save(checkpoint, tmp_path / "run.ckpt")), state)


def test_nested_containers_are_unwrapped(tmp_path):
    state = random_state(seed=3)
    checkpoint = {"state_dict": {"model": {f"module.{key}": value for key, value in state.items()}}}
    assert_same_tensors(read_state_dict(save(checkpoint, tmp_path / "nested.pt")), state)


# ------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_prefixes_keep_only_matching_keys(tmp_path, suffix):
    state = random_state(seed=4)
    found = read_state_dict(save(state, tmp_path / f"w{suffix}"), prefixes=("decoder.",))
    assert_same_tensors(found, {key: value for key, value in state.items() if key.startswith("decoder.")})
    assert read_state_dict(tmp_path / f"w{suffix}", prefixes=("nothing.",)) == {}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_ddp_prefix_is_stripped_by_default_and_kept_on_request(tmp_path, suffix):
    state = random_state(seed=5)
    path = save({f"module.{key}": value for key, value in state.items()}, tmp_path / f"ddp{suffix}")
    assert_same_tensors(read_state_dict(path), state)
    assert sorted(read_state_dict(path, strip=())) == sorted(f"module.{key}" for key in state)


def test_prefixes_apply_after_stripping(tmp_path):
    state = random_state(seed=6)
    path = save({f"module.{key}": value for key, value in state.items()}, tmp_path / "ddp.safetensors")
    found = read_state_dict(path, prefixes=("encoder.",))
    assert sorted(found) == ["encoder.conv.bias", "encoder.conv.weight"]
    assert torch.equal(found["encoder.conv.bias"], state["encoder.conv.bias"])


def test_custom_strip_prefixes_repeat(tmp_path):
    path = save({"model.module.model.w": torch.arange(3.0)}, tmp_path / "w.pt")
    assert list(read_state_dict(path, strip=("model.", "module."))) == ["w"]


def test_keys_that_collide_once_stripped_are_an_error(tmp_path):
    path = save({"module.w": torch.zeros(2), "w": torch.ones(2)}, tmp_path / "both.pt")
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "'module.w'" in message and "'w'" in message


def test_under_prefix_selects_and_unprefixes():
    state = {"visual.proj": torch.ones(2), "visual.conv1.weight": torch.zeros(1), "text.proj": torch.ones(3)}
    found = under_prefix(state, "visual.")
    assert list(found) == ["proj", "conv1.weight"]
    assert found["proj"] is state["visual.proj"]


# ------------------------------------------------------------------------------------ unreadable files


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.safetensors"))):
        read_state_dict(tmp_path / "absent.safetensors")


def test_unknown_suffix_names_path_and_known_formats(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "'.onnx'" in message and ".safetensors" in message and ".ckpt" in message


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pt", "garbage.ckpt"])
def test_corrupt_file_is_a_value_error_naming_path(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a weights file \x00\x01\x02" * 10)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_state_dict(path)


def test_truncated_zip_checkpoint_is_a_value_error(tmp_path):
    path = save(random_state(), tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_state_dict(path)


@dataclasses.dataclass
class NotATensor:
    value: int


def test_torch_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": NotATensor(3)}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        read_state_dict(path)
    assert "weights_only=True" in str(info.value) and ".safetensors" in str(info.value)


def test_a_list_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds a list; expected a state dict"):
        read_state_dict(path)


def test_entries_that_are_not_tensors_are_listed(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "step": 3, "name": "net"}, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 2 entries are not tensors")
    assert "step: int" in message and "name: str" in message and "w:" not in message


# -------------------------------------------------------------------------------------- strict loading


class Tiny(nn.Module):
    """Parameters, a BatchNorm (with its step counter) and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("table", torch.arange(5.0), persistent=False)


def test_strict_load_copies_every_tensor():
    source = Tiny()
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    state = {key: value.clone() for key, value in source.state_dict().items()}
    target = Tiny()
    report = check_and_load(target, state, "tiny.safetensors")
    assert report == LoadReport(report.path, skipped=(), recomputed=())
    assert_same_tensors(target.state_dict(), state)


def test_misfit_lists_missing_unexpected_and_mis_shaped_with_shapes():
    module = Tiny()
    state = dict(module.state_dict())
    del state["linear.bias"]
    state["norm.weight"] = torch.zeros(6)
    state["head.weight"] = torch.zeros(2, 7)
    before = module.linear.weight.detach().clone()
    with pytest.raises(ValueError) as info:
        check_and_load(module, state, "/weights/tiny.pt")
    assert str(info.value) == (
        "/weights/tiny.pt: weights do not fit the Tiny built from the config\n"
        "  1 missing from the file:\n    linear.bias: expected (4,)\n"
        "  1 unexpected in the file:\n    head.weight: found (2, 7)\n"
        "  1 with a different shape:\n    norm.weight: expected (4,), found (6,)"
    )
    assert torch.equal(module.linear.weight, before)  # nothing is loaded from a file that does not fit


def test_misfit_names_the_target_and_lists_at_most_ten_of_each():
    module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])  # 16 tensors
    with pytest.raises(ValueError) as info:
        check_and_load(module, {}, "empty.pt", target="the 'probe' network")
    message = str(info.value)
    assert message.startswith("empty.pt: weights do not fit the 'probe' network\n  16 missing from the file:")
    assert len(re.findall(r"^    \d+\.(weight|bias): expected \((2, 2|2,)\)$", message, flags=re.M)) == MAX_LISTED
    assert message.endswith(f"... and {16 - MAX_LISTED} more")


def test_optional_suffixes_may_be_absent_and_keep_the_current_value():
    module = Tiny()
    module.norm.num_batches_tracked.fill_(9)
    state = {key: value.clone() for key, value in Tiny().state_dict().items() if "num_batches" not in key}
    state["norm.running_mean"] = torch.full((4,), 0.25)
    check_and_load(module, state, "old_export.pth", optional_suffixes=("num_batches_tracked",))
    assert module.norm.num_batches_tracked.item() == 9
    assert torch.equal(module.norm.running_mean, torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=r"norm\.num_batches_tracked: expected \(\)"):
        check_and_load(Tiny(), state, "old_export.pth")


def test_non_persistent_buffer_in_the_file_is_shape_checked_and_reported():
    state = dict(Tiny().state_dict())
    state["table"] = torch.zeros(5)
    report = check_and_load(Tiny(), state, "old_timm.safetensors")
    assert report.recomputed == ("table",)
    state["table"] = torch.zeros(6)
    with pytest.raises(ValueError, match=r"table: expected \(5,\), found \(6,\)"):
        check_and_load(Tiny(), state, "old_timm.safetensors")


def test_allowed_shape_mismatch_keeps_the_module_tensor_and_is_reported():
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {"0.weight": torch.randn(4, 5), "0.bias": torch.randn(4), "1.weight": torch.randn(2, 4),
             "1.bias": torch.randn(2)}
    before = module[0].weight.detach().clone()
    report = check_and_load(module, state, "x.safetensors", allow_shape_mismatch_prefixes=("0.",))
    assert report == LoadReport(path=report.path, skipped=(TensorShapes("0.weight", (4, 3), (4, 5)),), recomputed=())
    assert str(report.path) == "x.safetensors"
    assert torch.equal(module[0].weight, before)
    assert torch.equal(module[1].weight, state["1.weight"])
    with pytest.raises(ValueError, match=r"0\.weight: expected \(4, 3\), found \(4, 5\)"):
        check_and_load(module, state, "x.safetensors")


def test_file_to_module_round_trip(tmp_path):
    source = nn.Linear(3, 2)
    path = save({f"module.{key}": value.detach() for key, value in source.state_dict().items()}, tmp_path / "ddp.bin")
    target = nn.Linear(3, 2)
    check_and_load(target, read_state_dict(path), path)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_listing_counts_what_it_leaves_out():
    assert listing(["a", "b"]) == "\n    a\n    b"
    rows = [f"k{i}" for i in range(MAX_LISTED + 3)]
    assert listing(rows).splitlines()[1:] == [f"    k{i}" for i in range(MAX_LISTED)] + ["    ... and 3 more"]
