"""The HTTP API as a plain FastAPI app: request parsing, validation, auth and size limits.

Nothing here imports Ray (nor torch). The app talks to a :class:`Backend` (``info()`` and
``async colorize(request)``, a :class:`ColorizeRequest`);
``serve/app.py`` gives it one that calls the model deployment, and any object with those two methods
works for other uses.

Routes (errors are JSON ``{"error": message, "status": code}``):

- ``GET /healthz``: ``{"status": "ok"}``; never needs the token.
- ``GET /v1/info``: the model's numbers (preset, default steps/guidance, size grid, plugin present).
- ``POST /v1/colorize``: multipart (files ``sketch``, ``reference``, optional ``background_reference``,
  plus form fields) or JSON (the same fields; images as base64 strings, ``data:`` URLs accepted).
  Fields: ``seed`` (random when absent; always returned), ``steps`` (1..100), ``width``/``height``
  (both or neither; neither = the sketch's aspect at the preset's default area), ``reference_guidance``
  and ``sketch_guidance`` (0..30), ``reference_strength`` (0..2), ``plugin`` (on/off; default on when
  the model has one), ``format`` (``png``: image/png with the parameters in ``X-*`` headers;
  ``json``: ``{"image": base64 PNG, "parameters": {...}}``), ``extract_lines`` (true: the sketch is a
  colored or photographed drawing; its lines are extracted first with ``line_extractor``, one of the
  weight-free extractors of :mod:`model.line_art`, default ``xdog``), ``sampler`` (one of
  :data:`model.options.SAMPLERS`; default the model's, the published DPM++ 3M SDE).
- ``GET /``: the artists' web page (``serve/static/index.html``); it needs no token to load, and sends the
  one typed into it with each call.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import secrets
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.image_io import DecodeError, decode_image
from model.line_art import CLASSIC_EXTRACTORS
from model.options import SAMPLERS, ColorizeOptions
from model.sizes import fit_size, validate_size

PAGE = Path(__file__).with_name("static") / "index.html"

MAX_STEPS = 100
MAX_SEED = 2**63 - 1
IMAGE_FIELDS = ("sketch", "reference", "background_reference")
# The API's limits and back-off, defined here once: Settings, Overloaded and serve/app.py's AppOptions use them.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a whole request, images included
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096  # per uploaded image, checked from its header before decoding
DEFAULT_RETRY_AFTER_S = 1.0  # what a 503 asks the client to wait


# ------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A request the API refuses: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Overloaded(Exception):
    """Raised by a backend that cannot take the request now (→ 503 with Retry-After)."""

    def __init__(self, message: str = "the service is overloaded; retry later",
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)


# --------------------------------------------------------------------------------------- the model side
@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about the model (``GET /v1/info`` returns it)."""

    preset: str  # a preset's name, or "custom"
    size_multiple: int
    min_side: int
    max_side: int
    default_area: int
    default_steps: int
    reference_guidance: float
    sketch_guidance: float
    plugin: bool
    max_steps: int = MAX_STEPS
    sampler: str = SAMPLERS[0]  # the model's default sampler

    @classmethod
    def from_config(cls, config, plugin: bool) -> "ModelInfo":
        """From a :class:`model.config.ColorizerConfig` and whether the folder has a plugin."""
        from model.config import preset_name

        s = config.sampling
        return cls(preset=preset_name(config), size_multiple=config.size_multiple, min_side=s.min_side,
                   max_side=s.max_side, default_area=s.default_area, default_steps=min(s.steps, MAX_STEPS),
                   reference_guidance=s.reference_guidance, sketch_guidance=s.sketch_guidance, plugin=plugin,
                   sampler=s.sampler)


