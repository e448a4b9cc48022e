"""Reading weight files from local paths, and loading them strictly into a module.

Why one module: pretrained SDXL parts, the line extractors, the segmenters, the FID Inception and the
colorizer's own saved parts all read weight files. When each kept its own reader they drifted apart (one
stripped DataParallel's ``module.``, one memory-mapped, one lower-cased the suffix) and a fix to loading
reached one of three. This is the one place to fix loading, and every caller gets the same rules:

* Local paths only. Nothing is fetched from a hub, so a run never depends on the network or on what a hub
  serves that day.
* ``torch.save`` files are read with ``torch.load(weights_only=True)``: a checkpoint is data, and a pickle
  that would run code on load is refused with a message saying how to convert it.
* Loading is strict, because a silently half-loaded model trains for days before anyone notices. Every
  missing, unexpected or mis-shaped key raises a ``ValueError`` that names the file and lists the keys with
  their shapes.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Keys under which training code nests the state dict: Lightning and OpenCLIP (state_dict), the PyTorch
# tutorials' convention (model_state_dict), many research repos (model), DeepSpeed (module).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# DataParallel and DistributedDataParallel save every key under this prefix.
DDP_PREFIX = "module."
MAX_LISTED = 10
# How much of a safetensors file is read through one memory map before it is closed (see _read_safetensors).
MAP_CHUNK_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------ listings


def shape_of(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    """The shape as a plain tuple, which prints the same in every message (``torch.Size`` does not)."""
    return None if tensor is None else tuple(tensor.shape)


def listing(rows: Sequence[str]) -> str:
    """Up to :data:`MAX_LISTED` rows, one an indented line, then how many were left out.

    Error messages stay readable when a wrong file misses hundreds of keys, and still show enough of
    them to recognise the pattern.
    """
    shown = "".join(f"\n    {row}" for row in rows[:MAX_LISTED])
    more = f"\n    ... and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    return shown + more


def under_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose keys start with ``prefix``, keyed without it (one tower of a whole-model file)."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


# ------------------------------------------------------------------------------------------- reading


def read_state_dict(
    path: PathLike,
    prefixes: tuple[str, ...] | None = None,
    strip: tuple[str, ...] = (DDP_PREFIX,),
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` file (``.ckpt/.pt/.pth/.bin``), on the CPU.

    ``strip``: leading prefixes removed from every key that has them (by default DataParallel's
    ``module.``, which no model of ours names a child). ``prefixes``: when given, only keys that start
    with one of them after stripping are kept; a safetensors file then reads nothing else, which matters
    when taking a 300 MB VAE out of a 7 GB single-file checkpoint. A torch file's state dict nested under
    one of :data:`WRAPPER_KEYS` is unwrapped. The suffix decides the format, in any letter case.
    ``dtype``: floating-point tensors are cast to it one by one as they are read, so a file never sits in
    memory at its stored precision and at the target one at once (integer tensors keep theirs).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the path for anything that
    is not a readable mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path, prefixes, strip, dtype)
    state = _unwrap(_torch_load(path), path)
    names = _kept_names(state, path, prefixes, strip)
    return {name: cast(state[stored], dtype) for stored, name in names.items()}


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` at ``dtype`` when it is floating point and ``dtype`` is given; otherwise as it is."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def tensor_shapes(path: PathLike, prefixes: tuple[str, ...] | None = None,
                  strip: tuple[str, ...] = (DDP_PREFIX,)) -> dict[str, tuple[int, ...]]:
    """Name → shape of the tensors :func:`read_state_dict` would return, without reading their data
    (a safetensors header; a zip-format torch file is memory-mapped). For deciding what a file is, and
    refusing it, before reading gigabytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                names = _kept_names(file.keys(), path, prefixes, strip)
                return {name: tuple(file.get_slice(stored).get_shape()) for stored, name in names.items()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read safetensors file {path}: {err}") from err
    state = _unwrap(_torch_load(path), path)
    names = _kept_names(state, path, prefixes, strip)
    return {name: shape_of(state[stored]) for stored, name in names.items()}


def _is_safetensors(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return True
    if suffix in TORCH_SUFFIXES:
        return False
    raise ValueError(
        f"{path}: unknown weights format {path.suffix!r}; expected {SAFETENSORS_SUFFIX} or one of "
        f"{', '.join(TORCH_SUFFIXES)}"
    )


def _read_safetensors(
    path: Path, prefixes: tuple[str, ...] | None, strip: tuple[str, ...], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            names = list(_kept_names(file.keys(), path, prefixes, strip).items())
        # safe_open memory-maps the whole file, and every page a tensor was read from stays resident (and
        # counted in RSS) until the file is closed, even once the tensor was cast to a new copy. Reading in
        # chunks of about MAP_CHUNK_BYTES bounds that to one chunk instead of the whole file.
        state: dict[str, torch.Tensor] = {}
        start = 0
        while start < len(names):
            with safe_open(str(path), framework="pt", device="cpu") as file:
                read = 0
                while start < len(names) and read < MAP_CHUNK_BYTES:
                    stored, name = names[start]
                    tensor = file.get_tensor(stored)
                    read += tensor.numel() * tensor.element_size()
                    state[name] = cast(tensor, dtype)
                    start += 1
        return state
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err


def _torch_load(path: Path) -> object:
    try:
        # mmap leaves tensors nobody asks for (e.g. a CLIP text tower) on disk; only the zip format has it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - on arbitrary bytes the unpickler raises anything (IndexError too)
        raise ValueError(
            f"cannot read weights from {path} with torch.load(weights_only=True) (it may pickle more than "
            f"tensors; re-save its state_dict or convert it to .safetensors): {err}"
        ) from err


def _unwrap(loaded: object, path: Path) -> Mapping[str, torch.Tensor]:
    """The flat name → tensor mapping inside a training checkpoint's container dicts."""
    while isinstance(loaded, Mapping):
        inner = next((loaded[key] for key in WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{path} holds a {type(loaded).__name__}; expected a state dict (a mapping of tensor names to tensors)"
        )
    not_tensors = [f"{key}: {type(value).__name__}" for key, value in loaded.items()
                   if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: {len(not_tensors)} entries are not tensors:{listing(not_tensors)}")
    return loaded


def _kept_names(
    stored_keys: Iterable[str], path: Path, prefixes: tuple[str, ...] | None, strip: tuple[str, ...]
) -> dict[str, str]:
    """Stored key → name to return, for the keys ``prefixes`` keeps once ``strip`` is applied."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for stored in stored_keys:
        name = _stripped(stored, strip)
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if name in seen:
            raise ValueError(f"{path}: keys {seen[name]!r} and {stored!r} both become {name!r} once "
                             f"{', '.join(strip)} is stripped")
        seen[name] = stored
        names[stored] = name
    return names


def _stripped(key: str, strip: tuple[str, ...]) -> str:
    """``key`` without its leading ``strip`` prefixes, however often and in whatever order they repeat."""
    prefix = next((prefix for prefix in strip if prefix and key.startswith(prefix)), None)
    while prefix is not None:
        key = key[len(prefix):]
        prefix = next((prefix for prefix in strip if prefix and key.startswith(prefix)), None)
    return key


# ------------------------------------------------------------------------------------- strict loading


@dataclass(frozen=True)
class TensorShapes:
    """One tensor whose shape in the file differs from the model's."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]


@dataclass(frozen=True)
class LoadReport:
    """What :func:`check_and_load` did besides loading every tensor of the model.

    ``skipped``: tensors left at their current value because their shape differs under an allowed prefix.
    ``recomputed``: tensors in the file that are non-persistent buffers of the model (e.g. timm SwinV2's
    relative-position tables, which older timm versions saved); the model derives them from its config,
    so they are shape-checked and otherwise ignored.
    """

    path: Path
    skipped: tuple[TensorShapes, ...] = ()
    recomputed: tuple[str, ...] = ()


@dataclass
class _Fit:
    """How the tensors of a file line up with a module's, key by key."""

    to_load: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[TensorShapes] = field(default_factory=list)
    skipped: list[TensorShapes] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def check_and_load(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_path: PathLike,
    *,
    allow_shape_mismatch_prefixes: tuple[str, ...] = (),
    optional_suffixes: tuple[str, ...] = (),
    target: str | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` strictly, or raise a ``ValueError`` that says what does not fit.

    The error names ``source_path`` and ``target`` (default: the module's class) and lists, up to ten of
    each, the missing keys with the shape the model expects, the unexpected keys with the shape found, and
    the shape mismatches with both. Shape mismatches under ``allow_shape_mismatch_prefixes`` keep the
    module's tensor and are reported (and logged) instead. Module tensors whose names end with
    ``optional_suffixes`` (e.g. BatchNorm's ``num_batches_tracked``, which some exporters drop) may be
    absent from the file and keep their current value.
    """
    source_path = Path(source_path)
    target = target or f"the {type(module).__name__} built from the config"
    expected = module.state_dict()
    fit = _fit(module, expected, state_dict, allow_shape_mismatch_prefixes, optional_suffixes)
    if not fit.fits:
        raise ValueError(_misfit_message(fit, expected, state_dict, source_path, target))
    try:
        module.load_state_dict(fit.to_load, strict=True)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied; keys and shapes were checked above
        raise ValueError(f"{source_path}: cannot load into {target}: {err}") from err
    if fit.skipped:
        rows = [f"{s.key}: model {s.expected}, file {s.found}" for s in fit.skipped]
        logger.warning("%s: kept the current value of %d tensors whose shape differs:%s", source_path,
                       len(fit.skipped), listing(rows))
    logger.info("loaded %d tensors into %s from %s", len(fit.to_load) - len(fit.skipped), type(module).__name__,
                source_path)
    return LoadReport(source_path, tuple(fit.skipped), tuple(fit.recomputed))


def build_and_load(
    build: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    source_path: PathLike,
    *,
    dtype: torch.dtype | None = None,
    allow_shape_mismatch_prefixes: tuple[str, ...] = (),
    target: str | None = None,
) -> tuple[nn.Module, LoadReport]:
    """``build()`` the module and fill it from ``state_dict`` strictly, without a random-init detour.

    The module is built on the meta device (shapes only, no memory, no init) and the file's tensors,
    cast to ``dtype`` (default: the dtype the module builds with), become its parameters
    (``load_state_dict(assign=True)``): loading a 2.6B-parameter U-Net in bf16 holds the bf16 tensors
    once, never an fp32 copy. Non-persistent buffers (not in any file) are then recomputed by
    :func:`materialize_buffers`, and nothing may remain on the meta device.

    When the file fits only by keeping some module tensors (shape mismatches under
    ``allow_shape_mismatch_prefixes``), those tensors need their real initial values, so the module is
    built for real instead and loaded with :func:`check_and_load`, then cast. Misfits raise the same
    ``ValueError`` as :func:`check_and_load`.
    """
    source_path = Path(source_path)
    with torch.device("meta"):
        module = build()
    target = target or f"the {type(module).__name__} built from the config"
    expected = module.state_dict()
    fit = _fit(module, expected, state_dict, allow_shape_mismatch_prefixes, ())
    if not fit.fits:
        raise ValueError(_misfit_message(fit, expected, state_dict, source_path, target))
    if fit.skipped:
        module = build()
        report = check_and_load(module, state_dict, source_path,
                                allow_shape_mismatch_prefixes=allow_shape_mismatch_prefixes, target=target)
        return (module.to(dtype) if dtype is not None else module), report
    to_load = {key: cast(tensor, dtype if dtype is not None else expected[key].dtype)
               for key, tensor in fit.to_load.items()}
    try:
        module.load_state_dict(to_load, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{source_path}: cannot load into {target}: {err}") from err
    del to_load
    materialize_buffers(module, dtype)
    logger.info("loaded %d tensors into %s from %s", len(fit.to_load), type(module).__name__, source_path)
    return module, LoadReport(source_path, (), tuple(fit.recomputed))


def materialize_buffers(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Recompute the buffers still on the meta device after an ``assign`` load (the non-persistent ones,
    which no file holds), then check that no parameter or buffer is left there.

    Each owning submodule gets real tensors of the buffers' shapes (floating ones at ``dtype`` when given,
    as ``module.to(dtype)`` would leave them) and fills them with its own ``init_non_persistent_buffers()``
    (timm's name for it; SwinV2 derives its relative-position tables and shifted-window masks there from
    the config, on the device and dtype of its loaded weights). A module with meta buffers and no such
    method is a ``ValueError`` naming the buffers: the caller must compute them another way.
    """
    for prefix, sub in module.named_modules():
        meta = [name for name, buffer in sub._buffers.items() if buffer is not None and buffer.is_meta]
        if not meta:
            continue
        init = getattr(sub, "init_non_persistent_buffers", None)
        if init is None:
            names = [f"{prefix}.{name}" if prefix else name for name in meta]
            raise ValueError(f"{type(sub).__name__} has buffers that are in no weights file and that it "
                             f"cannot recompute (no init_non_persistent_buffers):{listing(names)}")
        device = next((t.device for t in sub.parameters() if not t.is_meta), torch.device("cpu"))
        for name in meta:
            buffer = sub._buffers[name]
            want = dtype if (dtype is not None and buffer.is_floating_point()) else buffer.dtype
            sub._buffers[name] = torch.empty(buffer.shape, dtype=want, device=device)
        init()
    left = meta_tensors(module)
    if left:
        raise ValueError(f"{type(module).__name__}: {len(left)} tensors are still unmaterialized (meta) after "
                         f"loading:{listing(left)}")


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are on the meta device (no data)."""
    return [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]


def _fit(
    module: nn.Module,
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    allow_shape_mismatch_prefixes: tuple[str, ...],
    optional_suffixes: tuple[str, ...],
) -> _Fit:
    fit = _Fit()
    buffers = _non_persistent_buffers(module)
    for key, tensor in state_dict.items():
        found = shape_of(tensor)
        if key in expected:
            want = shape_of(expected[key])
            if want == found:
                fit.to_load[key] = tensor
            elif key.startswith(allow_shape_mismatch_prefixes):
                fit.skipped.append(TensorShapes(key, want, found))
                fit.to_load[key] = expected[key]
            else:
                fit.mismatched.append(TensorShapes(key, want, found))
        elif key in buffers:
            want = shape_of(buffers[key])
            if want is not None and want != found:
                fit.mismatched.append(TensorShapes(key, want, found))
            else:
                fit.recomputed.append(key)
        else:
            fit.unexpected.append(key)
    for key in expected:
        if key in state_dict:
            continue
        if optional_suffixes and key.endswith(optional_suffixes):
            fit.to_load[key] = expected[key]
        else:
            fit.missing.append(key)
    return fit


def _non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Buffers that ``state_dict`` leaves out because the module recomputes them, by full key."""
    found = {}
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            found[f"{prefix}.{name}" if prefix else name] = sub._buffers.get(name)
    return found


def _misfit_message(
    fit: _Fit,
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    source_path: Path,
    target: str,
) -> str:
    parts = [f"{source_path}: weights do not fit {target}"]
    if fit.missing:
        rows = [f"{key}: expected {shape_of(expected[key])}" for key in fit.missing]
        parts.append(f"  {len(rows)} missing from the file:{listing(rows)}")
    if fit.unexpected:
        rows = [f"{key}: found {shape_of(state_dict[key])}" for key in fit.unexpected]
        parts.append(f"  {len(rows)} unexpected in the file:{listing(rows)}")
    if fit.mismatched:
        rows = [f"{m.key}: expected {m.expected}, found {m.found}" for m in fit.mismatched]
        parts.append(f"  {len(rows)} with a different shape:{listing(rows)}")
    return "\n".join(parts)
