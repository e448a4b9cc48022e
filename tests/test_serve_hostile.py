"""Hostile clients against the bare HTTP API (``serve/api.py``, issue 15), with a fast fake model.

Every request here, generated or hand-made, is held to the same properties (:func:`check_reply`):

- never a 5xx;
- every error (4xx) is JSON ``{"error": str, "status": int}`` (the status equal to the HTTP one), at most
  ``MAX_ERROR_BYTES`` long, with no Python internals in the message;

and the requests sent to a real server (uvicorn in a child process, auth on) to two more:

- ``/healthz`` answers within ``HEALTH_BUDGET_S`` throughout (a thread polls it on fresh connections while
  each case runs);
- the server's peak RSS (``VmHWM`` of the uvicorn child, reset before each case) stays within
  ``RSS_BUDGET_MB`` of its baseline after warm-up, and its log shows no traceback.

Parts:

1. Schemathesis from the app's OpenAPI document, in-process (ASGI), auth on (a token) and off, positive and
   negative data; ``POST /v1/colorize`` declares its multipart and JSON bodies there. In positive mode the
   generated image fields are swapped for valid images, so the other fields reach the (fake) model.
2. Hypothesis strategies of our own, in-process: the multipart form (random field names and values, random
   and mutated image bytes, random part and request content types, duplicate parts), JSON of random shape
   and depth, strict integer fields, and the image decoder on mutated files of every format Pillow writes.
3. The concrete cases of issue 15 against the real server, one parametrized test.

Everything is derandomized (Hypothesis ``derandomize=True``, fixed seeds), so CI sees the same requests
each run. The Ray Serve layer's cancellation and batch isolation are tested with Ray elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image, features

hypothesis = pytest.importorskip("hypothesis")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from model.image_io import DecodeError, decode_image  # noqa: E402
from serve.api import ModelInfo, Settings, create_app  # noqa: E402
from serve.params import IMAGE_FIELDS, ColorizeParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hostile-suite-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_ERROR_BYTES = 2048
HEALTH_BUDGET_S = 1.0
RSS_BUDGET_MB = 600
MAX_BODY = 32 * 1024 * 1024  # the production default of Settings, stated here so the cases size to it
# Words that only Python's own error messages use: an error that shows one leaks internals.
INTERNALS = re.compile(r"Traceback|File \"|int_max_str_digits|Exceeds the limit \(\d+ digits\)|"
                       r"object has no attribute|NoneType|RecursionError|maximum recursion")

HYPOTHESIS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------ the fake model
def model_info(plugin: bool) -> ModelInfo:
    return ModelInfo(preset="tiny", size_multiple=32, min_side=64, max_side=256, default_area=128 * 128,
                     default_steps=4, reference_guidance=5.0, sketch_guidance=1.0, plugin=plugin)


class FastBackend:
    """The :class:`serve.api.Backend` protocol at no cost: a flat gray image of the requested size."""

    def __init__(self, plugin: bool = False):
        self._info = model_info(plugin)

    def info(self) -> ModelInfo:
        return self._info

    async def colorize(self, request) -> np.ndarray:
        width, height = request.options.size
        return np.full((height, width, 3), 128, dtype=np.uint8)


# ------------------------------------------------------------------------------------------- the property
@dataclass
class Reply:
    status: int  # 0: the server closed the connection without an answer
    headers: dict[str, str]
    body: bytes
    raised: str | None = None  # an exception that escaped the app (in-process calls only)

    def describe(self) -> str:
        text = self.body[:300].decode("utf-8", "replace")
        more = f" ... ({len(self.body)} bytes)" if len(self.body) > 300 else ""
        raised = f"; the app raised {self.raised}" if self.raised else ""
        return f"{self.status} {self.headers.get('content-type', '')!r}: {text!r}{more}{raised}"

    __repr__ = describe  # failure reports show the answer, not the bytes of a PNG


def check_reply(reply: Reply, request: str = "") -> None:
    """The properties every answer must have; ``request`` says what was sent, for the failure message."""
    problem = reply_problem(reply)
    if problem:
        raise AssertionError(f"{problem}\n  request: {request}\n  response: {reply.describe()}")


def reply_problem(reply: Reply) -> str | None:
    if reply.raised is not None:
        return "an exception escaped the app"
    if not 0 < reply.status < 500:
        return "a server error" if reply.status else "no answer (the connection was closed)"
    if reply.status < 400:
        return None
    if len(reply.body) > MAX_ERROR_BYTES:
        return f"an error body of {len(reply.body)} bytes (over {MAX_ERROR_BYTES})"
    if not reply.headers.get("content-type", "").startswith("application/json"):
        return "an error that is not JSON"
    try:
        body = json.loads(reply.body)
    except ValueError:
        return "an error body that does not parse as JSON"
    if not (isinstance(body, dict) and isinstance(body.get("error"), str) and type(body.get("status")) is int):
        return 'an error body that is not {"error": str, "status": int}'
    if body["status"] != reply.status:
        return "the body's status differs from the HTTP status"
    if INTERNALS.search(body["error"]):
        return "an error message that shows Python internals"
    return None


def show(method: str, path: str, headers: dict[str, str] | list, body: bytes) -> str:
    """A short, reproducible description of a request."""
    items = headers.items() if isinstance(headers, dict) else headers
    shown = {k: (v if len(v) <= 80 else f"{v[:40]}...({len(v)} chars)") for k, v in items}
    text = body[:200] if len(body) <= 200 else body[:160] + b"...(%d bytes)" % len(body)
    return f"{method} {path} headers={shown} body={text!r}"


# ------------------------------------------------------------------------- calling the ASGI app in-process
class InProcess:
    """Calls an ASGI app on one event loop kept for the module (the app may hold loop-bound state)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()

    def close(self):
        self.loop.close()

    def __call__(self, app, method: str, path: str, headers: dict[str, str] | list | None = None,
                 body: bytes = b"") -> Reply:
        return self.loop.run_until_complete(asgi_call(app, method, path, headers or {}, body))


