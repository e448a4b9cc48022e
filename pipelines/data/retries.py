"""Temporary failures, told apart from bad inputs, and retried with backoff.

At 6M inputs an object store answers some reads with a 503 ("SlowDown"), a reset connection or a timeout,
and a GPU now and then runs out of memory on a crowded batch. None of these says anything about the input:
recorded as an error row, it would drop a good image from the dataset for ever (its shard is marked done).
So every read and every encoder batch goes through :func:`call_with_retries`: a temporary failure is tried
again after an exponential, jittered wait, a bounded number of times; when the attempts run out it is raised
as :class:`TransientFailure`, which the stages never turn into an error row: the shard is left without its
marker and the next run does it again. Anything else (a corrupt image, a missing file) is a property of
the input and becomes its error row, as before.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# OSError numbers of a busy or broken connection (s3fs maps a 503 SlowDown to EBUSY, for example).
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}
# HTTP answers that mean "try again": too many requests and the server-side 5xx.
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# Error codes of S3 and GCS that mean the same, as botocore and gcsfs report them.
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeTooSkewed", "InternalError", "TooManyRequests", "RequestLimitExceeded"}
# Exception class names of the HTTP stacks under fsspec (botocore, aiohttp, urllib3, requests), matched by
# name so that none of them has to be installed.
TRANSIENT_NAMES = ("Timeout", "ConnectionError", "ConnectionClosed", "EndpointConnectionError", "ServerDisconnected",
                   "ClientPayloadError", "ClientOSError", "ProtocolError", "IncompleteRead", "ResponseStreamingError")


class TransientFailure(RuntimeError):
    """A temporary failure that outlived its retries: the work (a shard) must be redone, not recorded."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before try ``n + 1`` is ``base_seconds * 2**n`` (capped at
    ``max_seconds``) times a random factor in [0.5, 1], so that a thousand tasks that met the same 503 do
    not all come back at once. The defaults wait about 1 + 2 + 4 + 8 s over five tries: longer than an S3
    partition's usual throttling, short beside a shard's minutes of work."""

    attempts: int = 5
    base_seconds: float = 1.0
    max_seconds: float = 30.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"a retry policy needs at least 1 attempt, got {self.attempts}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_seconds, self.base_seconds * 2 ** attempt) * rng.uniform(0.5, 1.0)


def _status_of(err: BaseException):
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        return response.get("Error", {}).get("Code"), meta.get("HTTPStatusCode")
    return getattr(err, "code", None), getattr(err, "status", None)  # gcsfs HttpError, aiohttp


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a temporary failure worth another try."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TransientFailure):
            return True
        if isinstance(err, (ConnectionError, TimeoutError)):  # includes ConnectionResetError, socket timeouts
            return True
        if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
            return True
        if _is_out_of_memory(err):
            return True
        code, status = _status_of(err)
        if code in TRANSIENT_CODES or code in TRANSIENT_STATUS or status in TRANSIENT_STATUS:
            return True
        if any(name in type(err).__name__ for name in TRANSIENT_NAMES):
            return True
        err = err.__cause__ or err.__context__
    return False


def _is_out_of_memory(err: BaseException) -> bool:
    """A GPU out of memory: torch's OutOfMemoryError, or the RuntimeError older kernels raise."""
    if type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and "CUDA" in str(err) and "out of memory" in str(err)


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str, *,
                      on_retry: Callable[[BaseException], None] | None = None,
                      rng: random.Random | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried again after a temporary failure; other exceptions pass through at once.

    ``what`` names the work in the final error; ``on_retry`` runs before each wait (e.g. to free GPU
    memory). Raises :class:`TransientFailure` from the last error when every attempt failed."""
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - sorted just below
            if isinstance(err, TransientFailure) or not is_transient(err):
                raise  # an inner call's retries are spent already: no retries of retries
            if attempt + 1 == policy.attempts:
                raise TransientFailure(f"{what}: still failing after {policy.attempts} attempts: "
                                       f"{type(err).__name__}: {err}") from err
            if on_retry is not None:
                on_retry(err)
            sleep(policy.delay(attempt, rng))
    raise AssertionError("unreachable")


DEFAULT_RETRIES = RetryPolicy()
