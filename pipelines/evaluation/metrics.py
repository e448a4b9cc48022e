"""Metric objects of the paper's Table 1 and the feature extractors behind them, with honest names.

* PSNR and MS-SSIM come from torchmetrics, per image, on RGB in [0, 1]. PSNR of identical images is
  infinite; it is capped (:data:`PSNR_CAP_DB`) so that averages stay finite, and the cap is named in every
  report. MS-SSIM needs images larger than its kernel at the coarsest scale: :func:`ms_ssim_settings`
  keeps the standard 11-px Gaussian and drops scales (renormalizing the standard betas) until the images
  fit, so 1024² evaluations use the standard five scales and tiny 96-px tests use fewer; the settings
  are part of the report.
* FID is torchmetrics' ``FrechetInceptionDistance`` fed with features extracted elsewhere (on Ray
  actors): :class:`PrecomputedFeatures` is the identity "network" it runs on them.
* Extractors load from local files only. FID's standard network is :mod:`pipelines.evaluation.inception`; the
  CLIP score's is an OpenCLIP image tower from a checkpoint file. Where none is given, the caller may ask
  for a named substitute (the model's own CLIP tower, or for FID its VAE encoder), and the metric's key
  and label then say "substitute", so a number is never reported under a name it has not earned. The
  VAE substitute exists for presets whose CLIP tower is random-init (``tiny``): a random tower's features
  ranked the untrained colorizer's smooth noise above trained outputs, while the VAE is trained with the
  model, so its latents carry the colors and layout FID should compare.
* OpenCLIP checkpoints trained with QuickGELU (OpenAI's, the ``-quickgelu`` ones) have the same shapes as
  GELU ones: :func:`clip_activation` reads the activation off the checkpoint's name and metadata, and a
  tower that needs QuickGELU gets it (or the run stops when the caller's choice contradicts the file).
* :func:`conventions` states every choice that moves the numbers (library versions, the FID resize, how
  per-image scores are averaged) for the report; :func:`fid_sample_warning` flags FID at small n.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PSNR_CAP_DB = 100.0
STANDARD_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
STANDARD_MS_SSIM_KERNEL = 11

FID_EXTRACTORS = ("inception", "substitute:clip", "substitute:vae")
LATENT_GRID = 4  # the VAE substitute pools each latent channel to this grid: coarse layout and color, no detail
CLIP_EXTRACTORS = ("openclip", "substitute:model")
# OpenCLIP ViT image towers: width → attention heads (heads are not visible in the weights' shapes).
OPENCLIP_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
CLIP_ACTIVATIONS = ("auto", "gelu", "quick_gelu")
# Keys only OpenAI's own CLIP checkpoints carry (open_clip drops them when loading those, always with QuickGELU).
OPENAI_CHECKPOINT_KEYS = ("input_resolution", "context_length", "vocab_size")
# FID is biased upward at small n (the bias falls roughly as 1/n); below this it gets a warning.
FID_COMPARABLE_SAMPLES = 10_000
PAPER_FID_SAMPLES = 50_000
TABLE1_ARROWS = {"fid": "↓", "psnr": "↑", "ms_ssim": "↑", "clip_cosine": "↑"}  # which way is better


def table1_arrow(key: str) -> str:
    """The arrow of a Table 1 metric key (``fid``, ``fid_substitute_model_clip``, ``psnr``, ...)."""
    return next(arrow for prefix, arrow in TABLE1_ARROWS.items() if key.startswith(prefix))


# ------------------------------------------------------------------------------------ pixel metrics
@dataclass(frozen=True)
class MSSSIMSettings:
    """MS-SSIM parameters chosen for the smallest image side of an evaluation."""

    betas: tuple[float, ...]
    kernel_size: int

    @property
    def description(self) -> str:
        standard = self.betas == STANDARD_MS_SSIM_BETAS and self.kernel_size == STANDARD_MS_SSIM_KERNEL
        scales = f"{len(self.betas)} scales" + ("" if standard else " (standard betas truncated, renormalized)")
        return f"{scales}, {self.kernel_size}-px Gaussian σ 1.5"


def ms_ssim_settings(min_side: int) -> MSSSIMSettings:
    """The most standard MS-SSIM that torchmetrics accepts for images whose smaller side is ``min_side``:
    the 11-px kernel with as many of the five scales as fit, then smaller kernels."""
    for kernel in (11, 9, 7, 5, 3):
        for scales in (5, 4, 3, 2):
            # torchmetrics' own conditions (functional/image/ssim.py): side ≥ 2^scales and
            # side // max(1, scales - 1)² > kernel - 1
            if min_side >= 2**scales and min_side // max(1, scales - 1) ** 2 > kernel - 1:
                betas = STANDARD_MS_SSIM_BETAS[:scales]
                if scales < 5:
                    total = sum(betas)
                    betas = tuple(round(b / total, 6) for b in betas)
                return MSSSIMSettings(betas, kernel)
    raise ValueError(f"images with a side of {min_side} px are too small for MS-SSIM (need at least 8 px)")


class PixelMetrics:
    """Per-image PSNR (capped) and MS-SSIM of outputs against their ground truths, in float32.

    float32, not float64: torchmetrics computes MS-SSIM in its input's dtype, and float64 is slow and large
    on the CPU. Measured (torchmetrics 1.9, 2 CPU threads, synthetic illustrations against their seeded
    deformations, one image per call): at 1024² (5 scales) float64 took 16.3 s and 6.2 GB peak, float32
    1.5 s and 1.7 GB; the values differed by 4.9e-5 and 5.8e-5 (0.686903 vs 0.686854, 0.629063 vs
    0.629005); at 256² (4 scales) by 2.4e-6 and 2.0e-5. That is below the third decimal Table 1 reports,
    but not zero: float32 numbers are not bit-comparable with float64 ones (the report says float32).
    """

    def __init__(self, settings: MSSSIMSettings, psnr_cap: float = PSNR_CAP_DB):
        from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio

        self.settings = settings
        self.psnr_cap = psnr_cap
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3))
        self.ms_ssim = MultiScaleStructuralSimilarityIndexMeasure(
            data_range=1.0, kernel_size=settings.kernel_size, betas=settings.betas, reduction="none")

    @torch.no_grad()
    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``outputs``, ``targets``: (B, 3, H, W) float in [0, 1] → {"psnr": (B,), "ms_ssim": (B,)}."""
        if outputs.shape != targets.shape:
            raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in shape")
        outputs, targets = outputs.float(), targets.float()  # float32: see the class docstring
        self.psnr.reset()
        self.ms_ssim.reset()
        psnr = self.psnr(outputs, targets).reshape(-1)
        ms_ssim = self.ms_ssim(outputs, targets).reshape(-1)
        return {"psnr": psnr.clamp(max=self.psnr_cap).float(), "ms_ssim": ms_ssim.float()}