async def asgi_call(app, method: str, path: str, headers, body: bytes) -> Reply:
    items = list(headers.items() if isinstance(headers, dict) else headers)
    if body and not any(k.lower() == "content-length" for k, _ in items):
        items.append(("content-length", str(len(body))))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items]}
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""]
    done = asyncio.Event()
    status, out_headers, out = 0, {}, []

    async def receive():
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await done.wait()  # the client stays connected until the whole answer is sent
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update({k.decode("latin-1").lower(): v.decode("latin-1")
                                for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            out.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    raised = None
    try:
        await app(scope, receive, send)
    except Exception as err:  # Starlette sends its plain 500 and re-raises
        raised = f"{type(err).__name__}: {str(err)[:200]}"
        status = status or 500
    done.set()
    return Reply(status, out_headers, b"".join(out), raised)


# -------------------------------------------------------------------------------------- building requests
def multipart(parts: list[tuple], boundary: str = "hostile-boundary-7MA4YWxkTrZu0gW") -> tuple[str, bytes]:
    """``parts``: (name, value[, filename[, content type]]); bytes values or a filename make a file part."""
    out = bytearray()
    for part in parts:
        name, value, filename, ctype = (*part, None, None)[:4]
        if isinstance(value, str):
            value = value.encode("utf-8")
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode("utf-8")
        if ctype is not None:
            out += f"Content-Type: {ctype}\r\n".encode("utf-8")
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def drawing_png(width: int = 96, height: int = 64) -> bytes:
    """A small valid line drawing (dark strokes on white)."""
    array = np.full((height, width, 3), 255, dtype=np.uint8)
    array[height // 3, :] = 0
    array[:, width // 2] = 0
    array[np.arange(min(width, height)), np.arange(min(width, height))] = 40
    return encode(Image.fromarray(array), "PNG")


@lru_cache(maxsize=None)
def color_png() -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)), "PNG")


def valid_parts(**fields: str) -> list[tuple]:
    return [("sketch", drawing_png(), "sketch.png", "image/png"), ("reference", color_png(), "ref.png", "image/png"),
            *((k, v) for k, v in fields.items())]


def valid_json(**fields: Any) -> dict[str, Any]:
    return {"sketch": base64.b64encode(drawing_png()).decode(), "reference": base64.b64encode(color_png()).decode(),
            **fields}


@lru_cache(maxsize=None)
def corpus() -> dict[str, bytes]:
    """One small file per format Pillow writes here (the seeds of the mutated-image strategies)."""
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = {"png": encode(rgb, "PNG"), "jpeg": encode(rgb, "JPEG", quality=80), "webp": encode(rgb, "WEBP"),
           "gif": encode(rgb.convert("P"), "GIF"), "bmp": encode(rgb, "BMP"), "tiff": encode(rgb, "TIFF"),
           "ico": encode(rgb, "ICO"), "ppm": encode(rgb, "PPM"), "tga": encode(rgb, "TGA"),
           "png16": encode(Image.fromarray(rng.integers(0, 65535, (24, 32), dtype=np.uint16)), "PNG"),
           "rgba_png": encode(rgb.convert("RGBA"), "PNG"), "xbm": encode(rgb.convert("1"), "XBM"),
           "apng": encode(rgb, "PNG", save_all=True, append_images=[rgb.rotate(90)]),
           "tiff_pages": multipage_tiff(5)}
    if features.check("avif"):
        out["avif"] = encode(rgb, "AVIF")
    return out


def multipage_tiff(pages: int, side: int = 16, broken_page: int | None = None) -> bytes:
    """A valid baseline TIFF of ``pages`` gray side×side pages sharing one strip (about 100 bytes a page),
    written directly: Pillow would take seconds to save thousands of pages. ``broken_page`` gets an
    ImageWidth that points past the file's end and a StripOffsets out of range."""
    pixels = bytes([200]) * (side * side)
    first_ifd, entries = 8 + len(pixels), 8
    ifd_size = 2 + entries * 12 + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", first_ifd) + pixels)
    for k in range(pages):
        here = first_ifd + k * ifd_size
        tags = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                (273, 4, 1, 8), (278, 3, 1, side), (279, 4, 1, side * side)]
        if k == broken_page:
            tags[0], tags[5] = (256, 7, 3_000_000, 0xFFFFFF00), (273, 4, 1, 0xFFFFFFF0)
        out += struct.pack("<H", entries)
        for tag, kind, count, value in tags:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 else \
                struct.pack("<HHII", tag, kind, count, value)
        out += struct.pack("<I", here + ifd_size if k + 1 < pages else 0)
    return bytes(out)


