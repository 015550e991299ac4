"""Run the app with waitress, stopping gracefully on SIGTERM/SIGINT."""
from __future__ import annotations

import logging
import signal
import sys
import threading

from .config import Config

log = logging.getLogger(__name__)


def run_server(config: Config) -> int:
    """Start the service and serve HTTP until SIGTERM/SIGINT; returns the exit code."""
    from waitress.server import create_server

    from .api import create_app

    service = None
    try:
        from .serviceThread import ServiceThread  # Step 3
    except ImportError:
        ServiceThread = None  # type: ignore[assignment,misc]
    if ServiceThread is not None:
        service = ServiceThread(config)
        service.start()
    app = create_app(config, service)
    server = create_server(app, host=config.server.host, port=config.server.port,
                           threads=config.server.threads, ident="multigen")
    host, port = server.effective_host, server.effective_port
    url = f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"
    stopping = threading.Event()

    def _stop(signum, _frame):
        if stopping.is_set():
            return
        stopping.set()
        log.info("signal %s: stopping (no new requests; the running job finishes or is persisted)", signum)
        server.close()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"multigen serving on {url}", flush=True)
    log.info("serving on %s", url)
    try:
        server.run()
    except (OSError, ValueError):
        if not stopping.is_set():
            raise
    finally:
        if service is not None:
            service.stop()
        log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_server(__import__("multigen.service.config", fromlist=["load_config"]).load_config()))
