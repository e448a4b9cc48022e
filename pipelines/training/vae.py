"""Training the latent autoencoder (diffusers ``AutoencoderKL``) on a corpus of pictures, with Ray Train +
DeepSpeed ZeRO-2 and MLflow, as the colorizer's stages train.

Two uses, one code path: at ``sdxl``, fine-tuning the SDXL VAE on a studio's own art (anime SDXL models
ship such VAEs), usually decoder only (``decoder_only``), as Stability's ft-MSE VAE was trained, so the
latent space, and with it every U-Net trained on it, stays valid while the decoder learns the art's
lines and flat colors; at ``tiny``, training the whole small VAE from scratch, so the tiny preset's
latents mean something (a random VAE reconstructs at about 6 dB PSNR).

The loss is the reconstruction error (MSE, which is what PSNR measures, or L1) plus a small KL term that
keeps the latents near a unit Gaussian; no perceptual loss, since its weights would be a download.

Pictures come from a preprocessed dataset's ``image`` column (the bucket crops the U-Net's latents are
encoded from, so the VAE learns exactly the pictures it will be asked to encode) or from a corpus as
``jobs/preprocess.py`` reads it (a folder tree of images, or Parquet files of image bytes), decoded safely
and cropped to the preset's buckets the same way. Each worker holds its share of the encoded pictures in
memory (a fine-tuning set: thousands of pictures, not millions) and draws every step's batch from the
seed and the step, so a resumed run draws the same batches as an uninterrupted one without a data
position. The export is the starting model folder with its ``vae/`` replaced, which ``Colorizer`` and
``init_model`` load as any other.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F

from model.colorizer import read_config
from model.config import ColorizerConfig, preset_name
from model.geometry import buckets_for, crop_to_bucket, nearest_bucket
from model.image_io import decode_image
from model.pretrained import load_vae
from pipelines.training.progress import Progress
from pipelines.training.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, TRAINING_RECORD, Tracker

STAGE = "vae"  # the MLflow stage tag of a VAE run (beside backbone and plugin)
RECONSTRUCTIONS = ("mse", "l1")


@dataclass(frozen=True)
class VAETrainConfig:
    """Everything one VAE training run needs; logged to MLflow as its parameters. Exactly one of
    ``dataset`` and ``images`` names the pictures."""

    model: str  # model folder whose vae/ is the starting point (jobs/init_model.py, maybe with --vae)
    export: str  # the model folder written at the end: ``model`` with vae/ replaced
    dataset: str | None = None  # preprocess output: its ``image`` column
    images: str | None = None  # a corpus as jobs/preprocess.py reads it: image folder or Parquet of bytes
    steps: int = 1000
    batch_size: int = 16  # per worker
    crop_size: int | None = None  # square training crop; None = the preset's smallest bucket side
    lr: float = 1e-4
    final_lr_fraction: float = 1.0  # the lr falls along a cosine to lr * this at the last step (1 = constant)
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    reconstruction: str = "mse"
    kl_weight: float = 1e-6  # Stable Diffusion's VAE weight: the latents stay Gaussian-ish, detail stays
    decoder_only: bool = False  # freeze the encoder (and quant_conv): the latent space does not move
    heldout: int = 16  # pictures (every worker's first ones, never trained on) for the held-out PSNR
    eval_every: int = 200  # held-out PSNR to MLflow every this many steps (and at the end)
    checkpoint_every: int = 200
    log_every: int = 10
    metrics_every: int = 10
    seed: int = 0
    mlflow_tracking_uri: str = DEFAULT_TRACKING_URI
    mlflow_experiment: str = DEFAULT_EXPERIMENT
    run_name: str = "colorize-xl"
    stage: str = STAGE  # fixed: the Tracker finds the run by run name and stage
    extra_params: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.dataset is None) == (self.images is None):
            raise ValueError("give exactly one of dataset (a preprocess output) and images (a folder or Parquet "
                             f"corpus), got dataset={self.dataset!r}, images={self.images!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")
        if min(self.steps, self.batch_size, self.checkpoint_every, self.log_every, self.metrics_every,
               self.eval_every) < 1 or self.heldout < 0 or self.kl_weight < 0 or not 0 < self.final_lr_fraction <= 1:
            raise ValueError("steps, batch_size, checkpoint_every, log_every, metrics_every and eval_every must be "
                             "positive; heldout and kl_weight not negative; final_lr_fraction in (0, 1]")
        if self.stage != STAGE:
            raise ValueError(f"a VAE run's stage is {STAGE!r}, got {self.stage!r}")


# ------------------------------------------------------------------------------------------- the math
class VAEObjective(nn.Module):
    """The VAE and its loss as one module, so DeepSpeed's engine wraps it as it wraps a colorizer stage.
    ``forward(images)`` with (B, 3, H, W) RGB in [-1, 1] returns the losses."""

    def __init__(self, vae: AutoencoderKL, reconstruction: str = "mse", kl_weight: float = 1e-6,
                 decoder_only: bool = False):
        super().__init__()
        self.vae, self.reconstruction, self.kl_weight = vae, reconstruction, kl_weight
        if decoder_only:
            for part in (vae.encoder, vae.quant_conv):
                if part is not None:
                    part.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        decoded = self.vae.decode(posterior.sample()).sample
        error = F.mse_loss if self.reconstruction == "mse" else F.l1_loss
        reconstruction = error(decoded.float(), images.float())
        kl = posterior.kl().mean() / images[0].numel()  # per pixel value, as the reconstruction is a mean
        return {"loss": reconstruction + self.kl_weight * kl, "reconstruction": reconstruction, "kl": kl}


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → encoded (the posterior's mean, as the latent cache stores it) and decoded,
    clamped to [-1, 1]: what a picture looks like after a trip through the latent space."""
    parameter = next(vae.parameters())
    parts = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(parameter.device, parameter.dtype)
        parts.append(vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1).float().cpu())
    return torch.cat(parts)


