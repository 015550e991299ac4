"""Device workers: one loop per device taking jobs from the ledger, and their supervisor.

Like huey's consumer, a worker is ``initialize()`` / ``loop()`` (one unit of work) /
``shutdown()`` run as ``while not stop.is_set(): loop()``. It takes a job from the
:class:`~multigen.service.ledger.JobLedger` and hands it to the
:class:`~multigen.service.runner.JobRunner`, whose job boundary catches every exception
(the job fails, the loop goes on). Should the loop itself die, the :class:`Supervisor`
notices and starts it again.

Each worker fixes its torch thread count in its own thread (OpenMP's setting is per
thread, and the count changes pixels), and records it with every image.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .ledger import JobLedger
from .runner import Device, JobRunner
from .running import RunningJob

log = logging.getLogger(__name__)

#: how long an idle worker waits for work before checking its stop flag again
IDLE_WAIT_SECONDS = 0.5
#: how often the supervisor checks that every worker thread is alive
SUPERVISE_SECONDS = 0.5


class DeviceWorker:
    """The loop that runs jobs on one device.

    Args:
        ledger: gives jobs (and takes back those that break out of the runner).
        runner: runs them.
        device: torch device name (``cpu``, ``cuda:0``).
        threads: torch intra-op threads to use in this worker.
        dtype: precision of the models this worker loads.
    """

    def __init__(self, ledger: JobLedger, runner: JobRunner, device: str, threads: int, dtype: Any) -> None:
        self.ledger = ledger
        self.runner = runner
        self.device = device
        self.threads = threads
        self.dtype = dtype
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.current: RunningJob | None = None
        self.restarts = 0
        self.state = "idle"
        self.last_model: str | None = None

    @property
    def name(self) -> str:
        return f"multigen-worker-{self.device}"

    def start(self) -> None:
        """Start (or restart) the loop in a new thread."""
        # published only once started: stop() may join it at any moment (a supervisor restart racing with
        # stop()), and joining a thread that has not started raises RuntimeError
        thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        thread.start()
        self.thread = thread

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def run(self) -> None:
        self.initialize()
        try:
            while not self.stop_event.is_set():
                self.loop()
        except Exception:  # a bug outside any job: the supervisor restarts the loop
            log.exception("worker %s: loop died", self.device)
        finally:
            self.shutdown()

    def initialize(self) -> None:
        """Fix this thread's torch thread count (it changes pixels: recorded with each image)."""
        try:
            import torch

            torch.set_num_threads(self.threads)
            self.threads = torch.get_num_threads()
        except ImportError:  # pragma: no cover
            pass
        log.info("worker %s started (%d threads, %s)", self.device, self.threads,
                 str(self.dtype).replace("torch.", ""))

    def loop(self) -> None:
        """One unit of work: take the next job (or wait a little) and run it."""
        job = self.ledger.next_job(self.device, lambda: self.runner.held_models(self.device), self.stop_event,
                                   IDLE_WAIT_SECONDS)
        if job is None:
            return
        self.current, self.state = job, "running"
        try:
            self.runner.run(Device(self.device, self.threads, self.dtype), job)  # catches at the job boundary
        except Exception as exc:  # a bug past that boundary: end the job, then let the loop die and restart
            self.ledger.abandon(job, exc)
            raise
        finally:
            self.current, self.state = None, "idle"
            self.last_model = job.model

    def shutdown(self) -> None:
        self.state = "stopped"
        log.info("worker %s stopped", self.device)

    def info(self) -> dict[str, Any]:
        job = self.current
        return {"device": self.device, "state": self.state if self.alive() or self.state == "stopped" else "dead",
                "job_id": job.job_id if job else None, "model": job.model if job else self.last_model,
                "threads": self.threads, "dtype": str(self.dtype).replace("torch.", ""), "restarts": self.restarts}


class Supervisor:
    """Restarts worker loops that died (a bug, not a failing job: those never kill a loop)."""

    def __init__(self, workers: list[DeviceWorker], stop_event: threading.Event) -> None:
        self.workers = workers
        self.stop_event = stop_event
        self.thread = threading.Thread(target=self.run, name="multigen-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        while not self.stop_event.wait(SUPERVISE_SECONDS):
            self.check()

    def check(self) -> int:
        """Restart every dead worker; returns how many were restarted."""
        n = 0
        for w in self.workers:
            if not w.alive() and not w.stop_event.is_set() and not self.stop_event.is_set():
                w.restarts += 1
                log.error("worker %s died; restarting it (restart %d)", w.device, w.restarts)
                w.start()
                n += 1
                time.sleep(0)  # let it start before checking the next
        return n


class WorkerPool:
    """The service's workers (one per device) and their supervisor, started and stopped together.

    Args:
        make_worker: ``make_worker(device) -> DeviceWorker``.
        devices: the devices, one worker each.
    """

    def __init__(self, make_worker: Callable[[str], DeviceWorker], devices: list[str]) -> None:
        self.workers = [make_worker(d) for d in devices]
        self.stop_event = threading.Event()
        self.supervisor = Supervisor(self.workers, self.stop_event)

    def start(self) -> None:
        for w in self.workers:
            w.start()
        self.supervisor.start()

    def stop(self, timeout: float | None) -> bool:
        """Stop every loop (waiting up to ``timeout`` for each); True when all of them ended."""
        self.stop_event.set()
        for w in self.workers:
            w.stop_event.set()
        for w in self.workers:
            if w.thread is not None:
                w.thread.join(timeout)
        self.supervisor.thread.join(timeout)
        return not any(w.alive() for w in self.workers)

    def info(self) -> list[dict[str, Any]]:
        return [w.info() for w in self.workers]
