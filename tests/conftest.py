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
    """Give the zero-initialized sketch-encoder layers (the stem's last conv and the outputs) small random
    weights, as after some training, so tests can see the sketch reach the U-Net (a fresh encoder adds
    exactly nothing by design)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in [model.sketch_encoder.model[-1], *model.sketch_encoder.proj_outs]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)


@pytest.fixture()
def drawing_pair():
    from pipelines.data.synthetic import synthetic_illustration

    return synthetic_illustration(seed=3, width=128, height=96)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A finished tiny training dataset (24 synthetic images, both latent views), preprocessed in-process
    without Ray: ``root/base`` (model folder), ``root/dataset``. Tests write their own runs under ``root``."""
    from model.assembly import init_model
    from pipelines.data.synthetic import write_corpus
    from pipelines.data.layout import completed_shards, load_or_create_plan, write_manifest
    from pipelines.data.shards import PreprocessConfig, ShardEncoder, process_shard

    root = tmp_path_factory.mktemp("tiny-dataset")
    write_corpus(root / "corpus", count=24)
    base = init_model(root / "base", "tiny", seed=0)
    cfg = PreprocessConfig(preset="tiny", shard_size=12, encoders=str(base), latent_views=("target", "background"))
    output = str(root / "dataset")
    plan = load_or_create_plan(str(root / "corpus"), output, cfg)
    encoder = ShardEncoder(cfg)
    for k, shard in enumerate(plan.shards):
        process_shard(output, k, shard, cfg, encoder)
    assert write_manifest(output, cfg, plan, completed_shards(output))["complete"]
    return root
