"""Bearer-token auth and ownership checks.

With users in config, every ``/api/v1`` route but health, the OpenAPI document and its page (and
every route of the dialects, ``/sdapi/v1`` and ``/v1``) needs ``Authorization: Bearer <token>``, or
HTTP Basic with the token as the password (what AUTOMATIC1111 clients send); a user only ever sees their own sessions, jobs and
images, and anything else answers 404 so its existence is not revealed. With no users (the
server refuses that unless bound to loopback or told ``allow_anonymous``) the user is the
request's ``user`` field, or ``"local"``.

``GET`` requests for files and the event stream also take ``?access_token=``: an ``<img>`` tag
or a browser ``EventSource`` cannot send a header.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from flask import current_app, g, request

from ..errors import Forbidden, NotFound, Unauthorized
from ..users import UserTable, hash_token
from .context import service

log = logging.getLogger(__name__)

ANONYMOUS_USER = "local"
PUBLIC_ENDPOINTS = frozenset({"service.health", "service.openapi", "service.docs"})
QUERY_TOKEN_ENDPOINTS = frozenset({"images.image_file", "jobs.job_preview", "jobs.job_grid", "events.events"})


def auth_enabled() -> bool:
    """Fixed at start-up: users added to a server started without any take effect on restart."""
    return bool(current_app.extensions["multigen.config"].users)


#: the URL prefixes whose routes need a token with auth on: multigen's API and the dialects it speaks
#: (AUTOMATIC1111's ``/sdapi/v1``, OpenAI's ``/v1``)
API_PREFIXES = ("/api/", "/sdapi/", "/v1/")


def needs_token(path: str, endpoint: str | None) -> bool:
    """With auth on: every API route but the public ones (unknown routes too: a 404 tells nothing)."""
    return path.startswith(API_PREFIXES) and endpoint not in PUBLIC_ENDPOINTS


def _basic_token(value: str) -> tuple[str, str]:
    """``(user, token)`` of HTTP Basic credentials (A1111 clients send ``--api-auth user:password``;
    the password is the user's token).

    Raises:
        Unauthorized: not base64 of ``user:password``.
    """
    import base64
    import binascii

    try:
        user, sep, token = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        sep = ""
    if not sep:
        raise Unauthorized("the Basic credentials are not base64 of `user:token`", field="Authorization")
    return user, token


def user_for_credentials(users: UserTable, method: str, endpoint: str | None, authorization: str,
                         query_token: str | None) -> tuple[str, str]:
    """The user of a request's ``Authorization`` header (or ``?access_token=`` where allowed) and the
    token's SHA-256 (a stream checks it again later).

    Raises:
        Unauthorized: no token, a malformed header, or an unknown token.
    """
    token, named = None, None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "basic" and value.strip():
            named, token = _basic_token(value)
        elif scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must be `Bearer <token>` (or Basic `user:token`)",
                               field="Authorization")
        else:
            token = value.strip()
    elif method == "GET" and endpoint in QUERY_TOKEN_ENDPOINTS:
        token = query_token
    if not token:
        raise Unauthorized("this server needs a token: send `Authorization: Bearer <token>`",
                           field="Authorization")
    digest = hash_token(token)
    user = users.user_for_digest(digest)
    if user is None:
        raise Unauthorized("unknown token", field="Authorization")
    if named and named != user:  # Basic's user name must be the token's owner
        raise Unauthorized(f"the token does not belong to {named!r}", field="Authorization")
    return user, digest


def failure_keys(client: str, authorization: str) -> list[str]:
    """What a failed token check counts against (ratelimit.py): the client's address, and the user name
    of HTTP Basic credentials (a guesser may spread over many addresses, never over many names)."""
    keys = [f"address {client}"]
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic" and value.strip():
        try:
            keys.append(f"user {_basic_token(value)[0]}")
        except Unauthorized:
            pass
    return keys


def authenticate() -> None:
    """``before_request``: sets ``g.user`` (None in anonymous mode) and ``g.token_sha256``, or raises 401."""
    g.user = None
    if not auth_enabled() or not needs_token(request.path, request.endpoint):
        return
    g.user, g.token_sha256 = current_app.extensions["multigen.guard"].user_of(
        request.method, request.endpoint, request.headers.get("Authorization", ""),
        request.args.get("access_token"), request.remote_addr, request.headers.get("X-Forwarded-For"))


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


def _lookup(getter: Callable[[str], dict[str, Any]], kind: str, key: str) -> dict[str, Any]:
    """A service record, with the same 404 for an unknown id as for another user's (nothing leaks)."""
    try:
        return getter(key)
    except NotFound:
        raise NotFound(f"no {kind} {key!r}", field=f"{kind}_id") from None


def owned_session(session_id: str) -> dict[str, Any]:
    """The session, if it exists and the request's user may see it, else 404."""
    session = _lookup(service().get_session, "session", session_id)
    _check_owner(session["user"], "session", session_id)
    return session


def owned_job(job_id: str) -> dict[str, Any]:
    """The job, if it exists and belongs to one of the user's sessions, else 404."""
    return _owned_through_session(service().get_job, "job", job_id)


def owned_image(image_id: str) -> dict[str, Any]:
    """The image record, if it exists and belongs to one of the user's sessions, else 404."""
    return _owned_through_session(service().get_image, "image", image_id)


def _owned_through_session(getter: Callable[[str], dict[str, Any]], kind: str, key: str) -> dict[str, Any]:
    """A job or image record whose session belongs to the user (with auth on), else 404."""
    record = _lookup(getter, kind, key)
    if g.get("user"):
        _check_owner(service().get_session(record["session_id"])["user"], kind, key)
    return record


def _check_owner(owner: str, kind: str, key: str) -> None:
    if g.get("user") and owner != g.user:
        log.info("user %s asked for %s %r of another user: 404", g.user, kind, key)
        raise NotFound(f"no {kind} {key!r}", field=f"{kind}_id")
