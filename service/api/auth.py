"""Bearer-token auth and ownership checks.

With users in config, every ``/api/v1`` route but health, the OpenAPI document and its page
needs ``Authorization: Bearer <token>``; a user only ever sees their own sessions, jobs and
images, and anything else answers 404 so its existence is not revealed. With no users (the
server refuses that unless bound to loopback or told ``allow_anonymous``) the user is the
request's ``user`` field, or ``"local"``.

``GET`` requests for files and the event stream also take ``?access_token=``: an ``<img>`` tag
or a browser ``EventSource`` cannot send a header.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import current_app, g, request

from ..errors import Forbidden, NotFound, Unauthorized

log = logging.getLogger(__name__)

ANONYMOUS_USER = "local"
PUBLIC_ENDPOINTS = frozenset({"service.health", "service.openapi", "service.docs"})
QUERY_TOKEN_ENDPOINTS = frozenset({"images.image_file", "jobs.job_preview", "events.events"})


def auth_enabled() -> bool:
    """Fixed at start-up: users added to a server started without any take effect on restart."""
    return bool(current_app.extensions["multigen.config"].users)


def authenticate() -> None:
    """``before_request``: sets ``g.user`` (None in anonymous mode) or raises 401."""
    g.user = None
    if not request.path.startswith("/api/") or not auth_enabled():
        return
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    token = None
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must be `Bearer <token>`", field="Authorization")
        token = value.strip()
    elif request.method == "GET" and request.endpoint in QUERY_TOKEN_ENDPOINTS:
        token = request.args.get("access_token")
    if not token:
        raise Unauthorized("this server needs a token: send `Authorization: Bearer <token>`",
                           field="Authorization")
    user = current_app.extensions["multigen.users"].user_for_token(token)
    if user is None:
        raise Unauthorized("unknown token", field="Authorization")
    g.user = user


def request_user(body_user: str | None = None) -> str:
    """The user a new session belongs to.

    Raises:
        Forbidden: with auth on, when the body names another user than the token's.
    """
    if g.get("user"):
        if body_user and body_user != g.user:
            raise Forbidden(f"the token belongs to {g.user!r}, not {body_user!r}", field="user")
        return g.user
    return body_user or ANONYMOUS_USER


def list_filter_user() -> str | None:
    """The user whose sessions a listing shows: the token's, or the ``user`` query argument."""
    return g.user if g.get("user") else (request.args.get("user") or None)


def _service():
    return current_app.extensions["multigen.service"]


def _lookup(fn, key: str) -> Any:
    """Call a service getter; unknown ids (None, NotFound, KeyError) come back as None."""
    try:
        return fn(key)
    except (NotFound, KeyError, LookupError):
        return None


def owned_session(session_id: str) -> dict[str, Any]:
    """The session, if it exists and the request's user may see it, else 404."""
    session = _lookup(_service().get_session_info, session_id)
    if not isinstance(session, dict) or "error" in session and "id" not in session:
        raise NotFound(f"no session {session_id!r}", field="session_id")
    _check_owner(session.get("user"), "session", session_id, "session_id")
    return session


def owned_job(job_id: str) -> dict[str, Any]:
    """The job, if it exists and belongs to one of the user's sessions, else 404."""
    return _owned_through_session("job", _service().get_job, job_id)


def owned_image(image_id: str) -> dict[str, Any]:
    """The image record, if it exists and belongs to one of the user's sessions, else 404."""
    return _owned_through_session("image", _service().get_image, image_id)


def _owned_through_session(kind: str, getter: Any, key: str) -> dict[str, Any]:
    """A job or image record whose session belongs to the user (with auth on), else 404."""
    record = _lookup(getter, key)
    if not isinstance(record, dict):
        raise NotFound(f"no {kind} {key!r}", field=f"{kind}_id")
    if g.get("user"):
        session = _lookup(_service().get_session_info, record.get("session_id"))
        _check_owner((session or {}).get("user"), kind, key, f"{kind}_id")
    return record


def _check_owner(owner: str | None, kind: str, key: str, field: str) -> None:
    if g.get("user") and owner != g.user:
        log.info("user %s asked for %s %s of another user: 404", g.user, kind, key)
        raise NotFound(f"no {kind} {key!r}", field=field)
