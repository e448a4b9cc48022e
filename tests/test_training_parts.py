"""The training package's parts without Ray: the two stages behind one interface, the progress lines,
the dataset manifest check and the shared job flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from model.colorizer import Colorizer
from model.objective import TrainingBatch
from model.plugin import PluginConfig, attach_plugin
from pipelines.training.progress import Progress, format_seconds
from pipelines.training.stages import BackboneStage, PluginStage, build_stage
from test_model_parts import make_batch


def make_stage2_batch(model, batch=2, width=64, height=96, seed=0) -> TrainingBatch:
    """A stage-2 batch as the dataset decodes it: the background picture's latents and tokens, the crop, a
    soft sketch mask and a binary reference mask."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    images = torch.rand(2 * batch, 3, height, width, generator=g)
    with torch.no_grad():
        tagger_tokens, clip_tokens = model.tagger(images).tokens, model.clip(images)
    latent = (batch, cfg.unet.latent_channels, height // cfg.latent_stride, width // cfg.latent_stride)
    sketch_mask, reference_mask = torch.zeros(batch, 1, height, width), torch.zeros(batch, 1, height, width)
    sketch_mask[..., : width // 2], reference_mask[..., : height // 2, :] = 0.8, 1
    return TrainingBatch(latents=torch.randn(latent, generator=g), sketch=torch.rand(batch, 1, height, width, generator=g) * 2 - 1,
                         clip_tokens=clip_tokens[:batch], tagger_tokens=tagger_tokens[:batch],
                         vector_condition=torch.tensor([[float(width), 7.0]] * batch),
                         background_latents=torch.randn(latent, generator=g), background_clip_tokens=clip_tokens[batch:],
                         background_tagger_tokens=tagger_tokens[batch:],
                         crop=torch.tensor([[0.05, 0.0, 0.9, 1.0]] * batch), sketch_mask=sketch_mask,
                         reference_mask=reference_mask)


@pytest.fixture()
def fresh_colorizer(tiny_config):
    torch.manual_seed(0)
    return Colorizer.from_config(tiny_config)


def test_both_stages_step_with_the_same_call_and_the_backbone_owns_the_gram_schedule(tiny_colorizer):
    backbone = build_stage(copy.deepcopy(tiny_colorizer), "backbone", total_steps=9, gradient_checkpointing=False)
    assert isinstance(backbone, BackboneStage)
    batch = make_batch(tiny_colorizer)
    generator = torch.Generator().manual_seed(0)
    warm_up = backbone(batch, 0, generator=generator)
    after = backbone(batch, 8, generator=torch.Generator().manual_seed(0))
    assert warm_up.gram_weight == 0.0 and warm_up.gram_loss.item() == 0.0  # λ = 0 for the first third
    assert after.gram_weight == tiny_colorizer.config.diffusion.gram_weight and after.gram_loss.item() > 0

    ablation = build_stage(copy.deepcopy(tiny_colorizer), "backbone", total_steps=9, gram_weight=0.0,
                           gradient_checkpointing=False)
    assert ablation(batch, 8, generator=torch.Generator().manual_seed(0)).gram_weight == 0.0

    plugin = build_stage(copy.deepcopy(tiny_colorizer), "plugin", total_steps=9, plugin_rank=4,
                         gradient_checkpointing=False)
    assert isinstance(plugin, PluginStage)
    losses = plugin(make_stage2_batch(tiny_colorizer), 8, generator=torch.Generator().manual_seed(0))
    assert losses.gram_weight == 0.0 and torch.isfinite(losses.loss)


def test_only_the_stages_trainable_parameters_require_gradients(tiny_colorizer):
    plugin = build_stage(copy.deepcopy(tiny_colorizer), "plugin", total_steps=1, plugin_rank=4,
                         gradient_checkpointing=False)
    trainable = {id(p) for p in plugin.trainable_parameters()}
    assert trainable and all(p.requires_grad == (id(p) in trainable) for p in plugin.parameters())
    assert not any(p.requires_grad for p in plugin.unet.parameters() if id(p) not in trainable)
    with pytest.raises(ValueError, match="stage must be one of"):
        build_stage(tiny_colorizer, "vae", total_steps=1)


def test_progress_prints_on_its_cadence_and_the_last_step_with_an_eta():
    now = [100.0]
    lines = []
    progress = Progress("train backbone", 25, every=10, clock=lambda: now[0], out=lambda text, flush: lines.append(text))
    for step in range(1, 26):
        now[0] += 2.0  # two seconds a step
        progress.update(step, loss=0.123456, samples_per_s=4.0)
    assert len(lines) == 3  # steps 10, 20 and the last one
    assert lines[0] == ("[train backbone] step 10/25 (40%) | loss 0.1235 | samples/s 4 | elapsed 20s | ETA 30s")
    assert lines[-1].startswith("[train backbone] step 25/25 (100%)") and lines[-1].endswith("ETA 0s")


def test_progress_after_a_resume_times_only_the_steps_it_ran():
    now = [0.0]
    progress = Progress("train", 1000, every=1, first_step=900, clock=lambda: now[0], out=lambda *a, **k: None)
    now[0] = 50.0
    assert progress.line(950).endswith("elapsed 50s | ETA 50s")  # 50 steps in 50 s since the resume
    assert progress.update(950) is not None and Progress("x", 10, active=False).update(10) is None


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (75, "1m15s"), (3725, "1h02m")])
def test_durations_read_the_way_people_write_them(seconds, text):
    assert format_seconds(seconds) == text


