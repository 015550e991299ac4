"""Run the app with waitress, stopping gracefully on SIGTERM/SIGINT.

Start-up enforces the bind/auth rule: bound to loopback with no users, the server runs
anonymous (desktop use); bound elsewhere with no users it refuses to start unless the config
says ``server.allow_anonymous: true``.

waitress reads a request's whole body before the app sees it, so the app's checks alone would
let anyone who can reach the port make it buffer the largest body (to temp files) for any
route. :func:`make_server` therefore checks each request's head (Host, Origin, token, the
route's body limit: ``RequestGuard.check_head``) as soon as waitress has parsed it, and answers
a refusal before a byte of the body is read.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from http import HTTPStatus
from typing import Any, Callable

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.utilities import Error as WaitressError
from waitress.utilities import RequestEntityTooLarge

from .api import create_app
from .api.guards import ANONYMOUS_ALLOWED, auth_mode, is_loopback
from .config import Config
from .devices import run_lowered, worker_nice
from .errors import ConfigError, MultigenError, TooLarge
from .serviceThread import ServiceThread

log = logging.getLogger(__name__)

#: seconds the waitress threads get to finish their requests once the server stops
DRAIN_SECONDS = 10.0


__all__ = ["check_bind_auth", "guarded_parser_class", "is_loopback", "make_server", "run_server"]

#: ``check_head(method, path, query, header, peer) -> (error or None, body limit)``: RequestGuard.check_head
HeadCheck = Callable[[str, str, str, Callable[[str], "str | None"], "str | None"], "tuple[MultigenError | None, int]"]


def check_bind_auth(config: Config) -> str:
    """Apply the bind/auth rule; returns the auth mode (``"tokens"``, ``"anonymous-loopback"``, ...).

    Raises:
        ConfigError: bound beyond loopback with no users and no ``allow_anonymous``.
    """
    mode = auth_mode(config)
    if mode != ANONYMOUS_ALLOWED:
        return mode
    if config.server.allow_anonymous:
        log.warning("serving on %s with no users: anyone who can reach it can use it (allow_anonymous)",
                    config.server.host)
        return mode
    raise ConfigError(str(config.file), "server.host",
                      f"bound to {config.server.host}, beyond loopback, with no users",
                      "add a user with `multigen users add NAME --config FILE`, bind to 127.0.0.1, "
                      "or set server.allow_anonymous: true")


class JsonRefusal(WaitressError):
    """A refusal waitress sends itself (the app never sees the request), in the API's JSON error shape."""

    def __init__(self, error: MultigenError):
        super().__init__(error.message)
        self.error = error
        self.code = error.http_status
        self.reason = HTTPStatus(error.http_status).phrase

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        headers = [("Content-Type", "application/json"), *self.error.headers().items()]
        if self.code == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="multigen"'))
        return f"{self.code} {self.reason}", headers, json.dumps(self.error.to_dict()).encode()


def guarded_parser_class(check_head: HeadCheck) -> type[HTTPRequestParser]:
    """A waitress request parser that asks ``check_head`` about a request with a body once its head is
    parsed, before reading the body, and counts a chunked body against its route's limit as it comes."""

    class GuardedParser(HTTPRequestParser):
        body_limit: int | None = None
        #: the client's address (the channel's peer), for the auth failure limit
        peer: str | None = None

        def received(self, data: bytes) -> int:
            in_head = not self.headers_finished
            consumed = super().received(data)
            if in_head and self.headers_finished and not self.empty and (self.content_length > 0 or self.chunked):
                if self.error is None or isinstance(self.error, RequestEntityTooLarge):
                    error, self.body_limit = check_head(self.command, self.path, self.query, self._header,
                                                           self.peer)
                    if error is not None:
                        return self._refuse(error, len(data))
            elif (self.chunked and not self.completed and self.body_limit is not None
                  and len(self.body_rcv) > self.body_limit):
                return self._refuse(TooLarge(f"the chunked body passed {self.body_limit} bytes, the most this route "
                                             "takes", field="body"), len(data))
            if isinstance(self.error, RequestEntityTooLarge):  # waitress's own backstop, in the API's shape
                self.error = JsonRefusal(TooLarge(f"the body is too large: {self.error.body}", field="body"))
            return consumed

        def _header(self, name: str) -> str | None:
            return self.headers.get(name.upper().replace("-", "_"))

        def _refuse(self, error: MultigenError, consumed: int) -> int:
            # answered at once and the connection closed: the rest of the body is never read, and no
            # `100 Continue` invites a client to send it
            self.error = JsonRefusal(error)
            self.completed = True
            self.expect_continue = False
            self.connection_close = True
            return consumed

    return GuardedParser


