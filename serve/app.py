"""The Ray Serve application: a FastAPI ingress (``serve/api.py``) in front of a batching model deployment.

    serve run serve/config.yaml                                  # or:
    serve run serve.app:build_app model=outputs/demo/stage2      # args as key=value

``ColorizerModel`` holds one :class:`model.colorizer.Colorizer` per replica (GPU when ``num_gpus`` > 0) and
autoscales between ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests``. Concurrent requests
are gathered by :class:`serve.runtime.Batcher` (a lone request starts at once; after a batch of n the next
waits up to ``batch_wait_timeout_s`` for n); within a batch, requests with equal
:class:`model.options.ColorizeOptions` run as one ``colorize_batch`` call (each keeps its own seed, so a
result does not depend on what it was batched with), and a call that fails is retried one request at a
time, so an error stays with the request that caused it. When the ingress stops waiting for a request
(its client disconnected, or Serve's ``request_timeout_s`` passed), the replica's call is cancelled and
its generation stops before the next denoising step, unless batch-mates still want it. When the model's
queue is full (more than ``max_queued_requests`` waiting), or the model is unreachable, the ingress
answers 503 with ``Retry-After``.

Why not ``@serve.batch``: its collector starts the next batch's window as soon as a batch is handed over,
so a lone request always waits out the whole window and, at a steady load, batches split (requests that
arrive while a batch runs are not held for the next one); and a caller cancelled mid-batch is only a
cancelled future inside it (``_process_batch_inner`` drops callers cancelled before the batch starts; the
batch function never learns of one cancelled later), so the batch cannot stop work nobody waits for.

Arguments (``build_app(args)``; each also read from the environment as ``COLORIZE_<NAME>``): ``model``
(the folder, required), ``device`` (``auto``/``cpu``/``cuda``), ``dtype`` (``float32``/``float16``/
``bfloat16``), ``num_gpus``, ``num_cpus``, ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
``max_ongoing_requests``, ``max_queued_requests``, ``max_batch_size``, ``batch_wait_timeout_s``,
``max_body_bytes``, ``max_input_pixels``, ``max_header_bytes``, ``max_decode_bytes``, ``max_concurrent_decodes``,
``max_sketch_aspect`` (the API's input limits, :class:`serve.api.Settings`), ``api_token`` (``COLORIZE_API_TOKEN``;
unset = no auth), ``allow_unauthenticated``, ``host``, ``ingress_replicas``, ``ingress_num_cpus``,
``ingress_memory_budget_mib``, ``ingress_max_ongoing_requests``, ``retry_after_s``, ``model_transport``
(``grpc``, the default: the ingress calls the model over Serve's direct gRPC channel; ``ray``: through Ray
actor calls, Serve's default), and the background modes'
mask models: ``reference_masker`` (``rmbg-2.0``, ``birefnet``, ``birefnet-hr`` or ``isnet``) with
``reference_masker_weights``, and ``sketch_masker_weights`` (ISNet-sketch); local files in their published
layouts, the weight-free masks when unset; and :mod:`model.acceleration`'s switches ``compile``
(``off``/``blocks``/``unet``), ``compile_mode``, ``compile_cache`` (a folder on the node: a restarted replica
reuses its kernels), ``channels_last`` and ``attention``. A replica that compiles does so in a warm-up
generation before it reports healthy.

Safe by default: ``build_app`` refuses to deploy when Serve's HTTP proxies listen on an address other than
loopback (read from the running Serve controller, else what Serve would start with, or the ``host`` arg)
and no ``api_token`` is set, unless ``allow_unauthenticated: true`` says that is meant (e.g. behind a
gateway that authenticates).

The ingress holds each request's body and decoded images while it waits for the model, so its
``max_ongoing_requests`` comes from a memory budget: ``ingress_memory_budget_mib`` over the worst case of
one request (the body twice, as read and as parsed, plus three decoded RGB images of ``max_input_pixels``:
208 MiB at the defaults, so 14 requests in 3 GiB); ``ingress_max_ongoing_requests`` overrides it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from serve.api import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_DECODES, DEFAULT_MAX_DECODE_BYTES,
                       DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_SKETCH_ASPECT, ColorizeRequest, ModelInfo, Settings,
                       create_app)
from serve.errors import DEFAULT_RETRY_AFTER_S, ApiError, Overloaded
from serve.http_server import MAX_HEADER_BYTES, SERVE_CONTROL_HEADERS, HeaderGuard, is_loopback
from serve.runtime import FAILED, FAILED_MESSAGE, Batcher, ModelRunner, model_thread, raise_for_error
from serve.transport import model_handle

log = logging.getLogger("colorize_xl.serve")

DTYPES = ("float32", "float16", "bfloat16")
# Defaults the deployment decorators below need at import time; AppOptions declares the same ones to users.
DEFAULT_MAX_ONGOING_REQUESTS = 8
DEFAULT_MAX_QUEUED_REQUESTS = 32
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.05
DEFAULT_INGRESS_MEMORY_BUDGET_MIB = 3072
DEFAULT_INGRESS_MAX_ONGOING_REQUESTS = 14  # what the budget gives at the default limits (see request_memory_bytes)
# The model replica's coroutines run on Serve's own event loop rather than a second one in another thread:
# they never block it (every generation runs on the model thread), and without the loop-to-loop hop a lone
# request took 36 ms more than the library instead of 51 ms in one bench/serve.py comparison on 2 cores.
# Merged with the application's runtime_env.
MODEL_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# The ingress likewise: the API never blocks its loop (decoding, extraction and encoding run in worker
# threads; the model call is awaited), and its handle's router runs on the same loop too, so a request
# crosses no loop-to-loop hop in the ingress. A/B with bench/serve.py on 2 cores, 4 alternating pairs of
# runs (with, without): +50/26/32/44 ms against +46/46/55/78 ms at concurrency 1, and 0.70/0.56/0.85/0.62x
# against 0.63/0.58/0.72/0.52x the library's throughput at 8.
INGRESS_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


class AppOptions(BaseModel):
    """``build_app``'s arguments, checked before anything is deployed."""

    model_config = ConfigDict(extra="forbid")

    model: str
    device: str = "auto"
    dtype: str = "float32"
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: int = Field(DEFAULT_MAX_ONGOING_REQUESTS, ge=1)
    max_queued_requests: int = Field(DEFAULT_MAX_QUEUED_REQUESTS, ge=-1)  # -1 = unbounded (Serve's default)
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_TIMEOUT_S, ge=0)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    max_input_pixels: int = Field(DEFAULT_MAX_INPUT_PIXELS, ge=1)
    max_header_bytes: int = Field(MAX_HEADER_BYTES, ge=1024)  # all request headers together; more = 431
    max_decode_bytes: int = Field(DEFAULT_MAX_DECODE_BYTES, ge=1)  # a request's decodes, from the image headers
    max_concurrent_decodes: int = Field(DEFAULT_MAX_CONCURRENT_DECODES, ge=1)  # per ingress replica
    max_sketch_aspect: float = Field(DEFAULT_MAX_SKETCH_ASPECT, ge=1.0)  # long side over short side
    api_token: str | None = None
    allow_unauthenticated: bool = False  # serve without a token on a non-loopback address, knowingly
    host: str | None = None  # where Serve's HTTP proxies listen, when build_app cannot ask Serve itself
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.25, ge=0)
    ingress_memory_budget_mib: int = Field(DEFAULT_INGRESS_MEMORY_BUDGET_MIB, ge=1)
    ingress_max_ongoing_requests: int | None = Field(None, ge=1)  # None = from the memory budget
    retry_after_s: float = Field(DEFAULT_RETRY_AFTER_S, gt=0)
    # how the ingress sends a request to the model replica (serve/transport.py): "grpc", Serve's direct
    # channel to the replica; "ray", a Ray actor call through the object store (Serve's default)
    model_transport: Literal["grpc", "ray"] = "grpc"
    reference_masker: Literal["rmbg-2.0", "birefnet", "birefnet-hr", "isnet"] = "rmbg-2.0"  # what the weights are
    reference_masker_weights: str | None = None  # None = the weight-free reference mask
    sketch_masker_weights: str | None = None  # ISNet-sketch (sketch-segment.safetensors); None = weight-free
    # model/acceleration.py's switches; a compiled replica warms up (compiles) before it takes requests
    compile: Literal["off", "blocks", "unet"] = "off"
    compile_mode: str | None = None
    compile_cache: str | None = None  # a folder on the replica's node, kept across restarts
    channels_last: str | None = None  # comma-separated parts, "none"; None = the device's default
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"

    def acceleration(self) -> dict:
        """The switches as :meth:`model.acceleration.Acceleration.from_flags` arguments (but the device),
        checked here so that a bad value fails the deploy, not every replica."""
        from model.acceleration import Acceleration

        flags = {"compile": self.compile, "compile_mode": self.compile_mode, "compile_cache": self.compile_cache,
                 "channels_last": self.channels_last, "attention": self.attention}
        Acceleration.from_flags(**flags)
        return flags

    def mask_models(self) -> dict:
        """The background modes' mask models, as :meth:`model.background.MaskModels.from_files` arguments."""
        for path in (self.reference_masker_weights, self.sketch_masker_weights):
            if path is not None and not Path(path).exists():
                raise ValueError(f"mask model weights {path} do not exist")
        return {"reference": None if self.reference_masker_weights is None
                else (self.reference_masker, str(Path(self.reference_masker_weights).resolve())),
                "sketch": None if self.sketch_masker_weights is None
                else ("isnet-sketch", str(Path(self.sketch_masker_weights).resolve()))}

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and value.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppOptions":
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = os.environ.get(f"COLORIZE_{name.upper()}")
            if env not in (None, ""):
                values[name] = env
        values.update({k: v for k, v in (args or {}).items() if v is not None})
        options = cls.model_validate(values)
        if options.min_replicas > options.max_replicas:
            raise ValueError(f"min_replicas {options.min_replicas} > max_replicas {options.max_replicas}")
        return options

    def request_memory_bytes(self) -> int:
        """The most one request holds in the ingress: its body as read and as parsed, and three decoded
        RGB images (sketch, reference, background reference) of ``max_input_pixels``."""
        return 2 * self.max_body_bytes + 3 * 3 * self.max_input_pixels

    def ingress_concurrency(self) -> int:
        if self.ingress_max_ongoing_requests is not None:
            return self.ingress_max_ongoing_requests
        return max(1, self.ingress_memory_budget_mib * 2**20 // self.request_memory_bytes())


def read_model_info(folder: str | Path) -> ModelInfo:
    """The API's view of a model folder, from its manifest alone (format and version checked, no weights loaded)."""
    from model.colorizer import read_config

    return ModelInfo.from_config(read_config(folder), plugin=(Path(folder) / "plugin").is_dir())


# --------------------------------------------------------------------------------------- exposure
def serve_http_host() -> str | None:
    """The address Serve's HTTP proxies listen on: the running controller's, else what ``serve.start``
    would use with no options (Serve's own default: loopback, or ``RAY_SERVE_DEFAULT_HTTP_HOST``)."""
    import ray
    from ray.serve.config import HTTPOptions

    if ray.is_initialized():
        try:
            from ray.serve.context import _get_global_client

            client = _get_global_client(raise_if_no_controller_running=False)
            if client is not None:
                return client.http_config.host
        except Exception as err:  # a controller we cannot ask: fall back to Serve's default
            log.warning("could not read Serve's HTTP options (%s); assuming Serve's default host", err)
    return HTTPOptions().host


def check_exposure(options: AppOptions) -> None:
    """Refuse to serve unauthenticated compute beyond this machine unless that is said explicitly."""
    host = options.host or serve_http_host()
    if host is None or is_loopback(host) or options.api_token or options.allow_unauthenticated:
        return
    raise ValueError(
        f"Serve's HTTP proxies listen on {host}, beyond loopback, and no api_token is set: anyone who reaches "
        "the port could run the model. Set api_token (COLORIZE_API_TOKEN, from a secret), or listen on "
        "127.0.0.1 (http_options.host), or pass allow_unauthenticated: true if something in front "
        "authenticates")


# ------------------------------------------------------------------------------------------------ model
@serve.deployment(
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
    max_queued_requests=DEFAULT_MAX_QUEUED_REQUESTS,
    health_check_period_s=10,
)
class ColorizerModel:
    def __init__(self, folder: str, device: str = "auto", dtype: str = "float32",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S, masks: dict | None = None,
                 acceleration: dict | None = None):
        import torch

        from model.acceleration import Acceleration

        from model.background import MaskModels
        from model.colorizer import Colorizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        executor = model_thread()  # loading and every generation on one thread (see serve.runtime.model_thread)
        self.model = executor.submit(Colorizer.from_pretrained, folder, device=device, dtype=getattr(torch, dtype)).result()
        if masks and any(masks.values()):
            self.model.masks = executor.submit(MaskModels.from_files, **masks, device=device).result()
        switches = Acceleration.from_flags(**(acceleration or {}), device=device)
        self.acceleration = executor.submit(self.model.accelerate, switches).result()
        if switches.compile != "off":  # compile now, at the default size, rather than in a user's request
            self.acceleration["warm_up_s"] = executor.submit(warm_up, self.model, switches).result()
        self.runner = ModelRunner(self.model)
        self.batcher = Batcher(self.runner.run, max_batch_size, batch_wait_timeout_s, executor)

    def check_health(self):
        import torch

        if self.model is None:
            raise RuntimeError("the model is not loaded")
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # raises when the device is lost

    def stats(self) -> dict:
        """Counters of :class:`serve.runtime.ModelRunner` (batches, calls, steps, cancelled runs, ...)."""
        return {**self.runner.stats, "queued": self.batcher.queued, "device": self.device,
                "acceleration": self.acceleration}

    async def colorize(self, request: ColorizeRequest) -> dict:
        """``{"image": array}`` or ``{"error": message, "status": 422 | 500}``; never raises for a bad
        request, so one request's failure never reaches its batch-mates. Cancelling the call (the ingress
        does when its client goes away) stops the generation between steps if nobody else needs it."""
        return await self.batcher.submit(request)


def warm_up(model, acceleration) -> float:
    """One short generation at the model's default size, so that a compiled denoiser compiles (or loads
    its kernels from the cache) before the replica takes requests; then the cache is saved. Returns the
    seconds it took."""
    import time

    import numpy as np

    from model.acceleration import save_compile_cache
    from model.options import ColorizeOptions

    started = time.perf_counter()
    width, height = model.output_size((1024, 1024), None)
    blank = np.full((height, width), 255, np.uint8)
    model.colorize(blank, np.full((height, width, 3), 128, np.uint8), ColorizeOptions(size=(width, height), steps=2))
    if acceleration.compile_cache:
        save_compile_cache(acceleration.compile_cache)
    return round(time.perf_counter() - started, 1)


# ---------------------------------------------------------------------------------------------- ingress
class _HandleBackend:
    """The API's backend: the model deployment behind a handle. Back-pressure and an unreachable model
    become :class:`Overloaded` (503 + Retry-After); a refused combination a ValueError (422); anything
    else a generic 500. A cancelled call cancels the model's request too."""

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, retry_after_s: float):
        self.handle = handle
        self._info = info
        self.retry_after_s = retry_after_s

    def info(self) -> ModelInfo:
        return self._info

    async def colorize(self, request: ColorizeRequest) -> np.ndarray:
        import ray

        response = self.handle.colorize.remote(request)
        try:
            result = await response
        except asyncio.CancelledError:
            response.cancel()  # the model stops working for a caller that is gone
            raise
        except BackPressureError:
            raise Overloaded(f"the model's queue is full; retry in {self.retry_after_s:g} s",
                             retry_after_s=self.retry_after_s) from None
        except (ray.exceptions.RayError, RayServeException) as err:  # replica died, unavailable, lost, ...
            log.warning("the model deployment failed a request: %r", err)
            raise Overloaded(f"the model is unavailable right now; retry in {self.retry_after_s:g} s",
                             retry_after_s=self.retry_after_s) from None
        except Exception:
            log.exception("the model call failed")
            raise ApiError(FAILED, FAILED_MESSAGE) from None
        return raise_for_error(result)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=DEFAULT_INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class ColorizeIngress:
    """HTTP front: the FastAPI app of ``serve/api.py``, built on each replica around the model's handle.

    The app is late-bound (``__serve_build_asgi_app__``) because its routes need this replica's handle
    and settings; Serve serves it exactly like ``@serve.ingress(app)``. Requests whose headers together
    pass ``max_header_bytes`` get 431 before the app sees them (Serve's proxy has no such limit), and
    requests that carry Serve's per-request control headers (their own timeout, or "keep running when I
    disconnect") get 400 before any work is done for them.
    """

    def __init__(self, model: DeploymentHandle, folder: str, settings: dict,
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S, max_header_bytes: int = MAX_HEADER_BYTES,
                 model_transport: str = "grpc"):
        self.backend = _HandleBackend(model_handle(model, model_transport), read_model_info(folder), retry_after_s)
        self.settings = Settings(**settings)
        self.max_header_bytes = max_header_bytes

    def __serve_build_asgi_app__(self):
        app = create_app(self.backend, self.settings)
        app.add_middleware(HeaderGuard, max_bytes=self.max_header_bytes, refused=SERVE_CONTROL_HEADERS)
        return app