EDITS = ("flip", "flip", "flip", "flip", "insert", "delete", "truncate")


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """``edits``: (kind, position, byte) with kind one of EDITS; positions wrap around the data's length."""
    out = bytearray(data)
    for kind, position, byte in edits:
        at = position % max(1, len(out))
        if kind == "flip" and out:
            out[at] = byte
        elif kind == "insert":
            out[at:at] = bytes([byte]) * (1 + byte % 16)
        elif kind == "delete":
            del out[at:at + 1 + byte % 16]
        elif kind == "truncate" and at > 8:
            del out[at:]
    return bytes(out)


def edits() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    return st.lists(st.tuples(st.sampled_from(EDITS), st.integers(0, 2**20), st.integers(0, 255)),
                    min_size=1, max_size=6)


# ---------------------------------------------------------------------------------------------- the apps
@pytest.fixture(scope="module")
def call():
    runner = InProcess()
    yield runner
    runner.close()


APPS = {"auth_on": lambda: create_app(FastBackend(plugin=True), Settings(api_token=TOKEN)),
        "auth_off": lambda: create_app(FastBackend(plugin=False), Settings())}


@pytest.fixture(scope="module", params=list(APPS))
def app_and_auth(request):
    headers = AUTH if request.param == "auth_on" else {}
    return APPS[request.param](), headers


# ------------------------------------------------------------------------------------ 1. Schemathesis
def load_schema(app, headers: dict[str, str]):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=dict(headers))  # the client adds to it
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE], deterministic=True)
    return schema


SCHEMA_APPS = {name: make() for name, make in APPS.items()}
SCHEMA_ON = load_schema(SCHEMA_APPS["auth_on"], AUTH)
SCHEMA_OFF = load_schema(SCHEMA_APPS["auth_off"], {})


def run_schemathesis_case(case, headers: dict[str, str]) -> None:
    # In positive mode the image fields carry valid images, so the rest of the request reaches the model.
    body = case.body
    positive = case.meta is None or not case.meta.generation.mode.is_negative
    if positive and isinstance(body, dict) and case.media_type:
        for name, data in (("sketch", drawing_png()), ("reference", color_png())):
            if name in body:
                body[name] = data if "multipart" in case.media_type else base64.b64encode(data).decode()
    response = case.call(headers=dict(headers))  # a copy: the client adds its own headers to the dict
    reply = Reply(response.status_code, {k.lower(): v if isinstance(v, str) else v[0]
                                         for k, v in response.headers.items()}, response.content)
    check_reply(reply, describe_case(case, headers))


def describe_case(case, headers: dict[str, str]) -> str:
    def short(value):
        if isinstance(value, (bytes, str)) and len(value) > 60:
            return f"{value[:40]!r}...({len(value)} {'bytes' if isinstance(value, bytes) else 'chars'})"
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items()}
        if isinstance(value, list):
            return [short(v) for v in value[:10]]
        return value

    body = None if type(case.body).__name__ == "NotSet" else short(case.body)
    return (f"{case.method} {case.formatted_path} query={case.query} headers={short(dict(case.headers or {}))} "
            f"media_type={case.media_type} body={body} (with {sorted(headers)})")


@SCHEMA_ON.parametrize()
@settings(max_examples=150, **HYPOTHESIS)
def test_schemathesis_auth_on(case):
    """Generated from the OpenAPI document, with the token."""
    run_schemathesis_case(case, AUTH)


@SCHEMA_OFF.parametrize()
@settings(max_examples=150, **HYPOTHESIS)
def test_schemathesis_auth_off(case):
    """Generated from the OpenAPI document, an app without auth."""
    run_schemathesis_case(case, {})


@SCHEMA_ON.parametrize()
@settings(max_examples=15, **HYPOTHESIS)
def test_schemathesis_without_the_token(case):
    """Every operation but the open ones answers a JSON 401 without the token."""
    run_schemathesis_case(case, {})


