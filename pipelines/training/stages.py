"""The two training stages as modules that DeepSpeed wraps, behind one interface.

Each stage is an ``nn.Module`` whose attribute names mirror :class:`model.colorizer.Colorizer`'s, so its
parameter names are the exported model's, and whose ``forward(batch, step)`` returns the step's
:class:`model.objective.StepLosses`. What differs between the stages (stage 1's λ schedule for the Gram
loss; stage 2's frozen backbone, ReferenceNet and background LoRA) lives inside them, so the loop never asks which stage it runs.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

from torch import nn

from model.colorizer import Colorizer
from model.config import DiffusionConfig
from model.objective import STAGES, StepLosses, TrainingBatch, gram_weight_at, training_step
from model.plugin import PluginConfig, attach_plugin, plugin_training_step, prepare_stage2


class TrainingStage(nn.Module):
    """The parts of a :class:`Colorizer` both stages run, under the colorizer's own names."""

    def __init__(self, colorizer: Colorizer):
        super().__init__()
        self.unet = colorizer.unet
        self.sketch_encoder = colorizer.sketch_encoder
        self.projector = colorizer.projector
        self.noise_scheduler = colorizer.noise_scheduler
        self.diffusion: DiffusionConfig = colorizer.config.diffusion

    @abstractmethod
    def forward(self, batch: TrainingBatch, step: int, generator=None) -> StepLosses:
        """The losses of optimizer step ``step`` (0-based) on ``batch``."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this stage trains; every other one is frozen by :func:`build_stage`."""


class BackboneStage(TrainingStage):
    """Stage 1: the U-Net, sketch encoder and projector train; each step is the dual-branch step with λ
    from the schedule (0 during the warm-up, then ``gram_weight``: the config's unless overridden)."""

    def __init__(self, colorizer: Colorizer, total_steps: int, gram_weight: float | None = None):
        super().__init__(colorizer)
        self.total_steps = total_steps
        if gram_weight is not None:
            self.diffusion = dataclasses.replace(self.diffusion, gram_weight=gram_weight)

    def forward(self, batch: TrainingBatch, step: int, generator=None) -> StepLosses:
        weight = gram_weight_at(step, self.total_steps, self.diffusion)
        return training_step(self, batch, self.noise_scheduler, self.diffusion, gram_weight=weight,
                             generator=generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.unet, self.sketch_encoder, self.projector) for p in m.parameters()]


DEFAULT_PLUGIN_RANK = PluginConfig().lora_rank  # the published background LoRA's rank (4)


class PluginStage(TrainingStage):
    """Stage 2 as published: the ReferenceNet and the background LoRA (every denoiser cross-attention's
    ``to_q``/``to_k``/``to_v``) train; everything else (U-Net, sketch encoder, projector) is frozen.

    A model without a plug-in gets a fresh one (ReferenceNet copied from the denoiser, LoRA of ``rank``); a
    model that has one (an imported ``xlv2`` checkpoint, an earlier stage-2 export) trains it further, and
    ``rank`` must then be its LoRA rank."""

    def __init__(self, colorizer: Colorizer, rank: int = DEFAULT_PLUGIN_RANK):
        if colorizer.plugin is None:
            attach_plugin(colorizer, PluginConfig(lora_rank=rank))
        elif colorizer.plugin.config.lora_rank != rank:
            raise ValueError(f"the model's plug-in has a background LoRA of rank {colorizer.plugin.config.lora_rank}, "
                             f"not the requested {rank}: train it with --plugin-rank "
                             f"{colorizer.plugin.config.lora_rank}, or start from a model folder without plugin/")
        trainable = prepare_stage2(colorizer)
        super().__init__(colorizer)
        self._trainable = trainable
        self.plugin = colorizer.plugin

    def forward(self, batch: TrainingBatch, step: int, generator=None) -> StepLosses:
        return plugin_training_step(self, self.plugin, batch, self.noise_scheduler, self.diffusion, generator=generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable)


def build_stage(colorizer: Colorizer, stage: str, *, total_steps: int, gram_weight: float | None = None,
                plugin_rank: int = DEFAULT_PLUGIN_RANK, gradient_checkpointing: bool = True) -> TrainingStage:
    """The module DeepSpeed wraps, with ``requires_grad`` set on exactly its trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    module = (BackboneStage(colorizer, total_steps, gram_weight) if stage == "backbone"
              else PluginStage(colorizer, rank=plugin_rank))
    trainable = {id(p) for p in module.trainable_parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in trainable)
    if gradient_checkpointing:
        colorizer.unet.unet.enable_gradient_checkpointing()
    return module
