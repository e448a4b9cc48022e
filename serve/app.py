"""The Ray Serve application: a FastAPI ingress (``serve/api.py``) in front of a batching model deployment.

    serve run serve/config.yaml                                  # or:
    serve run serve.app:build_app model=outputs/demo/stage2      # args as key=value

``ColorizerModel`` holds one :class:`model.colorizer.Colorizer` per replica (GPU when ``num_gpus`` > 0),
autoscales between ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests``, and gathers
concurrent requests with ``@serve.batch``; within a gathered batch, requests with equal
:class:`model.options.ColorizeOptions` run as one ``colorize_batch`` call (each keeps its own seed, so a
result does not depend on what it was batched with). When the model's queue is full (more than
``max_queued_requests`` waiting), the ingress answers 503 with ``Retry-After``.

Arguments (``build_app(args)``; each also read from the environment as ``COLORIZE_<NAME>``): ``model``
(the folder, required), ``device`` (``auto``/``cpu``/``cuda``), ``dtype`` (``float32``/``float16``/
``bfloat16``), ``num_gpus``, ``num_cpus``, ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
``max_ongoing_requests``, ``max_queued_requests``, ``max_batch_size``, ``batch_wait_timeout_s``,
``max_body_bytes``, ``max_input_pixels``, ``api_token`` (``COLORIZE_API_TOKEN``; unset = no auth),
``ingress_replicas``, ``ingress_num_cpus``, ``retry_after_s``.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from model.options import ColorizeOptions
from serve.api import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INPUT_PIXELS, DEFAULT_RETRY_AFTER_S, ColorizeRequest,
                       ModelInfo, Overloaded, Settings, create_app)

DTYPES = ("float32", "float16", "bfloat16")
# Defaults the deployment decorators below need at import time; AppOptions declares the same ones to users.
DEFAULT_MAX_ONGOING_REQUESTS = 8
DEFAULT_MAX_QUEUED_REQUESTS = 32
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.05


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
    api_token: str | None = None
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.25, ge=0)
    retry_after_s: float = Field(DEFAULT_RETRY_AFTER_S, gt=0)

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


def read_model_info(folder: str | Path) -> ModelInfo:
    """The API's view of a model folder, from its manifest alone (format and version checked, no weights loaded)."""
    from model.colorizer import read_config

    return ModelInfo.from_config(read_config(folder), plugin=(Path(folder) / "plugin").is_dir())


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
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S):
        import torch

        from model.colorizer import Colorizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = Colorizer.from_pretrained(folder, device=device, dtype=getattr(torch, dtype))
        self.colorize.set_max_batch_size(max_batch_size)
        self.colorize.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = 0  # colorize_batch calls made (observable through stats())

    def check_health(self):
        import torch

        if self.model is None:
            raise RuntimeError("the model is not loaded")
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # raises when the device is lost

    def stats(self) -> dict:
        return {"batches": self.batches, "device": self.device}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def colorize(self, requests: list[ColorizeRequest]) -> list[dict]:
        """Each result is ``{"image": array}`` or ``{"error": message}`` (an error stays with its group)."""
        groups: dict[ColorizeOptions, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[request.options].append(index)
        results: list[dict] = [{}] * len(requests)
        for indices in groups.values():
            members = [requests[i] for i in indices]
            try:
                images = await asyncio.to_thread(self._run_group, members)
                outcome = [{"image": np.asarray(image)} for image in images]
            except ValueError as err:
                outcome = [{"error": str(err)}] * len(members)
            for i, result in zip(indices, outcome):
                results[i] = result
        return results

    def _run_group(self, requests: list[ColorizeRequest]) -> list:
        """One ``colorize_batch`` call for requests that share their options."""
        backgrounds = [request.background_reference for request in requests]
        self.batches += 1
        return self.model.colorize_batch(
            [request.sketch for request in requests], [request.reference for request in requests],
            requests[0].options, seeds=[request.seed for request in requests],
            background_references=backgrounds if any(b is not None for b in backgrounds) else None)


# ---------------------------------------------------------------------------------------------- ingress
class _HandleBackend:
    """The API's backend: the model deployment behind a handle; back-pressure becomes :class:`Overloaded`."""

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, retry_after_s: float):
        self.handle = handle
        self._info = info
        self.retry_after_s = retry_after_s

    def info(self) -> ModelInfo:
        return self._info

    async def colorize(self, request: ColorizeRequest) -> np.ndarray:
        try:
            result = await self.handle.colorize.remote(request)
        except BackPressureError as err:
            raise Overloaded(f"the model's queue is full; retry in {self.retry_after_s:g} s ({err})",
                             retry_after_s=self.retry_after_s) from None
        if "error" in result:
            raise ValueError(result["error"])
        return result["image"]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class ColorizeIngress:
    """HTTP front: the FastAPI app of ``serve/api.py``, built on each replica around the model's handle.

    The app is late-bound (``__serve_build_asgi_app__``) because its routes need this replica's handle
    and settings; Serve serves it exactly like ``@serve.ingress(app)``.
    """

    def __init__(self, model: DeploymentHandle, folder: str, settings: dict,
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        self.backend = _HandleBackend(model, read_model_info(folder), retry_after_s)
        self.settings = Settings(**settings)

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.settings)


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (``import_path: serve.app:build_app``)."""
    options = AppOptions.from_args(args)
    folder = str(Path(options.model).resolve())
    read_model_info(folder)  # fail at deploy time, not on the first request, when the folder is wrong
    model = ColorizerModel.options(
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        autoscaling_config={"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                            "target_ongoing_requests": options.target_ongoing_requests},
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
    ).bind(folder, options.device, options.dtype, options.max_batch_size, options.batch_wait_timeout_s)
    settings = {"max_body_bytes": options.max_body_bytes, "max_input_pixels": options.max_input_pixels,
                "api_token": options.api_token or None}
    return ColorizeIngress.options(
        num_replicas=options.ingress_replicas, ray_actor_options={"num_cpus": options.ingress_num_cpus},
    ).bind(model, folder, settings, options.retry_after_s)