@dataclass(frozen=True, eq=False)  # compared by identity: image arrays have no single truth value to compare
class ColorizeRequest:
    """One validated colorization request, as the backend receives it (images are RGB uint8 arrays).

    ``options`` are fully spelled out (no ``None`` left for the model to fill), so the response can report
    exactly what was used; requests with equal options can share one ``colorize_batch`` call.
    """

    sketch: np.ndarray
    reference: np.ndarray
    background_reference: np.ndarray | None
    seed: int
    options: ColorizeOptions
    line_extractor: str | None = None  # the sketch's lines were extracted with this first (None: used as sent)

    def parameters(self) -> dict[str, Any]:
        """What was used, for the response (``X-*`` headers or the JSON ``parameters``)."""
        options = self.options
        width, height = options.size
        return {"seed": self.seed, "steps": options.steps, "width": width, "height": height,
                "reference_guidance": options.reference_guidance, "sketch_guidance": options.sketch_guidance,
                "reference_strength": options.reference_strength, "plugin": options.plugin,
                "line_extractor": self.line_extractor, "background_reference": self.background_reference is not None,
                "sampler": options.sampler}


class Backend(Protocol):
    def info(self) -> ModelInfo: ...

    async def colorize(self, request: ColorizeRequest) -> np.ndarray: ...


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    api_token: str | None = None  # bearer token; None or "" = no auth
    open_paths: tuple[str, ...] = field(default=("/healthz", "/"))


