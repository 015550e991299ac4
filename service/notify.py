"""PostgreSQL LISTEN/NOTIFY between the processes that share one store (cluster.py).

Notifications are wake-ups and news, never the truth: the database is. Each process holds one
listening connection (a thread of its own, reconnecting after a restart of the server or a
network cut, and calling ``on_reconnect`` so that its owner reads again what it may have missed) and
sends through a second one from a queue, so a caller (a worker's step, an HTTP request) never waits
on the network. A notification that cannot be sent is logged and dropped: every receiver also
polls the database (leases, claims, stop requests), so nothing is lost, only later.

Channels (:data:`CHANNELS`): ``multigen_jobs`` (a job was queued or requeued: idle workers claim),
``multigen_control`` (a cancel or skip was stored for a running job: its worker reads it now) and
``multigen_events`` (a service event: every other process republishes it to its own subscribers).
Payloads are JSON objects under PostgreSQL's 8000-byte limit (:data:`MAX_PAYLOAD`).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

JOBS, CONTROL, EVENTS = "multigen_jobs", "multigen_control", "multigen_events"
CHANNELS = (JOBS, CONTROL, EVENTS)
#: PostgreSQL refuses payloads of 8000 bytes and more
MAX_PAYLOAD = 7900
#: notifications waiting to be sent; past it new ones are dropped (and logged)
SEND_QUEUE = 10000
#: seconds between reconnection attempts (doubling up to the last)
RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)

Handler = Callable[[dict[str, Any]], None]


class NullNotifier:
    """No other process to tell (the embedded SQLite store: one process holds it)."""

    def start(self, handlers: dict[str, Handler], on_reconnect: Callable[[], None] | None = None) -> None:
        pass

    def notify(self, channel: str, payload: dict[str, Any]) -> bool:
        return False

    def stop(self, timeout: float | None = 5.0) -> None:
        pass


class PgNotifier:
    """LISTEN/NOTIFY on the store's database.

    Args:
        dsn: the store's libpq URL.
        where: how to name the database in logs (never with its password).
    """

    def __init__(self, dsn: str, where: str = "the store") -> None:
        self.dsn = dsn
        self.where = where
        self._handlers: dict[str, Handler] = {}
        self._on_reconnect: Callable[[], None] | None = None
        self._outbox: queue.Queue[tuple[str, str] | None] = queue.Queue(SEND_QUEUE)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.received = 0
        self.sent = 0
        self.dropped = 0

    def start(self, handlers: dict[str, Handler], on_reconnect: Callable[[], None] | None = None) -> None:
        """Listen on the channels of ``handlers`` (``handler(payload)`` runs in the listening thread) and start
        sending; ``on_reconnect()`` runs after each reconnection."""
        self._handlers, self._on_reconnect = dict(handlers), on_reconnect
        self._threads = [threading.Thread(target=self._listen, name="multigen-listen", daemon=True),
                         threading.Thread(target=self._send, name="multigen-notify", daemon=True)]
        for t in self._threads:
            t.start()

    def notify(self, channel: str, payload: dict[str, Any]) -> bool:
        """Queue a notification; False (logged) when it is too large or the queue is full."""
        text = json.dumps(payload, separators=(",", ":"), default=str)
        if len(text.encode()) > MAX_PAYLOAD:
            log.debug("a %s notification of %d bytes is over PostgreSQL's limit: not sent", channel, len(text))
            return False
        try:
            self._outbox.put_nowait((channel, text))
        except queue.Full:
            self.dropped += 1
            log.warning("%d notifications are waiting to be sent to %s: dropping one on %s (receivers read the "
                        "database on their next poll)", SEND_QUEUE, self.where, channel)
            return False
        return True

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        try:
            self._outbox.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(timeout)

    # -- the two threads ----------------------------------------------------------------
    def _connect(self, purpose: str) -> Any:
        """A new autocommit connection, retried (with a log line per failure) until it works or stop()."""
        import psycopg

        for attempt in range(1_000_000_000):
            try:
                return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            except psycopg.Error as e:
                wait = RECONNECT_SECONDS[min(attempt, len(RECONNECT_SECONDS) - 1)]
                log.warning("%s: cannot connect to %s (%s); retrying in %.1f s", purpose, self.where,
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, wait)
                if self._stop.wait(wait):
                    return None
        return None  # pragma: no cover

    def _listen(self) -> None:
        import psycopg

        first = True
        while not self._stop.is_set():
            conn = self._connect("listening for other processes' notifications")
            if conn is None:
                return
            try:
                for channel in self._handlers:
                    conn.execute(f"LISTEN {channel}")
                if not first:
                    log.info("listening to %s again", self.where)
                    self._reconnected()
                first = False
                while not self._stop.is_set():
                    for n in conn.notifies(timeout=0.5):
                        self._dispatch(n.channel, n.payload)
            except psycopg.Error as e:
                log.warning("the listening connection to %s broke (%s): reconnecting", self.where,
                            type(e).__name__)
                first = False
                self._stop.wait(RECONNECT_SECONDS[0])
            finally:
                try:
                    conn.close()
                except Exception:  # pragma: no cover - a broken connection closes as it can
                    pass

    def _reconnected(self) -> None:
        if self._on_reconnect is not None:
            try:
                self._on_reconnect()
            except Exception:
                log.exception("re-reading the shared state after a reconnection failed")

    def _dispatch(self, channel: str, text: str) -> None:
        self.received += 1
        handler = self._handlers.get(channel)
        if handler is None:
            return
        try:
            handler(json.loads(text))
        except Exception:  # one bad notification must not stop the listener
            log.exception("handling a %s notification failed: %.200s", channel, text)

    def _send(self) -> None:
        import psycopg

        conn = None
        while True:
            item = self._outbox.get()
            if item is None:
                break
            for attempt in range(2):  # once more on a new connection after a broken one, then dropped
                if conn is None:
                    conn = self._connect("sending notifications")
                    if conn is None:
                        return
                try:
                    conn.execute("SELECT pg_notify(%s, %s)", item)
                    self.sent += 1
                    break
                except psycopg.Error as e:
                    log.warning("sending a %s notification to %s failed (%s)%s", item[0], self.where,
                                type(e).__name__, ": retrying" if attempt == 0 else ": dropped")
                    try:
                        conn.close()
                    except Exception:  # pragma: no cover
                        pass
                    conn = None
                    time.sleep(0.05)
        if conn is not None:
            conn.close()