def conventions(fid: ExtractorChoice, clip: ExtractorChoice, ms_ssim: MSSSIMSettings) -> dict[str, str]:
    """Every convention that moves a Table 1 number without changing the model, as report text."""
    from importlib.metadata import version

    if fid.kind == "inception":
        resize = ("299² by TensorFlow-1's bilinear rule (no half-pixel offset, no antialiasing): the FID reference's "
                  "and torch-fidelity's; torchmetrics' FrechetInceptionDistance defaults to antialias=True, a "
                  "different resize that gives different FIDs (23.46 vs 17.30 on one set, issue 18), not used here")
    elif fid.kind == "model_vae":
        resize = (f"none: the VAE encodes each image at its evaluation size, then each latent channel is averaged "
                  f"over a {LATENT_GRID}×{LATENT_GRID} grid; not the FID standard")
    else:
        resize = "the substitute tower's own input: stretched to its square size (bilinear); not the FID standard"
    return {
        "torchmetrics": version("torchmetrics"), "torch": version("torch"), "open_clip": version("open_clip_torch"),
        "fid": (f"torchmetrics FrechetInceptionDistance (float64) on precomputed features: ground truths vs outputs "
                f"after random other rows' references, n pairs; {fid.label()}"),
        "fid_resize": resize,
        "psnr": (f"per image over (C, H, W) on RGB in [0, 1] from uint8, torchmetrics PeakSignalNoiseRatio "
                 f"(data_range 1), capped at {PSNR_CAP_DB:g} dB, then the arithmetic mean of the per-image dB values "
                 f"(not the PSNR of the pooled MSE, which is lower when errors vary between images)"),
        "ms_ssim": (f"per image, float32, torchmetrics MultiScaleStructuralSimilarityIndexMeasure "
                    f"({ms_ssim.description}, data_range 1), arithmetic mean; values depend on the torchmetrics version (a 2024 change "
                    f"moved them by +0.0005 to +0.014): compare only numbers from the same version"),
        "clip_cosine": f"per image cosine of the image embeddings (class token), arithmetic mean; {clip.label()}",
    }


