"""The published ColorizeDiffusionXL checkpoints (model hub ``tellurion/ColorizeDiffusionXL``, CC BY-NC-SA
4.0) imported into a colorize-xl model folder.

The authors release single files in their training code's layout:

* ``sdxl*.safetensors``: the backbone. ``model.diffusion_model.*`` (SGM-layout U-Net),
  ``first_stage_model.*`` (LDM-layout VAE), ``control_encoder.*`` (the sketch encoder), ``proj.*`` (the
  projector) and twelve DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...).
* ``xlv2*.safetensors``: the same backbone plus the background plug-in: ``bg_encoder.*`` (a ReferenceNet,
  SGM layout), low-rank ``attn2.to_{q,k,v}.lora_{down,up}_background`` adapters inside the U-Net and
  ``conv_fg`` (a foreground input conv that the published inference never runs). The ReferenceNet becomes
  the plug-in's ``reference_net`` (:class:`model.plugin.ReferenceNet`) and the adapters its background LoRA
  (:func:`model.split_attention.add_background_lora`), so the model folder gets a ``plugin/`` folder;
  ``conv_fg`` is dropped and counted. ``backbone_only=True`` drops the whole plug-in instead.

The frozen encoders are not in those files; the reference code loads them from their own releases, and so
does :func:`import_checkpoint`: CLIP ViT-bigG-14 (OpenCLIP or transformers layout, see
:func:`model.pretrained.clip_vision_state`) and the WD v1.4 SwinV2 tagger v2 (timm ``model.safetensors`` plus
``selected_tags.csv``).

Mapping: the U-Net and VAE go through diffusers' SGM/LDM converters (:mod:`model.pretrained`); the sketch
encoder and projector keep the reference's key names, so their prefix is stripped and the strict loader
checks every key and shape. The ReferenceNet goes through the U-Net's converter too (at the ReferenceNet's
6 input channels and 4-sinusoid add-embedding); the converter also yields the decoder resnet after the
last bank block and that block's upsampler (the reference builds them but never uses their output), which
are dropped and counted. Each LoRA factor lands on the diffusers name of its layer, read off the same
converter (``lora_down`` (r, in) → ``down``, ``lora_up`` (out, r) → ``up``); the rank comes from the
file's shapes. The schedule buffers are compared with ours (:class:`DiffusionConfig`) and
dropped. The parameterization is v-prediction unless the file name contains ``eps`` (the reference's rule).

Everything is read tensor by tensor at the target dtype into modules built on the meta device
(:func:`model.weights.build_and_load`), so an ``sdxl`` import in bf16 holds about one bf16 model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from model import pretrained
from model.colorizer import Colorizer
from model.config import ColorizerConfig, DiffusionConfig, UNetConfig, sdxl
from model.plugin import Plugin, PluginConfig, reference_net_kwargs
from model.reference_encoders import ClipImageEncoder
from model.split_attention import add_background_lora, lora_modules
from model.unet import build_unet
from model.vae import build_vae
from model.weights import (PathLike, build_and_load, check_and_load, listing, read_state_dict, shape_of,
                           tensor_shapes)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SKETCH_ENCODER_PREFIX = "control_encoder."
PROJECTOR_PREFIX = "proj."
# The DDPM buffers the reference's LatentDiffusion registers (and its export keeps).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
CHECKED_BUFFERS = ("betas", "alphas_cumprod")
REFERENCE_NET_PREFIX = "bg_encoder."
LORA_KEY = re.compile(r"model\.diffusion_model\.(?P<layer>.*\.attn2\.to_[qkv])\.lora_(?P<factor>down|up)_background\.weight")
# Groups of the xlv2 plug-in: name → (what it is, how its keys look).
PLUGIN_GROUPS = {
    "bg_encoder": ("the plug-in's ReferenceNet (bg_encoder.*)", re.compile(r"bg_encoder\.")),
    "background_lora": ("the plug-in's background LoRA in the U-Net (attn2.to_{q,k,v}.lora_*_background)",
                        re.compile(r"model\.diffusion_model\..*\.attn2\.to_[qkv]\.lora_(down|up)_background\.")),
    "conv_fg": ("the plug-in's foreground input conv (model.diffusion_model.conv_fg.*)",
                re.compile(r"model\.diffusion_model\.conv_fg\.")),
}
CONV_FG_DROPPED = "the U-Net's foreground input conv conv_fg.* (unused by the published inference)"
PARTS = ("unet", "vae", "sketch_encoder", "projector")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREDICTIONS = {"v": "v_prediction", "eps": "epsilon"}


# ------------------------------------------------------------------------------------------- key groups


@dataclass(frozen=True)
class KeyGroups:
    """The keys of a ColorizeDiffusionXL file, sorted into what each becomes."""

    parts: dict[str, tuple[str, ...]]  # PARTS → file keys
    schedule: tuple[str, ...]
    plugin: dict[str, tuple[str, ...]]  # PLUGIN_GROUPS names present → file keys
    unknown: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "xlv2" if self.plugin else "sdxl"


def group_keys(keys: Iterable[str]) -> KeyGroups:
    """Sort file keys by the part they load into (plug-in groups first: they share the U-Net's prefix)."""
    parts: dict[str, list[str]] = {part: [] for part in PARTS}
    plugin: dict[str, list[str]] = {}
    schedule, unknown = [], []
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "sketch_encoder": SKETCH_ENCODER_PREFIX,
                "projector": PROJECTOR_PREFIX}
    for key in sorted(keys):
        group = next((name for name, (_, pattern) in PLUGIN_GROUPS.items() if pattern.match(key)), None)
        if group is not None:
            plugin.setdefault(group, []).append(key)
            continue
        part = next((part for part, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is not None:
            parts[part].append(key)
        elif key in SCHEDULE_BUFFERS:
            schedule.append(key)
        else:
            unknown.append(key)
    return KeyGroups({p: tuple(k) for p, k in parts.items()}, tuple(schedule),
                     {g: tuple(k) for g, k in plugin.items()}, tuple(unknown))


def check_groups(groups: KeyGroups, shapes: Mapping[str, tuple[int, ...]], path: PathLike,
                 backbone_only: bool) -> None:
    """Refuse a file with tensors of no known part, an ``xlv2`` file that lacks half of its plug-in (the
    ReferenceNet or the background LoRA; unless ``backbone_only``), or one without the schedule buffers
    that :func:`check_schedule` compares."""
    if groups.unknown:
        rows = [f"{key}: found {shapes[key]}" for key in groups.unknown]
        raise ValueError(f"{path}: {len(rows)} tensors belong to no part of a ColorizeDiffusionXL sdxl/xlv2 "
                         f"checkpoint (is this another model's file?):{listing(rows)}")
    plugin = {g: keys for g, keys in groups.plugin.items() if g != "conv_fg"}
    if plugin and not backbone_only:
        absent = [g for g in ("bg_encoder", "background_lora") if g not in plugin]
        if absent:
            rows = [f"{PLUGIN_GROUPS[g][0]}: {len(keys)} tensors" for g, keys in plugin.items()]
            rows += [f"{PLUGIN_GROUPS[g][0]}: none" for g in absent]
            raise ValueError(f"{path} holds only part of the xlv2 plug-in:{listing(rows)}\n  Import its backbone "
                             f"alone with --backbone-only (backbone_only=True), which drops the plug-in.")
    missing = [key for key in CHECKED_BUFFERS if key not in groups.schedule]
    if missing:
        raise ValueError(f"{path}: the DDPM schedule buffers {missing} are missing; they are needed to check "
                         f"that the checkpoint was trained with our noise schedule")


# ----------------------------------------------------------------------------------- schedule and target


def check_schedule(buffers: Mapping[str, torch.Tensor], cfg: DiffusionConfig, path: PathLike) -> None:
    """The file's ``betas`` and ``alphas_cumprod`` must be ours (what ``DDPMScheduler`` builds from ``cfg``):
    a model trained under another schedule would be sampled wrongly by every step of ours."""
    from model.sampler import training_scheduler

    scheduler = training_scheduler(cfg)
    ours = {"betas": scheduler.betas, "alphas_cumprod": scheduler.alphas_cumprod}
    for name in CHECKED_BUFFERS:
        theirs, want = buffers[name].detach().double().flatten(), ours[name].double()
        ref = (f"ours: {cfg.num_train_timesteps} scaled-linear betas from {cfg.beta_start} to {cfg.beta_end}, "
               f"model.config.DiffusionConfig")
        if theirs.shape != want.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(buffers[name].shape)}, expected "
                             f"{tuple(want.shape)} ({ref}); the checkpoint was trained with another noise schedule")
        if not torch.allclose(theirs, want, rtol=1e-4, atol=1e-7):
            t = int((theirs - want).abs().argmax())
            raise ValueError(
                f"{path}: its DDPM schedule differs from ours ({ref}): {name}[{t}] is {theirs[t].item():.6g} in "
                f"the file, {want[t].item():.6g} here ({name}[0]: {theirs[0].item():.6g} vs "
                f"{want[0].item():.6g}, {name}[-1]: {theirs[-1].item():.6g} vs {want[-1].item():.6g}); "
                f"sampling it with our schedule would be wrong, so it is not imported")


