"""Several processes, on one host or many, sharing one PostgreSQL store: :class:`SharedLedger`.

The queue is the store's ``jobs`` table. A worker of any process claims the next job in one
transaction (claims.py: the fair rule, model affinity, priority) under a lease it renews every
``cluster.heartbeat_seconds``; a lease nobody renews for ``cluster.lease_seconds`` (the host died
or lost its network, the process was killed) is expired by any process and the job goes back to the
queue, to resume from its first unwritten image with the same seeds. A worker whose lease was lost
stops the job at its next step and records none of its images (the store refuses them: LeaseLost).

Between processes (notify.py): a job queued or requeued wakes idle workers (``multigen_jobs``); a
cancel or skip is stored on the job and its worker is told at once (``multigen_control``; it also
reads the request at each lease renewal); every service event is republished by the other processes
(``multigen_events``), so an API process streams the progress and images of jobs any worker runs. The
latest preview of a running job is kept in the store for any API process to serve.

:class:`SharedLedger` is the :class:`~multigen.service.ledger.JobLedger` of such a process: the same
interface to the service, the runner and the workers; its FairQueue is a mirror of the store's queue
(refreshed at most every :data:`MIRROR_SECONDS`) for queue positions and the queue limits.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection

from .claims import utc_now
from .config import ClusterSettings
from .errors import NotFound
from .events import EventBus
from .failures import job_error
from .jobs import JobState, check_transition
from .ledger import JobLedger
from .notify import CONTROL, EVENTS, JOBS, NullNotifier, PgNotifier
from .records import JobRecord
from .running import RunningJob
from .scheduling import FairQueue
from .stats import ServiceStats
from .store import Store
from .views import now_iso

log = logging.getLogger(__name__)

#: the queue mirror (positions, limits) is read again from the store when older than this
MIRROR_SECONDS = 0.25
#: the events other processes republish (service.stopped and events.lost concern one process only)
FORWARDED = frozenset({"job.queued", "job.started", "job.progress", "image.created", "job.succeeded",
                       "job.failed", "job.cancelled", "session.opened", "session.closed"})
#: workers whose last heartbeat is older than this are no longer listed (GET /api/v1/queue)
FORGET_SECONDS = 3600.0
#: a job's end events (its live progress is dropped)
ENDED = frozenset({"job.queued", "job.succeeded", "job.failed", "job.cancelled"})

Notifier = PgNotifier | NullNotifier


class SharedLedger(JobLedger):
    """The ledger of a process that shares its store with others (module docstring).

    Args:
        store, events, counters, queue, data_dir: as for :class:`JobLedger` (``queue`` becomes a mirror).
        settings: config.yaml's ``cluster`` section.
        notifier: LISTEN/NOTIFY on the store's database (or a NullNotifier: one process, tests).
    """

    def __init__(self, store: Store, events: EventBus, counters: ServiceStats, queue: FairQueue, data_dir: Path,
                 settings: ClusterSettings, notifier: Notifier) -> None:
        super().__init__(store, events, counters, queue, data_dir, settings.host)
        self.settings = settings
        self.notifier = notifier
        #: this process, in the events it forwards (its own come back to it and are ignored)
        self.origin = f"{self.host}:{os.getpid()}:{secrets.token_hex(3)}"
        self._workers: dict[str, tuple[str, Callable[[], Collection[str]]]] = {}
        self._remote: dict[str, RunningJob] = {}  # jobs other processes run: their progress, from events
        self._mirror_at = 0.0
        self._claiming = 0  # claims in flight (drain() waits for them too)
        self._releasing = 0  # ends being recorded (wait_idle() waits for them)
        self._keeper_stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self.expired = 0
        events.forwarders.append(self._forward)

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> SharedLedger:
        """Listen to the other processes and start the keeper (leases, heartbeats, expiry)."""
        self._requeue_unleased()
        self.notifier.start({JOBS: self._on_jobs, CONTROL: self._on_control, EVENTS: self._on_event},
                            on_reconnect=self._on_reconnect)
        self._keeper = threading.Thread(target=self._keep, name="multigen-keeper", daemon=True)
        self._keeper.start()
        return self

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the keeper and the notifications (after the workers ended: their last changes are announced)."""
        self._keeper_stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout)
        self.notifier.stop(timeout)

    def _requeue_unleased(self) -> None:
        """Jobs left ``running`` without a lease (by a process that ran them alone, before a cluster) go back."""
        for job in self.store.list_jobs(states=[JobState.RUNNING]):
            if job.worker is None and self.store.update_job_if(job.id, JobState.RUNNING.value, state="queued"):
                log.info("session=%s job=%s running without a lease -> queued", job.session_id, job.id)

    # ---- the queue: a mirror of the store's -------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._mirror_at > MIRROR_SECONDS:
            jobs, served = self.store.queue_snapshot()
            with self._cv:
                self.queue.reset(jobs, served)
                self._mirror_at = time.monotonic()

    def check_room(self, user: str) -> None:
        self._refresh()
        super().check_room(user)

    def add(self, job: JobRecord, callback: Any = None, guard: Callable[[], None] | None = None
            ) -> tuple[int, dict[str, Any]]:
        self._refresh()
        out = super().add(job, callback, guard)
        self.notifier.notify(JOBS, {"job_id": job.id})
        return out

    def view(self, job_id: str, job: JobRecord | None = None) -> dict[str, Any]:
        self._refresh()
        return super().view(job_id, job)

    def counts(self) -> tuple[int, int]:
        """(queued, running) jobs of the whole cluster."""
        n = self.store.job_counts()
        return n.get(JobState.QUEUED.value, 0), n.get(JobState.RUNNING.value, 0)

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running or self._claiming or self._releasing or self.counts() != (0, 0):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            with self._cv:
                self._cv.wait(0.1)
        return True

    def _live(self, job_id: str) -> RunningJob | None:
        return self._running.get(job_id) or self._remote.get(job_id)

    def preview(self, job_id: str) -> bytes | None:
        local = super().preview(job_id)
        return local if local is not None else self.store.get_preview(job_id)

    def preview_ready(self, job: RunningJob) -> None:
        if isinstance(self.notifier, NullNotifier):  # no other process to serve it: memory is enough
            return
        try:
            self.store.set_preview(job.job_id, job.preview)
        except Exception:  # a preview is a nicety
            log.debug("session=%s job=%s: storing the preview failed", job.session_id, job.job_id, exc_info=True)

    def is_running_in(self, session_id: str) -> bool:
        return bool(self.store.list_jobs(session_id=session_id, states=[JobState.RUNNING]))

    def next_job_of(self, session_id: str) -> dict[str, Any] | None:
        self._refresh()
        running = self.store.list_jobs(session_id=session_id, states=[JobState.RUNNING])
        if running:
            return {"queue_number": 0, "image_count": running[0].count}
        return super().next_job_of(session_id)

    # ---- cancel and skip: here, or through the store for a job another process runs ---------------
    def cancel(self, job_id: str, image_only: bool = False) -> dict[str, Any]:
        if image_only and job_id not in self._running:
            job = self.store.get_job(job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found", field="job_id")
            if self.store.request_stop(job_id, skip=True):
                self.notifier.notify(CONTROL, {"job_id": job_id})
                log.info("session=%s job=%s skip requested of the worker running it", job.session_id, job_id)
                return self.view(job_id)
        return super().cancel(job_id, image_only)

    def _cancel_elsewhere(self, job: JobRecord) -> None:
        """A queued job is cancelled at once, unless a worker claims it first: then its worker is asked to stop."""
        new = check_transition(job.id, JobState.QUEUED.value, JobState.CANCELLED)
        fields = {"finished_at": now_iso()}
        if self.store.update_job_if(job.id, JobState.QUEUED.value, state=new.value, **fields):
            self.queue.remove(job.id)
            self._callbacks.pop(job.id, None)
            self.announce(dataclasses.replace(job, state=JobState.QUEUED.value), new, **fields)
        elif self.store.request_stop(job.id):  # claimed by a worker (of this process or another) meanwhile
            self.notifier.notify(CONTROL, {"job_id": job.id})
            self._check_requests_of(job.id)
            log.info("session=%s job=%s cancel requested of the worker running it: stops at its next step",
                     job.session_id, job.id)

    def workers_view(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every worker of the cluster that sent a heartbeat in the last :data:`FORGET_SECONDS`: host, device,
        models held, last heartbeat, its job (``lost``: no heartbeat for a lease's time)."""
        mine = {w["id"]: w for w in super().workers_view(local)}
        jobs = {j.worker: j for j in self.store.list_jobs(states=[JobState.RUNNING]) if j.worker}
        now, out = utc_now(), []
        for rec in self.store.list_workers():
            age = (now - dt.datetime.fromisoformat(rec.heartbeat_at)).total_seconds()
            if rec.id not in mine and age > FORGET_SECONDS:
                continue
            job, here = jobs.get(rec.id), mine.pop(rec.id, {})
            state = here.get("state") or ("lost" if age > self.settings.lease_seconds else
                                          "running" if job else "idle")
            out.append({**here, "id": rec.id, "host": rec.host, "device": rec.device, "state": state,
                        "job_id": job.id if job else here.get("job_id"),
                        "model": job.model if job else here.get("model"), "models": rec.models,
                        "heartbeat_at": rec.heartbeat_at, "heartbeat_age_seconds": round(max(age, 0.0), 3)})
        return out + list(mine.values())  # (workers of this process that sent no heartbeat yet)

    # ---- the worker side --------------------------------------------------------------------
    def next_job(self, device: str, prefer: Callable[[], Collection[str]], stop: threading.Event,
                 timeout: float) -> RunningJob | None:
        worker = self.worker_id(device)
        if worker not in self._workers:
            self._workers[worker] = (device, prefer)
            self._heartbeat(worker)
        job = self._take(worker, device, prefer, stop)
        if job is None:
            with self._cv:
                if self._idle(stop):
                    return None
                self._cv.wait(timeout)
            job = self._take(worker, device, prefer, stop)
        return job

    def _take(self, worker: str, device: str, prefer: Callable[[], Collection[str]],
              stop: threading.Event) -> RunningJob | None:
        """Claim a job; counted as running from the claim on (drain() waits for it, stop() requeues it)."""
        with self._cv:
            if self._idle(stop):
                return None
            self._claiming += 1
        record = job = None
        try:
            record = self._claim(worker, prefer)
        finally:
            with self._cv:
                self._claiming -= 1
                if record is not None:
                    job = RunningJob(job_id=record.id, session_id=record.session_id, user=record.user,
                                     model=record.model, priority=record.priority, seq=record.seq, count=record.count,
                                     device=device, host=self.host, worker=worker, skips_seen=record.skip_requests)
                    self._running[job.job_id] = job
                    self._mirror_at = 0.0
                self._cv.notify_all()
        if record is None or job is None:
            return None
        if record.cancel_requested:
            job.cancel_event.set()
        try:
            self.store.update_job(job.job_id, device=device)
            self.announce(dataclasses.replace(record, state=JobState.QUEUED.value), JobState.RUNNING, device=device)
        except Exception:  # the store broke right after the claim: the lease runs out and the job is requeued
            log.exception("session=%s job=%s: could not record its start", record.session_id, record.id)
        if self._closed.is_set() or stop.is_set():  # stopped while claiming: give it straight back
            self.requeue(job)
            return None
        return job

    def drain(self, timeout: float | None) -> None:
        with self._cv:
            self._draining = True
            self._cv.wait_for(lambda: not self._running and not self._claiming, timeout)

    def _claim(self, worker: str, prefer: Callable[[], Collection[str]]) -> JobRecord | None:
        try:
            return self.store.claim_job(worker, prefer(), self.settings.lease_seconds,
                                        self.settings.max_affinity_skips)
        except Exception as e:  # the database is away (a restart): the worker waits and tries again
            log.warning("worker %s could not claim a job (%s: %s); trying again", worker, type(e).__name__,
                        str(e).strip()[:200])
            return None

    def finish(self, job: RunningJob, state: JobState, error: dict[str, Any] | None = None) -> None:
        fields = {"finished_at": now_iso(), "error": error, "timings": job.timings or None}
        self._release(job, state, fields)

    def requeue(self, job: RunningJob) -> None:
        self._release(job, JobState.QUEUED, {})

    def abandon(self, job: RunningJob, exc: BaseException) -> None:
        if self._running.get(job.job_id) is not job:  # requeued and taken again meanwhile
            return
        if job.requeue_event.is_set():
            self.requeue(job)
        elif job.cancel_event.is_set():
            self.finish(job, JobState.CANCELLED)
        else:
            self.finish(job, JobState.FAILED, error=job_error(exc, job.job_id, bad_input=False))

    def _release(self, job: RunningJob, state: JobState, fields: dict[str, Any]) -> None:
        """End this worker's lease on ``job`` in ``state``: recorded and announced only while the lease holds."""
        with self._cv:
            self._running.pop(job.job_id, None)
            self._callbacks.pop(job.job_id, None)
            self._releasing += 1  # wait_idle() waits for the bookkeeping below too (inputs removed, events out)
        new = check_transition(job.job_id, JobState.RUNNING.value, state)
        try:
            if job.lease_lost.is_set() or not self.store.release_job(job.job_id, job.worker or "", new.value,
                                                                     **fields):
                log.warning("session=%s job=%s: this worker's lease was lost (another worker resumes the job): "
                            "its %s here is not recorded", job.session_id, job.job_id, new.value)
                return
            self.store.set_preview(job.job_id, None)
            record = self.store.get_job(job.job_id)
            if record is not None:
                self.announce(dataclasses.replace(record, state=JobState.RUNNING.value), new, **fields)
            if new == JobState.QUEUED:
                self.notifier.notify(JOBS, {"job_id": job.job_id})
        except Exception as e:  # e.g. the store is locked: record it failed if that can be, so it does not stay running
            log.exception("session=%s job=%s: could not record its end (%s)", job.session_id, job.job_id, new.value)
            self._fail_unreleased(job, e)
        finally:
            with self._cv:
                self._releasing -= 1
                self._mirror_at = 0.0
                self._cv.notify_all()

    def _fail_unreleased(self, job: RunningJob, e: Exception) -> None:
        fields = {"finished_at": now_iso(), "timings": job.timings or None,
                  "error": job_error(e, job.job_id, bad_input=False)}
        try:
            if self.store.release_job(job.job_id, job.worker or "", JobState.FAILED.value, **fields):
                record = self.store.get_job(job.job_id)
                if record is not None:
                    self.announce(dataclasses.replace(record, state=JobState.RUNNING.value), JobState.FAILED,
                                  **fields)
        except Exception:  # the store itself is away: the lease runs out and the job is resumed (never lost)
            log.exception("session=%s job=%s: could not record it failed either; its lease will expire and it "
                          "will be resumed", job.session_id, job.job_id)

    # ---- the keeper: leases, stop requests, heartbeats, expiry --------------------------------
    def _keep(self) -> None:
        while not self._keeper_stop.wait(self.settings.heartbeat_seconds):
            try:
                self.keep_once()
            except Exception as e:  # the database is away: the next round tries again
                log.warning("cluster upkeep failed (%s: %s); trying again in %.1f s", type(e).__name__,
                            str(e).strip()[:200], self.settings.heartbeat_seconds)

    def keep_once(self) -> None:
        """Renew the leases of this process's jobs (reading their stop requests), send the workers'
        heartbeats, and put jobs whose lease expired back to the queue."""
        for job in list(self._running.values()):
            if job.worker is None or job.lease_lost.is_set():
                continue
            if self.store.renew_lease(job.job_id, job.worker, self.settings.lease_seconds):
                self._check_requests(job, self.store.get_job(job.job_id))
            elif self._running.get(job.job_id) is job:
                job.lease_lost.set()
                job.requeue_event.set()
                log.warning("session=%s job=%s: worker %s lost its lease (it was not renewed in time): the job "
                            "stops here at its next step; another worker resumes it", job.session_id, job.job_id,
                            job.worker)
        for worker in list(self._workers):
            self._heartbeat(worker)
        for job_id in self.store.expire_leases():
            self._expired(job_id)
        for job_id in list(self._remote):  # an end event that never came: the job is not running any more
            record = self.store.get_job(job_id)
            if record is None or record.state != JobState.RUNNING.value:
                self._remote.pop(job_id, None)

    def _heartbeat(self, worker: str) -> None:
        device, held = self._workers[worker]
        try:
            self.store.heartbeat(worker, self.host, device, held())
        except Exception as e:
            log.warning("worker %s: heartbeat failed (%s)", worker, type(e).__name__)

    def _expired(self, job_id: str) -> None:
        self.expired += 1
        record = self.store.get_job(job_id)
        if record is None:  # pragma: no cover - jobs are never deleted
            return
        log.warning("session=%s job=%s: its worker's lease expired (the worker died or lost the database): back "
                    "to the queue, to resume from its first unwritten image", record.session_id, job_id)
        self.announce(dataclasses.replace(record, state=JobState.RUNNING.value), JobState.QUEUED)
        self.notifier.notify(JOBS, {"job_id": job_id})
        with self._cv:
            self._mirror_at = 0.0
            self._cv.notify_all()

    @staticmethod
    def _check_requests(job: RunningJob, record: JobRecord | None) -> None:
        """Act on a cancel or a new skip stored for ``job`` (by an API process)."""
        if record is None:
            return
        if record.cancel_requested and not job.cancel_event.is_set():
            job.cancel_event.set()
            log.info("session=%s job=%s cancel received: stops at the next step", job.session_id, job.job_id)
        if record.skip_requests > job.skips_seen:
            job.skips_seen = record.skip_requests
            job.skip_event.set()
            log.info("session=%s job=%s skip received: the image being made stops at its next step",
                     job.session_id, job.job_id)

    def _check_requests_of(self, job_id: str) -> None:
        job = self._running.get(job_id)
        if job is not None:
            self._check_requests(job, self.store.get_job(job_id))

    # ---- notifications from the other processes ------------------------------------------------
    def _on_jobs(self, payload: dict[str, Any]) -> None:
        with self._cv:
            self._mirror_at = 0.0
            self._cv.notify_all()

    def _on_control(self, payload: dict[str, Any]) -> None:
        self._check_requests_of(str(payload.get("job_id")))

    def _on_reconnect(self) -> None:
        self._on_jobs({})
        for job_id in list(self._running):
            self._check_requests_of(job_id)

    def _forward(self, type: str, data: dict[str, Any], session_id: str | None) -> None:
        if type not in FORWARDED:
            return
        if not self.notifier.notify(EVENTS, {"o": self.origin, "t": type, "s": session_id, "d": data}) and \
                isinstance(data.get("job"), dict):  # too large to carry: the receivers read the job from the store
            self.notifier.notify(EVENTS, {"o": self.origin, "t": type, "s": session_id, "j": data["job"]["id"]})

    def _on_event(self, payload: dict[str, Any]) -> None:
        if payload.get("o") == self.origin:
            return
        type, session_id, data = payload["t"], payload.get("s"), payload.get("d")
        if data is None and payload.get("j"):
            with self._cv:
                data = {"job": self._event_view_locked(payload["j"])}
        if not isinstance(data, dict):
            return
        self._follow(type, data)
        self.events.publish(type, data, session_id=session_id, forward=False)

    def _follow(self, type: str, data: dict[str, Any]) -> None:
        """Keep the progress of jobs other processes run, for this process's views."""
        job_id = data.get("job_id") or (data.get("job") or {}).get("id")
        if not job_id:
            return
        if type in ENDED or type == "job.started":
            self._remote.pop(job_id, None)
            with self._cv:
                self._mirror_at = 0.0
                self._cv.notify_all()  # wait_idle, and idle workers (a job requeued elsewhere)
            return
        if type == "job.progress" and job_id not in self._running:
            live = self._remote.get(job_id)
            if live is None:
                record = self.store.get_job(job_id)
                if record is None:
                    return
                live = RunningJob(job_id=record.id, session_id=record.session_id, user=record.user,
                                  model=record.model, priority=record.priority, seq=record.seq, count=record.count,
                                  device=record.device, worker=record.worker)
                self._remote[job_id] = live
            live.progress = dict(data.get("progress") or live.progress)
            live.eta_seconds = data.get("eta_seconds")


def build_ledger(config: Any, store: Store, events: EventBus, counters: ServiceStats, queue: FairQueue,
                 writer: Any) -> SharedLedger:
    """The service's ledger. On a PostgreSQL store, several processes may share the queue (LISTEN/NOTIFY between
    them). The embedded SQLite store is this process's alone (its data folder is locked): no one else can hold
    a lease on it, so the leases an earlier run left are expired at once, and the start-up recovery
    (recovery.py) adopts the images that run wrote and removes its temporary files: a crash is put right by
    the same mechanism as a lost host, a lease that nobody renews."""
    if config.store is None:
        from .recovery import recover

        for job_id in store.expire_leases(utc_now() + dt.timedelta(days=36500)):  # the earlier run's leases
            job = store.get_job(job_id)
            log.info("session=%s job=%s running -> queued (resumed after a restart)", job and job.session_id, job_id)
        recover(store, queue, writer)  # (also jobs run without a lease by an older multigen)
        return SharedLedger(store, events, counters, queue, config.inputs_root, config.cluster, NullNotifier())
    from .pgstore import describe_dsn

    return SharedLedger(store, events, counters, queue, config.inputs_root, config.cluster,
                        PgNotifier(config.store, describe_dsn(config.store)))