# ------------------------------------------------------------------------------------------ parameters
class ColorizeParams(BaseModel):
    """The form/JSON fields of ``POST /v1/colorize`` (images aside)."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    reference_guidance: float | None = Field(None, ge=0.0, le=30.0)
    sketch_guidance: float | None = Field(None, ge=0.0, le=30.0)
    reference_strength: float = Field(1.0, ge=0.0, le=2.0)
    plugin: bool | None = None
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
    sketch: str | None = None
    reference: str | None = None
    background_reference: str | None = None


def _b64(name: str, text: str) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{name} is not valid base64") from None


def _decode(name: str, data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return decode_image(data, max_pixels=max_pixels)
    except DecodeError as err:
        reason = str(err)
        status = 413 if reason.startswith(("too many pixels", "decompression bomb")) else 422
        raise ApiError(status, f"{name}: {reason}") from None


def extract_drawing(image: np.ndarray, extractor: str) -> np.ndarray:
    """A colored or photographed drawing → its line drawing (dark lines on white, RGB), as the model expects."""
    lines = CLASSIC_EXTRACTORS[extractor](image)
    return np.repeat(lines[..., None], 3, axis=2)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- the app
def create_app(backend: Backend, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="colorize-xl", version="1")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, err: Overloaded):
        return _error(503, err.message, {"Retry-After": str(max(1, round(err.retry_after_s)))})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return _error(422, "; ".join(str(e.get("msg")) for e in err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        # Auth first, then the declared size: both before a byte of the body is read.
        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):  # behind a route prefix (Serve passes it as root_path)
            path = path[len(root):] or "/"
        if settings.api_token and path not in settings.open_paths:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_token.encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return _error(400, "Content-Length is not a number")
            if declared > settings.max_body_bytes:
                return _error(413, f"request body of {declared} bytes exceeds the limit of "
                                   f"{settings.max_body_bytes} bytes")
        return await call_next(request)

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def artists_page():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info():
        model = backend.info()
        return {"model": asdict(model), "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_input_pixels": settings.max_input_pixels,
            "sizes": {"multiple": model.size_multiple, "min_side": model.min_side, "max_side": model.max_side,
                      "default_area": model.default_area},
            "steps": [1, MAX_STEPS], "guidance": [0.0, 30.0], "reference_strength": [0.0, 2.0]},
            "line_extractors": list(CLASSIC_EXTRACTORS), "samplers": list(SAMPLERS), "auth": bool(settings.api_token)}

    @app.post("/v1/colorize")
    async def colorize(request: Request):
        body = await _read_body(request, settings.max_body_bytes)
        raw, images = await _parse(request, body)
        model = backend.info()
        try:
            params = ColorizeParams.model_validate(raw)
        except ValidationError as err:
            raise ApiError(422, _validation_message(err)) from None
        for name in ("sketch", "reference"):
            if not images.get(name):
                raise ApiError(422, f"missing {name} image (send it as the '{name}' file or base64 field)")
        if images.get("background_reference") is not None and not model.plugin:
            raise ApiError(422, "background_reference needs a model with a plugin; this model has none")
        if params.plugin and not model.plugin:
            raise ApiError(422, "plugin=true needs a model with a plugin; this model has none")
        use_plugin = model.plugin if params.plugin is None else params.plugin
        if images.get("background_reference") is not None and not use_plugin:
            raise ApiError(422, "background_reference needs the plugin on")
        decoded = {name: _decode(name, data, settings.max_input_pixels)
                   for name, data in images.items() if data is not None}
        if params.extract_lines:  # CPU work: keep it off the event loop
            decoded["sketch"] = await run_in_threadpool(extract_drawing, decoded["sketch"], params.line_extractor)
        limits = dict(multiple=model.size_multiple, min_side=model.min_side, max_side=model.max_side)
        if params.width is None:
            sketch = decoded["sketch"]
            width, height = fit_size(sketch.shape[1], sketch.shape[0], area=model.default_area, **limits)
        else:
            try:
                width, height = validate_size(params.width, params.height, **limits)
            except ValueError as err:
                raise ApiError(422, str(err)) from None
        options = ColorizeOptions(
            size=(width, height),
            steps=model.default_steps if params.steps is None else params.steps,
            reference_guidance=model.reference_guidance if params.reference_guidance is None
            else params.reference_guidance,
            sketch_guidance=model.sketch_guidance if params.sketch_guidance is None else params.sketch_guidance,
            reference_strength=params.reference_strength, plugin=use_plugin,
            sampler=model.sampler if params.sampler is None else params.sampler)
        colorize_request = ColorizeRequest(
            sketch=decoded["sketch"], reference=decoded["reference"],
            background_reference=decoded.get("background_reference"),
            seed=secrets.randbelow(2**31) if params.seed is None else params.seed, options=options,
            line_extractor=params.line_extractor if params.extract_lines else None)
        try:
            result = await backend.colorize(colorize_request)
        except ValueError as err:  # the model refused the combination: the client's to fix
            raise ApiError(422, str(err)) from None
        png = _png(result)
        used = colorize_request.parameters()
        if params.format == "json":
            return {"image": base64.b64encode(png).decode("ascii"), "media_type": "image/png", "parameters": used}
        headers = {"X-" + "-".join(w.capitalize() for w in k.split("_")): str(v).lower() if isinstance(v, bool)
                   else str(v) for k, v in used.items()}
        return Response(png, media_type="image/png", headers=headers)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (chunked uploads have no Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser reads a cached body from here
    return body


async def _parse(request: Request, body: bytes) -> tuple[dict[str, Any], dict[str, bytes | None]]:
    """(fields, images) from a JSON or multipart body; images maps a name to its bytes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: dict[str, bytes | None] = {}
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ApiError(422, "the JSON body must be an object")
        try:
            parsed = ColorizeJSON.model_validate(data)
        except ValidationError as err:
            raise ApiError(422, _validation_message(err)) from None
        for name in IMAGE_FIELDS:
            text = getattr(parsed, name)
            images[name] = None if text is None else _b64(name, text)
        raw = {k: v for k, v in data.items() if k not in IMAGE_FIELDS}
        return raw, images
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=len(IMAGE_FIELDS), max_fields=32)
        except StarletteHTTPException as err:
            raise ApiError(400, f"malformed multipart body: {err.detail}") from None
        except Exception as err:  # the multipart parser's own errors
            raise ApiError(400, f"malformed multipart body: {err}") from None
        raw: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, f"{key} must be a file part")
                images[key] = await value.read()
            elif isinstance(value, UploadFile):
                raise ApiError(422, f"unexpected file field '{key}'; files are {', '.join(IMAGE_FIELDS)}")
            elif value != "":  # an empty form field means "not given"
                raw[key] = value
        return raw, images
    raise ApiError(415, "send multipart/form-data (files sketch, reference) or application/json (base64 images)")