def reference_schedule_buffers(cfg: DiffusionConfig, beta_start: float | None = None,
                               beta_end: float | None = None) -> dict[str, torch.Tensor]:
    """The twelve DDPM buffers a reference checkpoint stores for ``cfg``'s scaled-linear schedule (or
    another start and end), computed in float64 and stored in float32 as the reference does. For writing
    test and benchmark files in the published layout."""
    start = cfg.beta_start if beta_start is None else beta_start
    end = cfg.beta_end if beta_end is None else beta_end
    betas = torch.linspace(start**0.5, end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    alphas = 1 - betas
    cumprod = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    variance = betas * (1 - prev) / (1 - cumprod)
    values = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - cumprod).log(), "sqrt_recip_alphas_cumprod": (1 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / cumprod - 1).sqrt(), "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - cumprod),
        "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - cumprod),
    }
    return {name: values[name].float() for name in SCHEDULE_BUFFERS}


def prediction_type_for(path: PathLike, override: str | None = None) -> tuple[str, str]:
    """``(prediction_type, why)``: ``override`` (``"v"``/``"eps"``) when given, else the reference's
    rule: epsilon-prediction when the file name contains ``eps``, v-prediction otherwise."""
    if override is not None:
        if override not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {sorted(PREDICTIONS)}, not {override!r}")
        return PREDICTIONS[override], "given"
    if "eps" in Path(path).name:
        return PREDICTIONS["eps"], "the file name contains 'eps'"
    return PREDICTIONS["v"], "the file name has no 'eps'"


