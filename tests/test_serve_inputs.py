"""The HTTP API's input side against hostile clients (issue 15), on the bare FastAPI app with a fake backend:
image formats, memory inside the caps, CPU work off the event loop, strict parsing, capped errors, JSON
errors for everything, and a disconnect cancelling the generation. Each test names the attack it replays."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import serve.api as api
from model.image_io import API_FORMATS, DecodeError, decode_cost, decode_image
from serve.api import ModelInfo, Settings, create_app
from serve.errors import MAX_ERROR_CHARS
from serve.params import PARAM_FIELDS

ROOT = Path(__file__).resolve().parents[1]
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


SKETCH = encode(np.full((96, 128, 3), 255, np.uint8))
REFERENCE = encode(np.full((64, 64, 3), (200, 40, 40), np.uint8))


class FakeBackend:
    """The tiny preset's numbers; ``colorize`` answers at once (or waits for ``gate``) and records what it
    got and whether it was cancelled."""

    def __init__(self, plugin: bool = False, delay_s: float = 0.0, error: Exception | None = None):
        self.plugin, self.delay_s, self.error = plugin, delay_s, error
        self.requests: list = []
        self.cancelled = 0

    def info(self) -> ModelInfo:
        return ModelInfo(preset="tiny", size_multiple=32, min_side=64, max_side=256, default_area=128 * 128,
                         default_steps=4, reference_guidance=3.0, sketch_guidance=1.0, plugin=self.plugin)

    async def colorize(self, request):
        self.requests.append(request)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        width, height = request.options.size
        return np.zeros((height, width, 3), np.uint8)


@pytest.fixture()
def backend():
    return FakeBackend()


@pytest.fixture()
def client(backend):
    return TestClient(create_app(backend))


def files_of(sketch=SKETCH, reference=REFERENCE, **extra):
    files = [("sketch", ("s.png", sketch, "image/png")), ("reference", ("r.png", reference, "image/png"))]
    files += [(name, value) for name, value in extra.items()]
    return files


def assert_error(response, status, *words):
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == status and len(body["error"]) <= MAX_ERROR_CHARS
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


def tiff_pages(pages: int, side: int = 16, broken_page: int | None = None) -> bytes:
    """A valid baseline TIFF of ``pages`` gray pages sharing one strip of pixels, built directly (a 60k-page
    file takes a fraction of a second); ``broken_page``'s IFD gets garbage entry types."""
    pixels = (bytes(range(256)) * (side * side // 256 + 1))[: side * side]
    first = 8 + len(pixels)
    entries = [(256, 3, side), (257, 3, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (278, 3, side), (279, 4, len(pixels))]
    size = 2 + 12 * len(entries) + 4
    out = [b"II*\0", struct.pack("<I", first), pixels]
    for page in range(pages):
        ifd = [struct.pack("<H", len(entries))]
        for tag, kind, value in entries:
            if page == broken_page:
                kind = 99  # no such TIFF type
            ifd.append(struct.pack("<HHII", tag, kind, 1, value) if kind == 4
                       else struct.pack("<HHIHH", tag, kind, 1, value, 0))
        ifd.append(struct.pack("<I", 0 if page == pages - 1 else first + (page + 1) * size))
        out.append(b"".join(ifd))
    return b"".join(out)


# --------------------------------------------------------------------------------------------- formats
def other_formats() -> dict[str, bytes]:
    gray = Image.new("L", (32, 32), 128)
    return {"TIFF": encode(gray, "TIFF"), "BMP": encode(gray, "BMP"), "GIF": encode(gray, "GIF"),
            "XBM": encode(gray.convert("1"), "XBM"), "ICO": encode(gray, "ICO"),
            "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n",
            "HTML": b"<html>hello</html>"}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_accepted(client, backend, fmt):
    response = client.post("/v1/colorize", files=files_of(sketch=encode(np.full((96, 128, 3), 255, np.uint8), fmt)))
    assert response.status_code == 200, response.text
    assert backend.requests[-1].sketch.shape == (96, 128, 3)


@pytest.mark.parametrize("name", list(other_formats()))
def test_every_other_format_is_refused_with_the_accepted_list(client, name, monkeypatch):
    from PIL import EpsImagePlugin

    parsed = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: parsed.append(self))
    error = assert_error(client.post("/v1/colorize", files=files_of(sketch=other_formats()[name])), 422, "sketch")
    assert "PNG, JPEG, WEBP" in error
    assert not parsed  # an EPS never reaches its plugin (nor Ghostscript)


def test_a_60k_page_tiff_costs_nothing(client):
    """The issue's freeze: a valid 6 MB TIFF of 60k pages took 45 s in ``n_frames``, on the event loop."""
    tiff = tiff_pages(60_000)
    assert 5_000_000 < len(tiff) < 8_000_000
    start = time.perf_counter()
    assert_error(client.post("/v1/colorize", files=files_of(sketch=tiff)), 422, "accepted")
    first_page = decode_image(tiff)  # the corpus decoder, all formats: the first page, frames never counted
    assert first_page.shape == (16, 16, 3)
    assert time.perf_counter() - start < 3.0


def test_a_tiff_with_a_broken_later_page_decodes_its_first(client):
    assert decode_image(tiff_pages(3, broken_page=1)).shape == (16, 16, 3)


@pytest.mark.parametrize("error", [TypeError("x"), SyntaxError("x"), RuntimeError("x"), struct.error("x"),
                                   IndexError("x"), ZeroDivisionError(), KeyError("x"), MemoryError()])
def test_anything_a_plugin_raises_is_a_decode_error(client, monkeypatch, error):
    from PIL import PngImagePlugin

    def broken(self):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_prepare", broken)
    with pytest.raises(DecodeError) as caught:
        decode_image(REFERENCE)
    assert caught.value.too_large == isinstance(error, MemoryError)
    assert_error(client.post("/v1/colorize", files=files_of()), 413 if isinstance(error, MemoryError) else 422,
                 "sketch")


def test_data_urls_must_declare_an_accepted_image_type(client, backend):
    import base64

    png = base64.b64encode(SKETCH).decode()
    ref = base64.b64encode(REFERENCE).decode()
    for header in ("data:text/html;base64,", "data:image/svg+xml;base64,", "data:image/png,", "data:;base64,"):
        assert_error(client.post("/v1/colorize", json={"sketch": header + png, "reference": ref}), 422,
                     "sketch", "data:image/png")
    for header in ("data:image/png;base64,", "DATA:image/JPEG;base64,", "data:image/webp;name=a.webp;base64,"):
        response = client.post("/v1/colorize", json={"sketch": header + png, "reference": ref})
        assert response.status_code == 200, (header, response.text)  # the bytes decide the format


VALID = {"png_rgba": encode(Image.new("RGBA", (32, 24), (10, 200, 30, 100))),
         "png_16": encode(Image.fromarray(np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80)),
         "png_palette": encode(Image.new("RGB", (24, 32), (5, 6, 7)).convert("P")),
         "jpeg_gray": encode(Image.new("L", (32, 32), 90), "JPEG"),
         "jpeg_cmyk": encode(Image.new("CMYK", (32, 32), (0, 200, 200, 0)), "JPEG"),
         "webp_rgba": encode(Image.new("RGBA", (32, 32), (1, 2, 3, 4)), "WEBP"),
         "webp_lossy": encode(Image.new("RGB", (40, 32), (200, 100, 0)), "WEBP", quality=50)}


def check_decoded(data: bytes, formats) -> None:
    try:
        rgb = decode_image(data, formats=formats)
    except DecodeError as err:
        assert str(err)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@settings(max_examples=150, **HYPOTHESIS)
@given(base=st.sampled_from(sorted(VALID)), cut=st.integers(0, 400),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       strict=st.booleans())
def test_mutated_png_jpeg_webp_decode_or_raise_decode_error(base, cut, edits, strict):
    data = bytearray(VALID[base])
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: len(data) - cut] if cut < len(data) else data)
    check_decoded(data, API_FORMATS if strict else None)


