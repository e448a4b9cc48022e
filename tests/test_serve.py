"""The Ray Serve app over real HTTP: a local Ray, the tiny preset, requests to 127.0.0.1:8000.

Two applications run side by side: ``/`` (no auth, batching on, a base model) and ``/secured`` (a bearer
token, a model with a plugin, one request at a time with a queue of one, to see back-pressure become
503 + Retry-After).
"""

from __future__ import annotations

import base64
import dataclasses
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
    from pipelines.data.synthetic import synthetic_illustration

    drawing = synthetic_illustration(seed=5, width=128, height=96)
    return png_bytes(drawing.sketch), png_bytes(drawing.color)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model whose sketch encoder is not at its zero init, so the sketch visibly steers the output
    (as after training); a fresh model ignores its sketch entirely."""
    from conftest import _wake_up
    from model.assembly import init_model
    from model.colorizer import Colorizer

    folder = init_model(tmp_path_factory.mktemp("serve") / "init", "tiny")
    model = Colorizer.from_pretrained(folder)
    _wake_up(model)
    return model.save_pretrained(folder.parent / "model")


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
    from serve.transport import use_grpc_proxies

    use_grpc_proxies()
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
    assert "xdog" in info["line_extractors"]


def test_png_of_requested_size_matches_the_model(server, pair, model_folder):
    from model.colorizer import Colorizer
    from model.image_io import decode_image
    from model.options import ColorizeOptions

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
    options = ColorizeOptions(size=(96, 64), steps=3, reference_guidance=2.5, sketch_guidance=1.5,
                              reference_strength=0.8)
    local = model.colorize(decode_image(pair[0]), decode_image(pair[1]), options, seed=1234)
    difference = np.abs(served.astype(int) - np.asarray(local).astype(int)).max()
    assert difference <= 1, difference
    other = model.colorize(decode_image(pair[0]), decode_image(pair[1]), options, seed=1235)
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


def test_background_reference_needs_a_split_and_background_enhance_gives_one(server, pair):
    background = ("bg.png", pair[1], "image/png")
    response = post(files_of(pair, background_reference=background))
    assert_error(response, 422, "background_reference needs the plugin on or background_enhance=true")
    fields = {"seed": "3", "steps": "1", "width": "64", "height": "64"}
    enhanced = post(files_of(pair, background_reference=background),
                    {**fields, "background_enhance": "true", "merge_scale": "0.2", "sketch_mask_threshold": "0.1"})
    assert enhanced.status_code == 200, enhanced.text
    assert (enhanced.headers["X-Background-Enhance"], enhanced.headers["X-Merge-Scale"]) == ("true", "0.2")
    assert enhanced.headers["X-Sketch-Mask-Threshold"] == "0.1"
    assert to_array(enhanced.content).shape == (64, 64, 3)  # what the split changes: tests/test_plugin.py
    assert_error(post(files_of(pair), {**fields, "merge_scale": "2"}), 422, "merge_scale")


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
    assert_error(refused, 422, "background_reference needs the plugin on or background_enhance=true")


def test_extract_lines_turns_a_colored_drawing_into_a_sketch(server, pair):
    fields = {"seed": "3", "steps": "2", "width": "128", "height": "96", "format": "json"}
    colored = {"sketch": ("colored.png", pair[1], "image/png"), "reference": ("ref.png", pair[1], "image/png")}
    extracted = post(colored, {**fields, "extract_lines": "true", "line_extractor": "canny"})
    assert extracted.status_code == 200, extracted.text
    assert extracted.json()["parameters"]["line_extractor"] == "canny"
    as_sent = post(colored, fields).json()
    assert as_sent["parameters"]["line_extractor"] is None
    assert extracted.json()["image"] != as_sent["image"]  # the model saw a different sketch
    assert_error(post(colored, {**fields, "extract_lines": "true", "line_extractor": "magic"}), 422, "line_extractor")


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


def test_every_input_limit_of_the_api_is_an_app_argument():
    from serve.api import Settings
    from serve.app import AppOptions, api_settings

    given = {"max_body_bytes": 1000, "max_input_pixels": 2000, "max_decode_bytes": 3000,
             "max_concurrent_decodes": 3, "max_sketch_aspect": 4.0, "api_token": "t"}
    settings = Settings(**api_settings(AppOptions.from_args({"model": "/m", **given})))
    assert {name: getattr(settings, name) for name in given} == given
    limits = {f.name for f in dataclasses.fields(Settings)} - {"open_paths"}
    assert limits <= set(AppOptions.model_fields)  # a new API limit must be settable where the app is deployed


# ------------------------------------------------------------------------- the artists' page, in Chromium
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium through Selenium. CI installs it (.ci/run) and sets
    COLORIZE_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""
    import os
    from pathlib import Path

    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("COLORIZE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, seconds=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: condition(d))


def drop_file(driver, element_id: str, name: str, data: bytes) -> None:
    """A real drop event carrying a File, as when an artist drags one from the desktop."""
    driver.execute_script("""
        const [id, name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        const target = document.getElementById(id);
        for (const type of ["dragover", "drop"])
            target.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
    """, element_id, name, base64.b64encode(data).decode())


def set_range(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_page_colorizes_and_downloads_in_chromium(server, pair, browser, tmp_path):
    from selenium.webdriver.common.by import By

    sketch_file = tmp_path / "sketch.png"
    sketch_file.write_bytes(pair[0])
    browser.get(server + "/")
    wait_for(browser, lambda d: "tiny preset" in d.find_element(By.ID, "model-line").text)
    go = browser.find_element(By.ID, "go")
    assert not go.is_enabled()  # nothing to colorize yet
    assert not browser.find_element(By.ID, "plugin-row").is_displayed()  # no plugin here
    assert browser.find_element(By.ID, "background-box").is_displayed()  # background enhance works without

    browser.find_element(By.ID, "file-sketch").send_keys(str(sketch_file))  # the file picker
    drop_file(browser, "drop-reference", "ref.png", pair[1])  # drag and drop
    wait_for(browser, lambda d: go.is_enabled())
    browser.find_element(By.ID, "seed").send_keys("11")
    set_range(browser, "steps", 2)
    set_range(browser, "reference_guidance", 3)
    go.click()
    wait_for(browser, lambda d: "Done" in d.find_element(By.ID, "status").text
             or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert "seed 11" in browser.find_element(By.ID, "status").text, browser.find_element(By.ID, "status").text
    used = json.loads(browser.find_element(By.ID, "used").text)
    assert (used["seed"], used["steps"], used["reference_guidance"]) == (11, 2, 3.0)

    shown = browser.find_element(By.ID, "result").get_attribute("src")
    assert shown.startswith("data:image/png;base64,")
    direct = post(files_of(pair), {"seed": "11", "steps": "2", "reference_guidance": "3",
                                   "sketch_guidance": str(used["sketch_guidance"])})
    assert direct.status_code == 200
    assert np.array_equal(to_array(base64.b64decode(shown.split(",", 1)[1])), to_array(direct.content))
    assert browser.execute_script("const i = document.getElementById('result');"
                                  "return [i.naturalWidth, i.naturalHeight];") == [used["width"], used["height"]]

    browser.save_screenshot(str(tmp_path / "page.png"))  # kept under pytest's tmp dir for a look when it breaks
    browser.find_element(By.ID, "download").click()
    saved = browser.downloads / "colorized-seed11.png"
    wait_for(browser, lambda d: saved.exists() and saved.stat().st_size > 0, seconds=30)
    assert np.array_equal(to_array(saved.read_bytes()), to_array(direct.content))


def test_page_shows_the_services_refusal(server, pair, browser):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    wait_for(browser, lambda d: "tiny preset" in d.find_element(By.ID, "model-line").text)
    drop_file(browser, "drop-sketch", "sketch.png", pair[0])
    drop_file(browser, "drop-reference", "ref.png", pair[1])
    browser.find_element(By.TAG_NAME, "summary").click()  # open "Size"
    browser.find_element(By.ID, "auto-size").click()
    width = browser.find_element(By.ID, "width")
    width.clear()
    width.send_keys("100")  # not a multiple of 32
    browser.find_element(By.ID, "go").click()
    status = browser.find_element(By.ID, "status")
    wait_for(browser, lambda d: "error" in status.get_attribute("class"))
    assert "multiple of 32" in status.text, status.text


def test_page_behind_a_token_and_with_a_plugin(server, pair, browser):
    from selenium.webdriver.common.by import By

    browser.get(SECURED + "/")  # the page itself needs no token
    token_box = browser.find_element(By.ID, "token-box")
    wait_for(browser, lambda d: token_box.is_displayed())
    assert "token" in browser.find_element(By.ID, "status").text
    field = browser.find_element(By.ID, "token")
    field.send_keys(TOKEN)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    wait_for(browser, lambda d: "plugin" in d.find_element(By.ID, "model-line").text)
    assert browser.find_element(By.ID, "drop-background_reference").is_displayed()
    assert browser.find_element(By.ID, "plugin-row").is_displayed()