# ---------------------------------------------------------------------------------------------- mapping


def map_part(part: str, tensors: dict[str, torch.Tensor], config: ColorizerConfig,
             path: PathLike) -> dict[str, torch.Tensor]:
    """One part's file tensors (full keys) → the state dict keys of our component. Meta tensors work too,
    which is how the tests check a full-size listing against the ``sdxl`` preset without any memory."""
    if part == "unet":
        return pretrained.unet_from_ldm(tensors, config.unet, path)
    if part == "vae":
        return pretrained.vae_from_ldm(tensors, config.vae, path)
    prefix = {"sketch_encoder": SKETCH_ENCODER_PREFIX, "projector": PROJECTOR_PREFIX}[part]
    return {key[len(prefix):]: value for key, value in tensors.items()}


def reference_net_dropped_prefixes(unet: UNetConfig) -> tuple[str, ...]:
    """Diffusers-name prefixes of the converted ReferenceNet tensors that have no place in ours: the decoder
    resnet after the last block with a bank layer (the reference's ``discard_final_layers`` keeps the first
    layer of the top level) and that last block's upsampler (the reference runs both; nothing reads them)."""
    last = max(i for i, attention in enumerate(reversed(unet.attention_levels)) if attention)
    return f"up_blocks.{last}.upsamplers.0.", f"up_blocks.{last + 1}.resnets.0."


