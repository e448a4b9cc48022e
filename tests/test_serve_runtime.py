"""The serving runtime: generations stop between steps when nobody waits, errors stay with their request,
a lone request does not wait out a batch window, slow or bloated clients are cut off, the default config
is not open to the network, and (slow) the same through a real local Ray Serve app."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def request_of(seed: int, steps: int = 2, size=(128, 96), **options):
    from model.options import ColorizeOptions
    from serve.api import ColorizeRequest

    image = np.full((size[1], size[0], 3), 255, np.uint8)
    image[::7] = 0
    return ColorizeRequest(sketch=image, reference=image, background_reference=None, seed=seed,
                           options=ColorizeOptions(size=size, steps=steps, **options))


class FakeModel:
    """``colorize_batch`` without a network: seed 7 is refused (ValueError), seed 13 breaks the call
    (RuntimeError); ``gate`` (a threading.Event) holds every call until set."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[int]] = []
        self.gate = gate

    def colorize_batch(self, sketches, references, options, *, seeds, background_references=None, should_stop=None):
        self.calls.append(list(seeds))
        if self.gate is not None:
            self.gate.wait(10)
        if 13 in seeds:
            raise RuntimeError("CUDA error: an internal detail nobody should see")
        if 7 in seeds:
            raise ValueError("seed 7 is refused")
        return [np.full((2, 2, 3), seed % 256, np.uint8) for seed in seeds]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from model.assembly import init_model

    return init_model(tmp_path_factory.mktemp("runtime") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    import torch

    from model.colorizer import Colorizer

    torch.set_num_threads(2)
    return Colorizer.from_pretrained(tiny_folder)


# ------------------------------------------------------------------------------------ cancellation
def test_generation_stops_between_steps(tiny_model):
    from model.generate import Cancelled

    sketch = request_of(0).sketch
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 3  # before step 1, after steps 1 and 2: go on; after step 3: stop

    with pytest.raises(Cancelled) as stopped:
        tiny_model.colorize(sketch, sketch, request_of(0, steps=50).options, seed=1, should_stop=should_stop)
    assert stopped.value.steps == 3
    with pytest.raises(Cancelled) as stopped:
        tiny_model.colorize(sketch, sketch, request_of(0, steps=50).options, seed=1, should_stop=lambda: True)
    assert stopped.value.steps == 0
    done = tiny_model.colorize(sketch, sketch, request_of(0, steps=2).options, seed=1, should_stop=lambda: False)
    plain = tiny_model.colorize(sketch, sketch, request_of(0, steps=2).options, seed=1)
    assert np.array_equal(np.asarray(done), np.asarray(plain))  # the check does not change the result


def test_local_backend_cancel_stops_the_generation(tiny_model, tiny_folder):
    from serve.runtime import LocalBackend
    from serve.app import read_model_info

    backend = LocalBackend(tiny_model, read_model_info(tiny_folder), max_batch_size=4)

    async def scenario():
        task = asyncio.create_task(backend.colorize(request_of(1, steps=100)))
        while backend.stats()["calls"] == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 30
        while backend.stats()["cancelled_runs"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        image = await backend.colorize(request_of(2, steps=2))  # the backend still serves
        return image

    image = asyncio.run(scenario())
    stats = backend.stats()
    assert stats["cancelled_runs"] == 1, stats
    assert 0 < stats["cancelled_steps"] < 100, stats
    assert stats["busy_ms"] >= 200, stats  # the cancelled run went on for the 0.2 s before the cancel, at least
    assert image.shape == (96, 128, 3)


def test_cancelled_while_queued_never_runs_and_partial_cancel_finishes_the_rest():
    from serve.runtime import Batcher, ModelRunner

    gate = threading.Event()
    model = FakeModel(gate)
    batcher = Batcher(ModelRunner(model).run, max_batch_size=4, window_s=0.0)

    async def scenario():
        first = asyncio.create_task(batcher.submit(request_of(1)))
        while not model.calls:
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(batcher.submit(request_of(2)))
        kept = asyncio.create_task(batcher.submit(request_of(3)))
        await asyncio.sleep(0.05)
        queued.cancel()
        gate.set()
        return await first, await kept

    first, kept = asyncio.run(scenario())
    assert first["image"][0, 0, 0] == 1 and kept["image"][0, 0, 0] == 3
    assert model.calls == [[1], [3]]  # seed 2 never reached the model


# ------------------------------------------------------------------------------------------ errors
def test_errors_stay_with_the_request_that_caused_them(caplog):
    from serve.runtime import FAILED_MESSAGE, Batcher, ModelRunner

    model = FakeModel()
    runner = ModelRunner(model)
    batcher = Batcher(runner.run, max_batch_size=4, window_s=0.0)

    async def scenario():
        batcher._last_size, batcher._last_end = 4, asyncio.get_running_loop().time()  # as after a batch of 4
        batcher.window_s = 1.0
        return await asyncio.gather(*(batcher.submit(request_of(seed)) for seed in (1, 13, 7, 2)))

    results = asyncio.run(scenario())
    assert model.calls[0] == [1, 13, 7, 2]  # one call for the four, then each alone
    assert results[0]["image"][0, 0, 0] == 1 and results[3]["image"][0, 0, 0] == 2
    assert results[1] == {"error": FAILED_MESSAGE, "status": 500}  # no internals
    assert results[2] == {"error": "seed 7 is refused", "status": 422}
    assert runner.stats["isolated"] == 1 and runner.stats["failed"] == 1
    assert "CUDA error" in caplog.text  # the log keeps the detail


def test_a_lone_request_does_not_wait_for_a_window():
    import model.generate  # noqa: F401  (the runner imports it on first use: not what is timed here)
    from serve.runtime import Batcher, ModelRunner

    model = FakeModel()
    batcher = Batcher(ModelRunner(model).run, max_batch_size=8, window_s=2.0)

    async def scenario():
        timings = []
        for seed in range(3):
            started = time.perf_counter()
            await batcher.submit(request_of(seed))
            timings.append(time.perf_counter() - started)
        await asyncio.gather(*(batcher.submit(request_of(10 + i)) for i in range(5)))  # arrive together
        return timings

    timings = asyncio.run(scenario())
    assert max(timings) < 0.5, timings  # far below the 2 s window
    assert model.calls[:3] == [[0], [1], [2]]
    assert model.calls[3] == [10, 11, 12, 13, 14]  # queued together, dispatched together, no window


def test_ingress_maps_model_errors():
    import ray
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    from serve.errors import ApiError, Overloaded
    from serve.app import _HandleBackend

    class Response:
        def __init__(self, outcome):
            self.outcome, self.cancelled = outcome, False

        def __await__(self):
            if self.outcome == "hang":
                yield from asyncio.sleep(30).__await__()
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome
            yield

        def cancel(self):
            self.cancelled = True

    class Handle:
        def __init__(self, outcome):
            self.response = Response(outcome)
            self.colorize = self

        def remote(self, request):
            return self.response

    def call(outcome):
        return asyncio.run(_HandleBackend(Handle(outcome), None, 2.0).colorize(request_of(1)))

    for err in (BackPressureError(num_queued_requests=3, max_queued_requests=2), ReplicaUnavailableError("gone"),
                ray.exceptions.ActorDiedError(), ray.exceptions.RayError("lost")):
        with pytest.raises(Overloaded) as refused:
            call(err)
        assert refused.value.retry_after_s == 2.0 and "gone" not in str(refused.value)
    with pytest.raises(ApiError) as failed:
        call(RuntimeError("internal detail"))
    assert failed.value.status == 500 and "internal" not in failed.value.message
    with pytest.raises(ValueError, match="refused combo"):
        call({"error": "refused combo", "status": 422})
    with pytest.raises(ApiError) as failed:
        call({"error": "the model failed on this request", "status": 500})
    assert failed.value.status == 500
    assert call({"image": np.zeros((2, 2, 3), np.uint8)}).shape == (2, 2, 3)

    handle = Handle("hang")

    async def cancelled():
        task = asyncio.create_task(_HandleBackend(handle, None, 1.0).colorize(request_of(1)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert handle.response.cancelled  # the model's request is cancelled with the caller


# ------------------------------------------------------------------------------------------ config
def test_default_config_is_loopback_with_client_timeouts():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppOptions

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    http = config["http_options"]
    assert http["host"] == "127.0.0.1"
    assert 0 < http["keep_alive_timeout_s"] <= 10 and 0 < http["request_timeout_s"] <= 600
    args = config["applications"][0]["args"]
    assert not args.get("allow_unauthenticated") and "api_token" not in args
    options = AppOptions.from_args(args)
    assert options.ingress_concurrency() * options.request_memory_bytes() <= options.ingress_memory_budget_mib * 2**20


def test_non_loopback_without_a_token_is_refused(tiny_folder, monkeypatch):
    from serve.app import AppOptions, build_app, check_exposure

    for key in [k for k in os.environ if k.startswith("COLORIZE_")]:
        monkeypatch.delenv(key)
    with pytest.raises(ValueError, match="allow_unauthenticated"):
        build_app({"model": str(tiny_folder), "host": "0.0.0.0"})
    with pytest.raises(ValueError, match="beyond loopback"):
        check_exposure(AppOptions.from_args({"model": "m", "host": "10.1.2.3", "api_token": ""}))
    for allowed in ({"host": "127.0.0.1"}, {"host": "::1"}, {"host": "localhost"},
                    {"host": "0.0.0.0", "api_token": "t"}, {"host": "0.0.0.0", "allow_unauthenticated": True}):
        check_exposure(AppOptions.from_args({"model": "m", **allowed}))
    monkeypatch.setenv("COLORIZE_ALLOW_UNAUTHENTICATED", "true")
    check_exposure(AppOptions.from_args({"model": "m", "host": "0.0.0.0"}))


def test_ingress_concurrency_follows_the_memory_budget():
    from serve.app import AppOptions

    options = AppOptions.from_args({"model": "m"})
    assert options.ingress_concurrency() == 3072 * 2**20 // (2 * 32 * 2**20 + 9 * 4096 * 4096) == 14
    small = AppOptions.from_args({"model": "m", "max_body_bytes": 2**20, "max_input_pixels": 1024 * 1024})
    assert small.ingress_concurrency() > 64 * options.ingress_concurrency() / 8
    assert AppOptions.from_args({"model": "m", "ingress_max_ongoing_requests": 3}).ingress_concurrency() == 3


def test_header_guard_answers_json():
    from starlette.testclient import TestClient

    from serve.api import create_app
    from serve.http_server import SERVE_CONTROL_HEADERS, HeaderGuard

    app = create_app(None)
    app.add_middleware(HeaderGuard, max_bytes=16 * 1024, refused=SERVE_CONTROL_HEADERS)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        refused = client.get("/healthz", headers={"x-filler": "a" * 20_000})
        assert refused.status_code == 431 and refused.json()["status"] == 431
        for name, value in (("X-Request-Timeout-Seconds", "0"), ("x-request-disconnect-disabled", "?1")):
            refused = client.get("/healthz", headers={name: value})
            assert refused.status_code == 400 and name.lower() in refused.json()["error"]


# -------------------------------------------------------------------------- the bare app under uvicorn
SERVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from serve import http_server
    from serve.api import create_app

    http_server.run(create_app(None), "127.0.0.1", {port}, header_timeout_s=1.0, body_timeout_s=1.5,
                    keep_alive_timeout_s=1, log_level="warning")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bare_server():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER.format(repo=str(REPO), port=port)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent before."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, socket.timeout):
        return False, received
    except ConnectionResetError:
        pass
    return True, received


def test_bare_app_refuses_huge_headers(bare_server):
    with socket.create_connection(("127.0.0.1", bare_server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 200_000 + b"\r\n\r\n")
        closed, received = closed_within(sock, 5)
    assert closed and (received == b"" or received.startswith(b"HTTP/1.1 4")), received[:80]
    with socket.create_connection(("127.0.0.1", bare_server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * 1_000_000 + b"\r\n\r\n")
        closed, received = closed_within(sock, 5)
    assert closed and not received.startswith(b"HTTP/1.1 2")


def test_bare_app_closes_slow_clients(bare_server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", bare_server)) as sock:  # slow-loris headers
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(6):
            time.sleep(0.3)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        closed, _ = closed_within(sock, 3)
    assert closed and time.monotonic() - started < 4
    with socket.create_connection(("127.0.0.1", bare_server)) as sock:  # says nothing at all
        assert closed_within(sock, 3)[0]
    with socket.create_connection(("127.0.0.1", bare_server)) as sock:  # a body that never comes
        sock.sendall(b"POST /v1/colorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"seed\": ")
        started = time.monotonic()
        closed, received = closed_within(sock, 4)
    assert closed and time.monotonic() - started < 3.5 and not received.startswith(b"HTTP/1.1 2")
    with socket.create_connection(("127.0.0.1", bare_server)) as sock:  # a good client, then idle
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, received = closed_within(sock, 3)
    assert received.startswith(b"HTTP/1.1 200") and closed  # keep-alive ended after 1 s


# ---------------------------------------------------------------------------- through Ray Serve (slow)
@pytest.fixture(scope="module")
def served(tiny_folder):
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve.app import build_app, serve_http_host
    from serve.transport import use_grpc_proxies

    port = free_port()
    use_grpc_proxies()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "keep_alive_timeout_s": 5})
        assert serve_http_host() == "127.0.0.1"
        serve.run(build_app({"model": str(tiny_folder), "num_cpus": 1, "max_batch_size": 4, "api_token": ""}),
                  name="runtime", route_prefix="/")
        yield port, serve.get_deployment_handle("ColorizerModel", app_name="runtime")
    finally:
        serve.shutdown()
        ray.shutdown()


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "colorize-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_serve_disconnect_stops_the_generation(served):
    import requests

    port, model = served
    image = png_bytes(request_of(0).sketch)
    fields = {"steps": "100", "width": "128", "height": "96", "seed": "5"}
    body, content_type = multipart(fields, {"sketch": image, "reference": image})
    before = model.stats.remote().result()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/colorize HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while model.stats.remote().result()["calls"] == before["calls"]:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.05)
        time.sleep(0.3)
    deadline = time.monotonic() + 60
    while (stats := model.stats.remote().result())["cancelled_runs"] == before["cancelled_runs"]:
        assert time.monotonic() < deadline, f"the replica never stopped: {stats}"
        time.sleep(0.1)
    stopped_after = stats["cancelled_steps"] - before["cancelled_steps"]
    print(f"generation stopped after {stopped_after} of 100 steps")
    assert 0 < stopped_after < 100, stats
    fields["steps"] = "2"
    response = requests.post(f"http://127.0.0.1:{port}/v1/colorize", data=fields, timeout=120,
                             files={"sketch": ("s.png", image, "image/png"), "reference": ("r.png", image, "image/png")})
    assert response.status_code == 200, response.text  # the replica serves on


@pytest.mark.slow
def test_serve_caps_headers_and_batches_concurrent_requests(served):
    import requests
    from concurrent.futures import ThreadPoolExecutor

    port, model = served
    url = f"http://127.0.0.1:{port}"
    refused = requests.get(url + "/healthz", headers={"x-filler": "a" * 40_000}, timeout=30)
    assert refused.status_code == 431 and refused.json()["status"] == 431
    refused = requests.get(url + "/healthz", headers={"x-request-disconnect-disabled": "?1"}, timeout=30)
    assert refused.status_code == 400 and refused.json()["status"] == 400
    image = png_bytes(request_of(0).sketch)

    def post(seed: int):
        return requests.post(url + "/v1/colorize", timeout=120, data={"steps": "2", "seed": str(seed)},
                             files={"sketch": ("s.png", image, "image/png"), "reference": ("r.png", image, "image/png")})

    before = model.stats.remote().result()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    stats = model.stats.remote().result()
    assert stats["requests"] - before["requests"] == 4
    assert stats["batches"] - before["batches"] < 4  # some were batched together
    # the ingress's way to the model (serve/transport.py), from here: the same counters over gRPC
    from serve.transport import model_handle

    assert model_handle(model, "grpc").stats.remote().result()["requests"] == stats["requests"]
    with pytest.raises(ValueError, match="transport"):
        model_handle(model, "http")
