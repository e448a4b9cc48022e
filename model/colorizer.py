"""The ``Colorizer``: all components together, their folder format, and ``colorize``.

A model folder holds ``config.json`` (the :class:`ColorizerConfig`) and one subfolder per component, each
in the format its library publishes: ``unet/`` and ``vae/`` are diffusers model folders, ``tagger/`` is
a timm-style ``model.safetensors`` plus ``selected_tags.csv`` (the WD-Tagger's own layout), ``clip/``
holds the OpenCLIP ``visual.*`` tensors, and ``sketch_encoder/`` and ``projector/`` hold ours. A folder
is therefore also the way pretrained parts are swapped in or taken out.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from model import pretrained
from model.acceleration import Acceleration, accelerate
from model.config import ColorizerConfig
from model.generate import StepReport, StopCheck, generate_latents
from model.background import (MaskModels, crop_condition, latent_mask, stretch,
                              whiten_foreground)
from model.guidance import Guidance
from model.images import image_to_tensor, sketch_to_tensor, tensor_to_image
from model.options import ColorizeOptions
from model.projector import ReferenceProjector
from model.reference_encoders import ClipImageEncoder, Images, WDTagger, freeze
from model.sampler import training_scheduler
from model.sizes import fit_size, validate_size
from model.sketch_encoder import SketchEncoder
from model.split_attention import install_split_attention, split_attention_kwargs
from model.unet import ColorizerUNet, build_unet, injection_points
from model.vae import build_vae, decode_latents, encode_latents
from model.vector_condition import vector_condition

FORMAT_NAME = "colorize-xl"
# 2: the sketch encoder and projector are the published ColorizeDiffusionXL ones (their keys and shapes
#    changed); a version-1 folder's trained parts have no place in them, so it is refused, not half-loaded.
FORMAT_VERSION = 2
TRAINABLE = ("unet", "sketch_encoder", "projector")
FROZEN = ("tagger", "clip", "vae")
OPTIONAL_PARTS = ("unet", "vae", "tagger", "clip")  # may be left out of a load (see from_pretrained)
MANIFEST_FILE = "config.json"  # the folder's format, version and ColorizerConfig; written last by save_pretrained


def is_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished model (its manifest is written last, so a half-saved folder is not one)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_config(folder: str | Path) -> ColorizerConfig:
    """The folder's :class:`ColorizerConfig`, after checking its format and version (no weights are read)."""
    manifest_path = Path(folder) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a colorize-xl model folder: {manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(f"{manifest_path} is format version {version}; this code reads up to {FORMAT_VERSION}")
    if version < FORMAT_VERSION:
        raise ValueError(f"{manifest_path} is format version {version}, made before the sketch encoder and projector "
                         f"became the published model's (version {FORMAT_VERSION}); its weights cannot be mapped. "
                         "Assemble a new folder (jobs/init_model.py) or import the published checkpoint "
                         "(jobs/import_checkpoint.py)")
    return ColorizerConfig.from_dict(manifest["config"])


@dataclass(frozen=True)
class PretrainedPaths:
    """Local files of published weights to start from (any may be ``None`` = random init)."""

    unet: str | Path | None = None  # diffusers folder or single-file SDXL checkpoint
    vae: str | Path | None = None  # diffusers folder or single-file checkpoint
    tagger_weights: str | Path | None = None  # WD-Tagger model.safetensors (timm keys)
    tagger_tags: str | Path | None = None  # its selected_tags.csv
    clip: str | Path | None = None  # OpenCLIP checkpoint (.bin / .safetensors)


class Colorizer(nn.Module):
    """Sketch + reference → colored image. Build with :meth:`from_config` or :meth:`from_pretrained`."""

    def __init__(self, config: ColorizerConfig, *, unet=None, vae=None, tagger: WDTagger | None = None,
                 clip: ClipImageEncoder | None = None):
        super().__init__()
        self.config = config
        self.unet = ColorizerUNet(unet if unet is not None else build_unet(config.unet))
        self.sketch_encoder = SketchEncoder(config.sketch_encoder, injection_points(config.unet))
        self.projector = ReferenceProjector(
            clip_dim=config.clip.embed_dim,
            tagger_dim=config.tagger.token_dim,
            context_dim=config.unet.cross_attention_dim,
            num_tokens=config.context_tokens,
            head_dim=config.projector.attention_head_dim,
        )
        self.tagger = freeze(tagger if tagger is not None else WDTagger(config.tagger))
        self.clip = freeze(clip if clip is not None else ClipImageEncoder(config.clip))
        self.vae = freeze(vae if vae is not None else build_vae(config.vae))
        self.noise_scheduler = training_scheduler(config.diffusion)
        self.plugin = None  # stage 2: a model.plugin.Plugin, attached by model.plugin.attach_plugin
        self.masks = MaskModels()  # the background modes' mask models (weight-free until learned ones are set)
        install_split_attention(self.unet.unet)  # stock until a call asks for a split
        self.acceleration = Acceleration()  # the plain eager model until accelerate() says otherwise

    def accelerate(self, acceleration: Acceleration) -> dict:
        """Apply the inference switches of :mod:`model.acceleration` (compile, channels_last, the SDPA
        kernel) in place; returns what was done."""
        return accelerate(self, acceleration)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: ColorizerConfig, pretrained_paths: PretrainedPaths | None = None,
                    placeholders: tuple[str, ...] = (), progress: bool = False,
                    dtype: torch.dtype | None = None) -> "Colorizer":
        """Fresh model; published parts are loaded where ``pretrained_paths`` names them, at ``dtype`` (built
        on the meta device and filled from the files, so no float32 copy is made first). Parts named in
        ``placeholders`` (from :data:`OPTIONAL_PARTS`) are built on the meta device: right shapes, no memory,
        unusable until loaded (a trainer needs no tagger, a preprocess encoder no U-Net). ``progress`` shows
        a bar over the published parts (assembling the sdxl preset reads about 10 GB)."""
        paths = pretrained_paths or PretrainedPaths()
        unknown = set(placeholders) - set(OPTIONAL_PARTS)
        if unknown:
            raise ValueError(f"only {OPTIONAL_PARTS} can be left out, not {sorted(unknown)}")
        if bool(paths.tagger_weights) != bool(paths.tagger_tags):
            raise ValueError("the WD-Tagger needs both its weights file and its selected_tags.csv")
        parts: dict = dict.fromkeys(OPTIONAL_PARTS)
        with torch.device("meta"):
            builders = {"unet": lambda: build_unet(config.unet), "vae": lambda: build_vae(config.vae),
                        "tagger": lambda: WDTagger(config.tagger), "clip": lambda: ClipImageEncoder(config.clip)}
            for name in placeholders:
                parts[name] = builders[name]()
        loaders = {
            "unet": paths.unet and (lambda: pretrained.load_unet(paths.unet, config.unet, dtype)),
            "vae": paths.vae and (lambda: pretrained.load_vae(paths.vae, config.vae, dtype)),
            "tagger": paths.tagger_weights and (
                lambda: pretrained.load_tagger(paths.tagger_weights, paths.tagger_tags, config.tagger, dtype)),
            "clip": paths.clip and (lambda: pretrained.load_clip_vision(paths.clip, config.clip, dtype)),
        }
        published = [(name, load) for name, load in loaders.items() if load]
        with tqdm(published, desc="load published weights", unit="part", disable=not (progress and published)) as bar:
            for name, load in bar:
                bar.set_postfix_str(name)
                parts[name] = load()
        if parts["tagger"] is not None and paths.tagger_weights:
            config = config.replace(tagger={"num_tags": len(parts["tagger"].tags)})
        return cls(config, **parts)

    def train(self, mode: bool = True) -> "Colorizer":
        super().train(mode)
        for name in FROZEN:  # frozen encoders stay in inference mode whatever the trainer does
            getattr(self, name).eval()
        return self

    def trainable_parameters(self):
        return [p for name in TRAINABLE for p in getattr(self, name).parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------------------------- folder format
    def save_pretrained(self, folder: str | Path) -> Path:
        left_out = [n for n in OPTIONAL_PARTS if any(p.is_meta for p in getattr(self, n).parameters())]
        if left_out:
            raise ValueError(f"this model was loaded without {left_out}; load it whole to save it")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.plugin is not None:  # the unet folder stays stock diffusers; adapters go to plugin/
            from model.plugin import save_plugin
            from model.split_attention import stock_processors

            with stock_processors(self.unet.unet):
                self.unet.unet.save_pretrained(folder / "unet", safe_serialization=True)
            save_plugin(self, folder / "plugin")
        else:
            self.unet.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        sections = {"sketch_encoder": "sketch_encoder", "projector": "projector", "tagger": "tagger", "clip": "clip"}
        tensors = {
            "sketch_encoder": self.sketch_encoder.state_dict(),
            "projector": self.projector.state_dict(),
            "tagger": self.tagger.model.state_dict(),
            "clip": {f"visual.{k}": v for k, v in self.clip.visual.state_dict().items()},
        }
        config = self.config.to_dict()
        for component, state in tensors.items():
            sub = folder / component
            sub.mkdir(exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(sub / "model.safetensors"))
            (sub / "config.json").write_text(json.dumps(config[sections[component]], indent=2))
        with open(folder / "tagger" / "selected_tags.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["tag_id", "name", "category", "count"])
            writer.writerows([i, tag, 0, 0] for i, tag in enumerate(self.tagger.tags))
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype=None,
                        components: tuple[str, ...] | None = None) -> "Colorizer":
        """Load a model folder. ``components`` limits which of :data:`OPTIONAL_PARTS` are read (the rest
        stay meta placeholders); the sketch encoder, projector and plugin are always loaded."""
        folder = Path(folder)
        placeholders = tuple(p for p in OPTIONAL_PARTS if components is not None and p not in components)
        config = read_config(folder)
        wanted = {part: part not in placeholders for part in OPTIONAL_PARTS}
        model = cls.from_config(config, PretrainedPaths(
            unet=folder / "unet" if wanted["unet"] else None,
            vae=folder / "vae" if wanted["vae"] else None,
            tagger_weights=folder / "tagger" / "model.safetensors" if wanted["tagger"] else None,
            tagger_tags=folder / "tagger" / "selected_tags.csv" if wanted["tagger"] else None,
            clip=folder / "clip" / "model.safetensors" if wanted["clip"] else None,
        ), placeholders=placeholders, dtype=dtype)
        for component in ("sketch_encoder", "projector"):
            path = folder / component / "model.safetensors"
            pretrained.check_and_load(getattr(model, component), pretrained.read_state_dict(path), path)
        if (folder / "plugin").is_dir():
            from model.plugin import load_plugin

            load_plugin(model, folder / "plugin")
        for name, child in model.named_children():  # placeholders stay on the meta device
            if name not in placeholders:
                child.to(device=device, dtype=dtype)
        return model.eval()

    # ---------------------------------------------------------------------------------------- inference
    def output_size(self, sketch_size: tuple[int, int], size: tuple[int, int] | None) -> tuple[int, int]:
        s = self.config.sampling
        limits = dict(multiple=self.config.size_multiple, min_side=s.min_side, max_side=s.max_side)
        if size is None:
            return fit_size(*sketch_size, area=s.default_area, **limits)
        return validate_size(*size, **limits)

    @torch.no_grad()
    def encode_reference(self, images: Images) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1], or a list of (1, 3, H_i, W_i) of any sizes → context (B, N, D)."""
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, self.dtype)
        else:
            images = [x.to(self.device, self.dtype) for x in images]
        return self.projector(self.clip(images), self.tagger(images).tokens)

    @torch.no_grad()
    def colorize(self, sketch, reference, options: ColorizeOptions | None = None, *, seed: int = 0,
                 background_reference=None, should_stop: StopCheck | None = None,
                 on_step: StepReport | None = None) -> Image.Image:
        """Color ``sketch`` (a drawing: dark lines on light, PIL or uint8 array) after ``reference``.

        ``options`` holds the settings (``None`` = the model's defaults); ``seed`` draws the noise;
        ``background_reference`` gives the background its own picture (with the plug-in or
        ``background_enhance``). A batch of one: :meth:`colorize_batch` has the details.
        """
        backgrounds = None if background_reference is None else [background_reference]
        return self.colorize_batch([sketch], [reference], options, seeds=[seed], background_references=backgrounds,
                                   should_stop=should_stop, on_step=on_step)[0]

    @torch.no_grad()
    def colorize_batch(self, sketches: list, references: list, options: ColorizeOptions | None = None, *,
                       seeds: list[int], background_references: list | None = None,
                       should_stop: StopCheck | None = None, on_step: StepReport | None = None,
                       contexts: torch.Tensor | None = None) -> list[Image.Image]:
        """Several pairs with the same ``options`` (so at one output size); each item's noise comes from its
        own seed, so an item's result does not depend on what it was batched with.

        With the plug-in (``options.plugin``, on by default when the model has one) or
        ``options.background_enhance``, attention is split into foreground and background (masks from
        :attr:`masks`): see :meth:`background_conditions`. ``background_references`` (per item, or ``None``
        entries) give the background its own picture.

        ``should_stop`` (a server's "is anybody still waiting?") is asked between denoising steps; when it
        returns True the call raises :class:`model.generate.Cancelled` instead of finishing. ``on_step(done,
        total)`` is told after each step. ``contexts`` (B, N, D): the references' contexts, already computed
        with :meth:`encode_reference` (a batch job that colors many sketches after one reference encodes it
        once); only without split attention, which encodes the background picture too.
        """
        if not (len(sketches) == len(references) == len(seeds)) or not sketches:
            raise ValueError(f"got {len(sketches)} sketches, {len(references)} references, {len(seeds)} seeds")
        options = self.resolve(options)
        first = image_to_tensor(sketches[0])
        width, height = self.output_size((first.shape[-1], first.shape[-2]), options.size)
        sketch = torch.cat([sketch_to_tensor(x, (width, height)) for x in sketches])
        reference_images = [image_to_tensor(x) for x in references]
        backgrounds = None
        if background_references is not None:
            if len(background_references) != len(references):
                raise ValueError(f"got {len(background_references)} background references for "
                                 f"{len(references)} references")
            backgrounds = [None if b is None else image_to_tensor(b) for b in background_references]
        return tensor_to_image(self._sample(sketch, reference_images, options, seeds, None, backgrounds=backgrounds,
                                            should_stop=should_stop, on_step=on_step, context=contexts))

    @torch.no_grad()
    def colorize_tensors(self, sketch: torch.Tensor, references: Images, options: ColorizeOptions | None = None, *,
                         seeds: list[int], noise: torch.Tensor | None = None, backgrounds: list | None = None,
                         sketch_mask: torch.Tensor | None = None,
                         reference_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The tensor-level entry: ``sketch`` (B, 3, H, W) already in model space (inverted, letterboxed,
        in [-1, 1], H and W on the size grid), ``references`` RGB in [0, 1] (a batch, or a list of single
        images of any sizes) → decoded images (B, 3, H, W) in [-1, 1].

        ``noise`` (B, C, H/8, W/8) replaces the seeds' initial noise (the seeds still drive the solver's
        fresh noise): what a parity check against another implementation needs. With split attention
        (the plug-in or ``background_enhance``), ``backgrounds`` (per item, RGB in [0, 1] or ``None``) and the
        masks (``sketch_mask`` (B, 1, H, W) soft; ``reference_masks`` per item (1, 1, h, w) binary) replace
        what :attr:`masks` would compute; see :meth:`background_conditions`.
        """
        options = self.resolve(options if options is not None else ColorizeOptions(plugin=False))
        if sketch.shape[0] != len(seeds):
            raise ValueError(f"got {sketch.shape[0]} sketches and {len(seeds)} seeds")
        multiple = self.config.size_multiple
        if sketch.shape[-1] % multiple or sketch.shape[-2] % multiple:
            raise ValueError(f"sketch size {sketch.shape[-1]}x{sketch.shape[-2]} is not a multiple of {multiple}")
        return self._sample(sketch, references, options, seeds, noise, backgrounds=backgrounds,
                            sketch_mask=sketch_mask, reference_masks=reference_masks)

    def resolve(self, options: ColorizeOptions | None) -> ColorizeOptions:
        """``options`` with this model's defaults filled in (see :meth:`ColorizeOptions.resolved`)."""
        return (options if options is not None else ColorizeOptions()).resolved(
            self.config, self.plugin.config if self.plugin is not None else None)

    def _sample(self, sketch: torch.Tensor, references: Images, options: ColorizeOptions, seeds: list[int],
                noise: torch.Tensor | None, *, backgrounds: list | None = None, sketch_mask=None, reference_masks=None,
                should_stop: StopCheck | None = None, on_step: StepReport | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Resolved ``options`` → decoded images (B, 3, H, W) in [-1, 1]: the one sampling path
        (``should_stop``: see :func:`model.generate.generate_latents`)."""
        points = len(self.sketch_encoder.points)
        if options.sketch_strengths is not None and len(options.sketch_strengths) != points:
            raise ValueError(f"sketch_strengths needs {points} values (one per injection point), "
                             f"got {len(options.sketch_strengths)}")
        if backgrounds is not None and not options.splits_attention:
            raise ValueError("a background reference needs the plug-in or background_enhance; both are off")
        with self.acceleration.attention_context():  # the chosen SDPA kernel, for every part
            height, width = sketch.shape[-2:]
            device, dtype = self.device, self.dtype
            sketch = sketch.to(device, dtype)
            if not isinstance(references, torch.Tensor):
                references = [r.to(device, dtype) for r in references]
            split_kwargs = None
            if options.splits_attention:
                if context is not None:
                    raise ValueError("precomputed contexts are for colorizing without split attention (the plug-in "
                                     "and background_enhance encode the background picture too)")
                context, split_kwargs = self.background_conditions(sketch, references, options, backgrounds,
                                                                   sketch_mask, reference_masks)
            elif context is None:
                context = self.encode_reference(references)
            elif context.shape[0] != sketch.shape[0]:
                raise ValueError(f"got {context.shape[0]} contexts for {sketch.shape[0]} sketches")
            else:
                context = context.to(device, dtype)
            vector = vector_condition(height, width, options.aesthetic_score, batch=sketch.shape[0], device=device)
            sketch_strengths = None if options.sketch_strengths is None else list(options.sketch_strengths)
            latents = generate_latents(self.unet, self.sketch_encoder, self.config, context=context,
                                       sketch=sketch, vector=vector, seeds=seeds, steps=options.steps,
                                       guidance=Guidance(options.reference_guidance, options.sketch_guidance),
                                       sketch_strengths=sketch_strengths, cross_attention_kwargs=split_kwargs,
                                       reference_strength=options.reference_strength, noise=noise, sampler=options.sampler,
                                       should_stop=should_stop, on_step=on_step)
            return decode_latents(self.vae, latents)

    @torch.no_grad()
    def background_conditions(self, sketch: torch.Tensor, references: Images, options: ColorizeOptions,
                              backgrounds: list | None = None, sketch_mask: torch.Tensor | None = None,
                              reference_masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """The context [reference ‖ background reference] (B, 2N, D) and the ``cross_attention_kwargs`` of
        split attention, as the published code prepares them (:mod:`model.background` has the conventions).

        Per item: the background picture is its ``backgrounds`` entry, or the reference with its foreground
        (reference mask ≥ ``options.reference_mask_threshold``) painted white. With the plug-in, the
        ReferenceNet reads that picture's latent (stretched to the output size), both masks and the crop, once
        per generation, and its bank and the background LoRA join the soft split; without it the split is
        hard at ``options.sketch_mask_threshold``.
        """
        batch, _, height, width = sketch.shape
        latent_size = (height // self.config.latent_stride, width // self.config.latent_stride)
        items = list(references) if not isinstance(references, torch.Tensor) else list(references.split(1))
        backgrounds = backgrounds if backgrounds is not None else [None] * batch
        if len(items) != batch or len(backgrounds) != batch:
            raise ValueError(f"got {len(items)} references and {len(backgrounds)} backgrounds for {batch} sketches")
        device, dtype = self.device, self.dtype
        smask = sketch_mask.to(device, torch.float32) if sketch_mask is not None else self.masks.sketch_mask(sketch)
        pictures, reference_pixel_masks = [], []
        for i, reference in enumerate(items):
            reference = reference.to(device, torch.float32) * 2 - 1
            rmask = (reference_masks[i].to(device, torch.float32) if reference_masks is not None
                     else self.masks.reference_mask(reference))
            reference_pixel_masks.append(rmask)
            given = backgrounds[i]
            pictures.append(given.to(device, torch.float32) * 2 - 1 if given is not None
                            else whiten_foreground(reference, rmask, options.reference_mask_threshold))
        context = self.encode_reference(items)
        background_context = self.encode_reference([((p + 1) / 2).to(dtype) for p in pictures])
        context = torch.cat([context, background_context], dim=1)
        attention_mask = latent_mask(smask, latent_size).to(dtype)
        bank = None
        if options.plugin:
            latents = encode_latents(self.vae, torch.cat([stretch(p, (height, width)) for p in pictures]).to(dtype))
            rmask_latent = torch.cat([latent_mask(stretch(m, (height, width)), latent_size)
                                      for m in reference_pixel_masks])
            smask_latent = latent_mask(stretch(smask, (height, width)), latent_size)
            crop = crop_condition(height, width, [tuple(p.shape[-2:]) for p in pictures], device=device)
            bank = self.plugin(latents.to(dtype), smask_latent.to(dtype), rmask_latent.to(dtype), crop)
        return context, split_attention_kwargs(
            attention_mask, blend=bool(options.plugin), bank=bank, background_lora=bool(options.plugin),
            threshold=options.sketch_mask_threshold, foreground_strength=options.foreground_strength,
            background_strength=options.background_strength, merge_scale=options.merge_scale)
