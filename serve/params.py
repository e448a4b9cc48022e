"""The fields of ``POST /v1/colorize`` besides its images: what each accepts, strict parsing of form strings
(ASCII digits for integers, plain decimals, a closed set of boolean words), and validation errors turned
into short messages that name the field's rule and never echo the input."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.line_art import CLASSIC_EXTRACTORS
from model.options import SAMPLERS
from serve.errors import MAX_ERRORS_LISTED, ApiError, listed, quoted

MAX_STEPS = 100
MAX_SEED = 2**63 - 1
MAX_SIDE_FIELD = 16384  # width/height beyond this are refused as out of range before the size grid is asked
MAX_FIELD_CHARS = 64  # a non-image string field
IMAGE_FIELDS = ("sketch", "reference", "background_reference")


INT_RANGES = {"seed": (0, MAX_SEED), "steps": (1, MAX_STEPS), "width": (1, MAX_SIDE_FIELD),
              "height": (1, MAX_SIDE_FIELD)}
FLOAT_RANGES = {"reference_guidance": (0.0, 30.0), "sketch_guidance": (0.0, 30.0), "reference_strength": (0.0, 2.0),
                "foreground_strength": (0.0, 10.0), "background_strength": (0.0, 10.0), "merge_scale": (0.0, 1.0),
                "sketch_mask_threshold": (0.0, 0.99), "reference_mask_threshold": (0.0, 1.0)}
BOOL_FIELDS = ("plugin", "background_enhance", "extract_lines")
CHOICES = {"line_extractor": tuple(CLASSIC_EXTRACTORS), "sampler": tuple(SAMPLERS), "format": ("png", "json")}
_FORM_BOOLS = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only; 19 digits hold MAX_SEED
_DECIMAL = re.compile(r"-?[0-9]{1,12}(?:\.[0-9]{1,12})?(?:[eE][-+]?[0-9]{1,3})?")


def field_rule(name: str) -> str:
    """What a field accepts, as the error message names it."""
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        return f"{name}: must be a whole number from {low} to {high}"
    if name in FLOAT_RANGES:
        low, high = FLOAT_RANGES[name]
        return f"{name}: must be a number from {low:g} to {high:g}"
    if name in BOOL_FIELDS:
        return f"{name}: must be true or false (in a form also 1/0 or on/off)"
    if name in CHOICES:
        return f"{name}: must be one of {', '.join(CHOICES[name])}"
    return f"{quoted(name)}: not a field"


class ColorizeParams(BaseModel):
    """The form/JSON fields of ``POST /v1/colorize`` (images aside). Strict: JSON types as declared (form
    fields are turned into them by :func:`form_values` first)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    width: int | None = Field(None, ge=1, le=MAX_SIDE_FIELD)
    height: int | None = Field(None, ge=1, le=MAX_SIDE_FIELD)
    reference_guidance: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    sketch_guidance: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    reference_strength: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    plugin: bool | None = None
    background_enhance: bool = False
    foreground_strength: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    background_strength: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    merge_scale: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    sketch_mask_threshold: float = Field(0.05, ge=0.0, le=0.99, allow_inf_nan=False)
    reference_mask_threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    extract_lines: bool = False
    line_extractor: Literal[tuple(CLASSIC_EXTRACTORS)] = "xdog"
    sampler: Literal[SAMPLERS] | None = None
    format: Literal["png", "json"] = "png"

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither (to fit the sketch's aspect)")
        return self


class ColorizeJSON(ColorizeParams):
    """The JSON body: the fields, and the images as base64 strings or ``data:`` URLs."""

    sketch: str | None = None
    reference: str | None = None
    background_reference: str | None = None


PARAM_FIELDS = tuple(ColorizeParams.model_fields)


def validation_message(err: ValidationError) -> str:
    """At most a few of pydantic's errors, each as the field's rule (never the input echoed back)."""
    parts = []
    for item in err.errors(include_url=False, include_input=False, include_context=False):
        loc = [x for x in item.get("loc", ()) if x != "body"]
        if loc and isinstance(loc[0], str) and loc[0] in PARAM_FIELDS:
            message = field_rule(loc[0])
        else:
            message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if message not in parts:
            parts.append(message)
    return listed(parts)


def check_fields(data: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [key for key in data if key not in allowed]
    if unknown:
        names = ", ".join(quoted(key) for key in unknown[:MAX_ERRORS_LISTED])
        more = f" (and {len(unknown) - MAX_ERRORS_LISTED} more)" if len(unknown) > MAX_ERRORS_LISTED else ""
        raise ApiError(422, f"unknown field{'s' if len(unknown) > 1 else ''} {names}{more}; "
                            f"the fields are {', '.join((*IMAGE_FIELDS, *PARAM_FIELDS))}")
    for key, value in data.items():
        if key not in IMAGE_FIELDS and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise ApiError(422, f"{key}: too long (at most {MAX_FIELD_CHARS} characters)" if key in CHOICES
                           else field_rule(key))


def form_values(fields: dict[str, str]) -> dict[str, Any]:
    """Form strings → the JSON types :class:`ColorizeParams` takes, strictly (ASCII digits for integers)."""
    values: dict[str, Any] = {}
    for name, text in fields.items():
        if name in INT_RANGES:
            if not _DIGITS.fullmatch(text):
                raise ApiError(422, field_rule(name))
            values[name] = int(text)
        elif name in FLOAT_RANGES:
            if not _DECIMAL.fullmatch(text):
                raise ApiError(422, field_rule(name))
            values[name] = float(text)
        elif name in BOOL_FIELDS:
            if text.lower() not in _FORM_BOOLS:
                raise ApiError(422, field_rule(name))
            values[name] = _FORM_BOOLS[text.lower()]
        else:
            values[name] = text
    return values


def validate_params(values: dict[str, Any]) -> ColorizeParams:
    try:
        return ColorizeParams.model_validate(values)
    except ValidationError as err:
        raise ApiError(422, validation_message(err)) from None