def map_reference_net(tensors: Mapping[str, torch.Tensor], unet: UNetConfig,
                      path: PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``bg_encoder.*`` tensors (SGM layout) → (our ReferenceNet's ``UNet2DConditionModel`` keys, the
    diffusers keys dropped by :func:`reference_net_dropped_prefixes`). Works on meta tensors too."""
    renamed = {UNET_PREFIX + key[len(REFERENCE_NET_PREFIX):]: value for key, value in tensors.items()}
    converted = pretrained.convert_ldm(convert_ldm_unet_checkpoint, renamed, reference_net_kwargs(unet), Path(path))
    prefixes = reference_net_dropped_prefixes(unet)
    dropped = sorted(key for key in converted if key.startswith(prefixes))
    return {key: value for key, value in converted.items() if not key.startswith(prefixes)}, dropped


def lora_layer_names(unet_shapes: Mapping[str, tuple[int, ...]], config: ColorizerConfig,
                     path: PathLike) -> dict[str, str]:
    """SGM projection name (``input_blocks.4.1.transformer_blocks.0.attn2.to_q``) → diffusers name
    (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q``), read off the U-Net converter run on the
    file's U-Net listing (meta tensors: each converted tensor is one of the file's)."""
    listing_ = {key: torch.empty(shape, device="meta") for key, shape in unet_shapes.items()}
    by_id = {id(value): key for key, value in listing_.items()}
    names = {}
    for ours, value in pretrained.unet_from_ldm(listing_, config.unet, path).items():
        theirs = by_id.get(id(value)) or by_id.get(id(value._base))
        if theirs is not None and ours.endswith(".weight") and ".attn2.to_" in ours:
            names[theirs[len(UNET_PREFIX):].removesuffix(".weight")] = ours.removesuffix(".weight")
    return names


def map_lora(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], path: PathLike) -> dict[str, torch.Tensor]:
    """``...attn2.to_q.lora_{down,up}_background.weight`` → ``<diffusers layer>.to_q.{down,up}.weight`` (the
    keys of :func:`model.split_attention.lora_modules`); a layer the U-Net does not have is refused."""
    mapped, orphans = {}, []
    for key, value in tensors.items():
        match = LORA_KEY.fullmatch(key)
        layer = names.get(match["layer"]) if match else None
        if layer is None:
            orphans.append(f"{key}: found {shape_of(value)}")
            continue
        mapped[f"{layer}.{match['factor']}.weight"] = value
    if orphans:
        raise ValueError(f"{path}: {len(orphans)} background LoRA tensors belong to no cross-attention "
                         f"projection of the U-Net:{listing(orphans)}")
    return mapped


def lora_rank(tensors: Mapping[str, tuple[int, ...]], path: PathLike) -> int:
    """The background LoRA's rank: the first dimension of every ``lora_down`` (which must agree)."""
    ranks = {key: shape[0] for key, shape in tensors.items() if "lora_down_background" in key and len(shape) == 2}
    if not ranks or len(set(ranks.values())) != 1:
        rows = [f"{key}: found {tuple(shape)}" for key, shape in tensors.items() if "lora_down_background" in key]
        raise ValueError(f"{path}: cannot read the background LoRA's rank (one (r, in) lora_down per "
                         f"projection, the same r everywhere):{listing(rows or ['no lora_down tensors'])}")
    return next(iter(ranks.values()))


TARGETS = {
    "unet": f"the U-Net ({UNET_PREFIX}* in the file, SGM layout, shown in diffusers names)",
    "vae": f"the VAE ({VAE_PREFIX}* in the file, LDM layout, shown in diffusers names)",
    "sketch_encoder": f"the sketch encoder ({SKETCH_ENCODER_PREFIX}* in the file)",
    "projector": f"the projector ({PROJECTOR_PREFIX}* in the file)",
    "reference_net": f"the plug-in's ReferenceNet ({REFERENCE_NET_PREFIX}* in the file, SGM layout, shown as "
                     f"reference_net.unet.<diffusers name>)",
    "background_lora": "the plug-in's background LoRA (model.diffusion_model.*.attn2.to_{q,k,v}.lora_{down,up}_"
                       "background in the file, shown as <diffusers layer>.to_{q,k,v}.{down,up}.weight)",
}


# ----------------------------------------------------------------------------------------------- import


@dataclass
class ImportReport:
    """What :func:`import_checkpoint` loaded, converted and dropped, and the choices it made."""

    out: Path
    kind: str  # "sdxl" or "xlv2"
    prediction_type: str
    prediction_reason: str
    dtype: str
    loaded: dict[str, int] = field(default_factory=dict)  # component → tensors loaded
    converted: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # what → tensors

    def lines(self) -> list[str]:
        lines = [f"checkpoint: {self.kind}; parameterization: {self.prediction_type} ({self.prediction_reason}); "
                 f"dtype: {self.dtype}"]
        lines += [f"loaded {count} tensors into {part}" for part, count in self.loaded.items()]
        lines += [f"converted {what}" for what in self.converted]
        lines += [f"dropped {count} tensors: {what}" for what, count in self.dropped.items()]
        lines.append(f"wrote {self.out}")
        return lines


