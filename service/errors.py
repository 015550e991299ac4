"""The one exception hierarchy of the server, mapped to HTTP in one place (the API's error handler)."""
from __future__ import annotations

from typing import Any


class MultigenError(Exception):
    """Base of every error the server reports to a client.

    Attributes:
        code: machine-readable code (``snake_case``).
        http_status: status the API answers with.
        field: dotted path of the offending input, when there is one.
    """

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (``Retry-After`` for limits that pass with time)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            err["field"] = self.field
        return {"error": err}


class ConfigError(MultigenError):
    """A config file is missing, unreadable or has a bad value: names the file, the key and the fix."""

    code = "config_error"

    def __init__(self, file: str, key: str | None, problem: str, fix: str):
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}. Fix: {fix}", field=key)
        self.file, self.key, self.problem, self.fix = file, key, problem, fix


class InvalidInput(MultigenError):
    code = "invalid"
    http_status = 400


class Unauthorized(MultigenError):
    code = "unauthorized"
    http_status = 401


class Forbidden(MultigenError):
    code = "forbidden"
    http_status = 403


class NotFound(MultigenError):
    code = "not_found"
    http_status = 404


class Conflict(MultigenError):
    code = "conflict"
    http_status = 409


class TooLarge(MultigenError):
    code = "too_large"
    http_status = 413


class UnsupportedMedia(MultigenError):
    code = "unsupported_media_type"
    http_status = 415


#: seconds a client is told to wait after a 429 that names no time of its own (a full queue, too many sessions)
QUEUE_FULL_RETRY_SECONDS = 10


class QueueFull(MultigenError):
    """A count limit (queued jobs, open sessions): retry once some have ended."""

    code = "queue_full"
    http_status = 429

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(QUEUE_FULL_RETRY_SECONDS)}
