"""``ColorizeOptions``: the settings of a colorization, one object from the HTTP request to the sampler.

``Colorizer.colorize`` and ``Colorizer.colorize_batch`` take one of these instead of a dozen keyword
arguments; the Serve app groups requests by it (requests with equal options can share one
``colorize_batch`` call); the evaluation builds one per output size. What differs between the items of
one batch (the images, the background references, the noise seeds) stays an argument of those calls.

A ``None`` field means "the model's default". :meth:`ColorizeOptions.resolved` fills those from the
model's :class:`~model.config.ColorizerConfig` (and the plugin's config for the plugin controls), so the
defaults are written in the config and nowhere else. Each value is checked when the options are made, so
a bad one fails before any encoder runs; what needs the model (the size grid, a plugin being there) is
checked when they are resolved.

No torch here: the HTTP ingress builds options without loading the model's libraries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING

from model.sizes import validate_size

if TYPE_CHECKING:
    from model.config import ColorizerConfig
    from model.plugin import PluginConfig

MAX_STEPS = 200
GUIDANCE_RANGE = (0.0, 30.0)  # what model.guidance.Guidance accepts
REGION_STRENGTH_RANGE = (0.0, 10.0)  # what model.split_attention.split_attention_kwargs accepts
# The samplers model.sampler.sample knows (named here, without torch, so requests are checked before the
# model loads): the published model's DPM++ 3M SDE (k-diffusion's algorithm), then diffusers schedulers.
SAMPLERS = ("dpmpp_3m_sde", "dpmpp_2m", "euler", "euler_ancestral", "ddim", "unipc")


@dataclass(frozen=True)
class ColorizeOptions:
    """How to colorize; every field has a default, so ``ColorizeOptions()`` is "the model's defaults".

    - ``size``: (width, height) of the output; ``None`` fits the sketch's aspect at the preset's default
      area (that default depends on the sketch, so :meth:`resolved` leaves it ``None``).
    - ``steps``: sampling steps, 1..200; ``None`` = ``config.sampling.steps``.
    - ``reference_guidance``, ``sketch_guidance``: classifier-free guidance scales, 0..30 (see
      :class:`model.guidance.Guidance`); ``None`` = the config's.
    - ``reference_strength``: scales every cross-attention output of the U-Net before its output projection
      (the published model's strength; 0 = no reference).
    - ``sketch_strengths``: one scale per sketch-injection point; ``None`` = 1 everywhere.
    - ``aesthetic_score``: SDXL's aesthetic-score condition; ``None`` = the config's (0 is a score too).
    - ``plugin``: the stage-2 plug-in (ReferenceNet bank, background LoRA, soft split cross-attention) on or
      off; ``None`` = on when the model has one.
    - ``background_enhance``: split cross-attention over [reference ‖ background reference] without the
      plug-in (the published ``bg_enhance`` of ``sdxl`` models: a hard split at the sketch threshold).
    - ``foreground_strength``, ``background_strength``: weight of each region's reading of its reference,
      0..10; ``merge_scale``: how much of the background reading the foreground takes in, 0..1 (both
      only with the plug-in or ``background_enhance``; as published, ``background_enhance`` without the
      plug-in uses the strengths only when ``merge_scale`` > 0).
    - ``sketch_mask_threshold``: sketch-mask value above which a token is foreground in the hard
      cross-attention split of ``background_enhance`` (published default 0.05; as published, the plug-in's
      soft blend does not use it and its bank self-attention keeps 0.05); ``reference_mask_threshold``: reference-mask value from which a pixel is
      painted white for the background picture (published default 0.5).
    - ``sampler``: one of :data:`SAMPLERS`; ``None`` = ``config.sampling.sampler``.
    """

    size: tuple[int, int] | None = None
    steps: int | None = None
    reference_guidance: float | None = None
    sketch_guidance: float | None = None
    reference_strength: float = 1.0
    sketch_strengths: tuple[float, ...] | None = None
    aesthetic_score: float | None = None
    plugin: bool | None = None
    background_enhance: bool = False
    foreground_strength: float = 1.0
    background_strength: float = 1.0
    merge_scale: float = 0.0
    sketch_mask_threshold: float = 0.05
    reference_mask_threshold: float = 0.5
    sampler: str | None = None

    def __post_init__(self):
        # Sequences become tuples and numbers plain floats, so equal settings compare (and hash) equal:
        # the Serve app groups requests on that.
        if self.size is not None:
            try:
                size = tuple(self.size)
            except TypeError:
                size = ()
            if len(size) != 2 or isinstance(self.size, str):
                raise ValueError(f"size must be (width, height), got {self.size!r}")
            self._set("size", size)
        if self.steps is not None:
            if not isinstance(self.steps, Integral) or isinstance(self.steps, bool):
                raise ValueError(f"steps must be an integer, got {self.steps!r}")
            if not 1 <= self.steps <= MAX_STEPS:
                raise ValueError(f"steps {self.steps} is outside [1, {MAX_STEPS}]")
            self._set("steps", int(self.steps))
        for name in ("reference_guidance", "sketch_guidance"):
            if getattr(self, name) is not None:
                self._set_number(name, *GUIDANCE_RANGE)
        self._set_number("reference_strength", 0.0, math.inf)
        if self.sketch_strengths is not None:
            if isinstance(self.sketch_strengths, (str, bytes)) or not hasattr(self.sketch_strengths, "__iter__"):
                raise ValueError(f"sketch_strengths must be a sequence of numbers, got {self.sketch_strengths!r}")
            self._set("sketch_strengths", tuple(_number(f"sketch_strengths[{i}]", value, 0.0, math.inf)
                                                for i, value in enumerate(self.sketch_strengths)))
        if self.aesthetic_score is not None:
            self._set_number("aesthetic_score", -math.inf, math.inf)
        if self.plugin is not None and not isinstance(self.plugin, bool):
            raise ValueError(f"plugin must be True, False or None (the model's default), got {self.plugin!r}")
        if not isinstance(self.background_enhance, bool):
            raise ValueError(f"background_enhance must be True or False, got {self.background_enhance!r}")
        for name in ("foreground_strength", "background_strength"):
            self._set_number(name, *REGION_STRENGTH_RANGE)
        self._set_number("merge_scale", 0.0, 1.0)
        self._set_number("sketch_mask_threshold", 0.0, 1.0, high_inclusive=False)
        self._set_number("reference_mask_threshold", 0.0, 1.0)
        if self.sampler is not None and (not isinstance(self.sampler, str) or self.sampler not in SAMPLERS):
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")

    def resolved(self, config: ColorizerConfig, plugin: PluginConfig | None = None) -> ColorizeOptions:
        """These options with the model's defaults filled in: steps, guidance, aesthetic score and sampler
        from ``config.sampling``; ``plugin`` (the model's plugin config, ``None`` when it has no plugin) decides
        whether the plugin is on. A given size is checked against the
        config's size grid. Raises ``ValueError`` for ``plugin=True`` on a model without a plugin."""
        s = config.sampling
        if self.size is not None:
            validate_size(*self.size, multiple=config.size_multiple, min_side=s.min_side, max_side=s.max_side)
        if self.plugin and plugin is None:
            raise ValueError("plugin=True needs a model with a plugin (a stage-2 model folder has plugin/); "
                             "this model has none")
        return dataclasses.replace(
            self,
            steps=s.steps if self.steps is None else self.steps,
            reference_guidance=s.reference_guidance if self.reference_guidance is None else self.reference_guidance,
            sketch_guidance=s.sketch_guidance if self.sketch_guidance is None else self.sketch_guidance,
            aesthetic_score=s.aesthetic_score if self.aesthetic_score is None else self.aesthetic_score,
            plugin=plugin is not None if self.plugin is None else self.plugin,
            sampler=s.sampler if self.sampler is None else self.sampler,
        )

    @property
    def splits_attention(self) -> bool:
        """Whether attention is split into foreground and background (the plug-in or ``background_enhance``)."""
        return bool(self.plugin) or self.background_enhance

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen; this is its own normalization

    def _set_number(self, name: str, low: float, high: float, *, high_inclusive: bool = True) -> None:
        self._set(name, _number(name, getattr(self, name), low, high, high_inclusive=high_inclusive))


def _number(name: str, value, low: float, high: float, *, high_inclusive: bool = True) -> float:
    """``value`` as a float, refused with its name unless it is a finite number in [low, high] (or [low, high))."""
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        upper = "inf)" if math.isinf(high) else f"{high:g}]" if high_inclusive else f"{high:g})"
        lower = "(-inf" if math.isinf(low) else f"[{low:g}"
        raise ValueError(f"{name} {value!r} is outside {lower}, {upper}")
    return float(value)
