"""``JobLedger``: the queue, the running jobs, every state transition and the image callbacks.

One lock (a condition variable) guards them together, so that a job is always in exactly
one place: stored and queued, taken by one worker (``running``), or finished. Every state
change goes through :meth:`JobLedger.transition`, which checks it (jobs.py), stores it, logs
one line and announces it. The worker side (:meth:`next_job`, :meth:`finish`,
:meth:`requeue`, :meth:`abandon`) is where the queue lives: cluster.SharedLedger claims jobs from
the store under a lease (both stores); it never raises: a transition the store refuses, or a
user's callback that raises, is logged and the worker loop goes on.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from .errors import Conflict, NotFound
from .events import EventBus
from .inputs import remove_job_inputs
from .jobs import EVENT_FOR_STATE, JobState, check_transition
from .records import JobRecord
from .running import RunningJob
from .scheduling import FairQueue, QueuedJob
from .stats import ServiceStats
from .store import Store
from .views import job_event_view, job_view

log = logging.getLogger(__name__)

ImageCallback = Callable[[str], Any]


class JobLedger(abc.ABC):
    """Where every job is, under one lock.

    Args:
        store: the persistent store (jobs are stored before they are queued).
        events: where transitions are announced.
        counters: finished jobs are counted there.
        queue: the fair queue of queued jobs.
        data_dir: the data folder, whose ``inputs/<job>`` a job's input images leave when it ends.
        host: the machine's name, recorded with each image (config.yaml ``cluster.host``).
    """

    def __init__(self, store: Store, events: EventBus, counters: ServiceStats, queue: FairQueue,
                 data_dir: Path, host: str) -> None:
        self.data_dir = data_dir
        self.store = store
        self.events = events
        self.counters = counters
        self.queue = queue
        self._cv = threading.Condition()
        self._running: dict[str, RunningJob] = {}
        self._callbacks: dict[str, ImageCallback] = {}
        self._closed = threading.Event()  # stop(): workers take nothing more
        self.host = host
        self._draining = False  # stop(finish_running=True): running jobs finish, nothing new starts

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock: for checks that must not race with queueing (session limits, closing)."""
        with self._cv:
            yield

    # ---- queue side ----------------------------------------------------------------------------
    def check_room(self, user: str) -> None:
        """Raise QueueFull when ``user`` cannot queue one more job."""
        with self._cv:
            self.queue.check_room(user)

    def add(self, job: JobRecord, callback: ImageCallback | None = None,
            guard: Callable[[], None] | None = None) -> tuple[int, dict[str, Any]]:
        """Store and queue a new job; returns its queue position and its view.

        Args:
            job: the job as it will be stored (state ``queued``).
            callback: called with each image's path once it is written.
            guard: run under the lock before the job is stored; raise to refuse it (the
                session closed meanwhile).

        Raises:
            QueueFull, or what ``guard`` raises.
        """
        with self._cv:
            self.queue.check_room(job.user)
            if guard is not None:
                guard()
            job = self.store.create_job(job)
            position = self.queue.push(QueuedJob(job.id, job.user, job.model, job.priority, seq=job.seq))
            if callback is not None:
                self._callbacks[job.id] = callback
            self._cv.notify_all()
            view = self._view_locked(job.id)
            event = self._event_view_locked(job.id)
        self.events.publish("job.queued", {"job": event}, session_id=job.session_id)
        return position, view

    def cancel(self, job_id: str, image_only: bool = False) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one at its next step; returns its view.

        Args:
            image_only: skip only the image being made (it stops at its next step, unwritten, and the job goes on
                with its next image; A1111's skip).

        Raises:
            NotFound: unknown job.
            Conflict: the job has already finished (or, for ``image_only``, is not running).
        """
        with self._cv:
            job = self.store.get_job(job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found", field="job_id")
            if JobState(job.state).finished:
                raise Conflict(f"job {job_id} has already {job.state}: nothing to cancel", field="job_id",
                               code="job_finished")
            if image_only:
                running = self._running.get(job_id)
                if running is None:
                    raise Conflict(f"job {job_id} is {job.state}: no image is being made to skip", field="job_id",
                                   code="job_not_running")
                running.skip_event.set()
                log.info("session=%s job=%s skip requested: the image being made stops at its next step",
                         job.session_id, job_id)
            else:
                self._cancel_locked(job)
            return self._view_locked(job_id)

    def cancel_session(self, session_id: str) -> None:
        """Cancel every queued and running job of a session (call with :meth:`locked` held or not)."""
        with self._cv:
            for job in self.store.list_jobs(session_id=session_id, states=[JobState.QUEUED, JobState.RUNNING]):
                self._cancel_locked(job)

    def _cancel_locked(self, job: JobRecord) -> None:
        running = self._running.get(job.id)
        if running is not None:
            running.cancel_event.set()
            log.info("session=%s job=%s cancel requested: stops at the next step", job.session_id, job.id)
            return
        self._cancel_elsewhere(job)

    @abc.abstractmethod
    def _cancel_elsewhere(self, job: JobRecord) -> None:
        """Cancel a job no worker of this process runs."""

    # ---- reading -------------------------------------------------------------------------------
    def view(self, job_id: str, job: JobRecord | None = None) -> dict[str, Any]:
        """API.md ``Job``. Raises NotFound.

        The store is safe across threads: only the queue position and the running job's
        progress need the lock, so polling does not wait on the store behind other callers.
        """
        job = job or self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found", field="job_id")
        images = self.store.list_images(job_id=job_id)
        delivery = self.store.get_delivery(job_id) if job.params.get("webhook_url") else None
        with self._cv:
            return job_view(job, images, self.queue.position(job_id), self._live(job_id), delivery)

    def _view_locked(self, job_id: str) -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job is None:  # pragma: no cover - only ever called for a job just read or written
            raise NotFound(f"job {job_id} not found", field="job_id")
        return job_view(job, self.store.list_images(job_id=job_id), self.queue.position(job_id),
                        self._live(job_id))

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview (JPEG bytes) of a running job, or None."""
        job = self._running.get(job_id)
        return job.preview if job is not None else None

    def next_job_of(self, session_id: str) -> dict[str, Any] | None:
        """metafusion's ``next_job`` of a session: ``{"queue_number", "image_count"}`` of its first
        running or queued job, or None."""
        with self._cv:
            for job in self._running.values():
                if job.session_id == session_id:
                    return {"queue_number": 0, "image_count": job.count}
        for job in self.store.list_jobs(session_id=session_id, states=[JobState.QUEUED]):
            position = self.queue.position(job.id)
            if position is not None:
                return {"queue_number": position, "image_count": job.count}
        return None

    def is_running_in(self, session_id: str) -> bool:
        with self._cv:
            return any(job.session_id == session_id for job in self._running.values())

    @abc.abstractmethod
    def counts(self) -> tuple[int, int]:
        """(queued, running) jobs."""

    @abc.abstractmethod
    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False on timeout."""

    # ---- life cycle ----------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self) -> JobLedger:
        """Start what the ledger runs beside the workers; returns self."""

    @abc.abstractmethod
    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop it (after the workers ended)."""

    @abc.abstractmethod
    def drain(self, timeout: float | None) -> None:
        """Start nothing new and wait (up to ``timeout``) for the running jobs to end."""

    def close(self) -> None:
        """Workers take nothing more; running jobs stop at their next step and go back to ``queued``."""
        with self._cv:
            self._closed.set()
            for job in self._running.values():
                job.requeue_event.set()
            self._cv.notify_all()

    # ---- worker side (never raises past a log line) --------------------------------------------
    @abc.abstractmethod
    def next_job(self, device: str, prefer: Callable[[], Collection[str]], stop: threading.Event,
                 timeout: float) -> RunningJob | None:
        """Take the next job for a worker on ``device`` (waiting up to ``timeout``), or None.

        Args:
            device: the worker's device.
            prefer: the models already loaded on the device (model affinity).
            stop: the worker's own stop flag.
            timeout: seconds to wait for work.
        """

    def _idle(self, stop: threading.Event) -> bool:
        return self._closed.is_set() or self._draining or stop.is_set()

    def running(self, job_id: str) -> RunningJob | None:
        return self._running.get(job_id)

    def worker_id(self, device: str) -> str:
        """The id of this process's worker on ``device``: ``<host>:<pid>:<device>``."""
        return f"{self.host}:{os.getpid()}:{device}"

    def workers_view(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The workers for GET /api/v1/queue and /metrics: here, this process's (``local``: their info())."""
        return [{**w, "id": self.worker_id(w["device"]), "host": self.host} for w in local]

    @abc.abstractmethod
    def preview_ready(self, job: RunningJob) -> None:
        """The runner made a new preview of ``job`` (``job.preview``)."""

    def image_written(self, job: RunningJob, path: str) -> None:
        """Call the job's ``image_callback`` (the user's code: its exceptions are logged, never raised)."""
        callback = self._callbacks.get(job.job_id)
        if callback is None:
            return
        try:
            callback(path)
        except Exception:
            log.exception("session=%s job=%s: image_callback raised", job.session_id, job.job_id)

    @abc.abstractmethod
    def finish(self, job: RunningJob, state: JobState, error: dict[str, Any] | None = None) -> None:
        """End a running job in ``state`` (succeeded, failed or cancelled)."""

    @abc.abstractmethod
    def requeue(self, job: RunningJob) -> None:
        """Put a job stopped by stop() back to ``queued`` (resumed at its first unwritten image)."""

    @abc.abstractmethod
    def abandon(self, job: RunningJob, exc: BaseException) -> None:
        """End a job whose run broke out of the job boundary (a bug in the runner): without this it would stay
        ``running``, and ``wait_idle`` and ``drain_on_exit`` would wait for it for ever."""

    # ---- the one transition --------------------------------------------------------------------
    def transition(self, job: JobRecord, new: JobState, **fields: Any) -> None:
        """Every job state change: checked, stored, logged (one line) and announced.

        Raises:
            Conflict: the change is not allowed from the job's state.
        """
        new = check_transition(job.id, job.state, new)
        self.store.update_job(job.id, state=new.value, **fields)
        self.announce(job, new, **fields)

    def announce(self, job: JobRecord, new: JobState, **fields: Any) -> None:
        """What follows a state change once it is stored: a finished job's inputs go, one log line, the event."""
        if new.finished:  # it can never run again: its input images go (the metadata names them by file name)
            remove_job_inputs(self.data_dir, job.id)
            self.counters.job_finished(new.value)
        error = fields.get("error")
        log.info("session=%s job=%s %s -> %s%s", job.session_id, job.id, job.state, new.value,
                 f" ({error['type']}: {error['message']})" if error else "")
        self.events.publish(EVENT_FOR_STATE[new], {"job": self._event_view_locked(job.id)}, session_id=job.session_id)

    def _event_view_locked(self, job_id: str) -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job is None:  # pragma: no cover - only ever called for a job just written
            raise NotFound(f"job {job_id} not found", field="job_id")
        return job_event_view(job, len(self.store.list_images(job_id=job_id)), self.queue.position(job_id),
                              self._live(job_id))

    def _live(self, job_id: str) -> RunningJob | None:
        """The progress of a running job, for views (here: the jobs this process runs)."""
        return self._running.get(job_id)