def test_schema_declares_the_colorize_body():
    """Schemathesis generates bodies for POST /v1/colorize only if the API declares them: multipart (images as
    binary parts) and JSON (images as base64 strings), both needing the sketch and the reference."""
    operation = SCHEMA_APPS["auth_off"].openapi()["paths"]["/v1/colorize"]["post"]
    content = operation.get("requestBody", {}).get("content", {})
    if set(content) != {"multipart/form-data", "application/json"}:
        pytest.fail(f"POST /v1/colorize declares bodies {sorted(content)} in /openapi.json", pytrace=False)
    for media_type, schema in content.items():
        schema = schema["schema"]
        if not {"sketch", "reference"} <= set(schema.get("required", ())) or \
                not set(IMAGE_FIELDS) <= set(schema.get("properties", {})):
            pytest.fail(f"the {media_type} body declares no required sketch and reference: {schema}", pytrace=False)


# ------------------------------------------------------------------------- 2. Hypothesis, in-process
FIELD_NAMES = [*IMAGE_FIELDS, *ColorizeParams.model_fields]
INT_FIELDS = ["seed", "steps", "width", "height"]


def image_bytes() -> st.SearchStrategy[bytes]:
    seeds = corpus()
    return st.one_of(
        st.sampled_from(sorted(seeds.values())),
        st.builds(lambda key, changes: mutate(seeds[key], changes), st.sampled_from(sorted(seeds)), edits()),
        st.binary(max_size=512),
        st.just(drawing_png()))


def field_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40), st.from_regex(r"[+-]?[0-9_ ]{0,6}(\.[0-9]*)?(e[+-]?[0-9]{1,3})?", fullmatch=True),
        st.sampled_from(["true", "false", "on", "off", "1", "0", "nan", "inf", "-inf", "1e309", "None", "null",
                         "png", "json", "xdog", "9" * 5000, "١٠", "𝟗", "0x10", "1_0", "+1", "96.0", " 7 "]),
        st.integers(-(2**70), 2**70).map(str))


@st.composite
def multipart_requests(draw) -> tuple[dict[str, str], bytes]:
    parts = []
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(min_size=0, max_size=12).filter(
            lambda s: '"' not in s and "\r" not in s and "\n" not in s)))
        if draw(st.booleans()):
            parts.append((name, draw(image_bytes()), draw(st.sampled_from(["a.png", "a", "x.tif", "", "a.html"])),
                          draw(st.sampled_from([None, "image/png", "image/jpeg", "text/html", "application/pdf",
                                                "image/svg+xml", "application/octet-stream", "x/y"]))))
        else:
            parts.append((name, draw(field_text())))
    if draw(st.booleans()):
        parts = valid_parts() + parts
    ctype, body = multipart(parts)
    ctype = draw(st.sampled_from([ctype, ctype, ctype, "multipart/form-data", "multipart/form-data; boundary=x",
                                  "application/json", "text/plain", "application/x-www-form-urlencoded",
                                  "MULTIPART/FORM-DATA; boundary=hostile-boundary-7MA4YWxkTrZu0gW", ""]))
    if draw(st.integers(0, 4)) == 0:  # a damaged body
        body = mutate(body, draw(edits()))
    headers = {"content-type": ctype} if ctype else {}
    return headers, body


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(allow_nan=False),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                        max_leaves=max_leaves)


def b64_image() -> st.SearchStrategy[str]:
    return st.one_of(
        image_bytes().map(lambda b: base64.b64encode(b).decode()),
        st.tuples(st.sampled_from(["image/png", "text/html", "image/svg+xml", "", "image/png;charset=x"]),
                  image_bytes()).map(lambda t: f"data:{t[0]};base64,{base64.b64encode(t[1]).decode()}"),
        st.text(max_size=50))


@st.composite
def json_requests(draw) -> tuple[dict[str, str], bytes]:
    shape = draw(st.integers(0, 3))
    if shape == 0:  # anything at all
        data = draw(json_values())
    else:
        data = valid_json() if shape == 1 else {}
        for _ in range(draw(st.integers(0, 6))):
            key = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10)))
            data[key] = draw(st.one_of(b64_image(), json_values(8))) if key in IMAGE_FIELDS or draw(st.booleans()) \
                else draw(json_values(8))
    depth = draw(st.integers(0, 3))
    for _ in range(depth):
        data = {"x": [data]} if draw(st.booleans()) else [data]
    body = json.dumps(data).encode()
    ctype = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                  "application/json-patch+json", "text/json"]))
    return {"content-type": ctype}, body


@pytest.mark.parametrize("auth", ["auth_on", "auth_off"])
@settings(max_examples=120, **HYPOTHESIS)
@given(request=multipart_requests())
def test_generated_multipart(call, auth, request):
    app = SCHEMA_APPS[auth]
    headers = {**(AUTH if auth == "auth_on" else {}), **request[0]}
    check_reply(call(app, "POST", "/v1/colorize", headers, request[1]), show("POST", "/v1/colorize", headers,
                                                                              request[1]))


