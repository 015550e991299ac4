"""Server-sent events: ``GET /api/v1/events?session_id=``.

Each stream holds a waitress thread, so at most ``server.max_event_streams`` are open at once,
and with auth on at most ``server.max_event_streams_per_user`` per user (so one user cannot take
every slot); past either the answer is 429 with ``Retry-After``: polling and downloads are never
starved. A comment line goes out every ``heartbeat`` seconds (15 by default) so proxies keep the
connection and a closed client is noticed. With auth on, a stream carries only events of the
user's own sessions, and at each heartbeat the stream's token is checked against the users in
config again: a user removed (or given a new token) gets a ``stream.ended`` event and the stream
ends.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, request

from ..errors import InvalidInput, MultigenError, NotFound
from ..protocol import GenerationService, ServiceEvent
from ..users import UserTable
from .auth import owned_session
from .context import service

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__, url_prefix="/api/v1")

HEARTBEAT_SECONDS = 15.0
#: a stream is held until its client leaves, so no time frees a slot for sure: this is a polite pace for retries
STREAM_RETRY_AFTER_SECONDS = 30
#: the last event of a stream the server ends while the client still listens
STREAM_ENDED = "stream.ended"


class TooManyStreams(MultigenError):
    code = "too_many_streams"
    http_status = 429

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(STREAM_RETRY_AFTER_SECONDS)}


class StreamLimiter:
    """A non-blocking cap on concurrent event streams: server-wide, and per user (``user=None``: anonymous,
    where a user is whatever name a request gives, only the server-wide cap applies).

    Args:
        limit: streams open at once.
        per_user: streams one user may hold at once.
    """

    def __init__(self, limit: int, per_user: int | None = None):
        self.limit = max(1, int(limit))
        self.per_user = max(1, int(per_user if per_user is not None else self.limit))
        self._lock = threading.Lock()
        self._by_user: Counter[str] = Counter()
        self.open = 0

    def acquire(self, user: str | None) -> None:
        """Take a slot.

        Raises:
            TooManyStreams: the user's or the server's streams are all taken (429).
        """
        with self._lock:
            if user is not None and self._by_user[user] >= self.per_user:
                raise TooManyStreams(f"{self.per_user} event streams of user {user!r} are open, the most one user "
                                     "may hold: close one (another tab or program), or poll GET /api/v1/jobs/{id} and "
                                     "/sessions/{id}/images?after=", code="too_many_streams_per_user")
            if self.open >= self.limit:
                raise TooManyStreams(f"{self.limit} event streams are open, the most this server allows: poll "
                                     "GET /api/v1/jobs/{id} and /sessions/{id}/images?after= instead, or retry later")
            self.open += 1
            if user is not None:
                self._by_user[user] += 1

    def release(self, user: str | None) -> None:
        with self._lock:
            self.open -= 1
            if user is not None:
                self._by_user[user] -= 1
                if self._by_user[user] <= 0:
                    del self._by_user[user]


def format_event(event: ServiceEvent) -> str:
    """One SSE message: ``id``, ``event`` (the type) and ``data`` (JSON, with the ``session_id``)."""
    data = event["data"]
    if event["session_id"] and "session_id" not in data:
        data = {"session_id": event["session_id"], **data}
    return (f"id: {event['id']}\nevent: {event['type']}\n"
            f"data: {json.dumps(data, separators=(',', ':'), default=str)}\n\n")


def _last_event_id() -> int | None:
    """The ``Last-Event-ID`` header (or ``last_event_id`` argument): the id of an event this server sent.

    Raises:
        InvalidInput: not an event id (the service compares ids as integers: anything else was a 500).
    """
    field, value = "Last-Event-ID", request.headers.get("Last-Event-ID")
    if not value:
        field, value = "last_event_id", request.args.get("last_event_id")
    if not value:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise InvalidInput(f"{field} must be the id of an event of this stream (a whole number), got "
                           f"{value[:40]!r}", field=field)
    return int(value)


class _Visibility:
    """With auth on, which sessions' events the stream's user may see (cached per stream)."""

    def __init__(self, svc: GenerationService, user: str | None):
        self.svc = svc
        self.user = user
        self.allowed: dict[str, bool] = {}

    def __call__(self, event: ServiceEvent) -> bool:
        if self.user is None:
            return True
        sid = event["session_id"]
        if sid is None:  # service-wide events say nothing about anyone's sessions
            return False
        if sid not in self.allowed:
            try:
                self.allowed[sid] = self.svc.get_session(sid)["user"] == self.user
            except NotFound:
                self.allowed[sid] = False
        return self.allowed[sid]


def ended_event(reason: str, message: str) -> str:
    """The ``stream.ended`` event: no ``id`` (it is no service event: a reconnect resumes from the last one)."""
    data = json.dumps({"reason": reason, "message": message}, separators=(",", ":"))
    return f"event: {STREAM_ENDED}\ndata: {data}\n\n"


class _TokenCheck:
    """Whether the stream's token still belongs to its user (always true without auth)."""

    def __init__(self, users: UserTable, user: str | None, digest: str | None):
        self.users, self.user, self.digest = users, user, digest

    def __call__(self) -> bool:
        if self.user is None or self.digest is None:
            return True
        return self.users.user_for_digest(self.digest) == self.user


@bp.get("/events")
def events():
    """The event stream of one session (``session_id``) or of all the user's sessions."""
    session_id = request.args.get("session_id") or None
    if session_id:
        owned_session(session_id)
    last_event_id = _last_event_id()  # checked before a slot is taken
    user = g.get("user")
    limiter: StreamLimiter = current_app.extensions["multigen.event_streams"]
    limiter.acquire(user)
    heartbeat = float(current_app.config.get("MULTIGEN_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS))
    stopping: threading.Event = current_app.extensions["multigen.stopping"]
    still_allowed = _TokenCheck(current_app.extensions["multigen.users"], user, g.get("token_sha256"))
    svc = service()
    try:
        sub = svc.subscribe(session_id=session_id, last_event_id=last_event_id)
    except BaseException:
        limiter.release(user)
        raise

    visible = _Visibility(svc, user)
    done = threading.Lock()

    def cleanup() -> None:
        # from the generator's end or the response's close, whichever comes first: a stream that
        # was never iterated (client gone at once) still gives its slot back
        if done.acquire(blocking=False):
            try:
                sub.close()
            finally:
                limiter.release(user)

    def stream() -> Iterator[str]:
        try:
            yield f"retry: 3000\n: connected {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n\n"
            next_beat = time.monotonic() + heartbeat
            while not stopping.is_set():
                event = sub.get(timeout=min(1.0, max(0.05, next_beat - time.monotonic())))
                if event is None and sub.closed:  # the service stopped: what it sent before is out
                    break
                if event is not None and visible(event):
                    yield format_event(event)
                if time.monotonic() >= next_beat:
                    if not still_allowed():
                        log.info("event stream of user %s ended: the token no longer belongs to them", user)
                        yield ended_event("unauthorized", "the token of this stream no longer belongs to a user of "
                                                          "this server (removed from its config, or given a new "
                                                          "token): the stream ends")
                        break
                    yield ": heartbeat\n\n"
                    next_beat = time.monotonic() + heartbeat
        finally:
            cleanup()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    # no stream_with_context: the generator needs nothing from the request, and streams closed
    # out of order must not pop each other's contexts
    response = Response(stream(), mimetype="text/event-stream", headers=headers)
    response.call_on_close(cleanup)
    return response
