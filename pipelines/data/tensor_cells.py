"""Binary cells of the dataset's Parquet files: tensors, and the encoded images beside them.

Parquet has no tensor type that every reader agrees on; raw little-endian bytes with the shape beside
them are readable anywhere (numpy, torch, Arrow) and cost exactly 2 bytes per value. The dtype is a
column too, so a dataset can switch between float16 and bfloat16 without a schema change. Images
(the crop as JPEG; sketches and masks as PNG) are decoded by :func:`image_from_cell`, the one decoder of
stored cells that training, evaluation and the encoder stage share.
"""

from __future__ import annotations

import cv2
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


def image_from_cell(data: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """A stored image cell → (H, W) uint8 (grayscale) or (H, W, 3) uint8 RGB. The cells are the
    preprocess job's own encodings, so unlike :func:`model.image_io.decode_image` there is no pixel cap;
    a cell that does not decode is a damaged dataset, reported as such."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise ValueError("an image cell of the dataset cannot be decoded: the dataset is damaged")
    return array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
