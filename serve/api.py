"""The HTTP API as a plain FastAPI app: routes, auth, size limits, the CPU work off the event loop, and
cancellation. Its parts: the fields and their parsing (:mod:`serve.params`), JSON bodies
(:mod:`serve.json_body`), and the JSON errors it answers with (:mod:`serve.errors`).

Nothing here imports Ray (nor torch). The app talks to a :class:`Backend` (``info()`` and
``async colorize(request)``, a :class:`ColorizeRequest`);
``serve/app.py`` gives it one that calls the model deployment, and any object with those two methods
works for other uses.

Routes (errors are JSON ``{"error": message, "status": code}``):

- ``GET /healthz``: ``{"status": "ok"}``; never needs the token.
- ``GET /v1/info``: the model's numbers (preset, default steps/guidance, size grid, plugin present).
- ``POST /v1/colorize``: multipart (files ``sketch``, ``reference``, optional ``background_reference``,
  plus form fields) or JSON (the same fields; images as base64 strings, or ``data:image/png;base64,...``
  URLs of an accepted type). Fields: ``seed`` (random when absent; always returned), ``steps`` (1..100),
  ``width``/``height`` (both or neither; neither = the sketch's aspect at the preset's default area),
  ``reference_guidance`` and ``sketch_guidance`` (0..30), ``reference_strength`` (0..2), ``plugin``
  (default on when the model has one), ``background_enhance`` (split attention over the reference and a
  background picture without the plug-in: the published ``bg_enhance``), ``foreground_strength`` and
  ``background_strength`` (0..10), ``merge_scale`` (0..1), ``sketch_mask_threshold`` (0..0.99, default
  0.05), ``reference_mask_threshold`` (0..1, default 0.5) (see :class:`model.options.ColorizeOptions`; the
  background picture is ``background_reference`` or the reference with its foreground whitened), ``format``
  (``png``: image/png with the parameters in ``X-*`` headers; ``json``: ``{"image": base64 PNG, "parameters": {...}}``), ``extract_lines`` (true: the sketch
  is a colored or photographed drawing; its lines are extracted first with ``line_extractor``, one of the
  weight-free extractors of :mod:`model.line_art`, default ``xdog``), ``sampler`` (one of
  :data:`model.options.SAMPLERS`; default the model's, the published DPM++ 3M SDE).
- ``GET /``: the artists' web page (``serve/static/index.html``); it needs no token to load, and sends the
  one typed into it with each call.

What a request must look like, and what it may cost:

- Integers are plain ASCII digits in a form field and JSON integers in JSON (no ``+1``, ``1_0``, ``96.0``,
  ``true`` nor strings); numbers are plain decimals; booleans are ``true``/``false``/``1``/``0``/``on``/
  ``off`` in a form and JSON booleans in JSON. Unknown fields, a field or file sent twice, and an empty
  image are refused with 422.
- Images are PNG, JPEG or WebP, told by their bytes (not the name nor the declared type), first frame only;
  anything else is 422. Each has at most ``max_input_pixels``; the sketch's long side is at most
  ``max_sketch_aspect`` times its short side (422). A request's decodes must fit ``max_decode_bytes``,
  estimated from the headers before decoding (413).
- A JSON body's fields besides the images take at most 64 KiB, at most 256 strings and brackets, nested at
  most 16 deep; this is checked on the raw bytes before parsing (413/400).
- Decoding, line extraction and PNG encoding run in worker threads, at most ``max_concurrent_decodes`` at
  once, so ``/healthz`` and other requests are answered meanwhile.
- Errors are JSON whatever happens, at most 1 KiB of message, never a traceback; an unexpected error is a
  500 logged once. A client that disconnects while its image is generated cancels the generation.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import secrets
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.image_io import API_FORMATS, DecodeError, decode_image
from model.line_art import CLASSIC_EXTRACTORS, extract_drawing
from model.options import SAMPLERS, ColorizeOptions
from model.sizes import fit_size, validate_size
from serve.errors import MAX_ERRORS_LISTED, ApiError, ClientGone, Overloaded, cap, error_response, listed, quoted
from serve.json_body import decode_base64, parse_json
from serve.params import (IMAGE_FIELDS, MAX_STEPS, PARAM_FIELDS, ColorizeJSON, ColorizeParams, check_fields,
                          form_values, validate_params)

PAGE = Path(__file__).with_name("static") / "index.html"
logger = logging.getLogger(__name__)

# The API's limits, defined here once: Settings and serve/app.py's AppOptions use them.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a whole request, images included
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096  # per uploaded image, checked from its header before decoding
DEFAULT_MAX_DECODE_BYTES = 384 * 1024 * 1024  # a request's decodes: three 4096² RGBA PNGs or WebPs fit
DEFAULT_MAX_CONCURRENT_DECODES = 2  # requests decoding (or encoding) at once, per app
DEFAULT_MAX_SKETCH_ASPECT = 8.0  # the sketch's long side over its short side
MAX_FORM_FIELD_BYTES = 64 * 1024  # a multipart field part: larger is a 400 from the parser, smaller a 422


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
                "background_enhance": options.background_enhance,
                "foreground_strength": options.foreground_strength, "background_strength": options.background_strength,
                "merge_scale": options.merge_scale, "sketch_mask_threshold": options.sketch_mask_threshold,
                "reference_mask_threshold": options.reference_mask_threshold,
                "line_extractor": self.line_extractor, "background_reference": self.background_reference is not None,
                "sampler": options.sampler}


class Backend(Protocol):
    """The model side of the app.

    ``colorize`` must be cancellable: when the client disconnects (or the server stops waiting), the app
    cancels the task awaiting ``colorize``, and the ``asyncio.CancelledError`` raised at its ``await`` must
    reach the work itself (stop generating between denoising steps, cancel a remote call) rather than be
    swallowed; nobody reads the result. ``ValueError`` means the model refused the combination (→ 422);
    :class:`Overloaded` means retry later (→ 503); anything else is a 500.
    """

    def info(self) -> ModelInfo: ...

    async def colorize(self, request: ColorizeRequest) -> np.ndarray: ...


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    api_token: str | None = None  # bearer token; None or "" = no auth
    open_paths: tuple[str, ...] = field(default=("/healthz", "/"))
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES  # a request's decodes, estimated from the image headers
    max_concurrent_decodes: int = DEFAULT_MAX_CONCURRENT_DECODES  # CPU work (decode, extract, encode) at once
    max_sketch_aspect: float = DEFAULT_MAX_SKETCH_ASPECT  # the sketch's long side over its short side


# ------------------------------------------------------------------------------------------- CPU work
def decode_images(images: dict[str, bytes | str], settings: Settings) -> dict[str, np.ndarray]:
    """Base64 (for JSON strings) and image decoding, one image after the other within the request's memory
    budget (the arrays already decoded count against it). CPU work: call it in a thread."""
    budget = settings.max_decode_bytes
    decoded: dict[str, np.ndarray] = {}
    for name in IMAGE_FIELDS:
        data = images.get(name)
        if data is None:
            continue
        if isinstance(data, str):
            data = decode_base64(name, data)
        if not data:
            raise ApiError(422, f"{name}: empty image")
        try:
            array = decode_image(data, max_pixels=settings.max_input_pixels, formats=API_FORMATS,
                                 max_bytes=budget,
                                 max_aspect=settings.max_sketch_aspect if name == "sketch" else None)
        except DecodeError as err:
            raise ApiError(413 if err.too_large else 422, f"{name}: {err}") from None
        budget -= array.nbytes
        decoded[name] = array
    return decoded


def _prepare(images: dict[str, bytes | str], params: ColorizeParams, settings: Settings) -> dict[str, np.ndarray]:
    decoded = decode_images(images, settings)
    if params.extract_lines:
        decoded["sketch"] = extract_drawing(decoded["sketch"], params.line_extractor)
    return decoded


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _header_name(key: str) -> str:
    return "X-" + "-".join(word.capitalize() for word in key.split("_"))


def _header_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------------------------------- cancellation
async def _wait_for_disconnect(receive) -> bool:
    """True once the client has disconnected; False when that cannot be told (the receive channel failed)."""
    try:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return True
    except Exception:  # noqa: BLE001 - a server whose receive fails cannot tell us; let the work finish
        return False


async def unless_disconnected(request: Request, work):
    """Await ``work`` (a coroutine), cancelling it when the client disconnects first (→ :class:`ClientGone`).
    The request's body must have been read: what ``receive`` gives after it is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.result():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - the work failed while being cancelled; nobody to tell
                logger.debug("cancelled work raised", exc_info=True)
            raise ClientGone()
        return await task
    finally:
        watcher.cancel()
        if not task.done():  # we were cancelled ourselves (server shutdown, Serve's own disconnect handling)
            task.cancel()


