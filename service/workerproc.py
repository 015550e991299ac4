"""``multigen worker``: device workers only, no HTTP, on a host that shares a PostgreSQL store (docs/deploy.md).

The process claims jobs from the store (cluster.py), writes their images to the shared ``output_dir`` and
tells the API processes through the database; it stops on SIGTERM/SIGINT, its running job going back to
the queue at its next step (resumed by any worker from its first unwritten image).
"""
from __future__ import annotations

import logging
import signal
import threading

from .config import Config
from .errors import ConfigError
from .serviceThread import ServiceThread

log = logging.getLogger(__name__)


def check_worker_config(config: Config) -> None:
    """Raise ConfigError when ``config`` cannot run a worker process: no PostgreSQL store (nothing to share work
    through), or ``workers: 0``."""
    if config.store is None:
        raise ConfigError(str(config.file), "store", "multigen worker needs the PostgreSQL store the API host uses "
                          "(the embedded SQLite store is one process's)",
                          "set store: postgresql://user:password@db-host:5432/multigen (or MULTIGEN_STORE); "
                          "see docs/deploy.md")
    if config.workers == 0:
        raise ConfigError(str(config.file), "workers", "0 leaves a worker process nothing to do",
                          "remove `workers: 0` from this host's config (it is for API-only hosts)")


def run_worker(config: Config) -> int:
    """Run this host's device workers until SIGTERM/SIGINT; returns the exit code.

    Raises:
        ConfigError: see :func:`check_worker_config`.
    """
    check_worker_config(config)
    service = ServiceThread(config)
    service.send_webhooks = False  # the API processes deliver them
    stopping = threading.Event()

    def _stop(signum, _frame):
        if not stopping.is_set():
            log.info("signal %s: stopping (the running job goes back to the queue at its next step)", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.start()
    try:
        ids = ",".join(service.ledger.worker_id(w.device) for w in service.workers)
        print(f"multigen worker ready: host={config.cluster.host} workers={ids}", flush=True)
        log.info("worker process ready on %s: %s", config.cluster.host, ids)
        while not stopping.wait(0.5):
            pass
    finally:
        service.stop()
    return 0
