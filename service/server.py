"""Run the app with waitress, stopping gracefully on SIGTERM/SIGINT.

Start-up enforces the bind/auth rule: bound to loopback with no users, the server runs
anonymous (desktop use); bound elsewhere with no users it refuses to start unless the config
says ``server.allow_anonymous: true``.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time
from typing import Any

from .api import create_app
from .config import Config
from .errors import ConfigError
from .serviceThread import ServiceThread

log = logging.getLogger(__name__)

#: seconds the waitress threads get to finish their requests once the server stops
DRAIN_SECONDS = 10.0


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_auth(config: Config) -> str:
    """Apply the bind/auth rule; returns the auth mode (``"tokens"``, ``"anonymous-loopback"``, ...).

    Raises:
        ConfigError: bound beyond loopback with no users and no ``allow_anonymous``.
    """
    if config.users:
        return "tokens"
    if is_loopback(config.server.host):
        return "anonymous-loopback"
    if config.server.allow_anonymous:
        log.warning("serving on %s with no users: anyone who can reach it can use it (allow_anonymous)",
                    config.server.host)
        return "anonymous-allowed"
    raise ConfigError(str(config.file), "server.host",
                      f"bound to {config.server.host}, beyond loopback, with no users",
                      "add a user with `multigen users add NAME --config FILE`, bind to 127.0.0.1, "
                      "or set server.allow_anonymous: true")


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
    from waitress.server import create_server

    mode = check_bind_auth(config)
    service = ServiceThread(config).start()
    try:
        app = create_app(config, service)
        server = create_server(app, host=config.server.host, port=config.server.port,
                               threads=config.server.threads, ident="multigen")
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
    log.info("serving on %s (auth: %s, %d threads, at most %d event streams)", url, mode,
             config.server.threads, app.extensions["multigen.event_streams"].limit)
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
