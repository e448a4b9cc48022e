"""Behaviour of the model's parts on the tiny preset: shapes, the fused Gram branch, the loss terms."""

from __future__ import annotations

import pytest
import torch

from model.gram import gram_loss, gram_matrix
from model.objective import TrainingBatch, gram_weight_at, training_step
from model.unet import injection_points


def make_batch(model, batch=4, width=128, height=96, seed=0):
    """A cached-style training batch (what the preprocess job stores) from random pixels."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g)
    with torch.no_grad():
        tagger_tokens = model.tagger(images).tokens
        clip_tokens = model.clip(images)
    stride = cfg.latent_stride
    return TrainingBatch(
        latents=torch.randn(batch, cfg.unet.latent_channels, height // stride, width // stride, generator=g),
        sketch=torch.rand(batch, 1, height, width, generator=g) * 2 - 1,
        clip_tokens=clip_tokens,
        tagger_tokens=tagger_tokens,
        vector_condition=torch.tensor([[float((width * height) ** 0.5), 7.0]] * batch),
    )


@pytest.mark.parametrize("width,height", [(128, 128), (192, 96), (96, 160)])
def test_denoiser_and_sketch_encoder_shapes_follow_the_aspect_ratio(tiny_colorizer, width, height):
    model = tiny_colorizer
    cfg = model.config
    sketch = torch.rand(2, 1, height, width) * 2 - 1
    residuals = model.sketch_encoder(sketch)
    latent_h, latent_w = height // cfg.latent_stride, width // cfg.latent_stride
    for residual, point in zip(residuals, injection_points(cfg.unet)):
        assert residual.shape == (2, point.channels, latent_h // point.downscale, latent_w // point.downscale)
    context = torch.randn(2, cfg.context_tokens, cfg.unet.cross_attention_dim)
    latents = torch.randn(2, cfg.unet.latent_channels, latent_h, latent_w)
    with torch.no_grad():
        out = model.unet(latents, torch.tensor([10, 900]), context, torch.tensor([[128.0, 7.0]] * 2), residuals,
                         capture_gram_features=True)
    assert out.prediction.shape == latents.shape
    lowest = (latent_h // 4, latent_w // 4)
    assert [tuple(f.shape[-2:]) for f in out.aligned_features.values()] == [lowest, lowest]
    assert set(out.aligned_features) == {model.unet.encoder_gram_layer, model.unet.decoder_gram_layer}


def test_reference_encoders_return_token_features(tiny_colorizer):
    cfg = tiny_colorizer.config
    images = torch.rand(3, 3, 80, 50)  # any size and aspect: padded to a square first
    tagged = tiny_colorizer.tagger(images)
    assert tagged.tokens.shape == (3, cfg.tagger.num_tokens, cfg.tagger.token_dim)
    assert tagged.logits.shape == (3, cfg.tagger.num_tags)
    clip_tokens = tiny_colorizer.clip(images)
    assert clip_tokens.shape == (3, cfg.clip.num_tokens, cfg.clip.embed_dim)
    context = tiny_colorizer.projector(clip_tokens, tagged.tokens)
    assert context.shape == (3, cfg.context_tokens, cfg.unet.cross_attention_dim)


def test_fresh_sketch_encoder_adds_nothing_and_strengths_scale_each_point(tiny_config):
    from model.sketch_encoder import SketchEncoder

    encoder = SketchEncoder(tiny_config.sketch_encoder, injection_points(tiny_config.unet))
    sketch = torch.rand(1, 1, 64, 64) * 2 - 1
    assert all(r.abs().max() == 0 for r in encoder(sketch))
    for conv in [encoder.model[-1], *encoder.proj_outs]:
        torch.nn.init.normal_(conv.weight, std=0.1)
    full = encoder(sketch)
    scaled = encoder(sketch, strengths=[0.0, 0.5, 1.0, 2.0])
    for f, s, k in zip(full, scaled, [0.0, 0.5, 1.0, 2.0]):
        assert f.abs().max() > 0
        torch.testing.assert_close(s, f * k)


def test_sketch_encoder_refuses_sizes_off_the_grid(tiny_colorizer):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_colorizer.sketch_encoder(torch.zeros(1, 1, 100, 64))


def test_gram_matrix_is_cosine_self_similarity():
    features = torch.randn(2, 8, 3, 5)
    gram = gram_matrix(features)
    assert gram.shape == (2, 15, 15)
    torch.testing.assert_close(torch.diagonal(gram, dim1=1, dim2=2), torch.ones(2, 15))
    scaled = gram_matrix(features * torch.rand(2, 1, 3, 5) * 10)  # per-token scale does not matter
    torch.testing.assert_close(gram, scaled, rtol=1e-4, atol=1e-5)


def test_gram_loss_is_zero_for_identical_features_and_spares_the_anchor():
    aligned = {"enc": torch.randn(2, 16, 4, 4, requires_grad=True), "dec": torch.randn(2, 16, 4, 4, requires_grad=True)}
    same = {k: v.detach().clone().requires_grad_(True) for k, v in aligned.items()}
    assert gram_loss(aligned, same).item() == pytest.approx(0.0, abs=1e-10)

    other = {k: torch.randn(2, 16, 4, 4, requires_grad=True) for k in aligned}
    loss = gram_loss(aligned, other)
    assert loss.item() > 1e-3
    loss.backward()
    assert all(v.grad is None for v in aligned.values())  # stop-gradient anchor
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in other.values())


def test_misaligned_branch_differs_from_the_aligned_one_only_in_its_context(tiny_colorizer):
    model = tiny_colorizer
    batch = make_batch(model, batch=3)
    with torch.no_grad():
        residuals = model.sketch_encoder(batch.sketch)
        context = model.projector(batch.clip_tokens, batch.tagger_tokens)
        t = torch.tensor([50, 400, 800])
        rolled = torch.roll(context, 1, dims=0)
        fused = model.unet(batch.latents, t, context, batch.vector_condition, residuals, misaligned_context=rolled)
        plain = model.unet(batch.latents, t, context, batch.vector_condition, residuals, capture_gram_features=True)
        alone = model.unet(batch.latents, t, rolled, batch.vector_condition, residuals, capture_gram_features=True)
    torch.testing.assert_close(fused.prediction, plain.prediction)
    for name in plain.aligned_features:
        torch.testing.assert_close(fused.aligned_features[name], plain.aligned_features[name])
        torch.testing.assert_close(fused.misaligned_features[name], alone.aligned_features[name])
        assert not torch.allclose(fused.misaligned_features[name], fused.aligned_features[name])


def test_training_step_passes_the_rolled_context_to_the_misaligned_branch(tiny_colorizer, monkeypatch):
    model = tiny_colorizer
    batch = make_batch(model, batch=3)
    seen = {}
    original = model.unet.forward

    def recording_forward(*args, **kwargs):
        seen["context"], seen["misaligned"] = args[2], kwargs["misaligned_context"]
        return original(*args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", recording_forward)
    with torch.no_grad():
        training_step(model, batch, model.noise_scheduler, model.config.diffusion, gram_weight=1.0,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["misaligned"], torch.roll(seen["context"], 1, dims=0))


def test_gram_schedule_switches_on_after_a_third_of_the_steps(tiny_config):
    cfg = tiny_config.diffusion
    weights = [gram_weight_at(step, 300, cfg) for step in range(300)]
    assert weights[:99] == [0.0] * 99 and weights[99:] == [1.0] * 201


def test_gram_loss_is_off_before_the_switch_and_positive_after(tiny_colorizer):
    model = tiny_colorizer
    batch = make_batch(model)
    losses = {}
    for weight in (0.0, 1.0):
        with torch.no_grad():
            losses[weight] = training_step(model, batch, model.noise_scheduler, model.config.diffusion,
                                           gram_weight=weight, generator=torch.Generator().manual_seed(0))
    assert losses[0.0].gram_loss.item() == 0.0
    assert losses[1.0].gram_loss.item() > 0.0
    assert torch.isfinite(losses[1.0].loss)
    torch.testing.assert_close(losses[1.0].diffusion_loss, losses[0.0].diffusion_loss)
    torch.testing.assert_close(losses[1.0].loss, losses[1.0].diffusion_loss + losses[1.0].gram_loss)


def test_tiny_model_overfits_one_batch(tiny_config):
    """Same noise and timesteps every step: the loss must fall at least 3× in 60 AdamW steps."""
    from model.colorizer import Colorizer

    torch.manual_seed(0)
    model = Colorizer.from_config(tiny_config).train()
    batch = make_batch(model, batch=4, width=64, height=64)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        out = training_step(model, batch, model.noise_scheduler, model.config.diffusion,
                            gram_weight=1.0 if step >= 20 else 0.0, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.diffusion_loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 3, f"loss fell only from {first:.4f} to {last:.4f}"


def test_frozen_encoders_have_no_trainable_parameters(tiny_colorizer):
    model = tiny_colorizer
    for name in ("tagger", "clip", "vae"):
        assert not any(p.requires_grad for p in getattr(model, name).parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for n in ("unet", "sketch_encoder", "projector") for p in getattr(model, n).parameters()}
    model.train()
    assert not model.tagger.training and not model.clip.training and not model.vae.training
    model.eval()


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_config):
    from model.colorizer import Colorizer

    torch.manual_seed(0)
    model = Colorizer.from_config(tiny_config).train()
    batch = make_batch(model, batch=2, width=64, height=64)

    def losses_and_grads():
        model.zero_grad(set_to_none=True)
        out = training_step(model, batch, model.noise_scheduler, model.config.diffusion, gram_weight=1.0,
                            generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.unet.named_parameters() if p.grad is not None}
        return out, grads

    plain, plain_grads = losses_and_grads()
    model.unet.unet.enable_gradient_checkpointing()
    checkpointed, checkpointed_grads = losses_and_grads()
    torch.testing.assert_close(checkpointed.gram_loss, plain.gram_loss)
    torch.testing.assert_close(checkpointed.diffusion_loss, plain.diffusion_loss)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
