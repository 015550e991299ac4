"""What every view needs: the app's service, config and schemas, the JSON body, service results."""
from __future__ import annotations

from typing import Any

from flask import current_app, request

from ..config import Config
from ..errors import InvalidInput, MultigenError, UnsupportedMedia
from .schemas import Schemas


def service() -> Any:
    """The app's ServiceThread (``app.extensions["multigen.service"]``)."""
    svc = current_app.extensions.get("multigen.service")
    if svc is None:
        raise ServiceUnavailable("the generation service is not running")
    return svc


def config() -> Config:
    return current_app.extensions["multigen.config"]


def schemas() -> Schemas:
    return current_app.extensions["multigen.schemas"]


class ServiceUnavailable(MultigenError):
    code = "service_unavailable"
    http_status = 503


def json_body() -> Any:
    """The request's JSON body.

    Raises:
        UnsupportedMedia: the Content-Type is not ``application/json``.
        InvalidInput: the body is not valid JSON.
    """
    if not request.is_json:
        raise UnsupportedMedia(f"send `Content-Type: application/json` (got {request.mimetype or 'none'!r})",
                               field="Content-Type")
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # the decoder gives up on deep nesting with this, not a ValueError
        raise InvalidInput("the body is nested too deeply", code="malformed_json") from None
    if data is None:
        raise InvalidInput("the body is not valid JSON", code="malformed_json")
    return data


def unwrap(result: Any, what: str) -> dict[str, Any]:
    """A service result dict, or the ``{"error": ...}`` it carries raised as a :class:`MultigenError`.

    metafusion's ``open_session`` answers ``{"error": "..."}`` rather than raising; the error may
    be a string or a dict with ``code``, ``message``, ``field`` (and optionally ``http_status``).
    """
    if not isinstance(result, dict):
        raise MultigenError(f"{what}: unexpected service answer {type(result).__name__}")
    if "error" not in result or result.get("error") is None:
        return result
    err = result["error"]
    if isinstance(err, dict):
        exc = MultigenError(str(err.get("message") or err.get("code") or err), field=err.get("field"),
                            code=str(err.get("code") or "invalid"))
        exc.http_status = int(err.get("http_status") or err.get("status") or
                              (429 if exc.code == "queue_full" else 404 if exc.code == "not_found" else 400))
        raise exc
    raise InvalidInput(str(err), field=result.get("field"), code=result.get("code") or None)
