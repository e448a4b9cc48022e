"""What Ray Serve itself costs a request, by transport: the same proxy -> ingress -> model topology as
``serve/app.py`` with trivial work (the ingress reads the body and calls the model with two arrays the size of
a tiny request's images; the model answers a 128x96 RGB array; the ingress returns 20 KB), so that only
Serve's hops are timed. Prints JSON lines.

    python bench/serve_transport.py                   # 2 alternating rounds of each transport, 40 requests each
    python bench/serve_transport.py --rounds 3 --requests 100

Transports (``serve/app.py``): ``grpc``, the proxies' and the ingress's direct gRPC channel to the replicas
(``RAY_SERVE_PROXY_USE_GRPC=1`` in the environment Ray starts with; handle option ``_by_reference=False``);
``ray``, Ray actor calls through the object store (Serve's defaults). Each round starts a fresh local Ray with
that environment; rounds alternate so that drifting load on a shared machine hits both alike. Per round and
path (``ingress``: proxy -> ingress; ``ingress_model``: proxy -> ingress -> model) the p50 latency of
sequential requests from one client; a last ``"summary": true`` line gives each transport's median over
rounds and the ratio grpc / ray.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import emit, free_port  # noqa: E402


def one_round(transport: str, requests_per_path: int) -> dict:
    """Runs :func:`_measure` in a child process, so that Ray starts afresh with the transport's environment."""
    from serve.transport import PROXY_GRPC_ENV

    env = {**os.environ, **{name: value if transport == "grpc" else "0" for name, value in PROXY_GRPC_ENV.items()}}
    child = subprocess.run([sys.executable, __file__, "--child", transport, "--requests", str(requests_per_path)],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{transport} round failed: {child.stderr[-2000:]}")
    return json.loads(lines[-1])


def _measure(transport: str, requests_per_path: int) -> None:
    import time

    import numpy as np
    import ray
    import requests
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from ray import serve

    from serve.app import INGRESS_REPLICA_ENV, MODEL_REPLICA_ENV
    from serve.transport import model_handle

    @serve.deployment(ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": MODEL_REPLICA_ENV}})
    class Model:
        async def colorize(self, request: dict) -> dict:
            return {"image": np.zeros((96, 128, 3), np.uint8)}

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": INGRESS_REPLICA_ENV}})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, model=None):
            self.model = None if model is None else model_handle(model, transport)

        @app.post("/colorize")
        async def colorize(self, request: Request):
            await request.body()
            if self.model is not None:
                await self.model.colorize.remote({"sketch": np.zeros((96, 128), np.uint8),
                                                  "reference": np.zeros((96, 128, 3), np.uint8)})
            return Response(b"\0" * 20_000, media_type="image/png")

    def p50_ms(url: str) -> float:
        session, latencies = requests.Session(), []
        body = {"sketch": ("s.png", b"\1" * 15_000, "image/png"), "reference": ("r.png", b"\2" * 15_000, "image/png")}
        for i in range(requests_per_path + 5):  # the first 5 warm up
            started = time.perf_counter()
            response = session.post(url, files=body, timeout=60)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            if i >= 5:
                latencies.append(time.perf_counter() - started)
        return round(statistics.median(latencies) * 1000, 2)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Ingress.bind(), name="ingress", route_prefix="/ingress")
        serve.run(Ingress.bind(Model.bind()), name="ingress_model", route_prefix="/ingress_model")
        base = f"http://127.0.0.1:{port}"
        emit({"ingress_ms": p50_ms(base + "/ingress/colorize"),
              "ingress_model_ms": p50_ms(base + "/ingress_model/colorize")})
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40, help="per path and round")
    parser.add_argument("--child", choices=["grpc", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _measure(args.child, args.requests)
        return 0
    emit({"bench": "serve_transport", "setting": {"rounds": args.rounds, "requests": args.requests,
                                                  "cpus": os.cpu_count()}})
    results: dict[str, list[dict]] = {"grpc": [], "ray": []}
    for round_index in range(args.rounds):
        for transport in ("grpc", "ray") if round_index % 2 == 0 else ("ray", "grpc"):
            measured = one_round(transport, args.requests)
            results[transport].append(measured)
            emit({"bench": "serve_transport", "transport": transport, "round": round_index, **measured})
    summary: dict = {"bench": "serve_transport", "summary": True}
    for path in ("ingress_ms", "ingress_model_ms"):
        medians = {t: statistics.median(r[path] for r in rounds) for t, rounds in results.items()}
        summary[path] = {**{t: round(v, 2) for t, v in medians.items()},
                         "grpc_over_ray": round(medians["grpc"] / medians["ray"], 3)}
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
