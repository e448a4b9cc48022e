"""How a :class:`~model.colorizer.Colorizer` runs fast on an accelerator, without changing what it computes.

Four switches, each off (or automatic) unless asked for, so that a CPU run, a test or a parity check is
the plain eager model, and each timed by ``bench/gpu_check.py`` against the eager model in the same run:

- ``compile``: ``torch.compile`` of the denoiser. ``blocks`` (regional) compiles each transformer and
  ResNet block of the U-Net in place: the repeated blocks share their compiled code, so compiling takes
  a fraction of compiling the whole U-Net (``unet``), and the state-dict keys stay as they are (saving,
  loading and the split-attention processors see the same modules);
- ``compile_cache``: a folder for this process's compile caches (Inductor's FX-graph and Triton caches,
  and a portable "mega-cache" file that ``torch.compiler.load_cache_artifacts`` reads back). A Serve
  replica or a batch actor that restarts with the same folder reuses the kernels instead of compiling
  again;
- ``channels_last``: the memory format of the convolutional parts named. On an H100 it made the U-Net's
  step 1.5x faster at batch 2 (0.120 → 0.0775 s) and slowed the VAE encode, so it is per part: the GPU
  default is the U-Net alone (:meth:`Acceleration.for_device`);
- ``attention``: which ``scaled_dot_product_attention`` kernel runs (``flash``, ``efficient``, ``cudnn``,
  ``math``), for the whole generation; ``auto`` lets PyTorch choose per call.

The fourth lever of the GPU path, bf16 end to end, is the model's dtype (``Colorizer.from_pretrained(...,
dtype=torch.bfloat16)``): every part's weights and activations are then bf16, while the sampler keeps its
noise levels and its state in float32 (:mod:`model.generate`), as the reference code's k-diffusion
samplers do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("colorize_xl.acceleration")

COMPILE_SCOPES = ("off", "blocks", "unet")
# The parts whose memory format can be switched, as ``Colorizer`` attribute paths.
CHANNELS_LAST_PARTS = {"unet": "unet", "sketch_encoder": "sketch_encoder", "vae_encoder": "vae.encoder",
                       "vae_decoder": "vae.decoder"}
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
# The U-Net blocks a regional compile wraps: each kind repeats many times with few distinct shapes.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
MEGA_CACHE_FILE = "torch-compile-artifacts.bin"


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


@dataclass(frozen=True)
class Acceleration:
    """The switches; see the module docstring. The default is the plain eager model."""

    compile: str = "off"  # off | blocks (regional) | unet (the whole denoiser)
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    compile_cache: str | None = None  # folder for this process's compile caches (None: torch's default)
    channels_last: tuple[str, ...] = ()  # parts of CHANNELS_LAST_PARTS
    attention: str = "auto"  # one of ATTENTION_BACKENDS

    def __post_init__(self):
        if self.compile not in COMPILE_SCOPES:
            raise ValueError(f"compile must be one of {COMPILE_SCOPES}, got {self.compile!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        parts = tuple(self.channels_last)
        unknown = [p for p in parts if p not in CHANNELS_LAST_PARTS]
        if unknown:
            raise ValueError(f"channels_last parts must be among {tuple(CHANNELS_LAST_PARTS)}, got {unknown}")
        object.__setattr__(self, "channels_last", parts)

    @classmethod
    def for_device(cls, device: str | torch.device, **overrides) -> "Acceleration":
        """The default for ``device``: on CUDA, channels_last for the U-Net (measured faster there); on the
        CPU nothing. Compiling stays opt-in: it costs minutes at start-up."""
        on_cuda = torch.device(device).type == "cuda"
        return dataclasses.replace(cls(channels_last=("unet",) if on_cuda else ()), **overrides)

    @classmethod
    def from_flags(cls, compile: str = "off", channels_last: str | None = None, attention: str = "auto",
                   compile_backend: str = "inductor", compile_mode: str | None = None,
                   compile_cache: str | None = None, device: str | torch.device = "cpu") -> "Acceleration":
        """From command-line values: ``channels_last`` is comma-separated part names, ``none``, or ``None``
        for the device's default."""
        fields = dict(compile=compile, attention=attention, compile_backend=compile_backend,
                      compile_mode=compile_mode or None, compile_cache=compile_cache or None)
        if channels_last is not None:
            fields["channels_last"] = tuple(p for p in channels_last.split(",") if p and p != "none")
        return cls.for_device(device, **fields)

    def attention_context(self):
        """A context in which every SDPA call uses the chosen kernel (a no-op for ``auto``)."""
        if self.attention == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([_backend(self.attention)])


def _part(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def regional_blocks(unet: nn.Module) -> list[nn.Module]:
    """The modules a regional compile wraps (see :data:`REGIONAL_BLOCKS`)."""
    return [m for m in unet.modules() if type(m).__name__ in REGIONAL_BLOCKS]


def use_compile_cache(folder: str | Path) -> bool:
    """Point this process's compile caches at ``folder`` (unless the environment already names them) and
    load the portable cache saved there by :func:`save_compile_cache`. Returns whether one was loaded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    artifacts = folder / MEGA_CACHE_FILE
    if not artifacts.is_file():
        return False
    try:  # torch logs and returns None for a file it cannot read
        loaded = torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    except Exception as error:  # noqa: BLE001 - a stale or foreign cache only costs a recompile
        log.warning("ignored the compile cache %s: %s", artifacts, error)
        return False
    return loaded is not None


def save_compile_cache(folder: str | Path) -> int:
    """Write what this process compiled to ``folder`` (atomically); returns the bytes written (0: none)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return 0
    data, _info = saved
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{MEGA_CACHE_FILE}.{os.getpid()}"
    partial.write_bytes(data)
    partial.replace(folder / MEGA_CACHE_FILE)
    return len(data)


def accelerate(model: nn.Module, acceleration: Acceleration) -> dict:
    """Apply ``acceleration`` to a Colorizer in place (its ``acceleration`` attribute keeps the attention
    choice for its generations). Memory formats follow ``channels_last`` both ways, so a bench can switch
    them on and off; a compile cannot be undone. Returns what was done, for logs and benches."""
    report: dict = {"compile": acceleration.compile, "attention": acceleration.attention,
                    "channels_last": list(acceleration.channels_last)}
    for name, path in CHANNELS_LAST_PARTS.items():  # every switchable part ends in the format asked for
        part = _part(model, path)
        if part is not None and not any(p.is_meta for p in part.parameters()):
            wanted = torch.channels_last if name in acceleration.channels_last else torch.contiguous_format
            part.to(memory_format=wanted)
    if acceleration.compile_cache:
        report["compile_cache_loaded"] = use_compile_cache(acceleration.compile_cache)
    if acceleration.compile != "off":
        options = {"backend": acceleration.compile_backend,
                   **({"mode": acceleration.compile_mode} if acceleration.compile_mode else {})}
        if acceleration.compile == "unet":
            model.unet.compile(**options)
            report["compiled_modules"] = 1
        else:
            blocks = regional_blocks(model.unet)
            # Each block instance is its own compiled frame: let every one keep its few shapes' entries.
            config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, limit, max(getattr(config, limit), 64))
            for block in blocks:
                block.compile(**options)
            report["compiled_modules"] = len(blocks)
    model.acceleration = acceleration
    return report