@pytest.mark.parametrize("auth", ["auth_on", "auth_off"])
@settings(max_examples=120, **HYPOTHESIS)
@given(request=json_requests())
def test_generated_json(call, auth, request):
    app = SCHEMA_APPS[auth]
    headers = {**(AUTH if auth == "auth_on" else {}), **request[0]}
    check_reply(call(app, "POST", "/v1/colorize", headers, request[1]), show("POST", "/v1/colorize", headers,
                                                                              request[1]))


@settings(max_examples=80, **HYPOTHESIS)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
       path=st.one_of(st.sampled_from(["/", "/healthz", "/v1/info", "/v1/colorize", "/docs", "/openapi.json",
                                       "/redoc", "/v1/colorize/", "//v1/info", "/v1/../v1/info", "/%2e%2e/"]),
                      st.from_regex(r"/[a-z0-9/._%-]{0,30}", fullmatch=True)),
       headers=st.dictionaries(st.sampled_from(["content-type", "content-length", "authorization", "x-forwarded-for",
                                                "transfer-encoding", "accept", "range"]),
                               st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=4),
       body=st.binary(max_size=200))
def test_generated_method_path_headers(call, method, path, headers, body):
    """Any method, path and headers on the app with auth on: only JSON errors come back."""
    app = SCHEMA_APPS["auth_on"]
    check_reply(call(app, method, path, headers, body), show(method, path, headers, body))


def _non_canonical_integers() -> st.SearchStrategy[str]:
    """Strings Python's int() may read as integers but that are not plain decimal digits."""
    return st.one_of(
        st.integers(1, 99).map(lambda n: f"+{n}"),
        st.integers(1, 99).map(lambda n: f"{n}.0"),
        st.integers(10, 99).map(lambda n: f"{n // 10}_{n % 10}"),
        st.integers(1, 99).map(lambda n: f" {n}"),
        st.integers(1, 99).map(lambda n: f"{n}\t"),
        st.integers(1, 9).map(lambda n: chr(0x0660 + n)),  # Arabic-Indic digits
        st.integers(1, 9).map(lambda n: chr(0xFF10 + n)),  # full-width digits
        st.integers(1, 99).map(lambda n: f"{n}e0"),
        st.integers(1, 99).map(hex))


@settings(max_examples=60, **HYPOTHESIS)
@given(name=st.sampled_from(INT_FIELDS), text=_non_canonical_integers(), form=st.booleans())
def test_integer_fields_are_strict(call, name, text, form):
    """An integer field is decimal digits (form) or a JSON integer; anything else is a 422, never a guess."""
    app = SCHEMA_APPS["auth_off"]
    fields = {name: text}
    if name in ("width", "height"):  # both or neither
        fields = {"width": text, "height": "64"} if name == "width" else {"width": "64", "height": text}
    if form:
        ctype, body = multipart(valid_parts(**fields))
    else:
        ctype, body = "application/json", json.dumps(valid_json(**fields)).encode()
    reply = call(app, "POST", "/v1/colorize", {"content-type": ctype}, body)
    request = show("POST", "/v1/colorize", {"content-type": ctype}, body) + f" [{name}={text!r}]"
    check_reply(reply, request)
    if reply.status != 422:
        raise AssertionError(f"a non-canonical integer was not refused\n  request: {request}\n  response: "
                             f"{reply.describe()}")


@settings(max_examples=40, **HYPOTHESIS)
@given(name=st.sampled_from(INT_FIELDS),
       value=st.one_of(st.booleans(), st.integers(1, 99).map(float), st.integers(1, 99).map(str)))
def test_json_integer_fields_take_only_json_integers(call, name, value):
    app = SCHEMA_APPS["auth_off"]
    fields = {name: value} if name in ("seed", "steps") else {"width": 64, "height": 64, name: value}
    body = json.dumps(valid_json(**fields)).encode()
    reply = call(app, "POST", "/v1/colorize", {"content-type": "application/json"}, body)
    request = f"POST /v1/colorize JSON {name}={json.dumps(value)}"
    check_reply(reply, request)
    if reply.status != 422:
        raise AssertionError(f"a JSON {type(value).__name__} was taken as an integer\n  request: {request}\n"
                             f"  response: {reply.describe()}")


@pytest.mark.parametrize("fmt", sorted(corpus()))
@settings(max_examples=40, **HYPOTHESIS)
@given(changes=edits())
def test_decoder_returns_rgb_or_decode_error(fmt, changes):
    """The decoder on damaged files of each format: an RGB uint8 array or a DecodeError, nothing else."""
    try:
        image = decode_image(mutate(corpus()[fmt], changes), max_pixels=4096 * 4096)
    except DecodeError:
        return
    except Exception as err:
        raise AssertionError(f"decode_image raised {type(err).__name__}: {err} on a damaged {fmt}: "
                             f"mutate(corpus()[{fmt!r}], {changes})") from None
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@pytest.mark.parametrize("fields", [{}, {"extract_lines": "true"}, {"extract_lines": "true", "line_extractor": "xdog"}],
                         ids=["as_sent", "extract_lines", "extract_lines_xdog"])