# ------------------------------------------------------------------------------------------ FID
class PrecomputedFeatures(nn.Module):
    """The identity as torchmetrics' FID "network": features were extracted on the workers already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got {tuple(features.shape)}")
        return features


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D), computed by torchmetrics in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or generated.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {real.shape[0]} and {generated.shape[0]}")
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(generated.double(), real=False)
    return float(fid.compute())


def fid_sample_warning(samples: int) -> str | None:
    """The warning a FID over ``samples`` pairs carries, or None when n is large enough to compare."""
    if samples >= FID_COMPARABLE_SAMPLES:
        return None
    return (f"FID over n={samples} is biased upward: its bias falls roughly as 1/n, so even two halves of one "
            f"distribution score well above 0 at small n (15.3 at n=8 in issue 18). Compare FIDs only at equal n; "
            f"this one is not comparable with the paper's {PAPER_FID_SAMPLES:,}-sample figure "
            f"(below {FID_COMPARABLE_SAMPLES:,} samples every report says so).")


# ----------------------------------------------------------------------------------- extractors
@dataclass(frozen=True)
class ExtractorChoice:
    """Which network a metric uses, as plain data (it travels to Ray actors, which build it there)."""

    kind: str  # "inception" | "openclip" | "model_clip" | "model_vae"
    path: str | None = None
    heads: int | None = None  # OpenCLIP only; None = from OPENCLIP_HEADS
    quick_gelu: bool = False  # OpenCLIP only: the tower's MLPs use QuickGELU (see clip_activation)
    activation_source: str = ""  # how quick_gelu was decided

    def label(self) -> str:
        if self.kind == "inception":
            return f"Inception-v3 FID weights ({Path(self.path).name})"
        if self.kind == "openclip":
            activation = "QuickGELU" if self.quick_gelu else "GELU"
            return f"OpenCLIP image tower ({Path(self.path).name}, {activation}: {self.activation_source})"
        if self.kind == "model_vae":
            return f"substitute: the model's own VAE encoder (latent means pooled to {LATENT_GRID}×{LATENT_GRID})"
        return "substitute: the model's own CLIP tower"


def choose_fid_extractor(name: str, inception_weights: str | None) -> ExtractorChoice:
    """``name`` from :data:`FID_EXTRACTORS`; the real Inception needs its weights file."""
    if name == "inception":
        if not inception_weights:
            raise ValueError(
                "FID needs the FID Inception-v3 weights, a local state_dict file (published as "
                "pt_inception-2015-12-05-6726825d.pth): pass --inception-weights PATH; or ask for "
                "--fid-extractor substitute:clip to use the model's own CLIP tower instead, reported as "
                "'FID (substitute: model CLIP tower)' and not comparable with published FID (substitute:vae: "
                "its VAE encoder, for a model whose CLIP tower is untrained)")
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"Inception weights not found: {inception_weights}")
        return ExtractorChoice("inception", str(inception_weights))
    if name == "substitute:clip":
        return ExtractorChoice("model_clip")
    if name == "substitute:vae":
        return ExtractorChoice("model_vae")
    raise ValueError(f"unknown FID extractor {name!r}; expected one of {FID_EXTRACTORS}")


def choose_clip_extractor(name: str, clip_weights: str | None, heads: int | None = None,
                          activation: str = "auto") -> ExtractorChoice:
    """``name`` from :data:`CLIP_EXTRACTORS`; ``openclip`` needs an OpenCLIP checkpoint file, whose MLP
    activation ``activation`` (:data:`CLIP_ACTIVATIONS`) gives or :func:`clip_activation` detects."""
    if name == "openclip":
        if not clip_weights:
            raise ValueError(
                "the CLIP score needs an OpenCLIP checkpoint (open_clip_pytorch_model.bin or .safetensors): "
                "pass --clip-weights PATH; or ask for --clip-extractor substitute:model to use the model's own "
                "CLIP tower, reported as 'CLIP (substitute: model CLIP tower)'")
        if not Path(clip_weights).is_file():
            raise FileNotFoundError(f"CLIP weights not found: {clip_weights}")
        quick_gelu, source = clip_activation(clip_weights, activation)
        return ExtractorChoice("openclip", str(clip_weights), heads, quick_gelu, source)
    if name == "substitute:model":
        return ExtractorChoice("model_clip")
    raise ValueError(f"unknown CLIP extractor {name!r}; expected one of {CLIP_EXTRACTORS}")


def fid_metric_name(choice: ExtractorChoice) -> tuple[str, str]:
    """(metrics key, table label): plain "FID" only for the standard Inception."""
    if choice.kind == "inception":
        return "fid", "FID"
    if choice.kind == "model_vae":
        return "fid_substitute_model_vae", "FID (substitute: model VAE encoder)"
    return "fid_substitute_model_clip", "FID (substitute: model CLIP tower)"


def clip_metric_name(choice: ExtractorChoice) -> tuple[str, str]:
    if choice.kind == "openclip":
        return "clip_cosine", "CLIP"
    return "clip_cosine_substitute_model_clip", "CLIP (substitute: model CLIP tower)"


def detect_quick_gelu(path: str | Path) -> tuple[bool | None, str]:
    """Whether a CLIP checkpoint was trained with QuickGELU (``x·σ(1.702x)``), and what says so; ``None``
    when nothing does. The weights have the same shapes either way, so only metadata can tell, read the
    way open_clip decides it, in this order:

    1. ``open_clip_config.json`` beside the file (a Hugging Face OpenCLIP repo): ``model_cfg.quick_gelu``;
    2. a transformers ``config.json`` beside it: ``hidden_act`` (top level or ``vision_config``);
    3. the file or folder name: open_clip's ``-quickgelu`` model names and tags; ``openai`` (OpenAI's CLIP
       weights all use QuickGELU, which open_clip forces for them);
    4. the keys OpenAI's own checkpoints carry (:data:`OPENAI_CHECKPOINT_KEYS`).
    """
    from model.weights import tensor_shapes

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / "open_clip_config.json"
    if config.is_file():
        quick = bool(json.loads(config.read_text()).get("model_cfg", {}).get("quick_gelu", False))
        return quick, f"{config.name} says quick_gelu={str(quick).lower()}"
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        act = data.get("hidden_act") or (data.get("vision_config") or {}).get("hidden_act")
        if act:
            return act == "quick_gelu", f"{config.name} says hidden_act={act}"
    for name in (path.name, folder.name):
        lowered = name.lower().replace("_", "")
        if "quickgelu" in lowered:
            return True, f"the name {name!r} says QuickGELU"
        if "openai" in lowered:
            return True, f"the name {name!r} says OpenAI weights, which use QuickGELU"
    if path.is_file() and any(k in tensor_shapes(path) for k in OPENAI_CHECKPOINT_KEYS):
        return True, "the file has the keys of an OpenAI checkpoint (input_resolution, ...), which uses QuickGELU"
    return None, "no QuickGELU marker in the name, open_clip_config.json, config.json or keys"


def clip_activation(path: str | Path, requested: str = "auto") -> tuple[bool, str]:
    """(use QuickGELU, why) for a CLIP checkpoint: ``requested`` from :data:`CLIP_ACTIVATIONS`; ``auto``
    follows :func:`detect_quick_gelu` (GELU, open_clip's default, when nothing is marked). A request that
    contradicts the checkpoint's own metadata is refused: a wrong activation loads without any error and
    shifts every embedding."""
    if requested not in CLIP_ACTIVATIONS:
        raise ValueError(f"unknown CLIP activation {requested!r}; expected one of {CLIP_ACTIVATIONS}")
    detected, why = detect_quick_gelu(path)
    if requested == "auto":
        return bool(detected), why if detected is not None else f"{why}, GELU assumed (open_clip's default)"
    wanted = requested == "quick_gelu"
    if detected is not None and detected != wanted:
        raise ValueError(f"{path}: --clip-activation {requested} contradicts the checkpoint ({why}); "
                         f"drop the flag or fix the metadata")
    return wanted, f"--clip-activation {requested}" + (f" ({why})" if detected is not None else "")


def use_quick_gelu(visual: nn.Module) -> nn.Module:
    """Swap the GELU of every transformer block's MLP of an open_clip ``VisionTransformer`` for open_clip's
    ``QuickGELU`` (what ``quick_gelu=True`` builds); in place, returns ``visual``."""
    from open_clip.transformer import QuickGELU

    blocks = list(visual.transformer.resblocks)
    for block in blocks:
        if not isinstance(block.mlp.gelu, nn.GELU):
            raise ValueError(f"expected nn.GELU in the CLIP tower's MLP, found {type(block.mlp.gelu).__name__}")
        block.mlp.gelu = QuickGELU()
    return visual


def openclip_config_from_file(path: str | Path, heads: int | None = None):
    """A :class:`ClipVisionConfig` read off the shapes of an OpenCLIP checkpoint's ``visual.*`` tensors
    (width, patch, image size, depth, MLP ratio, output dim); heads from ``heads`` or the known towers."""
    from model.config import ClipVisionConfig
    from model.weights import read_state_dict

    state = read_state_dict(path, prefixes=("visual.", "module.visual."))
    state = {k.removeprefix("module.").removeprefix("visual."): v for k, v in state.items()}
    if "conv1.weight" not in state or "proj" not in state:
        raise ValueError(f"{path} holds no OpenCLIP ViT image tower (visual.conv1.weight / visual.proj missing)")
    width, _, patch, _ = state["conv1.weight"].shape
    grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if heads is None:
        if width not in OPENCLIP_HEADS:
            raise ValueError(f"{path}: an image tower {width} wide is not a known OpenCLIP size "
                             f"({sorted(OPENCLIP_HEADS)}); give its head count (--clip-heads)")
        heads = OPENCLIP_HEADS[width]
    return ClipVisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
                            mlp_ratio=hidden / width, embed_dim=state["proj"].shape[1])


class ImageEmbedder(nn.Module):
    """uint8 images (B, 3, H, W) → (B, D) embeddings: the class token of a CLIP tower or Inception's pool."""

    def __init__(self, network: nn.Module, is_clip: bool):
        super().__init__()
        self.network = network
        self.is_clip = is_clip

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.network.parameters()).device
        if not self.is_clip:
            return self.network(images.to(device)).float()
        dtype = next(self.network.parameters()).dtype
        tokens = self.network(images.to(device).float().div(255).to(dtype))
        return tokens[:, 0].float()  # after ln_post and the projection: OpenCLIP's image embedding


