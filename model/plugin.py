"""The stage-2 plug-in of the published model (ColorizeDiffusionXL ``xlv2``): a ReferenceNet that shows the
denoiser's decoder what the background should look like, and the background LoRA of the denoiser's
cross-attentions; and the objective that trains them.

The ReferenceNet is the denoiser's U-Net architecture (diffusers, built from the same :class:`UNetConfig`)
without cross-attention and without the layers after its last decoder self-attention. It reads six
channels at the latent grid: the VAE latent of the *background* reference (the reference with its
foreground painted white, or a separate background picture), the sketch's foreground mask and the
reference's. Its add-embedding takes four sinusoids (``vector_embed_dim`` each) of the crop
``[top, left, height, width]`` that places the output inside the background picture (1024 inputs at
``sdxl``). It runs once per generation at t = 0, and the inputs of its decoder self-attentions (after
``norm1``) form the *bank*: :mod:`model.split_attention` lets the denoiser's background queries attend to it.

The background LoRA (rank 4 at ``sdxl``) sits on ``to_q``, ``to_k`` and ``to_v`` of every denoiser
cross-attention and is active, for all tokens, whenever the plug-in is.

Stage 2 trains exactly these two (:func:`prepare_stage2`); everything else is frozen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from model import pretrained
from model.config import DiffusionConfig, UNetConfig
from model.objective import StepLosses, TrainingBatch, noise_and_dropout
from model.split_attention import (add_background_lora, decoder_self_attention_names, lora_modules,
                                   lora_parameters, split_attention_kwargs)
from model.unet import unet_kwargs

MASK_CHANNELS = 2  # sketch foreground, reference foreground
CROP_VALUES = 4  # top, left, height, width of the output inside the background picture
PLUGIN_FORMAT = 2  # 1: the pre-publication design (zeroed latents, key/value adapters); refused


@dataclass(frozen=True)
class PluginConfig:
    """Sizes of the plug-in. ``lora_rank``: rank of the background LoRA (4 in the published model).
    ``threshold_range``: stage 2 draws each sample's sketch-mask threshold from it (see
    :func:`plugin_training_step`)."""

    lora_rank: int = 4
    threshold_range: tuple[float, float] = (0.01, 0.99)
    format: int = PLUGIN_FORMAT

    def __post_init__(self):
        object.__setattr__(self, "threshold_range", tuple(float(t) for t in self.threshold_range))
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        low, high = self.threshold_range
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"threshold_range must satisfy 0 <= low <= high < 1, got {self.threshold_range}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PluginConfig:
        if data.get("format") != PLUGIN_FORMAT:
            raise ValueError(
                f"this plug-in was saved in format {data.get('format', 1)}; this code reads format {PLUGIN_FORMAT}, "
                "the published design (ReferenceNet + background LoRA). Train stage 2 again, or import an xlv2 "
                "checkpoint with jobs/import_checkpoint.py")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise ValueError(f"plugin config has unknown keys {sorted(set(data) - known)}; expected {sorted(known)}")
        return cls(**data)


def reference_net_kwargs(unet_config: UNetConfig) -> dict:
    """Constructor arguments of the ReferenceNet's ``UNet2DConditionModel`` (before :func:`_strip`)."""
    kwargs = unet_kwargs(unet_config)
    return {**kwargs, "in_channels": kwargs["in_channels"] + MASK_CHANNELS,
            "projection_class_embeddings_input_dim": CROP_VALUES * unet_config.vector_embed_dim}