def _read(path: PathLike, keys: tuple[str, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Exactly ``keys`` of the file (read by their common prefixes, then filtered), cast as read."""
    wanted = set(keys)
    prefixes = tuple({key.split(".", 1)[0] + ("." if "." in key else "") for key in keys})
    state = read_state_dict(path, prefixes=prefixes, dtype=dtype)
    return {key: value for key, value in state.items() if key in wanted}


def import_checkpoint(
    cdxl: PathLike,
    clip: PathLike,
    tagger_weights: PathLike,
    tagger_tags: PathLike,
    out: PathLike,
    *,
    prediction: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    backbone_only: bool = False,
    config: ColorizerConfig | None = None,
    log: Callable[[str], None] = print,
) -> ImportReport:
    """A colorize-xl model folder at ``out`` from a published ColorizeDiffusionXL file and its encoders.

    ``cdxl``: an ``sdxl*`` or ``xlv2*`` file (``backbone_only``: leave an xlv2 file's plug-in out); ``clip``: CLIP ViT-bigG-14, OpenCLIP
    or transformers layout, file or folder; ``tagger_weights``/``tagger_tags``: the WD SwinV2 tagger's
    ``model.safetensors`` and ``selected_tags.csv``. ``prediction``: ``"v"``/``"eps"`` to override the
    file-name rule. ``config``: the architecture (default the ``sdxl`` preset; tests pass smaller ones).
    Every refusal is a ``ValueError`` (or ``FileNotFoundError``) naming the file and the offending keys with
    their expected and found shapes; nothing is written before every part has loaded.
    """
    out, cdxl = Path(out), Path(cdxl)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder for the imported model")
    config = config if config is not None else sdxl()
    dtype_name = next((name for name, value in DTYPES.items() if value == dtype), str(dtype))

    shapes = tensor_shapes(cdxl)
    groups = group_keys(shapes)
    check_groups(groups, shapes, cdxl, backbone_only)
    check_schedule(_read(cdxl, CHECKED_BUFFERS, torch.float32), config.diffusion, cdxl)
    prediction_type, reason = prediction_type_for(cdxl, prediction)
    tags = pretrained.read_tag_names(tagger_tags)
    config = config.replace(diffusion={"prediction_type": prediction_type}, tagger={"num_tags": len(tags)})
    report = ImportReport(out, groups.kind, prediction_type, reason, dtype_name)
    log(f"{cdxl}: {groups.kind} checkpoint, {len(shapes)} tensors; importing at {dtype_name}")

    builders = {"unet": lambda: build_unet(config.unet), "vae": lambda: build_vae(config.vae)}
    modules = {}
    for part in ("unet", "vae"):
        log(f"reading {part} ({len(groups.parts[part])} tensors)")
        state = map_part(part, _read(cdxl, groups.parts[part], dtype), config, cdxl)
        modules[part], _ = build_and_load(builders[part], state, cdxl, dtype=dtype, target=TARGETS[part])
        report.loaded[part] = len(state)
        del state
    report.converted.append(f"U-Net: {len(groups.parts['unet'])} SGM tensors to diffusers names")
    report.converted.append(f"VAE: {len(groups.parts['vae'])} LDM tensors to diffusers names")

    log(f"reading CLIP vision tower from {clip}")
    visual, clip_file, layout = pretrained.clip_vision_state(clip, dtype)
    report.loaded["clip"] = len(visual)
    if layout == "transformers":
        report.converted.append("CLIP: transformers layout to OpenCLIP (q/k/v merged into in_proj, "
                                "visual_projection transposed into proj)")
    clip_visual, _ = build_and_load(lambda: ClipImageEncoder(config.clip).visual, visual, clip_file,
                                    dtype=dtype)
    del visual
    log(f"reading tagger from {tagger_weights}")
    tagger = pretrained.load_tagger(tagger_weights, tagger_tags, config.tagger, dtype=dtype)
    report.loaded["tagger"] = len(tagger.model.state_dict())

    plugin_state = None
    if groups.kind == "xlv2" and not backbone_only:
        plugin_state = _read_plugin(cdxl, groups, shapes, config, dtype, report, log)

    with torch.device("meta"):
        clip_encoder = ClipImageEncoder(config.clip)
    clip_encoder.visual = clip_visual
    model = Colorizer(config, unet=modules.pop("unet"), vae=modules.pop("vae"), tagger=tagger, clip=clip_encoder)
    for part in ("sketch_encoder", "projector"):
        state = map_part(part, _read(cdxl, groups.parts[part], torch.float32), config, cdxl)
        check_and_load(getattr(model, part), state, cdxl, target=TARGETS[part])
        getattr(model, part).to(dtype)
        report.loaded[part] = len(state)
    if plugin_state is not None:
        _attach_plugin(model, plugin_state, cdxl, dtype)
        report.loaded["plugin.reference_net"] = len(plugin_state["reference_net"])
        report.loaded["plugin.background_lora"] = len(plugin_state["background_lora"])
    model.eval()

    report.dropped[f"DDPM schedule buffers (checked {', '.join(CHECKED_BUFFERS)} against ours)"] = len(groups.schedule)
    for group, keys in groups.plugin.items():
        if backbone_only:
            report.dropped[f"{PLUGIN_GROUPS[group][0]} (--backbone-only)"] = len(keys)
        elif group == "conv_fg":
            report.dropped[CONV_FG_DROPPED] = len(keys)
    if plugin_state is not None and plugin_state["dropped"]:
        report.dropped["the ReferenceNet's layers after its last bank block (" + ", ".join(
            reference_net_dropped_prefixes(config.unet)) + "*: unused)"] = len(plugin_state["dropped"])
    log(f"writing {out}")
    model.save_pretrained(out)
    return report


def _read_plugin(cdxl: Path, groups: KeyGroups, shapes: Mapping[str, tuple[int, ...]], config: ColorizerConfig,
                 dtype: torch.dtype, report: ImportReport, log: Callable[[str], None]) -> dict:
    """The xlv2 plug-in's tensors under our names, checked against a meta-built plug-in (every refusal names
    the file keys or our keys with the shapes) before anything is built for real."""
    lora_keys = groups.plugin["background_lora"]
    rank = lora_rank({key: shapes[key] for key in lora_keys}, cdxl)
    log(f"reading the plug-in's ReferenceNet ({len(groups.plugin['bg_encoder'])} tensors) and background LoRA "
        f"({len(lora_keys)} tensors, rank {rank})")
    reference_net, dropped = map_reference_net(_read(cdxl, groups.plugin["bg_encoder"], dtype), config.unet, cdxl)
    names = lora_layer_names({key: shapes[key] for key in groups.parts["unet"]}, config, cdxl)
    lora = map_lora(_read(cdxl, lora_keys, dtype), names, cdxl)
    report.converted.append(f"ReferenceNet: {len(groups.plugin['bg_encoder'])} SGM tensors to diffusers names")
    report.converted.append(f"background LoRA: {len(lora_keys)} tensors to the diffusers cross-attention names "
                            f"(rank {rank})")
    return {"config": PluginConfig(lora_rank=rank), "reference_net": reference_net, "background_lora": lora,
            "dropped": dropped}


def _attach_plugin(model: Colorizer, state: dict, cdxl: Path, dtype: torch.dtype) -> None:
    """What :func:`model.plugin.attach_plugin` does, with the ReferenceNet built on the meta device and filled
    from the file (no float32 copy of a second U-Net), then the LoRA checked and loaded."""
    plugin_config = state["config"]
    plugin, _ = build_and_load(lambda: Plugin(model.config.unet, plugin_config),
                               {f"reference_net.unet.{k}": v for k, v in state["reference_net"].items()}, cdxl,
                               dtype=dtype, target=TARGETS["reference_net"])
    denoiser = model.unet.unet
    add_background_lora(denoiser, plugin_config.lora_rank)
    check_and_load(lora_modules(denoiser), state["background_lora"], cdxl, target=TARGETS["background_lora"])
    model.plugin = plugin.to(device=model.device, dtype=model.dtype)
