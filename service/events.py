"""Publish/subscribe of service events (``job.queued``, ``image.created``, ...).

Each subscriber has its own bounded queue: a slow reader (an SSE client on a bad
network) loses its oldest events, never blocks a worker and never grows memory without
bound. Events carry increasing integer ids, and the bus keeps a short history so that a
reconnecting reader can pass ``last_event_id`` and receive what it missed.

Nothing is lost silently: a reader whose oldest events were dropped, or who reconnects with
an id older than the history (or from before a restart, when ids began again), first receives
an ``events.lost`` event saying so and telling it to fetch the state it follows again.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

#: events each subscriber may have waiting; past it the oldest are dropped
DEFAULT_SUBSCRIBER_QUEUE = 1000
#: events kept for replay to readers that reconnect with ``last_event_id``
DEFAULT_HISTORY = 2000
#: the event a reader gets in place of events it missed
LOST = "events.lost"


def lost_event(event_id: int, session_id: str | None, reason: str, **data: Any) -> dict[str, Any]:
    """An ``events.lost`` event (not published: made for one reader)."""
    return {"id": event_id, "type": LOST, "session_id": session_id, "time": time.time(),
            "data": {"reason": reason, "action": "fetch the jobs and images you follow again "
                                                 "(GET /api/v1/sessions/{id}/jobs and /images)", **data}}


class Subscription:
    """One reader's stream of events: iterate it, or call :meth:`get` with a timeout.

    Events are dicts ``{"type", "data", "id", "session_id", "time"}``.
    """

    def __init__(self, bus: EventBus, session_id: str | None, maxsize: int) -> None:
        self.session_id = session_id
        self.dropped = 0  # events lost because this reader was too slow
        self._dropped_up_to: int | None = None  # the newest dropped event's id, until the reader is told
        self._bus = bus
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize)
        self._closed = threading.Event()

    def wants(self, event: dict[str, Any]) -> bool:
        return self.session_id is None or event.get("session_id") == self.session_id

    def _put(self, event: dict[str, Any]) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                try:  # drop the oldest: the newest state matters most to a reader
                    gone = self._queue.get_nowait()
                    self.dropped += 1
                    if gone is not None:
                        self._dropped_up_to = gone["id"]
                except queue.Empty:
                    pass

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds or once closed."""
        if self._closed.is_set() and self._queue.empty():
            return None
        dropped, self._dropped_up_to = self._dropped_up_to, None
        if dropped is not None:  # tell the reader before it reads on
            return lost_event(dropped, self.session_id, "this reader fell behind and missed events",
                              dropped=self.dropped)
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop receiving events; a reader blocked in :meth:`get` wakes up with None."""
        if not self._closed.is_set():
            self._closed.set()
            self._bus._remove(self)
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while not self._closed.is_set():
            event = self.get(timeout=0.5)
            if event is not None:
                yield event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fan-out of events to subscribers, filtered by session."""

    def __init__(self, subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE, history: int = DEFAULT_HISTORY) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._ids = itertools.count(1)
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self._subscriber_queue = subscriber_queue
        #: ``forward(type, data, session_id)`` for each event published here with ``forward=True`` (the
        #: cluster's bridge sends them to the other processes sharing the store: cluster.py)
        self.forwarders: list[Callable[[str, dict[str, Any], str | None], None]] = []

    def publish(self, type: str, data: dict[str, Any], session_id: str | None = None,
                forward: bool = True) -> dict[str, Any]:
        """Send an event to every subscriber that wants it; returns the event.

        Args:
            forward: also hand it to the :attr:`forwarders` (False: an event that came from another process,
                or one that only concerns this one).
        """
        if forward:
            for fn in self.forwarders:
                try:
                    fn(type, data, session_id)
                except Exception:  # another process missing an event must not fail this one's caller
                    log.exception("forwarding the %s event failed", type)
        with self._lock:
            event = {"id": next(self._ids), "type": type, "data": data,
                     "session_id": session_id, "time": time.time()}
            self._history.append(event)
            targets = [s for s in self._subscribers if s.wants(event)]
        for sub in targets:
            sub._put(event)
        return event

    def subscribe(self, session_id: str | None = None, last_event_id: int | None = None,
                  maxsize: int | None = None) -> Subscription:
        """A new subscription to all events (``session_id=None``) or one session's.

        Args:
            session_id: only this session's events.
            last_event_id: replay the kept events after this id first (SSE ``Last-Event-ID``).
            maxsize: queue size for this reader.
        """
        sub = Subscription(self, session_id, maxsize or self._subscriber_queue)
        with self._lock:
            if last_event_id is not None:
                lost = self._lost_since(last_event_id, session_id)
                if lost is not None:
                    sub._put(lost)
                for event in self._history:
                    if event["id"] > last_event_id and sub.wants(event):
                        sub._put(event)
            self._subscribers.append(sub)
        return sub

    def _lost_since(self, last_event_id: int, session_id: str | None) -> dict[str, Any] | None:
        """The ``events.lost`` event for a reader resuming after ``last_event_id``, or None when the history
        still holds everything after it (call with the lock held)."""
        newest = self._history[-1]["id"] if self._history else 0
        oldest = self._history[0]["id"] if self._history else newest + 1
        if last_event_id > newest:  # an id this server never gave: it restarted since
            return lost_event(newest, session_id, "the server restarted since that event id",
                              last_event_id=last_event_id)
        if last_event_id < oldest - 1:  # the events right after it were dropped from the history
            return lost_event(oldest - 1, session_id, "the events after that id are no longer kept",
                              last_event_id=last_event_id, oldest_kept=oldest)
        return None

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close_all(self) -> None:
        """Close every subscription (on service stop): readers wake up and end."""
        with self._lock:
            subs = list(self._subscribers)
        for sub in subs:
            sub.close()
