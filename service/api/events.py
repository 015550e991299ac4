"""Server-sent events: ``GET /api/v1/events?session_id=``.

Each stream holds a waitress thread, so at most ``server.max_event_streams`` are open at once
(503 past it): polling and downloads are never starved. A comment line goes out every
``heartbeat`` seconds (15 by default) so proxies keep the connection and a closed client is
noticed. With auth on, a stream carries only events of the user's own sessions.
"""
from __future__ import annotations

import inspect
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from ..errors import InvalidInput, MultigenError, NotFound
from .auth import owned_session
from .context import service

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__, url_prefix="/api/v1")

HEARTBEAT_SECONDS = 15.0


class TooManyStreams(MultigenError):
    code = "too_many_streams"
    http_status = 503


class StreamLimiter:
    """A non-blocking cap on concurrent event streams."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self._sem = threading.BoundedSemaphore(self.limit)
        self._lock = threading.Lock()
        self.open = 0

    def acquire(self) -> bool:
        if not self._sem.acquire(blocking=False):
            return False
        with self._lock:
            self.open += 1
        return True

    def release(self) -> None:
        with self._lock:
            self.open -= 1
        self._sem.release()


def event_session(event: dict[str, Any]) -> str | None:
    """The session an event is about: the event's ``session_id``, else its data's."""
    data = event.get("data")
    return event.get("session_id") or (data.get("session_id") if isinstance(data, dict) else None)


def format_event(event: dict[str, Any]) -> str:
    """One SSE message: ``id``, ``event`` (the type) and ``data`` (JSON, with the ``session_id``)."""
    lines = []
    if event.get("id") is not None:
        lines.append(f"id: {event['id']}")
    lines.append(f"event: {event.get('type', 'message')}")
    data = event.get("data", {})
    sid = event_session(event)
    if isinstance(data, dict) and sid and "session_id" not in data:
        data = {"session_id": sid, **data}
    data = json.dumps(data, separators=(",", ":"), default=str)
    lines.append(f"data: {data}")
    return "\n".join(lines) + "\n\n"


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


def _subscribe(svc: Any, session_id: str | None, last_event_id: int | None) -> Any:
    """``svc.subscribe``; passes ``last_event_id`` on when the service can replay from it."""
    try:
        accepted = inspect.signature(svc.subscribe).parameters
    except (TypeError, ValueError):
        accepted = {}
    if last_event_id is not None and "last_event_id" in accepted:
        return svc.subscribe(session_id=session_id, last_event_id=last_event_id)
    return svc.subscribe(session_id=session_id)


def _next(sub: Any, timeout: float) -> dict[str, Any] | None:
    try:
        return sub.get(timeout=timeout)
    except queue.Empty:
        return None


class _Visibility:
    """With auth on, which sessions' events the stream's user may see (cached per stream)."""

    def __init__(self, svc: Any, user: str | None):
        self.svc = svc
        self.user = user
        self.allowed: dict[str, bool] = {}

    def __call__(self, event: dict[str, Any]) -> bool:
        if self.user is None:
            return True
        sid = event_session(event)
        if sid is None:
            return False
        if sid not in self.allowed:
            try:
                session = self.svc.get_session_info(sid)
            except (LookupError, NotFound):
                session = None
            self.allowed[sid] = isinstance(session, dict) and session.get("user") == self.user
        return self.allowed[sid]


@bp.get("/events")
def events():
    """The event stream of one session (``session_id``) or of all the user's sessions."""
    session_id = request.args.get("session_id") or None
    if session_id:
        owned_session(session_id)
    last_event_id = _last_event_id()  # checked before a slot is taken
    limiter: StreamLimiter = current_app.extensions["multigen.event_streams"]
    if not limiter.acquire():
        raise TooManyStreams(f"{limiter.limit} event streams are open, the most this server allows: poll "
                             "GET /api/v1/jobs/{id} and /sessions/{id}/images?after= instead, or retry later")
    heartbeat = float(current_app.config.get("MULTIGEN_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS))
    stopping: threading.Event = current_app.extensions["multigen.stopping"]
    try:
        svc = service()
        sub = _subscribe(svc, session_id, last_event_id)
    except BaseException:
        limiter.release()
        raise

    visible = _Visibility(svc, g.get("user"))
    done = threading.Lock()

    def cleanup() -> None:
        # from the generator's end or the response's close, whichever comes first: a stream that
        # was never iterated (client gone at once) still gives its slot back
        if done.acquire(blocking=False):
            try:
                sub.close()
            finally:
                limiter.release()

    def stream() -> Iterator[str]:
        try:
            yield f"retry: 3000\n: connected {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n\n"
            next_beat = time.monotonic() + heartbeat
            while not stopping.is_set() and not getattr(sub, "closed", False):
                event = _next(sub, timeout=min(1.0, max(0.05, next_beat - time.monotonic())))
                if event is not None and visible(event):
                    yield format_event(event)
                if time.monotonic() >= next_beat:
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