def api_settings(options: AppOptions) -> dict[str, Any]:
    """The :class:`serve.api.Settings` fields the ingress gets from the app's arguments (kept plain: they
    travel to the ingress replicas as a bind argument)."""
    return {"max_body_bytes": options.max_body_bytes, "max_input_pixels": options.max_input_pixels,
            "api_token": options.api_token or None, "max_decode_bytes": options.max_decode_bytes,
            "max_concurrent_decodes": options.max_concurrent_decodes, "max_sketch_aspect": options.max_sketch_aspect}


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (``import_path: serve.app:build_app``)."""
    options = AppOptions.from_args(args)
    folder = str(Path(options.model).resolve())
    read_model_info(folder)  # fail at deploy time, not on the first request, when the folder is wrong
    check_exposure(options)
    masks = options.mask_models()
    model = ColorizerModel.options(
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                           "runtime_env": {"env_vars": MODEL_REPLICA_ENV}},
        autoscaling_config={"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                            "target_ongoing_requests": options.target_ongoing_requests},
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
    ).bind(folder, options.device, options.dtype, options.max_batch_size, options.batch_wait_timeout_s, masks,
           options.acceleration())
    settings = api_settings(options)
    return ColorizeIngress.options(
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": options.ingress_num_cpus, "runtime_env": {"env_vars": INGRESS_REPLICA_ENV}},
        max_ongoing_requests=options.ingress_concurrency(),
    ).bind(model, folder, settings, options.retry_after_s, options.max_header_bytes, options.model_transport)
