"""The per-worker training loop (Ray Train + DeepSpeed ZeRO-2), as plain functions around the objective.

``train_loop_per_worker`` is what ``TorchTrainer`` runs on every worker: build the trainable modules from
a model folder, wrap them in a DeepSpeed engine (ZeRO-2; bf16 on GPUs, fp32 with gloo on CPUs), stream
single-bucket batches from the preprocessed dataset (:mod:`pipelines.training.data_stream`: files shuffled
per epoch, the data position saved with every checkpoint; the rows decoded by Ray Data, so the loop only
stacks ready tensors), step, and checkpoint (:mod:`pipelines.training.checkpointing`: every
``checkpoint_every`` steps and/or ``checkpoint_minutes``, and just in time on a preemption notice) DeepSpeed's
sharded checkpoint (trainable parameters only) through ``ray.train.report``, uploaded in the background. A checkpoint saved
at another worker count is converted to a DeepSpeed universal checkpoint and re-sharded on load. Rank 0
logs to MLflow under one run that survives restarts and, at the end, exports a consolidated model folder
that ``Colorizer`` loads.

The science lives in :mod:`model.objective` (stage 1) and :mod:`model.plugin` (stage 2); the stages
that wrap them share one interface (:mod:`pipelines.training.stages`), so this loop is the same for both.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.colorizer import Colorizer
from model.config import preset_name
from model.generate import generate_latents
from model.guidance import Guidance
from model.images import tensor_to_image
from model.objective import TrainingBatch
from model.plugin import PluginConfig, attach_plugin
from model.vae import decode_latents
from model.visualize import figure_image, gram_figure, grid, sketch_image
from pipelines.data.batches import BucketBatcher, DecodeSettings, columns_for, decoded_sample
from pipelines.training.checkpointing import CheckpointPolicy, CheckpointSchedule, CheckpointUploads, Decision, agree
from pipelines.training.data_stream import DataPosition, DataStream, ray_data_reader
from pipelines.training.progress import Progress, write_line
from pipelines.training.stages import DEFAULT_PLUGIN_RANK, STAGES, build_stage
from pipelines.training.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, TRAINING_RECORD, Tracker


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; logged to MLflow as its parameters."""

    stage: str
    model: str  # model folder to start from (stage 1: jobs/init_model.py; stage 2: a stage-1 export or an
    # imported checkpoint, with or without plugin/)
    dataset: str  # preprocess output folder
    export: str  # where the consolidated model folder goes at the end
    steps: int = 1000
    batch_size: int = 16  # per worker
    shards: int = 1  # shard files in the dataset; make_trainer reads it from the dataset manifest
    lr: float = 1e-5
    weight_decay: float = 0.01
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = True
    checkpoint_every: int = 100  # steps between checkpoints (0 = by the clock only)
    checkpoint_minutes: float = 0.0  # minutes between checkpoints (0 = by steps only); either trigger fires
    checkpoint_async: bool = True  # upload checkpoints in the background (the last one always synchronously)
    preemption_poll_seconds: float = 10.0  # ask Ray Train for a preemption notice this often (0 = never)
    decode_prefetch_batches: int = 4  # decoded Ray Data batches (of 16 rows) read ahead of the training thread
    sample_every: int = 500  # sample grid + Gram heat maps to MLflow (0 = only at the end)
    log_every: int = 10  # rank 0 prints step i/N, loss, samples/s and the ETA every this many steps
    metrics_every: int = 10  # rank 0 sends the buffered per-step metrics to MLflow every this many steps
    seed: int = 0
    aesthetic_score: float | None = None  # the vector condition's score; None = the model config's sampling one
    plugin_rank: int = DEFAULT_PLUGIN_RANK  # stage 2's background LoRA rank (the published 4)
    gram_weight: float | None = None  # stage 1's λ after the warm-up; None = the model config's (0 = ablation)
    mlflow_tracking_uri: str = DEFAULT_TRACKING_URI
    mlflow_experiment: str = DEFAULT_EXPERIMENT
    run_name: str = "colorize-xl"
    extra_params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if min(self.steps, self.batch_size, self.shards, self.log_every, self.metrics_every) < 1:
            raise ValueError("steps, batch_size, shards, log_every and metrics_every must be positive")
        self.checkpoint_policy()  # refuses negative cadences
        if self.decode_prefetch_batches < 0:
            raise ValueError(f"decode_prefetch_batches must be ≥ 0, got {self.decode_prefetch_batches}")

    def checkpoint_policy(self) -> CheckpointPolicy:
        return CheckpointPolicy(every_steps=self.checkpoint_every, every_minutes=self.checkpoint_minutes,
                                preemption_poll_seconds=self.preemption_poll_seconds, asynchronous=self.checkpoint_async)