class ReferenceNet(nn.Module):
    """Background latent + masks + crop → the bank {decoder self-attention name: (B, N, C)}."""

    def __init__(self, unet_config: UNetConfig):
        super().__init__()
        self.unet = UNet2DConditionModel(**reference_net_kwargs(unet_config))
        self.layer_names = decoder_self_attention_names(self.unet)
        dead = {id(p) for p in _strip(self.unet, self.layer_names[-1])}
        self._dead_names = {name for name, p in self.named_parameters() if id(p) in dead}
        self._bank: dict[str, torch.Tensor] | None = None
        for name in self.layer_names:
            block = self.unet.get_submodule(name.removesuffix(".attn1"))
            block.norm1.register_forward_hook(self._capture(name))  # attn1's input is norm1's output

    def _capture(self, name: str):
        def hook(module, args, output):
            if self._bank is not None:  # only inside forward, not in checkpoint recomputation
                self._bank[name] = output
        return hook

    @torch.no_grad()
    def copy_denoiser(self, denoiser: UNet2DConditionModel) -> ReferenceNet:
        """Start from the denoiser's weights: the mask channels of ``conv_in`` and the crop embedding's input
        weights start at zero (so at start it reads the latent as the denoiser does, and the crop is learnt)."""
        source = denoiser.state_dict()
        for key, tensor in self.unet.state_dict().items():
            if key == "conv_in.weight":
                tensor.zero_()
                tensor[:, : source[key].shape[1]].copy_(source[key])
            elif key == "add_embedding.linear_1.weight":
                tensor.zero_()
            else:
                tensor.copy_(source[key])
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that can reach the bank (the frozen tail of :func:`_strip` cannot)."""
        return [p for name, p in self.named_parameters() if name not in self._dead_names]

    def forward(self, background_latents: torch.Tensor, sketch_mask: torch.Tensor, reference_mask: torch.Tensor,
                crop: torch.Tensor) -> dict[str, torch.Tensor]:
        """``background_latents`` (B, C, h, w); ``sketch_mask``, ``reference_mask`` (B, 1, h, w) at the latent
        grid (see :func:`model.background.latent_mask`); ``crop`` (B, 4). Returns the bank."""
        net = self.unet
        dtype = background_latents.dtype
        x = torch.cat([background_latents, sketch_mask.to(dtype), reference_mask.to(dtype)], dim=1)
        timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        emb = net.time_embedding(net.get_time_embed(x, timesteps))
        added = {"text_embeds": x.new_zeros(x.shape[0], 0), "time_ids": crop.to(dtype)}
        emb = emb + net.get_aug_embed(emb, None, added)
        self._bank = {}
        try:
            h = net.conv_in(x)
            skips = [h]
            for block in net.down_blocks:
                h, res = block(h, temb=emb)
                skips.extend(res)
            h = net.mid_block(h, emb)
            for block in net.up_blocks:
                n = len(block.resnets)
                res, skips = tuple(skips[-n:]), skips[:-n]
                h = block(h, temb=emb, res_hidden_states_tuple=res)
            return self._bank
        finally:
            self._bank = None


def _strip(net: UNet2DConditionModel, last_layer: str) -> list[nn.Parameter]:
    """Remove what the ReferenceNet never uses and the published file does not hold: cross-attention, the
    decoder blocks after the last bank layer, that block's upsampler and the output head. The last bank
    block's own attention/feed-forward and its transformer's output projection are in the published file
    and still run (diffusers runs whole blocks) but cannot reach the bank: their parameters are frozen and
    returned, so trainers (and DDP) never see parameters without gradients."""
    for module in net.modules():
        if getattr(module, "attn2", None) is not None:
            module.attn2, module.norm2 = None, None
    last_block = int(last_layer.split(".")[1])
    net.up_blocks = nn.ModuleList(list(net.up_blocks)[: last_block + 1])
    net.up_blocks[-1].upsamplers = None
    net.conv_norm_out, net.conv_act, net.conv_out = None, None, None
    transformer = net.up_blocks[-1].attentions[-1]
    dead = [transformer.proj_out, transformer.transformer_blocks[-1].attn1,
            transformer.transformer_blocks[-1].ff, transformer.transformer_blocks[-1].norm3]
    for module in dead:
        module.requires_grad_(False)
    return [p for module in dead for p in module.parameters()]


class Plugin(nn.Module):
    """The plug-in as one module: ``reference_net`` and its config; the LoRA lives in the denoiser's
    processors (:func:`model.split_attention.install_split_attention`)."""

    def __init__(self, unet_config: UNetConfig, config: PluginConfig | None = None):
        super().__init__()
        self.config = config or PluginConfig()
        self.reference_net = ReferenceNet(unet_config)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.reference_net(*args, **kwargs)


def attach_plugin(model, config: PluginConfig | None = None, *, copy_denoiser: bool = True) -> Plugin:
    """Give a :class:`model.colorizer.Colorizer` its plug-in and install split attention (with the background
    LoRA) on its denoiser. ``copy_denoiser=False`` skips the weight copy (weights are about to be loaded)."""
    if getattr(model, "plugin", None) is not None:
        raise ValueError("this model already has a plugin")
    plugin = Plugin(model.config.unet, config)
    denoiser = model.unet.unet
    if copy_denoiser:
        plugin.reference_net.copy_denoiser(denoiser)
    add_background_lora(denoiser, plugin.config.lora_rank)
    model.plugin = plugin.to(device=model.device, dtype=model.dtype)
    return plugin


def prepare_stage2(model) -> list[nn.Parameter]:
    """Freeze everything but the ReferenceNet and the background LoRA; return those parameters."""
    if getattr(model, "plugin", None) is None:
        raise ValueError("stage 2 needs a model with a plugin (see attach_plugin)")
    model.requires_grad_(False)
    trainable = model.plugin.reference_net.trainable_parameters() + lora_parameters(model.unet.unet)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


def plugin_training_step(model, plugin: Plugin, batch: TrainingBatch, scheduler: DDPMScheduler,
                         cfg: DiffusionConfig, generator: torch.Generator | None = None) -> StepLosses:
    """Losses of one stage-2 step, as the published trainer computes them: stage 1's v-prediction loss
    (offset noise, reference and sketch dropout drawn in the same order) with the bank, the soft split
    cross-attention over ``[reference ‖ background reference]`` and the background LoRA active.

    Per sample a sketch-mask threshold is drawn from ``plugin.config.threshold_range``, and the sketch's
    lines outside the mask at that threshold are erased, so the model learns to draw the background from the
    bank. The ReferenceNet reads the sketch mask nearest-neighbour at the latent grid and the reference mask
    bicubically; the attention reads the sketch mask bicubically (the published trainer's conventions).

    The batch must carry the background latents and tokens (the reference with its foreground whitened, as
    preprocessing caches them), the crop and both masks. The sketch encoder and the projector are frozen in
    stage 2, so they run without building a graph; gradients reach the ReferenceNet and the LoRA.
    Published-trainer draws left out: the whitening threshold of the reference mask is fixed by the cache
    (0.5), and there is no white-background "bleaching" of the target (its latents are cached).
    """
    needed = ("background_latents", "background_clip_tokens", "background_tagger_tokens", "crop", "sketch_mask",
              "reference_mask")
    missing = [f for f in needed if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"a stage-2 batch needs {missing}; preprocess with the stage-2 columns "
                         "(--latent-views target,background)")
    low, high = plugin.config.threshold_range
    device = batch.latents.device
    draw = torch.rand(batch.latents.shape[0], generator=generator, device=device)
    thresholds = (low + (high - low) * draw)[:, None, None, None]
    sketch_mask = batch.sketch_mask.float()
    erased = dataclasses.replace(batch, sketch=torch.where(
        F.interpolate(sketch_mask, size=batch.sketch.shape[-2:], mode="nearest") > thresholds,
        batch.sketch, torch.full_like(batch.sketch, -1.0)))
    drawn = noise_and_dropout(erased, scheduler, cfg, generator)
    with torch.no_grad():
        residuals = model.sketch_encoder(drawn.sketch)
        context = torch.cat([model.projector(batch.clip_tokens, batch.tagger_tokens),
                             model.projector(batch.background_clip_tokens, batch.background_tagger_tokens)], dim=1)
        context = context * drawn.keep_reference
    latent_size = tuple(batch.latents.shape[-2:])
    bank = plugin(batch.background_latents,
                  F.interpolate(sketch_mask, size=latent_size, mode="nearest"),
                  F.interpolate(batch.reference_mask.float(), size=latent_size, mode="bicubic"),
                  batch.crop)
    kwargs = split_attention_kwargs(F.interpolate(sketch_mask, size=latent_size, mode="bicubic"), blend=True,
                                    bank=bank, background_lora=True)
    out = model.unet(drawn.noisy, drawn.timesteps, context, batch.vector_condition, residuals,
                     cross_attention_kwargs=kwargs)
    diffusion = F.mse_loss(out.prediction.float(), drawn.target.float())
    return StepLosses(loss=diffusion, diffusion_loss=diffusion, gram_loss=diffusion.new_zeros(()), gram_weight=0.0)


def _weights_view(model) -> nn.Module:
    """The plugin folder's tensors as one module: ``reference_net.*`` (the ReferenceNet's U-Net) and
    ``background_lora.<layer>.to_{q,k,v}.{down,up}.weight`` (the LoRA, which lives in the denoiser)."""
    view = nn.Module()
    view.reference_net = model.plugin.reference_net.unet
    view.background_lora = lora_modules(model.unet.unet)
    return view


def save_plugin(model, folder: str | Path) -> Path:
    """Write ``config.json`` (the :class:`PluginConfig`) and ``model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _weights_view(model).state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.plugin.config.to_dict(), indent=2))
    return folder


def load_plugin(model, folder: str | Path) -> Plugin:
    """Attach a saved plug-in (and its LoRA) to ``model``; strict, errors name the file."""
    folder = Path(folder)
    config = PluginConfig.from_dict(json.loads((folder / "config.json").read_text()))
    plugin = attach_plugin(model, config, copy_denoiser=False)
    path = folder / "model.safetensors"
    pretrained.check_and_load(_weights_view(model), pretrained.read_state_dict(path), path)
    return plugin


def plugin_state_keys(model) -> list[str]:
    """The keys of a plug-in file for ``model`` (for importers)."""
    return list(_weights_view(model).state_dict())
