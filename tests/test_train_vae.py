"""The VAE training job: its objective learns on plain tensors, and one short Ray Train run (1 CPU worker,
DeepSpeed ZeRO-2 with gloo, tiny preset, MLflow in sqlite) fine-tunes the decoder only and exports a model
folder that ``Colorizer`` loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_objective_lowers_the_reconstruction_error_and_decoder_only_leaves_the_encoder(tiny_config):
    from model.vae import build_vae
    from pipelines.data.synthetic import synthetic_illustration
    from pipelines.training.vae import VAEObjective, random_crops, reconstruction_psnr

    pictures = [synthetic_illustration(seed, width=96, height=96).color for seed in range(8)]
    fixed = random_crops(pictures, 4, 64, np.random.default_rng(0))
    measured = {}
    for decoder_only, steps in ((False, 20), (True, 2)):
        torch.manual_seed(0)
        objective = VAEObjective(build_vae(tiny_config.vae), decoder_only=decoder_only)
        started = {k: v.clone() for k, v in objective.vae.state_dict().items()}
        optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-3)
        before = reconstruction_psnr(objective.vae, fixed)
        for step in range(steps):
            losses = objective(random_crops(pictures, 4, 64, np.random.default_rng(step)))
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
        measured[decoder_only] = (before, reconstruction_psnr(objective.vae, fixed))
        changed = {k for k, v in objective.vae.state_dict().items() if not torch.equal(v, started[k])}
        assert any(k.startswith("decoder.") for k in changed)
        assert decoder_only != any(k.startswith(("encoder.", "quant_conv.")) for k in changed)
    before, after = measured[False]
    assert after > before + 1.0, measured  # 20 steps from random init: about +1.6 dB


@pytest.mark.slow
def test_the_job_fine_tunes_the_decoder_through_ray_train_and_exports_a_model_folder(tiny_dataset):
    import mlflow

    from model.colorizer import Colorizer

    root = tiny_dataset
    out, uri = root / "vae-tuned", f"sqlite:///{root / 'vae.db'}"
    command = [sys.executable, str(ROOT / "jobs" / "train_vae.py"), "--model", str(root / "base"),
               "--data", str(root / "dataset"), "--out", str(out), "--decoder-only", "--train-steps", "3",
               "--batch-size", "2", "--heldout", "4", "--eval-every", "3", "--checkpoint-every", "3",
               "--lr", "1e-3", "--storage", str(root / "vae-runs"), "--run-name", "tiny-vae", "--mlflow-uri", uri,
               "--ray-address", "local"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert json.loads(done.stdout.splitlines()[-1])["model"] == str(out)

    base, tuned = Colorizer.from_pretrained(root / "base"), Colorizer.from_pretrained(out)
    before, after = base.state_dict(), tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vae.decoder.") or k.startswith("vae.post_quant_conv.") for k in changed)
    assert (out / "training.json").is_file()

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("colorize-xl").experiment_id])
    assert run.data.tags["colorize.stage"] == "vae" and run.data.params["decoder_only"] == "True"
    assert {"heldout_psnr", "train_psnr", "reconstruction", "kl", "exported"} <= set(run.data.metrics)
