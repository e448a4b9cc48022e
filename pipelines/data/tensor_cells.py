"""Compact tensor cells for Parquet: raw fp16/bf16 bytes plus a shape column.

Parquet has no tensor type that every reader agrees on; raw little-endian bytes with the shape beside
them are readable anywhere (numpy, torch, Arrow) and cost exactly 2 bytes per value. The dtype is a
column too, so a dataset can switch between float16 and bfloat16 without a schema change.
"""

from __future__ import annotations

import numpy as np
import torch

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_to_bytes(tensor: torch.Tensor, dtype: str = "float16") -> tuple[bytes, list[int]]:
    """One sample's tensor → (bytes, shape)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    cast = tensor.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
    return cast.view(torch.int16).numpy().tobytes(), list(cast.shape)


def bytes_to_tensor(data: bytes, shape, dtype: str = "float16") -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; returns a float32 tensor of ``shape``."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    shape = [int(s) for s in shape]
    expected = int(np.prod(shape)) * 2
    if len(data) != expected:
        raise ValueError(f"tensor cell has {len(data)} bytes; shape {shape} in {dtype} needs {expected}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.int16)
    return raw.view(STORAGE_DTYPES[dtype]).reshape(shape).float()
