"""The bare API (no Ray) under uvicorn, with limits for slow clients and large headers.

    python -m serve.http_server --model outputs/demo/stage2 --port 8000      # 127.0.0.1 unless --host

Plain ``uvicorn`` holds a connection whose headers or body trickle in for as long as the client likes
(its keep-alive timeout only runs between requests), and its default parser, httptools, takes headers
of any size. :func:`uvicorn_config` gives uvicorn:

- the h11 parser with ``h11_max_incomplete_event_size`` = ``max_header_bytes`` (16 KiB), which refuses a
  larger header block while it trickles in, and :class:`HeaderGuard` (431) for one that arrives whole;
- :class:`GuardedH11Protocol`: a connection must send its complete headers within ``header_timeout_s``
  (10 s) of connecting (or of the first byte of a keep-alive request), and its body within
  ``body_timeout_s`` (60 s: 32 MiB at about 0.5 MiB/s) of the headers; otherwise it is closed (the app,
  if it is reading, sees a disconnect);
- ``timeout_keep_alive`` (5 s) for idle keep-alive connections, and ``limit_concurrency`` (64): beyond
  that many open connections and tasks, uvicorn answers 503 at once.

The equivalent uvicorn command line has no slow-header guard; the closest is
``uvicorn --http h11 --h11-max-incomplete-event-size 16384 --timeout-keep-alive 5 --limit-concurrency 64``.
Serve's proxy (Ray 2.60) exposes only ``request_timeout_s`` and ``keep_alive_timeout_s`` (set in
``serve/config.yaml``); :class:`HeaderGuard` gives the ingress the header cap, and refuses the headers with
which a client could lift those (:data:`SERVE_CONTROL_HEADERS`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging

MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
KEEP_ALIVE_TIMEOUT_S = 5
LIMIT_CONCURRENCY = 64

log = logging.getLogger("colorize_xl.serve")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


# Headers with which a client steers Ray Serve's proxy (2.60) itself: ``x-request-timeout-seconds`` replaces
# request_timeout_s (0 = none) and ``x-request-disconnect-disabled: ?1`` keeps a request running after its
# client has gone. The proxy acts on them before the app sees the request, so the app refuses them outright.
SERVE_CONTROL_HEADERS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")


class HeaderGuard:
    """ASGI middleware, before the app sees a request: 431 when its headers together pass ``max_bytes``;
    400 when it carries one of ``refused`` (by default none; the Serve ingress refuses
    :data:`SERVE_CONTROL_HEADERS`). Errors are JSON like the API's others."""

    def __init__(self, app, max_bytes: int = MAX_HEADER_BYTES, refused: tuple[bytes, ...] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.refused = refused

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            size = sum(len(name) + len(value) + 4 for name, value in headers)
            if size > self.max_bytes:
                return await self._refuse(send, 431, f"request headers of {size} bytes exceed the limit of "
                                                     f"{self.max_bytes} bytes")
            steering = sorted({name.decode("latin-1") for name, _ in headers if name.lower() in self.refused})
            if steering:
                return await self._refuse(send, 400, f"header(s) {', '.join(steering)} are not accepted here")
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error": message, "status": status}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _guarded_protocol(header_timeout_s: float, body_timeout_s: float):
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with read deadlines: the request's headers within ``header_timeout_s``,
        its body within ``body_timeout_s``; a connection that misses one is closed."""

        def connection_made(self, transport) -> None:
            self._read_phase = None
            self._read_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._watch_reads()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_reads()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_reads()

        def connection_lost(self, exc) -> None:
            self._set_read_phase(None)
            super().connection_lost(exc)

        def _watch_reads(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:  # between requests: idle (keep-alive's timer) or headers coming
                phase = None if self.timeout_keep_alive_task is not None else "headers"
            elif state is h11.SEND_BODY:
                phase = "body"
            else:  # the request is in; the app's work is not limited here
                phase = None
            self._set_read_phase(phase)

        def _set_read_phase(self, phase: str | None) -> None:
            if phase == self._read_phase:
                return
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
            self._read_phase = phase
            if phase is not None and not self.transport.is_closing():
                delay = header_timeout_s if phase == "headers" else body_timeout_s
                self._read_timer = self.loop.call_later(delay, self._read_timed_out, phase)

        def _read_timed_out(self, phase: str) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection whose request %s did not arrive in time", phase)
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, max_header_bytes: int = MAX_HEADER_BYTES,
                   header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                   keep_alive_timeout_s: int = KEEP_ALIVE_TIMEOUT_S, limit_concurrency: int | None = LIMIT_CONCURRENCY,
                   **kwargs):
    """A ``uvicorn.Config`` for ``app`` with the limits of the module docstring (``kwargs`` go to uvicorn).

    h11's cap only trips while a header block is still incomplete (one that arrives in a single read is
    parsed whole, whatever its size), so :class:`HeaderGuard` caps the complete block too."""
    import uvicorn

    return uvicorn.Config(HeaderGuard(app, max_bytes=max_header_bytes), host=host, port=port, http=_guarded_protocol(header_timeout_s, body_timeout_s),
                          h11_max_incomplete_event_size=max_header_bytes, timeout_keep_alive=keep_alive_timeout_s,
                          limit_concurrency=limit_concurrency, **kwargs)


def run(app, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Serve ``app`` until interrupted, with :func:`uvicorn_config`'s limits."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, **kwargs)).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a colorize-xl model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--api-token", default=None, help="bearer token (default: COLORIZE_API_TOKEN; none = no auth)")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve without a token on a non-loopback --host")
    args = parser.parse_args(argv)

    import os

    from serve.api import Settings, create_app
    from serve.runtime import LocalBackend

    token = args.api_token or os.environ.get("COLORIZE_API_TOKEN") or None
    if not (is_loopback(args.host) or token or args.allow_unauthenticated):
        parser.error(f"--host {args.host} is beyond loopback: set --api-token (or COLORIZE_API_TOKEN), "
                     "or pass --allow-unauthenticated")
    backend = LocalBackend.from_folder(args.model, args.device, args.dtype, max_batch_size=args.max_batch_size,
                                       batch_wait_timeout_s=args.batch_wait_timeout_s)
    run(create_app(backend, Settings(api_token=token)), args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