class LatentEmbedder(nn.Module):
    """uint8 images (B, 3, H, W) → (B, C·g²) features: the VAE posterior's mean latents, each channel averaged
    over a g×g grid (:data:`LATENT_GRID`). Pooling keeps where the colors are and drops the texture a
    handful of samples could not estimate; any image size works."""

    def __init__(self, vae: nn.Module, grid: int = LATENT_GRID):
        super().__init__()
        self.vae = vae
        self.grid = grid

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parameter = next(self.vae.parameters())
        pixels = images.to(parameter.device).float().div(127.5).sub(1).to(parameter.dtype)  # the VAE's [-1, 1]
        means = self.vae.encode(pixels).latent_dist.mean
        return F.adaptive_avg_pool2d(means.float(), self.grid).flatten(1)


def build_extractor(choice: ExtractorChoice, model=None, device=None) -> nn.Module:
    """The network for ``choice``; ``model`` (a Colorizer) supplies its own CLIP tower or VAE for substitutes."""
    if choice.kind == "inception":
        from pipelines.evaluation.inception import load_fid_inception

        return ImageEmbedder(load_fid_inception(choice.path).to(device), is_clip=False)
    if choice.kind == "openclip":
        from model.pretrained import load_clip_vision

        encoder = load_clip_vision(choice.path, openclip_config_from_file(choice.path, choice.heads))
        if choice.quick_gelu:
            use_quick_gelu(encoder.visual)
        return ImageEmbedder(encoder.eval().to(device), is_clip=True)
    if choice.kind in ("model_clip", "model_vae"):
        if model is None:
            raise ValueError(f"the model's own {choice.kind.removeprefix('model_').upper()} was asked for, but no "
                             f"model was given")
        return ImageEmbedder(model.clip, is_clip=True) if choice.kind == "model_clip" else LatentEmbedder(model.vae)
    raise ValueError(f"unknown extractor kind {choice.kind!r}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (B, D) embeddings."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
