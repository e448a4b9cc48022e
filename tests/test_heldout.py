"""The held-out diffusion loss: reproducible, finite, and sensitive to the weights it measures."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.evaluation.heldout import first_rows, heldout_diffusion_loss


def perturbed_copy(folder: Path, destination: Path, scale: float = 0.05) -> Path:
    """A copy of a model folder whose U-Net weights carry seeded noise (the rest is unchanged)."""
    shutil.copytree(folder, destination)
    weights = destination / "unet" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(7)
    state = {k: (v + scale * torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype)
                 if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    return destination


def test_the_backbone_loss_is_reproducible_finite_and_moves_with_the_unet(tiny_dataset, tmp_path):
    base, dataset = str(tiny_dataset / "base"), str(tiny_dataset / "dataset")
    first = heldout_diffusion_loss(base, dataset, samples=6, batch_size=4, seed=0)
    second = heldout_diffusion_loss(base, dataset, samples=6, batch_size=4, seed=0)
    assert first == second
    assert math.isfinite(first) and first > 0
    assert heldout_diffusion_loss(base, dataset, samples=6, batch_size=4, seed=1) != first  # the seed matters

    changed = perturbed_copy(tiny_dataset / "base", tmp_path / "perturbed")
    assert abs(heldout_diffusion_loss(str(changed), dataset, samples=6, batch_size=4, seed=0) - first) > 1e-4


def test_rows_keep_their_first_sketch_and_any_batch_size_works(tiny_dataset):
    """The held-out rows are fixed (first rows, first sketch variant); batches of one row still measure."""
    base, dataset = str(tiny_dataset / "base"), str(tiny_dataset / "dataset")
    rows = first_rows(dataset, "backbone", 5)
    assert len(rows) == 5 and all(len(row["sketches"]) == 1 for row in rows)
    assert math.isfinite(heldout_diffusion_loss(base, dataset, samples=5, batch_size=1))


def test_the_plugin_stage_measures_stage_two_loss(tiny_dataset):
    base, dataset = str(tiny_dataset / "base"), str(tiny_dataset / "dataset")
    first = heldout_diffusion_loss(base, dataset, stage="plugin", samples=4, batch_size=2, seed=0)
    assert first == heldout_diffusion_loss(base, dataset, stage="plugin", samples=4, batch_size=2, seed=0)
    assert math.isfinite(first) and first > 0


def test_an_unknown_stage_is_refused(tiny_dataset):
    with pytest.raises(ValueError, match="stage must be one of"):
        heldout_diffusion_loss(str(tiny_dataset / "base"), str(tiny_dataset / "dataset"), stage="stage3")


def test_a_model_with_its_own_plugin_is_measured_with_it(tiny_dataset, tmp_path):
    """A folder with plugin/ (any rank) is measured with that plug-in, and the number moves with it."""
    from model.colorizer import Colorizer
    from model.plugin import PluginConfig, attach_plugin
    from model.split_attention import lora_parameters

    dataset = str(tiny_dataset / "dataset")
    model = Colorizer.from_pretrained(tiny_dataset / "base")
    attach_plugin(model, PluginConfig(lora_rank=2))
    folder = model.save_pretrained(tmp_path / "with-plugin")
    first = heldout_diffusion_loss(str(folder), dataset, stage="plugin", samples=4, batch_size=2, seed=0)
    assert math.isfinite(first) and first > 0
    with torch.no_grad():  # a LoRA that does something
        for p in lora_parameters(model.unet.unet):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    changed = model.save_pretrained(tmp_path / "changed")
    assert abs(heldout_diffusion_loss(str(changed), dataset, stage="plugin", samples=4, batch_size=2) - first) > 1e-5