def test_png_answer_headers_read_no_none(call, fields):
    """A PNG answer reports what was used in X-* headers; none of them reads None (issue 15, 9)."""
    ctype, body = multipart(valid_parts(**fields))
    reply = call(SCHEMA_APPS["auth_off"], "POST", "/v1/colorize", {"content-type": ctype}, body)
    assert reply.status == 200, reply.describe()
    nones = {k: v for k, v in reply.headers.items() if k.startswith("x-") and v in ("None", "none", "null", "")}
    assert not nones, f"response headers that read None: {nones} (form fields {fields})"


# --------------------------------------------------------------------------------- 3. the real server
SERVER_SCRIPT = r"""
import sys
import numpy as np
import uvicorn
from serve.api import ModelInfo, Settings, create_app

class FastBackend:
    def info(self):
        return ModelInfo(preset="tiny", size_multiple=32, min_side=64, max_side=256, default_area=128 * 128,
                         default_steps=4, reference_guidance=5.0, sketch_guidance=1.0, plugin=True)
    async def colorize(self, request):
        width, height = request.options.size
        return np.full((height, width, 3), 128, dtype=np.uint8)

app = create_app(FastBackend(), Settings(api_token=sys.argv[2]))
try:  # the project's launcher of the bare app: header cap, slow-client timeouts
    from serve.http_server import uvicorn_config
except ImportError:
    config = uvicorn.Config(app, fd=int(sys.argv[1]), log_level="warning")
else:
    config = uvicorn_config(app, fd=int(sys.argv[1]), log_level="warning")
uvicorn.Server(config).run()
"""


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    baseline_kb: int = 0
    polls: list = field(default_factory=list)  # (started, seconds or None when it failed)
    stop: threading.Event = field(default_factory=threading.Event)

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def poll_health(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
                conn.close()
                self.polls.append((started, time.monotonic() - started if ok else None))
            except OSError:
                self.polls.append((started, None))
            self.stop.wait(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(listener.fileno()), TOKEN], cwd=ROOT,
                                   env=env, pass_fds=[listener.fileno()], stdout=sink, stderr=subprocess.STDOUT)
    listener.close()
    server = Server(process, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if raw_request(port, "GET", "/healthz", {}, b"", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # Warm up (lazy imports, the first decode and encode), then take the baseline.
        ctype, body = multipart(valid_parts())
        warm = raw_request(port, "POST", "/v1/colorize", {**AUTH, "content-type": ctype}, body)
        assert warm.status == 200, warm.describe()
        server.baseline_kb = server.status("VmRSS")
        poller = threading.Thread(target=server.poll_health, daemon=True)
        poller.start()
        yield server
        server.stop.set()
        poller.join(15)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def raw_request(port: int, method: str, path: str, headers: dict[str, str] | list, body: bytes,
                timeout: float = 60, stop_after: int | None = None) -> Reply:
    """One request on a fresh connection, written byte for byte (no client-side checks of the headers).
    ``stop_after``: send only that many body bytes, then close (a client that goes away mid-body)."""
    items = list(headers.items() if isinstance(headers, dict) else headers)
    if not any(k.lower() == "content-length" for k, _ in items) and (body or method == "POST"):
        items.append(("Content-Length", str(len(body))))
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in items) + "\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(head.encode("latin-1"))
            sock.sendall(body if stop_after is None else body[:stop_after])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (a 413 before the body) or refused the headers: read what it said
        if stop_after is not None:
            return Reply(0, {}, b"")
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            data = response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead):
            return Reply(0, {}, b"")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        sock.close()


@dataclass
class Hostile:
    """One concrete case: ``build()`` gives the requests (sent in parallel when there are several);
    ``expect`` the statuses the issue asks for (None: any answer that keeps the properties)."""

    build: Callable[[], list[tuple[str, str, dict, bytes]]]
    expect: set[int] | None = None
    # Refused by the HTTP server before the app sees it: its own plain 400/431, or the connection closed (0).
    protocol_refusal: bool = False
    parallel: bool = False  # send the requests at once (else one after the other)


def post_form(parts: list[tuple], headers: dict[str, str] | None = None):
    ctype, body = multipart(parts)
    return ("POST", "/v1/colorize", {**AUTH, "content-type": ctype, **(headers or {})}, body)


def post_json(text: bytes | str):
    data = text.encode() if isinstance(text, str) else text
    return ("POST", "/v1/colorize", {**AUTH, "content-type": "application/json"}, data)


