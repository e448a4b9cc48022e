"""How a request travels between Serve's processes: proxy -> ingress -> model replica.

Ray Serve 2.60 can carry both hops over a direct gRPC channel to the replica instead of a Ray actor call
through the object store. For the proxies that is the environment variable ``RAY_SERVE_PROXY_USE_GRPC=1``,
read in each proxy process, so it has to be in the environment the node's Ray processes start with (set before
``ray start`` or a local ``ray.init``: the demo, the benches and the tests call :func:`use_grpc_proxies`;
cluster/'s manifests set it on every node). For the ingress's calls to the model it is the handle option
``_by_reference=False`` (:func:`model_handle`). What each costs on a 2-core host without a model:
``bench/serve_transport.py``.

Nothing here imports Ray, so a job can call :func:`use_grpc_proxies` before it decides to start one.
"""

from __future__ import annotations

import os

PROXY_GRPC_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}
TRANSPORTS = ("grpc", "ray")  # grpc: the direct channel; ray: Ray actor calls (Serve's default)


def use_grpc_proxies() -> None:
    """Put :data:`PROXY_GRPC_ENV` in this process's environment unless it already says otherwise, so that a
    Ray started from here on (and its proxies) inherits it."""
    for name, value in PROXY_GRPC_ENV.items():
        os.environ.setdefault(name, value)


def model_handle(handle, transport: str):
    """The ingress's handle to the model for ``transport``. ``ray`` keeps Serve's default, which is also what
    passing Ray ObjectRefs through the handle would need (this app passes none)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    return handle.options(_by_reference=False) if transport == "grpc" else handle