def test_an_unfinished_dataset_is_refused_with_its_progress(tmp_path):
    from pipelines.data.layout import MANIFEST_FILE, SCHEMA_VERSION, finished_manifest

    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        finished_manifest(str(tmp_path))
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "complete": False,
                                                      "shards_done": 2, "shards": 5}))
    with pytest.raises(ValueError, match="2/5 shards"):
        finished_manifest(str(tmp_path))


def test_job_flags_parse_sizes_and_pairs_and_turn_expected_failures_into_one_line():
    import argparse

    from jobs import flags

    assert flags.parse_size("1024") == (1024, 1024) and flags.parse_size("1152x896") == (1152, 896)
    for bad in ("0", "12x", "axb", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="size must be N or WxH"):
            flags.parse_size(bad)
    assert flags.parse_pairs(["a=x", "b=y=z"]) == {"a": "x", "b": "y=z"}
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
        flags.parse_pairs(["nothing"])
    with pytest.raises(SystemExit, match="^train: no such dataset$"):
        with flags.job_errors("train"):
            raise FileNotFoundError("no such dataset")
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with flags.job_errors("train"):
            raise KeyError("bug")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_stage2_step_moves_only_the_reference_net_and_the_background_lora(tiny_colorizer, checkpointing):
    """The published trainable set: every parameter of the ReferenceNet that can reach the bank, and the
    LoRA on every denoiser cross-attention; everything else (U-Net, sketch encoder, projector, the
    ReferenceNet's frozen tail) stays bit-identical through optimizer steps."""
    model = copy.deepcopy(tiny_colorizer)
    stage = build_stage(model, "plugin", total_steps=2, gradient_checkpointing=checkpointing)
    assert model.plugin.config.lora_rank == 4  # the published rank by default
    stage.train()
    trainable = {id(p) for p in stage.trainable_parameters()}
    names = {n for n, p in stage.named_parameters() if id(p) in trainable}
    reference_net = {n for n in names if n.startswith("plugin.reference_net.")}
    lora = {n for n in names if ".attn2.processor." in n}
    assert names == reference_net | lora and reference_net and lora
    assert all(any(f".to_{x}." in n for n in lora) for x in "qkv")
    assert {id(p) for p in model.plugin.reference_net.trainable_parameters()} <= trainable

    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    optimizer = torch.optim.AdamW(stage.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    batch, generator = make_stage2_batch(tiny_colorizer), torch.Generator().manual_seed(0)
    for step in range(2):
        losses = stage(batch, step, generator=generator)
        assert losses.gram_weight == 0.0 and torch.isfinite(losses.loss)
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
    after = dict(stage.named_parameters())
    frozen = [n for n in before if n not in names]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(n.startswith("plugin.") for n in frozen)  # the ReferenceNet's tail after the last bank layer
    for group in (reference_net, lora):
        assert any(not torch.equal(before[n], after[n]) for n in group)
    for x in "qkv":  # the LoRA of every projection learns
        assert any(not torch.equal(before[n], after[n]) for n in lora if f".to_{x}.up." in n)


def test_stage2_trains_an_existing_plugin_at_its_own_rank(tiny_colorizer):
    """A model folder with plugin/ (an imported xlv2, an earlier stage-2 export) keeps its plug-in."""
    model = copy.deepcopy(tiny_colorizer)
    plugin = attach_plugin(model, PluginConfig(lora_rank=2))
    stage = build_stage(model, "plugin", total_steps=1, plugin_rank=2, gradient_checkpointing=False)
    assert stage.plugin is plugin and model.plugin is plugin
    other = copy.deepcopy(tiny_colorizer)
    attach_plugin(other, PluginConfig(lora_rank=2))
    with pytest.raises(ValueError, match="rank 2, not the requested 4: train it with --plugin-rank 2"):
        build_stage(other, "plugin", total_steps=1, gradient_checkpointing=False)


def test_mlflow_metrics_leave_in_batches_every_n_steps_and_every_step_keeps_its_point(tmp_path):
    """Rank 0's tracker buffers the per-step metrics and sends them every ``every`` steps without waiting;
    a flush (checkpoints, the end) waits until the store holds them all."""
    import mlflow

    from pipelines.training.loop import TrainConfig
    from pipelines.training.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig(stage="backbone", model="m", dataset="d", export=str(tmp_path / "export"), mlflow_tracking_uri=uri)
    tracker = Tracker(cfg, None, active=True, every=10)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        for step in range(1, 10):
            tracker.metrics({"loss": 1.0 / step}, step)
        assert client.get_metric_history(tracker.run_id, "loss") == []  # nothing sent before step 10
        assert len(tracker.buffered) == 9 and not tracker.sent
        for step in range(10, 13):
            tracker.metrics({"loss": 1.0 / step}, step)
        assert len(tracker.sent) == 1 and len(tracker.buffered) == 2  # steps 1-10 left as one batch
        tracker.flush()
        history = client.get_metric_history(tracker.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 13))
        assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    finally:
        tracker.close()
    with pytest.raises(ValueError, match="every must be positive"):
        Tracker(cfg, None, active=False, every=0)