# ---------------------------------------------------------------------------------------------- guard
class Guard:
    """Outermost ASGI middleware of the app: auth and the declared size, before a byte of the body is read;
    and the last word on errors: an exception nothing else handled becomes a JSON 500 (logged once, no
    internals sent), a client that went away mid-request is logged at debug level and not answered."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    def refusal(self, scope) -> JSONResponse | None:
        settings = self.settings
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind a route prefix (Serve passes it as root_path)
            path = path[len(root):] or "/"
        headers = Headers(scope=scope)
        if settings.api_token and path not in settings.open_paths:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_token.encode()):
                return error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.strip().isdigit() or len(length) > 20:
                return error_response(400, "Content-Length is not a number")
            if int(length) > settings.max_body_bytes:
                return error_response(413, f"request body of {int(length)} bytes exceeds the limit of "
                                   f"{settings.max_body_bytes} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            await refused(scope, receive, send)
            return
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except (ClientDisconnect, ClientGone):
            logger.debug("client disconnected during %s %s", scope.get("method"), scope.get("path"))
        except Exception:  # noqa: BLE001 - the last line: a JSON 500, the details in the log only
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                try:
                    await error_response(500, "internal error (it has been logged)")(scope, receive, send)
                except Exception:  # noqa: BLE001 - the client is gone as well
                    logger.debug("could not send the 500", exc_info=True)


def _request_body_schema() -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of ``POST /v1/colorize`` (the route reads the body itself)."""
    form = ColorizeParams.model_json_schema(ref_template="#/components/schemas/{model}")
    form.pop("title", None)
    form["properties"].update({name: {"type": "string", "format": "binary"} for name in IMAGE_FIELDS})
    form["required"] = ["sketch", "reference"]
    body = ColorizeJSON.model_json_schema(ref_template="#/components/schemas/{model}")
    body.pop("title", None)
    body["required"] = ["sketch", "reference"]
    for name in IMAGE_FIELDS:
        body["properties"][name] = {"type": "string", "contentEncoding": "base64"}
    return {"required": True, "content": {"multipart/form-data": {"schema": form},
                                          "application/json": {"schema": body}}}