def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """PSNR (dB, torchmetrics, over the whole batch) of :func:`reconstruct` against ``images`` in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    decoded = reconstruct(vae, images)
    return float(peak_signal_noise_ratio((decoded + 1) / 2, (images.float().cpu() + 1) / 2, data_range=1.0))


def to_tensor(pictures: list[np.ndarray]) -> torch.Tensor:
    """Same-size (H, W, 3) uint8 pictures → (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------- the data
def picture_bytes(cfg: VAETrainConfig, rank: int = 0, world: int = 1) -> list[bytes]:
    """This worker's share of the encoded pictures (every ``world``-th, from ``rank``), in a stable order."""
    if cfg.dataset is not None:
        from pipelines.data.layout import read_rows

        column = read_rows(cfg.dataset, None, ["id", "image"]).sort_by("id").column("image").to_pylist()
        return column[rank::world]
    from pipelines.data.corpus import list_inputs, read_shard_bytes

    items = list_inputs(cfg.images).items[rank::world]
    return [data for data in read_shard_bytes(items) if isinstance(data, bytes)]


def decode_pictures(encoded: list[bytes], config: ColorizerConfig) -> list[np.ndarray]:
    """Encoded pictures → (H, W, 3) uint8 RGB at the preset's bucket sizes, cropped as the preprocess job
    crops them (a dataset's crops are already there and pass unchanged); undecodable ones are skipped."""
    from model.image_io import DecodeError

    buckets, pictures = buckets_for(config), []
    for data in encoded:
        try:
            rgb = decode_image(data)
        except DecodeError:
            continue
        pictures.append(crop_to_bucket(rgb, nearest_bucket(rgb.shape[1], rgb.shape[0], buckets)))
    return pictures


def split_heldout(pictures: list[np.ndarray], heldout: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training pictures, held-out pictures): the first ``heldout`` are never trained on. Refuses a split
    that leaves nothing to train on."""
    if len(pictures) <= heldout:
        raise ValueError(f"{len(pictures)} decodable pictures leave none to train on after {heldout} held out")
    return pictures[heldout:], pictures[:heldout]


def random_crops(pictures: list[np.ndarray], count: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random ``size``² crops of random pictures (with replacement), randomly mirrored, as
    (count, 3, size, size) in [-1, 1]."""
    crops = []
    for index in rng.integers(0, len(pictures), count):
        picture = pictures[index]
        height, width = picture.shape[:2]
        if min(height, width) < size:
            raise ValueError(f"a {width}x{height} picture is smaller than the {size}² crop")
        top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        crop = picture[top:top + size, left:left + size]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return to_tensor([np.ascontiguousarray(c) for c in crops])


def center_squares(pictures: list[np.ndarray], size: int) -> torch.Tensor:
    """The center ``size``² of each picture, (B, 3, size, size) in [-1, 1]: the held-out measure's view."""
    squares = []
    for picture in pictures:
        height, width = picture.shape[:2]
        top, left = (height - size) // 2, (width - size) // 2
        squares.append(picture[top:top + size, left:left + size])
    return to_tensor(squares)


def crop_size_for(cfg: VAETrainConfig, config: ColorizerConfig) -> int:
    """The training crop's side: the given one, else the largest square every bucket crop holds."""
    return cfg.crop_size or config.data.bucket_min_side


# ------------------------------------------------------------------------------------ the worker loop
def train_loop_per_worker(config: dict) -> None:
    """What ``TorchTrainer`` runs on every worker: DeepSpeed ZeRO-2 over :class:`VAEObjective`, batches
    from :func:`random_crops` seeded by (seed, rank, step), a sharded checkpoint every
    ``checkpoint_every`` steps, MLflow and the export from rank 0."""
    import deepspeed
    import ray.train

    from pipelines.training.loop import CHECKPOINT_TAG, deepspeed_config, full_precision_parameters, resume_folder

    cfg = VAETrainConfig(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", context.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed + rank)

    colorizer_config = read_config(cfg.model)
    objective = VAEObjective(load_vae(Path(cfg.model) / "vae", colorizer_config.vae), cfg.reconstruction,
                             cfg.kl_weight, cfg.decoder_only).to(device)
    objective.train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=on_gpu)
    size = crop_size_for(cfg, colorizer_config)
    train, heldout = split_heldout(decode_pictures(picture_bytes(cfg, rank, world), colorizer_config), cfg.heldout)
    heldout_images = center_squares(heldout, size) if heldout else None

    step, run_id, client_state = 0, None, {}
    with resume_folder(ray.train.get_checkpoint(), world, context.get_local_rank()) as (folder, universal):
        engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                               lr_scheduler=cosine_schedule(optimizer, cfg),
                                               config=deepspeed_config(cfg, on_gpu, load_universal=universal))
        if folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_module_strict=False)
    if client_state:
        step, run_id = int(client_state["step"]), client_state.get("mlflow_run_id")
    tracker = Tracker(cfg, run_id, active=rank == 0, every=cfg.metrics_every,
                      extra_params={"preset": preset_name(colorizer_config), "crop_size": size, "workers": world,
                                    "train_pictures_per_worker": len(train)})
    progress = Progress(f"train {STAGE}", cfg.steps, every=cfg.log_every, first_step=step, active=rank == 0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    while step < cfg.steps:
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, rank, step])
        images = random_crops(train, cfg.batch_size, size, rng).to(device, dtype)
        losses = engine(images)
        engine.backward(losses["loss"])
        engine.step()
        step += 1
        metrics = {name: value.item() for name, value in losses.items()}
        metrics["samples_per_s"] = cfg.batch_size * world / (time.perf_counter() - started)
        if cfg.reconstruction == "mse":  # pixels span 2 (from -1 to 1): PSNR = 10 log10(2² / MSE)
            metrics["train_psnr"] = 10 * float(np.log10(4 / max(metrics["reconstruction"], 1e-10)))
        if rank == 0 and heldout_images is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics["heldout_psnr"] = evaluate(objective.vae, heldout_images)
        tracker.metrics(metrics, step)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        progress.update(step, loss=metrics["loss"], samples_per_s=metrics["samples_per_s"],
                        **{k: metrics[k] for k in ("train_psnr", "heldout_psnr") if k in metrics})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tracker.flush()
            client_state = {"step": step, "mlflow_run_id": tracker.run_id, "world_size": world}
            report_checkpoint(engine, client_state, metrics | {"step": step}, CHECKPOINT_TAG)

    trained = full_precision_parameters(objective)  # a collective: every rank takes part
    if rank == 0:
        export_vae(cfg, {name.removeprefix("vae."): value for name, value in trained.items()})
        tracker.metrics({"exported": 1.0}, step)
        tracker.close()
    ray.train.report({"step": step, "exported": cfg.export})


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: VAETrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """lr · (f + (1 - f)(1 + cos(π·step/steps))/2) with f = ``final_lr_fraction``: a constant lr when f = 1.
    DeepSpeed steps it with the optimizer and keeps it in the checkpoint."""
    fraction = cfg.final_lr_fraction

    def factor(step: int) -> float:
        return fraction + (1 - fraction) * 0.5 * (1 + np.cos(np.pi * min(step, cfg.steps) / cfg.steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Held-out PSNR with the VAE in inference mode, then back to training."""
    vae.eval()
    try:
        return reconstruction_psnr(vae, images)
    finally:
        vae.train()


def report_checkpoint(engine, client_state: dict, metrics: dict, tag: str) -> None:
    """Every rank saves its ZeRO shard; Ray merges the folders into one checkpoint (frozen parameters,
    e.g. the encoder when training the decoder only, come from the model folder)."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=tag, client_state=client_state, exclude_frozen_parameters=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def export_vae(cfg: VAETrainConfig, trained: dict[str, torch.Tensor]) -> Path:
    """The starting model folder, copied, with ``vae/`` holding the starting VAE with ``trained`` (fp32,
    names of ``AutoencoderKL``) put in; the run's config goes beside it as ``training.json``."""
    source, export = Path(cfg.model), Path(cfg.export)
    vae = load_vae(source / "vae", read_config(source).vae)
    result = vae.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"trained parameters not in the VAE: {result.unexpected_keys[:10]}")
    staging = export.with_name(export.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("vae", TRAINING_RECORD))
    vae.save_pretrained(staging / "vae", safe_serialization=True)
    (staging / TRAINING_RECORD).write_text(json.dumps(asdict(cfg), indent=2))
    shutil.rmtree(export, ignore_errors=True)
    staging.rename(export)  # the folder appears whole or not at all
    return export


# ---------------------------------------------------------------------------------------- the trainer
def make_vae_trainer(cfg: VAETrainConfig, resources, storage: str, max_failures: int = 3):
    """A ``TorchTrainer`` for one VAE run (``resources``: :class:`pipelines.training.trainer.WorkerResources`);
    rerunning with the same ``run_name`` and ``storage`` resumes from its last checkpoint."""
    from pipelines.training.trainer import absolute, torch_trainer
    from pipelines.training.tracking import tracking_uri

    read_config(cfg.model)  # a clear error here, not in a worker
    cfg = dataclasses.replace(
        cfg, model=absolute(cfg.model), export=absolute(cfg.export),
        dataset=cfg.dataset and absolute(cfg.dataset), images=cfg.images and absolute(cfg.images),
        mlflow_tracking_uri=tracking_uri(cfg.mlflow_tracking_uri),
        extra_params={"gpu": resources.gpu, "global_batch": cfg.batch_size * resources.workers} | cfg.extra_params)
    return torch_trainer(train_loop_per_worker, asdict(cfg), resources, name=f"{cfg.run_name}-{STAGE}",
                         storage=storage, max_failures=max_failures)
