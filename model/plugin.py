"""The stage-2 plugin: a reference-net that shows the denoiser's decoder what the reference's background
looks like, and the objective that trains it.

The reference-net is the denoiser's own U-Net architecture (diffusers, built from the same
:class:`UNetConfig`) and starts as a copy of its weights, minus what it cannot use: cross-attention is
removed (it sees no context) and the layers after its last decoder self-attention are dropped. Its
``conv_in`` also takes the sketch's and the reference's foreground masks (two extra input channels,
zero-initialized, so at start it reads the latent exactly as the denoiser does). It reads the
*background* latent of the reference (the latent with the reference's foreground zeroed), runs once per
generation at t = 0, and returns the inputs of its decoder self-attention layers as tokens, keyed by the
denoiser's layer names; :mod:`model.split_attention` offers them to the denoiser's decoder
self-attention.

Stage 2 trains only this network and the split-attention adapters; :func:`prepare_stage2` freezes the rest.
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
from model.images import to_rgb_array
from model.objective import StepLosses, TrainingBatch, noise_and_dropout
from model.split_attention import (adapter_modules, adapter_parameters, decoder_self_attention_names,
                                   install_split_attention, split_attention_kwargs)
from model.unet import unet_kwargs
from model.vae import encode_latents

MASK_CHANNELS = 2  # sketch foreground, reference foreground


@dataclass(frozen=True)
class PluginConfig:
    """Sizes and defaults of the plugin. ``lora_rank``: rank of the split-attention adapters (16 at
    ``sdxl``; a tiny model may use less). ``mask_threshold``: default foreground threshold at inference."""

    lora_rank: int = 16
    mask_threshold: float = 0.5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PluginConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise ValueError(f"plugin config has unknown keys {sorted(set(data) - known)}; expected {sorted(known)}")
        return cls(**data)


class ReferencePlugin(nn.Module):
    """Background latent + masks → decoder self-attention inputs {layer name: (B, N, C)}."""

    def __init__(self, unet_config: UNetConfig, config: PluginConfig | None = None):
        super().__init__()
        self.config = config or PluginConfig()
        kwargs = unet_kwargs(unet_config)
        self.latent_channels = kwargs["in_channels"]
        self.unet = UNet2DConditionModel(**{**kwargs, "in_channels": self.latent_channels + MASK_CHANNELS})
        self.layer_names = decoder_self_attention_names(self.unet)
        dead = {id(p) for p in _strip(self.unet, self.layer_names[-1])}
        self._dead_names = {name for name, p in self.named_parameters() if id(p) in dead}
        self._features: dict[str, torch.Tensor] | None = None
        for name in self.layer_names:
            block = self.unet.get_submodule(name.removesuffix(".attn1"))
            block.norm1.register_forward_hook(self._capture(name))  # attn1's input is norm1's output

    def _capture(self, name: str):
        def hook(module, args, output):
            if self._features is not None:  # only inside forward, not in checkpoint recomputation
                self._features[name] = output
        return hook

    @torch.no_grad()
    def copy_denoiser(self, denoiser: UNet2DConditionModel) -> "ReferencePlugin":
        """Start from the denoiser's weights; the mask channels of ``conv_in`` start at zero."""
        source = denoiser.state_dict()
        own = self.unet.state_dict()
        for key, tensor in own.items():
            if key == "conv_in.weight":
                tensor.zero_()
                tensor[:, : self.latent_channels].copy_(source[key])
            else:
                tensor.copy_(source[key])
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that can reach a feature (the frozen tail of :func:`_strip` cannot)."""
        return [p for name, p in self.named_parameters() if name not in self._dead_names]

    def forward(self, reference_latents: torch.Tensor, sketch_mask: torch.Tensor, reference_mask: torch.Tensor,
                vector_condition: torch.Tensor) -> dict[str, torch.Tensor]:
        """``reference_latents`` (B, C, h, w); ``sketch_mask`` and ``reference_mask`` (B, 1, H, W) foregrounds in
        [0, 1] at any resolution of the latent's aspect; ``vector_condition`` (B, 2). Returns tokens
        (B, N, C_layer) per decoder self-attention layer."""
        net = self.unet
        batch, _, height, width = reference_latents.shape
        dtype = reference_latents.dtype
        covered = F.adaptive_max_pool2d(reference_mask.float(), (height, width))  # any foreground pixel
        background = reference_latents * (1 - covered).to(dtype)
        masks = [F.interpolate(m.float(), size=(height, width), mode="area").to(dtype)
                 for m in (sketch_mask, reference_mask)]
        x = torch.cat([background, *masks], dim=1)
        timesteps = torch.zeros(batch, dtype=torch.long, device=x.device)
        emb = net.time_embedding(net.get_time_embed(x, timesteps))
        added = {"text_embeds": x.new_zeros(batch, 0), "time_ids": vector_condition.to(dtype)}
        emb = emb + net.get_aug_embed(emb, None, added)

        self._features = {}
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
            return self._features
        finally:
            self._features = None


def _strip(net: UNet2DConditionModel, last_layer: str) -> list[nn.Parameter]:
    """Remove what the plugin never uses: cross-attention, the decoder after the last captured layer and
    the output head. The last captured block's own attention/feed-forward and its transformer's output
    projection still run (diffusers runs whole blocks) but cannot reach any feature: their parameters are
    frozen and returned, so trainers (and DDP) never see parameters without gradients."""
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


def attach_plugin(model, config: PluginConfig | None = None, *, copy_denoiser: bool = True) -> ReferencePlugin:
    """Give a :class:`model.colorizer.Colorizer` its plugin and install split attention on its denoiser.
    ``copy_denoiser=False`` skips the weight copy (weights are about to be loaded)."""
    if getattr(model, "plugin", None) is not None:
        raise ValueError("this model already has a plugin")
    plugin = ReferencePlugin(model.config.unet, config)
    denoiser = model.unet.unet
    if copy_denoiser:
        plugin.copy_denoiser(denoiser)
    install_split_attention(denoiser, plugin.config.lora_rank)
    model.plugin = plugin.to(device=model.device, dtype=model.dtype)
    return plugin


def prepare_stage2(model) -> list[nn.Parameter]:
    """Freeze everything but the plugin and the split-attention adapters; return those parameters."""
    if getattr(model, "plugin", None) is None:
        raise ValueError("stage 2 needs a model with a plugin (see attach_plugin)")
    model.requires_grad_(False)
    trainable = model.plugin.trainable_parameters() + adapter_parameters(model.unet.unet)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


def plugin_training_step(model, plugin: ReferencePlugin, batch: TrainingBatch, scheduler: DDPMScheduler,
                         cfg: DiffusionConfig, generator: torch.Generator | None = None) -> StepLosses:
    """Losses of one stage-2 step: stage 1's v-prediction loss (offset noise, reference and sketch dropout
    drawn in the same order) with the plugin's features and the split attention active; no Gram branch.

    The batch must carry ``reference_latents`` and both masks. The sketch encoder and the projector are
    frozen in stage 2, so they run without building a graph; gradients reach the plugin and the adapters.
    The background half of the cross-attention context is the reference's own context (the adapters learn
    how the background reads it).
    """
    missing = [f for f in ("reference_latents", "sketch_mask", "reference_mask") if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"a stage-2 batch needs {missing}; the preprocess cache must include them")
    drawn = noise_and_dropout(batch, scheduler, cfg, generator)
    noisy, timesteps, target = drawn.noisy, drawn.timesteps, drawn.target
    with torch.no_grad():
        residuals = model.sketch_encoder(drawn.sketch)
        context = model.projector(batch.clip_tokens, batch.tagger_tokens) * drawn.keep_reference

    features = plugin(batch.reference_latents, batch.sketch_mask, batch.reference_mask, batch.vector_condition)
    kwargs = split_attention_kwargs(batch.sketch_mask, batch.reference_mask, features,
                                    mask_threshold=plugin.config.mask_threshold)
    out = model.unet(noisy, timesteps, context, batch.vector_condition, residuals, cross_attention_kwargs=kwargs)
    diffusion = F.mse_loss(out.prediction.float(), target.float())
    return StepLosses(loss=diffusion, diffusion_loss=diffusion, gram_loss=diffusion.new_zeros(()), gram_weight=0.0)


@torch.no_grad()
def plugin_inputs(model, sketches: list, references: list, background_references: list | None,
                  size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the plugin reads at inference, for images at the output ``size`` (width, height): the masks
    (B, 1, H, W) of the sketches and of the references letterboxed to ``size`` (weight-free masks), and
    the references' latents (B, C, h, w). A separate background reference replaces the reference's latent
    and is all background (its mask is zero)."""
    from model.geometry import letterbox, resize
    from model.masks import reference_foreground, sketch_foreground

    width, height = size
    device, dtype = model.device, model.dtype

    def as_mask(array) -> torch.Tensor:
        return torch.from_numpy((array > 127).astype("float32"))[None, None]

    def gray(image):
        return to_rgb_array(image).mean(axis=2).round().astype("uint8")

    sketch_masks = [as_mask(sketch_foreground(resize(gray(s), width, height))) for s in sketches]
    views, reference_masks = [], []
    for i, reference in enumerate(references):
        background = background_references[i] if background_references is not None else None
        view = letterbox(to_rgb_array(background if background is not None else reference), (width, height))
        views.append(torch.from_numpy(view.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1)
        reference_masks.append(torch.zeros(1, 1, height, width) if background is not None
                               else as_mask(reference_foreground(view)))
    latents = encode_latents(model.vae, torch.cat(views).to(device, dtype)).to(dtype)
    return torch.cat(sketch_masks).to(device, dtype), torch.cat(reference_masks).to(device, dtype), latents


def _weights_view(model) -> nn.Module:
    """The plugin folder's tensors as one module: ``reference_net.*`` (the plugin's U-Net) and
    ``split_attention.<layer>.*`` (the adapters, which live in the denoiser's processors)."""
    view = nn.Module()
    view.reference_net = model.plugin.unet
    view.split_attention = adapter_modules(model.unet.unet)
    return view


def save_plugin(model, folder: str | Path) -> Path:
    """Write ``config.json`` (the :class:`PluginConfig`) and ``model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _weights_view(model).state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.plugin.config.to_dict(), indent=2))
    return folder


def load_plugin(model, folder: str | Path) -> ReferencePlugin:
    """Attach a saved plugin (and its adapters) to ``model``; strict, errors name the file."""
    folder = Path(folder)
    config = PluginConfig.from_dict(json.loads((folder / "config.json").read_text()))
    plugin = attach_plugin(model, config, copy_denoiser=False)
    path = folder / "model.safetensors"
    pretrained.check_and_load(_weights_view(model), pretrained.read_state_dict(path), path)
    return plugin
