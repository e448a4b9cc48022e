"""What the API answers when it refuses a request: the exceptions the app and its backends raise, and the
JSON error body, capped in length so that no input can make the answer large (``{"error": message,
"status": code}``, at most :data:`MAX_ERROR_CHARS` characters of message, never a traceback)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

DEFAULT_RETRY_AFTER_S = 1.0  # what a 503 asks the client to wait
MAX_ERROR_CHARS = 1024  # an error message
MAX_ERRORS_LISTED = 3  # validation errors named in one message


class ApiError(Exception):
    """A request the API refuses: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Overloaded(Exception):
    """Raised by a backend that cannot take the request now (→ 503 with Retry-After)."""

    def __init__(self, message: str = "the service is overloaded; retry later",
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class ClientGone(Exception):
    """The client disconnected before its response was ready; there is nobody to answer."""


def cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": cap(str(message)), "status": status}, status_code=status, headers=headers)


def quoted(key: Any) -> str:
    """A client-chosen name, quoted and cut short, for an error message."""
    return cap(repr(key), 40)


def listed(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = "; ".join(cap(item, 240) for item in items[:MAX_ERRORS_LISTED])
    return shown + (f" (and {total - MAX_ERRORS_LISTED} more)" if total > MAX_ERRORS_LISTED else "")
