"""The Ray Serve app over real HTTP: a local Ray, the tiny preset, requests to 127.0.0.1:8000.

Two applications run side by side: ``/`` (no auth, batching on, a base model) and ``/secured`` (a bearer
token, a model with a plugin, one request at a time with a queue of one, to see back-pressure become
503 + Retry-After).
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

BASE = "http://127.0.0.1:8000"
SECURED = BASE + "/secured"
TOKEN = "s3cret-token"
MAX_BODY = 1_000_000
MAX_PIXELS = 600 * 600


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pair():
    from pipelines.synthetic import synthetic_illustration

    drawing = synthetic_illustration(seed=5, width=128, height=96)
    return png_bytes(drawing.sketch), png_bytes(drawing.color)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from jobs.init_model import init_model

    return init_model(tmp_path_factory.mktemp("serve") / "model", "tiny")


@pytest.fixture(scope="module")
def plugin_folder(model_folder):
    from model.colorizer import Colorizer
    from model.plugin import attach_plugin

    model = Colorizer.from_pretrained(model_folder)
    attach_plugin(model)
    return model.save_pretrained(model_folder.parent / "plugin_model")


@pytest.fixture(scope="module")
def server(model_folder, plugin_folder):
    from serve.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.run(build_app({"model": str(model_folder), "num_cpus": 0.5, "max_batch_size": 4,
                             "batch_wait_timeout_s": 0.2, "max_body_bytes": MAX_BODY,
                             "max_input_pixels": MAX_PIXELS, "api_token": ""}),
                  name="open", route_prefix="/")
        serve.run(build_app({"model": str(plugin_folder), "num_cpus": 0.5, "max_batch_size": 1,
                             "max_ongoing_requests": 1, "max_queued_requests": 1, "api_token": TOKEN,
                             "retry_after_s": 2}),
                  name="secured", route_prefix="/secured")
        yield BASE
    finally:
        serve.shutdown()
        ray.shutdown()


def post(files=None, data=None, url=BASE, **kwargs):
    return requests.post(url + "/v1/colorize", files=files, data=data, timeout=120, **kwargs)


def files_of(pair, **extra):
    files = {"sketch": ("sketch.png", pair[0], "image/png"), "reference": ("ref.png", pair[1], "image/png")}
    files.update(extra)
    return files


def assert_error(response, status, *words):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["status"] == status
    for word in words:
        assert word in body["error"], body["error"]


def to_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------------------- happy
def test_health_and_info(server):
    assert requests.get(server + "/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(server + "/v1/info", timeout=30).json()
    assert info["model"]["preset"] == "tiny"
    assert info["model"]["plugin"] is False
    assert info["limits"]["sizes"] == {"multiple": 32, "min_side": 64, "max_side": 256, "default_area": 128 * 128}
    assert info["limits"]["max_body_bytes"] == MAX_BODY
    assert info["auth"] is False


def test_png_of_requested_size_matches_the_model(server, pair, model_folder):
    from model.colorizer import Colorizer
    from model.guidance import Guidance
    from pipelines.decode import decode_image

    fields = {"seed": "1234", "steps": "3", "width": "96", "height": "64", "reference_guidance": "2.5",
              "sketch_guidance": "1.5", "reference_strength": "0.8"}
    response = post(files_of(pair), fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    served = to_array(response.content)
    assert served.shape == (64, 96, 3)
    headers = response.headers
    assert (headers["X-Seed"], headers["X-Steps"], headers["X-Width"], headers["X-Height"]) == ("1234", "3", "96", "64")
    assert (headers["X-Reference-Guidance"], headers["X-Sketch-Guidance"]) == ("2.5", "1.5")
    assert headers["X-Reference-Strength"] == "0.8" and headers["X-Plugin"] == "false"

    model = Colorizer.from_pretrained(model_folder)
    local = model.colorize(decode_image(pair[0]), decode_image(pair[1]), steps=3, seed=1234, size=(96, 64),
                           guidance=Guidance(2.5, 1.5), reference_strength=0.8)
    difference = np.abs(served.astype(int) - np.asarray(local).astype(int)).max()
    assert difference <= 1, difference
    other = model.colorize(decode_image(pair[0]), decode_image(pair[1]), steps=3, seed=1235, size=(96, 64),
                           guidance=Guidance(2.5, 1.5), reference_strength=0.8)
    assert np.abs(served.astype(int) - np.asarray(other).astype(int)).max() > 1  # the seed matters


def test_json_base64_and_auto_size(server, pair):
    body = {"sketch": base64.b64encode(pair[0]).decode(),
            "reference": "data:image/png;base64," + base64.b64encode(pair[1]).decode(),
            "steps": 2, "format": "json"}
    response = requests.post(server + "/v1/colorize", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    used = result["parameters"]
    # no size given: the 128x96 sketch's aspect at the tiny preset's 128² area, on the 32 px grid
    assert (used["width"], used["height"]) == (160, 96)
    assert used["steps"] == 2 and isinstance(used["seed"], int) and used["background_reference"] is False
    image = to_array(base64.b64decode(result["image"]))
    assert image.shape == (96, 160, 3)

    again = requests.post(server + "/v1/colorize", json={**body, "seed": used["seed"]}, timeout=120).json()
    assert np.abs(to_array(base64.b64decode(again["image"])).astype(int) - image.astype(int)).max() <= 1


def test_default_seed_is_random_and_returned(server, pair):
    seeds = {post(files_of(pair), {"steps": "1", "width": "64", "height": "64"}).headers["X-Seed"] for _ in range(2)}
    assert len(seeds) == 2


def model_batches(app_name: str) -> int:
    handle = serve.get_deployment_handle("ColorizerModel", app_name=app_name)
    return handle.stats.remote().result()["batches"]


def test_parallel_requests_are_all_answered(server, pair):
    before = model_batches("open")

    def one(seed):
        return post(files_of(pair), {"seed": str(seed), "steps": "2", "width": "64", "height": "96"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.headers["X-Seed"] for r in responses] == ["0", "1", "2", "3"]
    images = [to_array(r.content) for r in responses]
    assert all(image.shape == (96, 64, 3) for image in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 1  # each kept its own seed
    assert model_batches("open") - before < 4  # some requests shared a colorize_batch call


# ------------------------------------------------------------------------------------------ bad input
def test_missing_parts(server, pair):
    assert_error(post({"sketch": ("s.png", pair[0], "image/png")}), 422, "missing reference")
    assert_error(requests.post(server + "/v1/colorize", json={"reference": "aGk="}, timeout=30), 422, "missing sketch")
    assert_error(requests.post(server + "/v1/colorize", data=b"x", headers={"content-type": "text/plain"},
                               timeout=30), 415, "multipart")


def test_not_images_and_corrupt_files(server, pair):
    text = ("notes.png", b"<html>hello</html>", "image/png")
    assert_error(post(files_of(pair, reference=text)), 422, "reference", "not an image")
    truncated = ("s.png", pair[0][: len(pair[0]) // 2], "image/png")
    assert_error(post(files_of(pair, sketch=truncated)), 422, "sketch", "corrupt")
    assert_error(requests.post(server + "/v1/colorize", json={"sketch": "%%%", "reference": "aGk="}, timeout=30),
                 422, "sketch is not valid base64")
    assert_error(requests.post(server + "/v1/colorize", data=b"{not json", timeout=30,
                               headers={"content-type": "application/json"}), 400, "JSON")


def test_oversized_body_and_too_many_pixels(server, pair):
    big = ("big.bin", b"\0" * (MAX_BODY + 10), "application/octet-stream")
    assert_error(post(files_of(pair, reference=big)), 413, "exceeds the limit")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\0" * 65536

    chunked = requests.post(server + "/v1/colorize", data=chunks(), timeout=60,
                            headers={"content-type": "application/json"})
    assert_error(chunked, 413, "exceeds the limit")
    huge = png_bytes(np.full((700, 700, 3), 255, np.uint8))  # small file, too many pixels
    assert len(huge) < MAX_BODY
    assert_error(post(files_of(pair, sketch=("huge.png", huge, "image/png"))), 413, "too many pixels")


@pytest.mark.parametrize("fields, words", [
    ({"steps": "0"}, ["steps"]),
    ({"steps": "101"}, ["steps"]),
    ({"reference_guidance": "31"}, ["reference_guidance"]),
    ({"sketch_guidance": "-1"}, ["sketch_guidance"]),
    ({"reference_strength": "5"}, ["reference_strength"]),
    ({"seed": "-3"}, ["seed"]),
    ({"width": "96"}, ["both width and height"]),
    ({"width": "100", "height": "64"}, ["not a multiple of 32"]),
    ({"width": "512", "height": "64"}, ["outside [64, 256]"]),
    ({"steps": "many"}, ["steps"]),
    ({"format": "gif"}, ["format"]),
    ({"plugin": "true"}, ["plugin"]),
    ({"colour": "red"}, ["colour"]),
])
def test_out_of_range_parameters(server, pair, fields, words):
    assert_error(post(files_of(pair), fields), 422, *words)


def test_background_reference_needs_a_plugin(server, pair):
    response = post(files_of(pair, background_reference=("bg.png", pair[1], "image/png")))
    assert_error(response, 422, "background_reference", "plugin")


# ------------------------------------------------------------------------------------ auth, overload
def test_bearer_token(server, pair):
    assert requests.get(SECURED + "/healthz", timeout=30).status_code == 200  # open without a token
    assert_error(requests.get(SECURED + "/v1/info", timeout=30), 401, "bearer token")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(requests.get(SECURED + "/v1/info", headers=wrong, timeout=30), 401, "bearer token")
    assert_error(post(files_of(pair), {"steps": "1"}, url=SECURED, headers=wrong), 401, "bearer token")
    good = {"Authorization": f"Bearer {TOKEN}"}
    info = requests.get(SECURED + "/v1/info", headers=good, timeout=30).json()
    assert info["auth"] is True and info["model"]["plugin"] is True
    response = post(files_of(pair), {"steps": "1", "width": "64", "height": "64"}, url=SECURED, headers=good)
    assert response.status_code == 200, response.text
    assert to_array(response.content).shape == (64, 64, 3)


def test_overload_answers_503_with_retry_after(server, pair):
    good = {"Authorization": f"Bearer {TOKEN}"}

    def one(seed):
        return post(files_of(pair), {"seed": str(seed), "steps": "40", "width": "128", "height": "96"},
                    url=SECURED, headers=good)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "2"
            assert "queue is full" in response.json()["error"]


def test_plugin_model_takes_a_background_reference(server, pair):
    good = {"Authorization": f"Bearer {TOKEN}"}
    fields = {"seed": "7", "steps": "2", "width": "128", "height": "96"}
    background = ("bg.png", png_bytes(np.full((80, 80, 3), (30, 160, 40), np.uint8)), "image/png")
    response = post(files_of(pair, background_reference=background), fields, url=SECURED, headers=good)
    assert response.status_code == 200, response.text
    assert (response.headers["X-Plugin"], response.headers["X-Background-Reference"]) == ("true", "true")
    plain = post(files_of(pair), fields, url=SECURED, headers=good)
    assert (plain.headers["X-Plugin"], plain.headers["X-Background-Reference"]) == ("true", "false")
    off = post(files_of(pair), {**fields, "plugin": "false"}, url=SECURED, headers=good)
    assert off.headers["X-Plugin"] == "false"
    assert np.abs(to_array(off.content).astype(int) - to_array(plain.content).astype(int)).max() > 0
    refused = post(files_of(pair, background_reference=background), {**fields, "plugin": "off"}, url=SECURED,
                   headers=good)
    assert_error(refused, 422, "background_reference needs the plugin on")


# ------------------------------------------------------------------------------------------ config
def test_config_yaml_is_a_valid_serve_config():
    from pathlib import Path

    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    application = config.applications[0]
    assert application.import_path == "serve.app:build_app"
    from serve.app import AppOptions

    options = AppOptions.from_args(application.args)
    assert options.model == application.args["model"] and options.min_replicas <= options.max_replicas


def test_options_from_env_and_refused_args(monkeypatch, tmp_path):
    from serve.app import AppOptions, build_app

    monkeypatch.setenv("COLORIZE_MODEL", "/models/x")
    monkeypatch.setenv("COLORIZE_API_TOKEN", "t")
    options = AppOptions.from_args({"max_batch_size": 2})
    assert (options.model, options.api_token, options.max_batch_size) == ("/models/x", "t", 2)
    assert AppOptions.from_args({"model": "/m"}).model == "/m"  # args win over the environment
    with pytest.raises(ValueError, match="max_replicas"):
        AppOptions.from_args({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="unknown_option"):
        AppOptions.from_args({"unknown_option": 1})
    with pytest.raises(FileNotFoundError, match="not a colorize-xl model folder"):
        build_app({"model": str(tmp_path)})
    assert json.dumps(AppOptions.from_args({}).model_dump())  # env alone is enough