_ERROR_SCHEMA = {"application/json": {"schema": {
    "type": "object", "required": ["error", "status"],
    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}}}
_ERRORS = {str(code): {"description": text, "content": _ERROR_SCHEMA} for code, text in (
    (400, "malformed body"), (401, "missing or wrong token"), (413, "too large"), (415, "unsupported body type"),
    (422, "invalid fields or images"), (500, "internal error"), (503, "overloaded; see Retry-After"))}


# ---------------------------------------------------------------------------------------------- the app
def create_app(backend: Backend, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="colorize-xl", version="1")
    cpu = anyio.CapacityLimiter(settings.max_concurrent_decodes)

    async def in_thread(function, *args):
        return await anyio.to_thread.run_sync(function, *args, limiter=cpu)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, err: Overloaded):
        return error_response(503, err.message, {"Retry-After": str(max(1, round(err.retry_after_s)))})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        return error_response(422, listed([str(e.get("msg")) for e in errors[:MAX_ERRORS_LISTED]], len(errors)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), getattr(err, "headers", None))

    app.add_middleware(Guard, settings=settings)
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
            "max_decode_bytes": settings.max_decode_bytes,
            "max_sketch_aspect": settings.max_sketch_aspect,
            "formats": [name.lower() for name in API_FORMATS],
            "sizes": {"multiple": model.size_multiple, "min_side": model.min_side, "max_side": model.max_side,
                      "default_area": model.default_area},
            "steps": [1, MAX_STEPS], "guidance": [0.0, 30.0], "reference_strength": [0.0, 2.0]},
            "line_extractors": list(CLASSIC_EXTRACTORS), "samplers": list(SAMPLERS), "auth": bool(settings.api_token)}

    @app.post("/v1/colorize", responses=_ERRORS, openapi_extra={"requestBody": _request_body_schema()})
    async def colorize(request: Request):
        body = await _read_body(request, settings.max_body_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            fields, images = await in_thread(parse_json, body)
        elif content_type == "multipart/form-data":
            fields, images = await _parse_form(request)
            fields = form_values(fields)
        else:
            raise ApiError(415, "send multipart/form-data (files sketch, reference) or application/json "
                                "(base64 images)")
        del body
        params = validate_params(fields)
        model = backend.info()
        for name in ("sketch", "reference"):
            if not images.get(name):
                raise ApiError(422, f"missing {name} image (send it as the '{name}' file or base64 field)")
        if params.plugin and not model.plugin:
            raise ApiError(422, "plugin=true needs a model with a plugin; this model has none")
        use_plugin = model.plugin if params.plugin is None else params.plugin
        if images.get("background_reference") is not None and not (use_plugin or params.background_enhance):
            raise ApiError(422, "background_reference needs the plugin on or background_enhance=true")
        limits = dict(multiple=model.size_multiple, min_side=model.min_side, max_side=model.max_side)
        if params.width is not None:  # checked before any decoding
            try:
                size = validate_size(params.width, params.height, **limits)
            except ValueError as err:
                raise ApiError(422, str(err)) from None
        decoded = await in_thread(_prepare, images, params, settings)
        del images
        if params.width is None:
            sketch = decoded["sketch"]
            size = fit_size(sketch.shape[1], sketch.shape[0], area=model.default_area, **limits)
        options = ColorizeOptions(
            size=size,
            steps=model.default_steps if params.steps is None else params.steps,
            reference_guidance=model.reference_guidance if params.reference_guidance is None
            else params.reference_guidance,
            sketch_guidance=model.sketch_guidance if params.sketch_guidance is None else params.sketch_guidance,
            reference_strength=params.reference_strength, plugin=use_plugin,
            background_enhance=params.background_enhance, foreground_strength=params.foreground_strength,
            background_strength=params.background_strength, merge_scale=params.merge_scale,
            sketch_mask_threshold=params.sketch_mask_threshold,
            reference_mask_threshold=params.reference_mask_threshold,
            sampler=model.sampler if params.sampler is None else params.sampler)
        colorize_request = ColorizeRequest(
            sketch=decoded["sketch"], reference=decoded["reference"],
            background_reference=decoded.get("background_reference"),
            seed=secrets.randbelow(2**31) if params.seed is None else params.seed, options=options,
            line_extractor=params.line_extractor if params.extract_lines else None)
        del decoded
        try:
            result = await unless_disconnected(request, backend.colorize(colorize_request))
        except ValueError as err:  # the model refused the combination: the client's to fix
            raise ApiError(422, str(err)) from None
        png = await in_thread(_png, result)
        used = colorize_request.parameters()
        if params.format == "json":
            return {"image": base64.b64encode(png).decode("ascii"), "media_type": "image/png", "parameters": used}
        headers = {_header_name(k): _header_value(v) for k, v in used.items() if v is not None}
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


async def _parse_form(request: Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """(fields, image bytes) of a multipart body; a part sent twice, or a file where a field belongs (or
    the other way round), is refused."""
    try:
        form = await request.form(max_files=len(IMAGE_FIELDS), max_fields=len(PARAM_FIELDS),
                                  max_part_size=MAX_FORM_FIELD_BYTES)
    except StarletteHTTPException as err:
        raise ApiError(400, f"malformed multipart body: {err.detail}") from None
    except ClientDisconnect:
        raise
    except Exception as err:  # noqa: BLE001 - the multipart parser's own errors
        raise ApiError(400, f"malformed multipart body: {cap(str(err), 200)}") from None
    fields: dict[str, str] = {}
    images: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        for key, value in form.multi_items():
            if key in seen:
                raise ApiError(422, f"{quoted(key)} is sent twice")
            seen.add(key)
            if key in IMAGE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, f"{key} must be a file part")
                images[key] = await value.read()
            elif isinstance(value, UploadFile):
                raise ApiError(422, f"unexpected file field {quoted(key)}; files are {', '.join(IMAGE_FIELDS)}")
            elif value != "":  # an empty form field means "not given"
                fields[key] = value
    finally:
        await form.close()
    check_fields(fields, PARAM_FIELDS)
    return fields, images