def test_checkpoints_fire_by_steps_or_by_the_clock_and_wait_for_a_running_upload():
    """Rank 0's schedule on a fake clock: whichever cadence comes first, counted from the last checkpoint
    of any kind; a due checkpoint waits while the previous upload runs (but the last step never does);
    the preemption poll has its own clock."""
    from pipelines.training.checkpointing import CheckpointPolicy, CheckpointSchedule, Decision

    now = [0.0]
    schedule = CheckpointSchedule(CheckpointPolicy(every_steps=5, every_minutes=1.0, preemption_poll_seconds=10),
                                  total_steps=100, last_step=3, clock=lambda: now[0])
    fired = {}
    for step in range(4, 30):
        now[0] += 7.0  # 7 s a step: the clock (60 s) comes first at step 12, steps (5 since) first otherwise
        decision = schedule.decide(step, busy=step == 8)
        if decision.checkpoint:
            fired[step] = decision.reason
            schedule.saved(step)
    assert fired == {9: "steps", 14: "steps", 19: "steps", 24: "steps", 29: "steps"}  # 8 was due but busy

    clock_only = CheckpointSchedule(CheckpointPolicy(every_steps=0, every_minutes=0.5, preemption_poll_seconds=0),
                                    total_steps=10, clock=lambda: now[0])
    decisions = []
    for step in range(1, 11):
        now[0] += 11.0
        decisions.append(clock_only.decide(step, busy=True))
        if decisions[-1].checkpoint:
            clock_only.saved(step)
    assert [d.checkpoint for d in decisions] == [False] * 9 + [True]  # busy throughout; the last step still saves
    assert decisions[-1].reason == "last" and not any(d.poll_preemption for d in decisions)
    now[0] += 29.0
    assert not clock_only.decide(3).checkpoint
    now[0] += 1.0
    assert clock_only.decide(4) == Decision(True, False, "minutes")  # by the clock once idle, 30 s after the last
    polls = [CheckpointSchedule(CheckpointPolicy(every_steps=0, preemption_poll_seconds=10), 100,
                                clock=lambda: now[0])]
    pattern = []
    for _ in range(6):
        now[0] += 4.0
        pattern.append(polls[0].decide(1).poll_preemption)
    assert pattern == [False, False, True, False, False, True]
    assert Decision.decode(Decision(True, False, "minutes").encode()) == Decision(True, False, "minutes")
    with pytest.raises(ValueError, match="must be ≥ 0"):
        CheckpointPolicy(every_minutes=-1)


def test_workers_that_would_leave_no_cpu_for_their_data_stream_are_refused():
    from pipelines.training.trainer import WorkerResources, check_cpus_left_for_data

    with pytest.raises(ValueError, match="wait for data forever"):
        check_cpus_left_for_data(WorkerResources(workers=1, cpus_per_worker=2), cluster_cpus=2)
    with pytest.raises(ValueError, match="2 worker"):
        check_cpus_left_for_data(WorkerResources(workers=2, cpus_per_worker=1.5), cluster_cpus=3.5)
    check_cpus_left_for_data(WorkerResources(workers=1, cpus_per_worker=1), cluster_cpus=2)  # one CPU left
    check_cpus_left_for_data(WorkerResources(workers=2, cpus_per_worker=0.5), cluster_cpus=2)  # the demo's
    check_cpus_left_for_data(WorkerResources(workers=8, cpus_per_worker=8), cluster_cpus=4)  # autoscaling: Ray's call