@settings(max_examples=100, **HYPOTHESIS)
@given(data=st.one_of(st.binary(max_size=512),
                      st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 ",
                                       b"II*\0", b"GIF89a"]).flatmap(
                          lambda magic: st.binary(max_size=256).map(lambda tail: magic + tail))))
def test_random_bytes_decode_or_raise_decode_error(data):
    check_decoded(data, API_FORMATS)
    check_decoded(data, None)


# --------------------------------------------------------------------------------------------- memory
MEASURE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[2])
    from model.image_io import decode_image
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rgb = decode_image(data, max_pixels=4096 * 4096, formats=("PNG", "JPEG", "WEBP"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, rgb.shape, rgb[0, 0].tolist())
""")


def peak_decode_bytes(tmp_path, data: bytes) -> tuple[int, str]:
    """The decode's peak RSS growth, measured in a fresh interpreter (this one's peak is long past)."""
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(ROOT)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown, _, rest = out.stdout.strip().partition(" ")
    return int(grown), rest


@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_a_4096_square_16_bit_or_rgba_png_decodes_within_its_estimate(tmp_path, mode):
    """The issue's amplification: a 33 KB 4096² 16-bit PNG cost +430 MB (float64), an RGBA one +370 MB."""
    image = Image.fromarray(np.zeros((4096, 4096), np.uint16)) if mode == "I;16" \
        else Image.new("RGBA", (4096, 4096), (10, 20, 30, 128))
    data = encode(image)
    assert len(data) < 100_000
    grown, rest = peak_decode_bytes(tmp_path, data)
    estimate = decode_cost(4096, 4096, mode, "PNG")
    assert grown <= estimate < 130 * 2**20, (grown, estimate)
    assert rest.startswith("(4096, 4096, 3)")