@lru_cache(maxsize=None)
def png16_4096() -> bytes:
    return encode(Image.fromarray(np.zeros((4096, 4096), dtype=np.uint16)), "PNG")


@lru_cache(maxsize=None)
def rgba_4096() -> bytes:
    array = np.zeros((4096, 4096, 4), dtype=np.uint8)
    array[..., 3] = 255
    return encode(Image.fromarray(array), "PNG")


def unknown_keys_json(count: int) -> bytes:
    keys = ",".join(f'"k{i}":0' for i in range(count))
    return ('{"sketch":"","reference":"",' + keys + "}").encode()


def empty_lists_json(size: int) -> bytes:
    head, tail = b'{"sketch":"","reference":"","x":[', b"[]]}"
    return head + b"[]," * ((size - len(head) - len(tail)) // 3) + tail


def mutated_avifs(count: int) -> list[bytes]:
    """Byte flips and insertions (libavif's RuntimeErrors come from these; truncations are refused earlier)."""
    rng = random.Random(15)
    return [mutate(corpus()["avif"], [(rng.choice(("flip", "insert")), rng.randrange(2**20), rng.randrange(256))
                                      for _ in range(rng.randint(1, 3))]) for _ in range(count)]


def as_sketch(data: bytes, filename: str = "sketch", ctype: str = "application/octet-stream"):
    return post_form([("sketch", data, filename, ctype), ("reference", color_png(), "ref.png", "image/png")])


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
REFUSED = {400, 413, 415, 422}
HEADER_REFUSED = {400, 413, 431}
CASES: dict[str, Hostile] = {
    # 1. freeze: counting 10k pages inline blocks the loop for ~3 s here (3k pages: 0.4 s, under the budget)
    "multipage_tiff_10k_pages": Hostile(lambda: [as_sketch(multipage_tiff(10_000), "a.tif", "image/tiff")]),
    # 2. error amplification
    "json_1m_unknown_keys": Hostile(lambda: [post_json(unknown_keys_json(1_000_000))], REFUSED),
    # 3. memory amplification inside the caps
    "png16_4096_pair": Hostile(lambda: [post_form([("sketch", png16_4096(), "a.png", "image/png"),
                                                   ("reference", png16_4096(), "b.png", "image/png")])]),
    "png16_4096_pair_x4_parallel": Hostile(lambda: [post_form([("sketch", png16_4096(), "a.png", "image/png"),
                                                               ("reference", png16_4096(), "b.png", "image/png")])
                                                    for _ in range(4)], parallel=True),
    "rgba_4096": Hostile(lambda: [as_sketch(rgba_4096(), "a.png", "image/png")]),
    "json_empty_lists_near_cap": Hostile(lambda: [post_json(empty_lists_json(MAX_BODY - 1024 * 1024))], REFUSED),
    # 4. text/plain 500s
    "json_nested_100k": Hostile(lambda: [post_json('{"sketch":"","reference":"","x":' + "[" * 100_000
                                                   + "]" * 100_000 + "}")], REFUSED),
    "tiff_broken_later_page": Hostile(lambda: [as_sketch(multipage_tiff(3, broken_page=1), "a.tif", "image/tiff")]),
    # 7. internals in errors
    "seed_5000_digits": Hostile(lambda: [post_form(valid_parts(seed="9" * 5000))], {422}),
    "seed_5000_digits_json": Hostile(lambda: [post_json(json.dumps(valid_json())[:-1] + ', "seed": ' + "9" * 5000
                                                        + "}")], REFUSED),
    # 9. 2xx for input that should be refused
    "steps_1_0": Hostile(lambda: [post_form(valid_parts(steps="1_0"))], {422}),
    "steps_plus_1": Hostile(lambda: [post_form(valid_parts(steps="+1"))], {422}),
    "steps_96_0": Hostile(lambda: [post_form(valid_parts(steps="96.0"))], {422}),
    "json_true_as_steps": Hostile(lambda: [post_json(json.dumps(valid_json(steps=True)))], {422}),
    "json_true_as_seed": Hostile(lambda: [post_json(json.dumps(valid_json(seed=True)))], {422}),
    "duplicate_sketch_parts": Hostile(lambda: [post_form([("sketch", drawing_png(), "a.png", "image/png"),
                                                          *valid_parts()])], REFUSED),
    "data_url_text_html_holding_png": Hostile(lambda: [post_json(json.dumps(valid_json(
        sketch="data:text/html;base64," + base64.b64encode(drawing_png()).decode())))], REFUSED),
    "xbm_text_sketch": Hostile(lambda: [as_sketch(corpus()["xbm"], "a.xbm", "image/x-xbitmap")], REFUSED),
    "eps_sketch": Hostile(lambda: [as_sketch(EPS, "a.eps", "application/postscript")], REFUSED),
    "sketch_1000_to_1": Hostile(lambda: [as_sketch(encode(Image.new("RGB", (16_000, 16), "white"), "PNG"),
                                                   "a.png", "image/png")], REFUSED),
    # 6. slow clients: header caps
    "headers_64kb": Hostile(lambda: [("GET", "/v1/info", {**AUTH, **{f"X-Pad-{i}": "p" * 2000 for i in range(32)}},
                                      b"")], HEADER_REFUSED, protocol_refusal=True),
    "headers_200kb": Hostile(lambda: [("GET", "/v1/info", {**AUTH, **{f"X-Pad-{i}": "p" * 2000
                                                                     for i in range(100)}}, b"")],
                             HEADER_REFUSED, protocol_refusal=True),
    "authorization_1mb": Hostile(lambda: [("GET", "/v1/info", {"Authorization": "Bearer " + "t" * 1_000_000},
                                           b"")], HEADER_REFUSED, protocol_refusal=True),
}
if features.check("avif"):
    CASES["avif_mutated"] = Hostile(lambda: [as_sketch(data, "a.avif", "image/avif") for data in mutated_avifs(64)])


def send_all(server: Server, case: Hostile) -> tuple[list, list[Reply]]:
    requests = case.build()
    results: list[Reply | None] = [None] * len(requests)

    def one(k):
        results[k] = raw_request(server.port, *requests[k])

    if case.parallel:
        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    else:
        for k in range(len(requests)):
            one(k)
    return requests, results


def check_server(server: Server, started: float, name: str) -> None:
    """/healthz within budget while the case ran, RSS within budget, no traceback in the log."""
    finished = time.monotonic()
    deadline = finished + 12
    while time.monotonic() < deadline and not any(s > finished for s, _ in list(server.polls)):
        time.sleep(0.02)  # wait for a poll that started after the case, so every overlapping poll is done
    during = [(s - started, t) for s, t in list(server.polls) if s >= started - 0.1 and s <= finished]
    slow = [(round(s, 2), None if t is None else round(t, 2)) for s, t in during if t is None or t > HEALTH_BUDGET_S]
    peak_mb = (server.status("VmHWM") - server.baseline_kb) / 1024
    log = server.log.read_text(errors="replace")
    worst = max((t for _, t in during if t is not None), default=0.0)
    print(f"[hostile] {name}: {time.monotonic() - started:.2f} s, peak RSS {peak_mb:+.0f} MB over the baseline, "
          f"{len(during)} /healthz polls, slowest {worst:.2f} s, {sum(t is None for _, t in during)} unanswered")
    problems = []
    if slow:
        problems.append(f"/healthz over {HEALTH_BUDGET_S} s (or unanswered) during {name}: "
                        f"(start after the case began, seconds) {slow[:8]}")
    if peak_mb > RSS_BUDGET_MB:
        problems.append(f"server RSS peaked {peak_mb:.0f} MB over its baseline during {name} "
                        f"(budget {RSS_BUDGET_MB} MB)")
    if "Traceback" in log:
        problems.append(f"the server logged a traceback during {name}; its end:\n{log[-1200:]}")
    server.log.write_bytes(b"")  # the child appends (O_APPEND), so truncating starts the next case afresh
    if problems:
        raise AssertionError("\n".join(problems))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(server, name):
    case = CASES[name]
    server.reset_peak()
    started = time.monotonic()
    requests, replies = send_all(server, case)
    failures = []
    for request, reply in zip(requests, replies):
        if case.protocol_refusal and reply.status in HEADER_REFUSED | {0}:
            problem = None  # the HTTP server refused it before the app saw it (with its own plain body)
        else:
            problem = reply_problem(reply)
        expect = None if case.expect is None else case.expect | ({0} if case.protocol_refusal else set())
        if problem is None and expect is not None and reply.status not in expect:
            problem = f"answered {reply.status}, expected one of {sorted(expect)}"
        if problem:
            failures.append(f"{problem}\n  request: {show(*request)}\n  response: {reply.describe()}")
    try:
        check_server(server, started, name)
    except AssertionError as err:
        failures.append(str(err))
    if failures:
        pytest.fail(f"{name}: {len(failures)} problem(s):\n" + "\n---\n".join(failures[:4]), pytrace=False)


def test_disconnect_mid_body(server):
    """Clients that go away half-way through their bodies: no traceback, health kept, nothing held."""
    ctype, body = multipart(valid_parts())
    body = body + b"\0" * 200_000
    server.reset_peak()
    started = time.monotonic()
    for _ in range(8):
        raw_request(server.port, "POST", "/v1/colorize", {**AUTH, "content-type": ctype}, body,
                    stop_after=len(body) // 2)
    time.sleep(0.5)  # give the server the time to notice
    try:
        check_server(server, started, "disconnect_mid_body")
    except AssertionError as err:
        pytest.fail(str(err), pytrace=False)