def make_server(app: Any, config: Config) -> Any:
    """A waitress server for ``app`` on the config's host and port, refusing bodies from their heads."""
    from waitress.server import BaseWSGIServer, create_server

    guard = app.extensions["multigen.guard"]
    server = create_server(app, host=config.server.host, port=config.server.port, threads=config.server.threads,
                           ident="multigen", max_request_body_size=guard.large_body + 1,
                           # reading ahead lets a request tell that its client disconnected
                           # (environ["waitress.client_disconnected"]): a waiting A1111/OpenAI call cancels its job
                           channel_request_lookahead=1)
    parser_class = guarded_parser_class(guard.check_head)

    def parser_of(channel: HTTPChannel, adj: Any) -> HTTPRequestParser:  # a channel's parser knows its peer
        parser = parser_class(adj)
        parser.peer = channel.addr[0] if isinstance(channel.addr, tuple) else None
        return parser

    channel = type("GuardedChannel", (HTTPChannel,), {"parser_class": parser_of})
    for dispatcher in list(server._map.values()):  # one listening server per address the host resolves to
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.channel_class = channel
    guard.bound_port = int(server.effective_port)  # Host may name the port waitress got (`--port 0`)
    return server


def serve_until(server: Any, stopping: threading.Event) -> None:
    """Run waitress's event loop in short slices until ``stopping`` is set (by a signal)."""
    while not stopping.is_set():
        server.asyncore.loop(timeout=0.5, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)


def _busy(server: Any) -> bool:
    dispatcher = server.task_dispatcher
    if dispatcher.active_count or dispatcher.queue:
        return True
    return any(getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0)
               for ch in list(server._map.values()) if ch is not server and ch is not server.trigger)


def drain(server: Any, seconds: float) -> None:
    """Stop accepting connections, then let requests in flight finish (at most ``seconds``)."""
    from waitress import wasyncore

    server.accepting = False
    wasyncore.dispatcher.close(server)  # the listening socket: new connections are refused
    deadline = time.monotonic() + seconds
    while _busy(server) and time.monotonic() < deadline:
        server.asyncore.loop(timeout=0.1, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)
    if _busy(server):
        log.warning("requests still running after %.0f s: closing anyway", seconds)


def wasyncore_close_all(server: Any) -> None:
    from waitress import wasyncore

    wasyncore.close_all(server._map, ignore_all=True)


def run_server(config: Config) -> int:
    """Start the service and serve HTTP until SIGTERM/SIGINT; returns the exit code."""
    mode = check_bind_auth(config)
    service = ServiceThread(config)
    # a CPU worker runs below the HTTP threads, so that polls are answered while it generates (devices.py);
    # an API-only process (`workers: 0`) has none, and need not see the devices its config names
    run_lowered(service.start, worker_nice(service.worker_devices() if config.workers != 0 else [],
                                           config.server.worker_nice))
    try:
        app = create_app(config, service)
        server = make_server(app, config)
    except BaseException:  # e.g. the port is taken: do not leave the workers running
        service.stop()
        raise
    host, port = server.effective_host, server.effective_port
    url = f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"
    stopping = threading.Event()

    def _stop(signum, _frame):
        if stopping.is_set():
            return
        stopping.set()
        log.info("signal %s: stopping (no new requests; the running job finishes or is persisted)", signum)
        app.extensions["multigen.stopping"].set()  # event streams end, their threads come back

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"multigen serving on {url}", flush=True)
    streams = app.extensions["multigen.event_streams"]
    log.info("serving on %s (auth: %s, %d threads, at most %d event streams, %d per user)", url, mode,
             config.server.threads, streams.limit, streams.per_user)
    try:
        serve_until(server, stopping)
        drain(server, DRAIN_SECONDS)
    finally:
        try:
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=DRAIN_SECONDS)
            wasyncore_close_all(server)
        finally:
            app.extensions["multigen.metrics"].step_timer.stop()
            service.stop()  # the running job stops at its next step and is resumed at the next start
            log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_server(__import__("multigen.service.config", fromlist=["load_config"]).load_config()))
