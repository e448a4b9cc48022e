"""Shared fixtures: every test builds the tiny preset (seconds on CPU), never downloads anything."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    from model.config import tiny

    return tiny()


@pytest.fixture(scope="session")
def tiny_colorizer(tiny_config):
    from model.colorizer import Colorizer

    torch.manual_seed(0)
    model = Colorizer.from_config(tiny_config).eval()
    _wake_up(model)
    return model


def _wake_up(model):
    """Give the zero-initialized sketch-encoder outputs small random weights, as after some training, so
    tests can see the sketch reach the U-Net (a fresh encoder adds exactly nothing by design)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in model.sketch_encoder.outputs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)


@pytest.fixture()
def drawing_pair():
    from pipelines.synthetic import synthetic_illustration

    return synthetic_illustration(seed=3, width=128, height=96)