CHECKPOINT_TAG = "state"  # DeepSpeed's tag (subfolder) inside every Ray checkpoint


def deepspeed_config(cfg: TrainConfig, on_gpu: bool, load_universal: bool = False) -> dict:
    """``load_universal``: the checkpoint to resume from is a universal one (saved at another worker count
    and converted by :func:`universal_checkpoint`)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": on_gpu,
                              "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
        "bf16": {"enabled": on_gpu},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": load_universal},
    }


# --------------------------------------------------------------------------------------------- loop
def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train

        return torch.device("cuda", ray.train.get_context().get_local_rank())
    return torch.device("cpu")


def batches_forever(rows, batch_size: int):
    """Single-bucket batches from this worker's endless stream of rows that Ray Data has decoded already
    (:func:`pipelines.data.batches.decode_rows`): the training thread only stacks them. The workers read
    their own files, so their epochs need not end together: each takes the batches its rows give, and all
    take one per step."""
    batcher = BucketBatcher(batch_size)
    for row in rows:
        batcher.add(decoded_sample(row))
        while (batch := batcher.pop()) is not None:
            yield batch


def saved_world_size(folder: str) -> int:
    """The data-parallel world size a DeepSpeed ZeRO checkpoint was saved at: one optimizer file per rank."""
    files = glob.glob(os.path.join(folder, CHECKPOINT_TAG, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer states in {folder}/{CHECKPOINT_TAG}: not a checkpoint of this trainer")
    return len(files)


def universal_checkpoint(folder: str, into: Path) -> Path:
    """DeepSpeed's universal form of the checkpoint in ``folder`` (one file per parameter and optimizer
    state, independent of the worker count) in ``into``, which any world size loads with
    ``load_universal``."""
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    shutil.rmtree(into, ignore_errors=True)  # a conversion killed halfway is redone
    to_universal(argparse.Namespace(input_folder=os.path.join(folder, CHECKPOINT_TAG),
                                    output_folder=str(into / CHECKPOINT_TAG), num_extract_workers=1,
                                    num_merge_workers=1, keep_temp_folder=False, strict=True,
                                    inject_missing_state=True))
    return into


@contextlib.contextmanager
def resume_folder(checkpoint, world: int, local_rank: int):
    """The folder to load the checkpoint from, and whether it is universal: the checkpoint itself when it
    was saved at this world size, else its universal conversion, made once per node by local rank 0."""
    import torch.distributed as dist

    if checkpoint is None:
        yield None, False
        return
    with checkpoint.as_directory() as folder:
        saved = saved_world_size(folder)
        if saved == world:
            yield folder, False
            return
        into = Path(tempfile.gettempdir()) / f"colorize-universal-{hashlib.sha1(str(checkpoint.path).encode()).hexdigest()[:16]}"
        if local_rank == 0:
            write_line(f"[train] the checkpoint was saved by {saved} workers, this run has {world}: converting it "
                       f"to a universal checkpoint in {into}")
            universal_checkpoint(folder, into)
        dist.barrier()
        try:
            yield str(into), True
        finally:
            dist.barrier()
            if local_rank == 0:
                shutil.rmtree(into, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed  # heavy, and only needed inside the Ray Train workers
    import ray.train

    cfg = TrainConfig(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed + rank)

    colorizer = Colorizer.from_pretrained(cfg.model, components=("unet", "vae"))  # no frozen encoders: cached
    stage = build_stage(colorizer, cfg.stage, total_steps=cfg.steps, gram_weight=cfg.gram_weight,
                        plugin_rank=cfg.plugin_rank, gradient_checkpointing=cfg.gradient_checkpointing)
    stage.to(device)
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=on_gpu)
    dtype = torch.bfloat16 if on_gpu else torch.float32

    step, run_id, client_state = 0, None, {}
    with resume_folder(ray.train.get_checkpoint(), world, context.get_local_rank()) as (folder, universal):
        engine, _, _, _ = deepspeed.initialize(model=stage, optimizer=optimizer,
                                               config=deepspeed_config(cfg, on_gpu, load_universal=universal))
        if folder:
            # frozen parameters are not in the checkpoint (they come from cfg.model), hence not strict
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_module_strict=False)
    position = DataPosition.from_state(client_state.get("data_position"))
    if client_state:
        step, run_id = int(client_state["step"]), client_state.get("mlflow_run_id")
        if rank == 0:
            progress_ = position.progress(position.epoch)
            write_line(f"[train] resumed from step {step} of {cfg.steps} ({client_state.get('world_size', '?')} workers "
                       f"then, {world} now); data: epoch {position.epoch}, {len(progress_.done)} of {cfg.shards} "
                       f"files done, {progress_.rows_seen()} rows of partly read files skipped")
    tracker = Tracker(cfg, run_id, active=rank == 0, every=cfg.metrics_every,
                      extra_params={"preset": preset_name(colorizer.config)})
    progress = Progress(f"train {cfg.stage}", cfg.steps, every=cfg.log_every, first_step=step, active=rank == 0)

    score = colorizer.config.sampling.aesthetic_score if cfg.aesthetic_score is None else cfg.aesthetic_score
    decode = DecodeSettings(stage=cfg.stage, aesthetic_score=score, seed=cfg.seed)
    stream = DataStream(ray_data_reader(cfg.dataset, columns_for(cfg.stage), decode=decode,
                                        prefetch_batches=cfg.decode_prefetch_batches),
                        shards=cfg.shards, seed=cfg.seed, rank=rank, world=world, position=position)
    batches = batches_forever(stream, cfg.batch_size)
    schedule = CheckpointSchedule(cfg.checkpoint_policy(), cfg.steps, last_step=step)
    uploads, notice_handled = CheckpointUploads(), None
    preview = None
    while step < cfg.steps:
        started = time.perf_counter()
        batch = next(batches).to(device, dtype)
        if preview is None:
            preview = batch
        losses = engine(batch, step)
        engine.backward(losses.loss)
        engine.step()
        step += 1
        if on_gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        metrics = {"loss": losses.loss.item(), "diffusion_loss": losses.diffusion_loss.item(),
                   "gram_loss": losses.gram_loss.item(), "gram_weight": losses.gram_weight,
                   "lr": optimizer.param_groups[0]["lr"], "samples_per_s": cfg.batch_size * world / seconds,
                   "gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else 0.0}
        tracker.metrics(metrics, step)
        progress.update(step, loss=metrics["loss"], samples_per_s=metrics["samples_per_s"])
        if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0:
            log_pictures(tracker, colorizer, preview, step)
        decision = agree(schedule.decide(step, busy=uploads.busy()) if rank == 0 else None, rank, device)
        if decision.poll_preemption:
            notice = ray.train.get_preemption_info()  # a barrier; rank 0's notice on every rank
            if notice is not None and notice != notice_handled:
                notice_handled = notice
                deadline = (f"{notice.deadline_ms / 1000 - time.time():.0f}s" if notice.deadline_ms else "none given")
                if rank == 0:
                    write_line(f"[train] preemption notice: nodes {notice.preempted_node_ids} (ranks "
                               f"{notice.preempted_ranks}), deadline in {deadline}: checkpoint at step {step}")
                decision = Decision(True, True, "preemption")
        if decision.checkpoint:
            tracker.flush()
            asynchronous = cfg.checkpoint_async and decision.reason in ("steps", "minutes")
            blocked = report_checkpoint(engine, step, tracker.run_id, stream, world, metrics | {"step": step},
                                        uploads=uploads, asynchronous=asynchronous)
            schedule.saved(step)
            if rank == 0:
                write_line(f"[train] checkpoint at step {step} ({decision.reason}), "
                           f"{'uploading in the background' if asynchronous else 'uploaded'}; "
                           f"training waited {blocked:.2f}s")

    trained = full_precision_parameters(stage)  # a collective: every rank takes part
    if rank == 0:
        log_pictures(tracker, colorizer, preview, step)
        export_model(cfg, trained)
        tracker.metrics({"exported": 1.0}, step)
        tracker.flush()
        tracker.close()
    ray.train.report({"step": step, "exported": cfg.export})


def report_checkpoint(engine, step: int, run_id: str | None, stream: DataStream, world: int, metrics: dict,
                      uploads: CheckpointUploads | None = None, asynchronous: bool = False) -> float:
    """Every rank saves its ZeRO shard into its own local folder; Ray uploads the folders (in the
    background when ``asynchronous``) and merges them into one checkpoint. Returns the seconds training
    waited (the local save plus, when synchronous, the upload).

    The client state (saved by rank 0) holds the step, the MLflow run, the world size and the data
    position of all workers together. Frozen parameters are left out: they come from the model folder the
    run starts from (in stage 2, nearly the whole U-Net)."""
    import torch.distributed as dist

    started = time.perf_counter()
    uploads = uploads or CheckpointUploads()

    positions = [None] * world
    dist.all_gather_object(positions, stream.position)
    position = DataPosition.merge(positions, stream.shards)
    stream.position.forget_before(position.epoch)
    client_state = {"step": step, "mlflow_run_id": run_id, "world_size": world, "data_position": position.to_state()}
    folder = uploads.folder()
    try:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state=client_state, exclude_frozen_parameters=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    uploads.report(folder, metrics | {"data_epoch": position.epoch}, asynchronous)
    return time.perf_counter() - started


@torch.no_grad()
def log_pictures(tracker: Tracker, colorizer, batch: TrainingBatch, step: int, count: int = 2) -> None:
    """Sample grid and Gram heat maps for the preview batch, each labeled so it reads on its own in MLflow.

    Grid columns: the sketch; the reference it is colorized with, which is the previous sample's (the
    contexts are rolled by one, as the misaligned branch rolls them; shown as that sample's decoded
    truth, the picture the reference was taken from); the output; the sample's own decoded truth. Gram
    figure: for each sample and Gram layer, the query token's similarity map in the aligned and the
    misaligned branch at t = 500, next to the sketch with the query marked."""
    if not tracker.active or batch is None:
        return

    was_training = colorizer.unet.training
    colorizer.unet.eval()
    count = min(count, batch.latents.shape[0])
    vae_device = next(colorizer.vae.parameters()).device
    try:
        context = colorizer.projector(batch.clip_tokens[:count], batch.tagger_tokens[:count])
        rolled = torch.roll(context, 1, 0)
        latents = generate_latents(colorizer.unet, colorizer.sketch_encoder, colorizer.config, context=rolled,
                                   sketch=batch.sketch[:count], vector=batch.vector_condition[:count],
                                   seeds=list(range(count)), steps=colorizer.config.sampling.steps,
                                   guidance=Guidance(colorizer.config.sampling.reference_guidance, 1.0))
        outputs = tensor_to_image(decode_latents(colorizer.vae, latents.to(vae_device)))
        truth = tensor_to_image(decode_latents(colorizer.vae, batch.latents[:count].to(vae_device)))
        rolled_truth = truth[-1:] + truth[:-1]
        sketches = [sketch_image(batch.sketch[i]) for i in range(count)]
        rows = [[sketches[i], rolled_truth[i], outputs[i], truth[i]] for i in range(count)]
        titles = ["sketch", "reference: previous sample's truth", "output (sketch + that reference)",
                  "ground truth"]
        tracker.image(grid(rows, titles=titles), f"samples/step_{step:07d}.png")

        timestep = 500
        t = torch.full((count,), timestep, device=batch.latents.device)
        residuals = colorizer.sketch_encoder(batch.sketch[:count])
        out = colorizer.unet(batch.latents[:count], t, context, batch.vector_condition[:count], residuals,
                             misaligned_context=rolled)
        figure = gram_figure(out.aligned_features, out.misaligned_features, sketches=sketches, timestep=timestep)
        tracker.image(figure_image(figure), f"gram/step_{step:07d}.png")
    finally:
        colorizer.unet.train(was_training)


def full_precision_parameters(stage: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters in fp32, assembled from DeepSpeed's partitioned master copies (under bf16 the
    module itself holds only bf16 values)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, parameter in stage.named_parameters():
        if parameter.requires_grad:
            value = safe_get_full_fp32_param(parameter)
            full[name] = (value if value is not None else parameter).detach().float().cpu()
    return full


def export_model(cfg: TrainConfig, trained: dict[str, torch.Tensor]) -> Path:
    """Consolidated model folder: the starting folder (fp32) with the trained parameters replaced, so
    frozen weights leave exactly as they came in."""
    final = Colorizer.from_pretrained(cfg.model)
    if cfg.stage == "plugin" and final.plugin is None:
        # as training started: the ReferenceNet copied from the denoiser, so its few parameters that never
        # train (the frozen tail after the last bank layer) leave as they started
        attach_plugin(final, PluginConfig(lora_rank=cfg.plugin_rank))
    result = final.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"trained parameters not in the model: {result.unexpected_keys[:10]}")
    folder = final.save_pretrained(cfg.export)
    (Path(folder) / TRAINING_RECORD).write_text(json.dumps(asdict(cfg), indent=2))
    return Path(folder)


def local_rank_environment() -> dict:
    """Environment fixes DeepSpeed needs on some images: its op builder cannot parse an arch list that ends
    in an architecture-specific suffix such as ``9.0a``, so the suffix is dropped for the workers."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    return {"TORCH_CUDA_ARCH_LIST": arch.replace("a", "")} if arch.endswith("a") else {}
