"""The SDXL-shaped denoiser: diffusers' ``UNet2DConditionModel`` walked block by block.

We build the stock diffusers U-Net (so SDXL-family weights load by name) and run its blocks ourselves
instead of calling ``UNet2DConditionModel.forward``, because the method needs three things that forward
does not offer:

* sketch residuals added after ``conv_in``, after every downsampler and after the last encoder block
  (and so also into the skip connections that those outputs feed);
* the token features of the two Gram layers, the final transformer block of the encoder and of the
  decoder at the lowest resolution;
* the reference strength of the published model: every cross-attention's output is scaled before its
  output projection (``strength · W·attn + b``), which leaves the attention weights alone (scaling the
  context instead would sharpen or flatten them);
* the semantic-misaligned branch of the Gram loss in the same call: everything before the first
  cross-attention is identical for both branches and is computed once, the rest runs as one batch of
  ``2B`` and the misaligned half stops right after the decoder's Gram layer, since nothing later feeds
  the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from model.config import UNetConfig


@dataclass(frozen=True)
class InjectionPoint:
    """Where a sketch residual is added: its channel count and downscale relative to the latent."""

    name: str
    channels: int
    downscale: int


def unet_kwargs(cfg: UNetConfig) -> dict:
    """Constructor arguments of ``UNet2DConditionModel`` for a preset (SDXL's layout at ``sdxl``)."""
    if len(cfg.attention_levels) != len(cfg.block_out_channels):
        raise ValueError(
            f"attention_levels has {len(cfg.attention_levels)} entries, block_out_channels {len(cfg.block_out_channels)}"
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return dict(
        sample_size=128,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        transformer_layers_per_block=tuple(cfg.transformer_layers_per_block),
        attention_head_dim=tuple(cfg.attention_heads),
        cross_attention_dim=cfg.cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=cfg.norm_num_groups,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.vector_embed_dim,
        projection_class_embeddings_input_dim=cfg.vector_condition_values * cfg.vector_embed_dim,
        mid_block_type="UNetMidBlock2DCrossAttn",
    )


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_kwargs(cfg))


def injection_points(cfg: UNetConfig) -> list[InjectionPoint]:
    """Sketch-residual points: after conv_in, after each downsampler, after the last encoder block.

    SDXL: 320@/1, 320@/2, 640@/4, 1280@/4 relative to the latent (128², 64², 32², 32² at 1024² pixels).
    """
    channels = cfg.block_out_channels
    points = [InjectionPoint("conv_in", channels[0], 1)]
    for level in range(len(channels) - 1):
        points.append(InjectionPoint(f"down_blocks.{level}.downsamplers", channels[level], 2 ** (level + 1)))
    last = len(channels) - 1
    points.append(InjectionPoint(f"down_blocks.{last}", channels[last], 2**last))
    return points


def gram_layer_names(unet: UNet2DConditionModel) -> tuple[str, str]:
    """The final transformer blocks of the encoder and of the decoder at the lowest resolution."""
    encoder_block = len(unet.down_blocks) - 1
    encoder = f"down_blocks.{encoder_block}.attentions.{len(unet.down_blocks[encoder_block].attentions) - 1}"
    decoder = f"up_blocks.0.attentions.{len(unet.up_blocks[0].attentions) - 1}"
    return encoder, decoder


@dataclass
class DenoiserOutput:
    """``prediction`` (B, C, h, w); Gram-layer features (B, C, h', w') keyed by layer name, per branch."""

    prediction: torch.Tensor
    aligned_features: dict[str, torch.Tensor] = field(default_factory=dict)
    misaligned_features: dict[str, torch.Tensor] = field(default_factory=dict)


class ColorizerUNet(nn.Module):
    """Denoiser forward with sketch residuals, Gram-layer capture and the fused misaligned branch."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.encoder_gram_layer, self.decoder_gram_layer = gram_layer_names(unet)
        self._decoder_capture: list[torch.Tensor] | None = None
        decoder_attention = unet.get_submodule(self.decoder_gram_layer)
        decoder_attention.register_forward_hook(self._capture_decoder_output)
        self._reference_strength = 1.0
        for name, module in unet.named_modules():
            if name.endswith(".attn2"):  # a pre-hook on the output projection works under every processor
                module.to_out[0].register_forward_pre_hook(self._scale_cross_attention)

    def _scale_cross_attention(self, module, args):
        if self._reference_strength == 1.0:
            return None
        return (args[0] * self._reference_strength,) + tuple(args[1:])

    def _capture_decoder_output(self, module, args, output):
        if self._decoder_capture is not None:
            self._decoder_capture.append(output[0] if isinstance(output, tuple) else output.sample)

    def _embedding(self, latents, timesteps, vector_condition):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(latents, timesteps))
        no_pooled_vector = latents.new_zeros(latents.shape[0], 0)
        added = {"text_embeds": no_pooled_vector, "time_ids": vector_condition.to(latents.dtype)}
        return emb + unet.get_aug_embed(emb, None, added)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        vector_condition: torch.Tensor,
        sketch_residuals: list[torch.Tensor] | None = None,
        *,
        misaligned_context: torch.Tensor | None = None,
        capture_gram_features: bool = False,
        cross_attention_kwargs: dict | None = None,
        reference_strength: float = 1.0,
    ) -> DenoiserOutput:
        """Predict the target for ``latents`` (B, C, h, w) at ``timesteps`` (B,).

        ``context`` (B, N, D) feeds every cross-attention; ``vector_condition`` (B, 2) holds √(H·W) of the
        source and the aesthetic score; ``sketch_residuals`` follow :func:`injection_points`.
        With ``misaligned_context`` the misaligned branch runs too and only its Gram features come back.
        ``reference_strength`` scales every cross-attention output before its output projection.
        """
        self._reference_strength = float(reference_strength)
        try:
            return self._forward(latents, timesteps, context, vector_condition, sketch_residuals,
                                 misaligned_context, capture_gram_features, cross_attention_kwargs)
        finally:
            self._reference_strength = 1.0

    def _forward(self, latents, timesteps, context, vector_condition, sketch_residuals, misaligned_context,
                 capture_gram_features, cross_attention_kwargs) -> DenoiserOutput:
        unet = self.unet
        batch = latents.shape[0]
        residuals = list(sketch_residuals) if sketch_residuals is not None else []
        n_points = len(unet.down_blocks) + 1
        if residuals and len(residuals) != n_points:
            raise ValueError(f"expected {n_points} sketch residuals (one per injection point), got {len(residuals)}")
        fused = misaligned_context is not None
        capture = capture_gram_features or fused
        emb = self._embedding(latents, timesteps, vector_condition)
        ctx = context

        def like_h(x: torch.Tensor) -> torch.Tensor:
            """Bring a per-sample tensor to ``h``'s batch: shared prefix tensors are doubled inside the fused
            part, fused tensors lose their misaligned half after it."""
            if h.shape[0] == x.shape[0]:
                return x
            return torch.cat([x, x]) if h.shape[0] == 2 * x.shape[0] else x[: h.shape[0]]

        h = unet.conv_in(latents)
        if residuals:
            h = h + residuals[0]
        skips: list[torch.Tensor] = [h]
        aligned: dict[str, torch.Tensor] = {}
        misaligned: dict[str, torch.Tensor] = {}

        for level, block in enumerate(unet.down_blocks):
            is_last = level == len(unet.down_blocks) - 1
            if getattr(block, "has_cross_attention", False):
                if fused and h.shape[0] == batch:
                    h = torch.cat([h, h])
                    emb = torch.cat([emb, emb])
                    ctx = torch.cat([context, misaligned_context])
                h, res = block(h, temb=emb, encoder_hidden_states=ctx, cross_attention_kwargs=cross_attention_kwargs)
            else:
                h, res = block(h, temb=emb)
            res = list(res)
            if is_last and capture:
                self._store(self.encoder_gram_layer, h, batch, aligned, misaligned)
            if residuals and (is_last or block.downsamplers is not None):
                h = h + like_h(residuals[level + 1])
                res[-1] = h
            skips.extend(res)

        if fused and h.shape[0] == batch:  # no cross-attention in the encoder at all: start the fused half here
            h, emb, ctx = torch.cat([h, h]), torch.cat([emb, emb]), torch.cat([context, misaligned_context])
        h = unet.mid_block(h, emb, encoder_hidden_states=ctx, cross_attention_kwargs=cross_attention_kwargs)

        for level, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            res = tuple(like_h(r) for r in res)
            self._decoder_capture = [] if (level == 0 and capture) else None
            try:
                if getattr(block, "has_cross_attention", False):
                    h = block(h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ctx,
                              cross_attention_kwargs=cross_attention_kwargs)
                else:
                    h = block(h, temb=emb, res_hidden_states_tuple=res)
                if level == 0 and capture:
                    self._store(self.decoder_gram_layer, self._decoder_capture[-1], batch, aligned, misaligned)
            finally:
                self._decoder_capture = None
            if fused and h.shape[0] == 2 * batch:  # the misaligned half has served the loss: drop it
                h, emb, ctx = h[:batch], emb[:batch], ctx[:batch]

        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        prediction = unet.conv_out(h)
        return DenoiserOutput(prediction, aligned if capture else {}, misaligned)

    @staticmethod
    def _store(name, features, batch, aligned, misaligned):
        aligned[name] = features[:batch]
        if features.shape[0] > batch:
            misaligned[name] = features[batch:]