def test_conversions_keep_their_values():
    deep = np.array([[0, 255, 256, 32768, 65535] * 4] * 20, np.uint16)
    assert decode_image(encode(Image.fromarray(deep)))[0, :5, 0].tolist() == [0, 0, 1, 128, 255]
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).astype(int)
    assert np.abs(decode_image(encode(rgba)).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    rng = np.random.default_rng(orientation)
    image = Image.fromarray(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_image(data), expected)


def test_a_request_over_the_memory_budget_is_refused_before_decoding(backend, monkeypatch):
    from PIL import ImageFile

    client = TestClient(create_app(backend, Settings(max_decode_bytes=32 * 2**20)))
    big = encode(Image.new("RGBA", (2048, 2048), (1, 2, 3, 4)))
    assert decode_cost(2048, 2048, "RGBA", "PNG") > 32 * 2**20
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    assert_error(client.post("/v1/colorize", files=files_of(reference=big)), 413, "reference", "memory budget")
    assert (2048, 2048) not in loads
    assert client.post("/v1/colorize", files=files_of()).status_code == 200


def test_a_1000_to_1_sketch_is_refused_with_the_range(client):
    error = assert_error(client.post("/v1/colorize", files=files_of(sketch=encode(Image.new("L", (16000, 16))))),
                         422, "sketch")
    assert "1:8 to 8:1" in error
    assert client.post("/v1/colorize", files=files_of(sketch=encode(Image.new("L", (512, 64))))).status_code == 200


# ------------------------------------------------------------------------------------ off the event loop
def slow_decode(seconds: float, active: list[int], peak: list[int], lock: threading.Lock):
    """decode_image that first holds its thread busy in Python (taking the GIL turn by turn) for a while."""
    def decode(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                sum(range(1000))
            return decode_image(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1
    return decode


def test_healthz_answers_while_decodes_run_and_decodes_are_bounded(monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    monkeypatch.setattr(api, "decode_image", slow_decode(0.5, active, peak, lock))
    app = create_app(FakeBackend(), Settings(max_concurrent_decodes=2))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            posts = [asyncio.create_task(http.post("/v1/colorize", files=files_of())) for _ in range(4)]
            await asyncio.sleep(0.3)
            waits = []
            for _ in range(3):
                start = time.perf_counter()
                health = await http.get("/healthz")
                waits.append(time.perf_counter() - start)
                assert health.json() == {"status": "ok"}
            return waits, [response.status_code for response in await asyncio.gather(*posts)]

    waits, codes = asyncio.run(scenario())
    assert codes == [200] * 4
    assert max(waits) < 1.0, waits
    assert peak[0] == 2  # four requests, two decoding at a time


# ---------------------------------------------------------------------------------------- strict parsing
@pytest.mark.parametrize("field, value", [
    ("steps", "1_0"), ("steps", "+1"), ("steps", "96.0"), ("steps", " 5 "), ("steps", "٣"), ("steps", "0x10"),
    ("seed", "9" * 5000), ("seed", "-1"), ("width", "1e2"), ("reference_guidance", "nan"),
    ("reference_guidance", "1_0.5"), ("sketch_guidance", "inf"), ("plugin", "yes"), ("extract_lines", "2"),
])
def test_form_numbers_and_booleans_are_strict(client, field, value):
    error = assert_error(client.post("/v1/colorize", files=files_of(), data={field: value}), 422, field)
    assert len(error) < 200 and "int" not in error.replace("integer", "") and value not in error


@pytest.mark.parametrize("field, value", [
    ("steps", True), ("steps", 96.0), ("steps", "5"), ("seed", "HUGE"), ("seed", 2**64), ("width", 1e999),
    ("reference_strength", "1"), ("plugin", "true"), ("plugin", 1), ("extract_lines", None),
])
def test_json_numbers_and_booleans_are_strict(client, field, value):
    import base64

    body = {"sketch": base64.b64encode(SKETCH).decode(), "reference": base64.b64encode(REFERENCE).decode()}
    text = json.dumps({**body, field: value}) if value != "HUGE" else json.dumps(body)[:-1] + f', "{field}": {"9" * 5000}}}'
    error = assert_error(client.post("/v1/colorize", content=text, headers={"content-type": "application/json"}),
                         422, field)
    assert len(error) < 200 and "Exceeds the limit" not in error


def test_plain_values_are_accepted(client, backend):
    data = {"seed": "0012", "steps": "10", "width": "128", "height": "96", "reference_guidance": "2.5",
            "sketch_guidance": "1", "reference_strength": "0.8", "plugin": "off", "extract_lines": "ON",
            "line_extractor": "canny", "format": "json"}
    response = client.post("/v1/colorize", files=files_of(), data=data)
    assert response.status_code == 200, response.text
    options = backend.requests[-1].options
    assert (backend.requests[-1].seed, options.steps, options.size, options.reference_guidance) == (12, 10, (128, 96), 2.5)
    assert response.json()["parameters"]["line_extractor"] == "canny"


def test_unknown_and_duplicate_fields_are_refused(client):
    import base64

    error = assert_error(client.post("/v1/colorize", files=files_of(), data={"colour": "red", "size": "3"}),
                         422, "unknown fields", "'colour'", "'size'")
    assert "the fields are sketch" in error
    twice = [("sketch", ("s.png", SKETCH, "image/png"))] + files_of()
    assert_error(client.post("/v1/colorize", files=twice), 422, "'sketch' is sent twice")
    assert_error(client.post("/v1/colorize", files=files_of(), data={"steps": ["2", "3"]}), 422,
                 "'steps' is sent twice")
    sketch = base64.b64encode(SKETCH).decode()
    duplicate = f'{{"sketch": "{sketch}", "reference": "{sketch}", "steps": 2, "steps": 3}}'
    assert_error(client.post("/v1/colorize", content=duplicate, headers={"content-type": "application/json"}),
                 422, "'steps' is given twice")
    assert_error(client.post("/v1/colorize", files=files_of(), data={"sampler": "x" * 100}), 422, "too long")


# ------------------------------------------------------------------------------------ error amplification
def post_json(client, body: bytes):
    return client.post("/v1/colorize", content=body, headers={"content-type": "application/json"})


def test_json_nested_100k_deep_is_a_400(client):
    assert_error(post_json(client, b"[" * 100_000 + b"]" * 100_000), 400, "nested deeper")
    assert_error(post_json(client, b'{"sketch": ' * 50_000 + b"1" + b"}" * 50_000), 400, "nested deeper")


def test_a_json_body_of_1m_unknown_keys_is_refused_cheaply(client):
    """The issue's amplification: 12.9 MB, +1.2 GB RSS, a 22 s stall and a 40.9 MB 422."""
    body = json.dumps({f"k{i}": 0 for i in range(1_000_000)}).encode()
    assert len(body) < api.DEFAULT_MAX_BODY_BYTES
    tracemalloc.start()
    try:
        start = time.perf_counter()
        response = post_json(client, body)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_error(response, 413, "too many members")
    assert len(response.content) < 1024 and elapsed < 2.0
    assert peak < 4 * len(body), peak  # the body and its copies, no parsed objects
    lists = b"[" + b"[]," * 5_000_000 + b"[]]"  # 15 MB of empty lists
    assert_error(post_json(client, lists), 413, "too many members")
    zeros = b'{"steps": [' + b"0," * 5_000_000 + b"0]}"  # few tokens, many bytes outside the images
    assert_error(post_json(client, zeros), 413, "besides the images")


def test_error_messages_are_capped(client):
    many = {f"unknown_{i:03d}" + "x" * 30: 1 for i in range(200)}
    error = assert_error(post_json(client, json.dumps(many).encode()), 422, "unknown fields", "(and 197 more)")
    assert len(error) < 600
    wrong = {"steps": "a", "seed": "b", "width": "c", "height": "d", "sampler": "e", "format": "f"}
    assert_error(client.post("/v1/colorize", files=files_of(), data=wrong), 422)


# ------------------------------------------------------------------------------------ every error is JSON
def test_an_unexpected_error_is_a_json_500_logged_once(caplog, monkeypatch):
    client = TestClient(create_app(FakeBackend(error=RuntimeError("secret internals"))))
    with caplog.at_level(logging.DEBUG, logger="serve.api"):
        response = client.post("/v1/colorize", files=files_of())
    error = assert_error(response, 500, "internal error")
    assert "secret" not in error and "RuntimeError" not in error
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    monkeypatch.setattr(api, "decode_image", lambda *a, **k: {}["boom"])  # a bug in our own code
    assert_error(client.post("/v1/colorize", files=files_of()), 500, "internal error")


def multipart(**fields) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    request = httpx.Request("POST", "http://test/v1/colorize", files=files_of(), data=fields)
    body = request.read()
    headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]
    return body, headers


async def call_asgi(app, body: bytes, headers, disconnect_after_s: float | None, partial: bool = False):
    """One request straight through ASGI: the body in one message (or half of it, then the disconnect),
    then ``http.disconnect`` after ``disconnect_after_s``. Returns the messages sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/colorize", "raw_path": b"/v1/colorize", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80)}
    sent, calls = [], 0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body[: len(body) // 2] if partial else body,
                    "more_body": partial}
        if disconnect_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_a_client_disconnecting_mid_body_is_logged_quietly(caplog):
    app = create_app(FakeBackend())
    body, headers = multipart()
    with caplog.at_level(logging.DEBUG, logger="serve.api"):
        sent = asyncio.run(call_asgi(app, body, headers, 0.0, partial=True))
    assert sent == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("disconnected" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ headers, cancellation
def test_no_none_valued_headers(client):
    response = client.post("/v1/colorize", files=files_of())
    assert response.status_code == 200
    assert "X-Line-Extractor" not in response.headers and "None" not in response.headers.values()
    extracted = client.post("/v1/colorize", files=files_of(), data={"extract_lines": "true"})
    assert extracted.headers["X-Line-Extractor"] == "xdog"


def test_a_disconnect_cancels_the_generation():
    backend = FakeBackend(delay_s=30)
    app = create_app(backend)
    body, headers = multipart(steps="4")
    start = time.perf_counter()
    sent = asyncio.run(call_asgi(app, body, headers, disconnect_after_s=0.3))
    assert time.perf_counter() - start < 5
    assert len(backend.requests) == 1 and backend.cancelled == 1
    assert sent == []  # nobody to answer


def test_a_connected_client_is_not_cancelled():
    backend = FakeBackend(delay_s=0.3)
    body, headers = multipart()
    sent = asyncio.run(call_asgi(create_app(backend), body, headers, disconnect_after_s=None))
    assert backend.cancelled == 0 and sent[0]["status"] == 200


# ------------------------------------------------------------------------------------ generated form fields
FIELD_NAMES = [*PARAM_FIELDS, "colour", "sketch", ""]
form_text = st.one_of(st.text(max_size=12), st.integers(-5, 300).map(str), st.sampled_from(
    ["true", "off", "1_0", "+1", "96.0", "nan", "1e3", "png", "json", "xdog", "ddim", " 5", "٣", "9" * 30]))


@settings(max_examples=80, **HYPOTHESIS)
@given(fields=st.dictionaries(st.sampled_from(FIELD_NAMES), form_text, max_size=5))
def test_generated_form_fields_get_2xx_or_a_json_4xx(client, fields):
    response = client.post("/v1/colorize", files=files_of(), data=fields)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error(response, response.status_code)


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


@settings(max_examples=80, **HYPOTHESIS)
@given(fields=st.dictionaries(st.sampled_from(FIELD_NAMES), json_value, max_size=5))
def test_generated_json_fields_get_2xx_or_a_json_4xx(client, fields):
    import base64

    body = {"sketch": base64.b64encode(SKETCH).decode(), "reference": base64.b64encode(REFERENCE).decode()}
    response = post_json(client, json.dumps({**body, **fields}).encode())
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error(response, response.status_code)
