"""``ServiceThread``: the service as a plain Python API (metafusion's, extended), a facade.

The path of a job runs one way: ``queue_gen`` checks it (admission.py) and hands it to the
:class:`~multigen.service.ledger.JobLedger` (store, queue, transitions, callbacks); a
:class:`~multigen.service.worker.DeviceWorker` per device takes it from there and a
:class:`~multigen.service.runner.JobRunner` runs it (cache, pipes, writer, store, events). Jobs are stored before
they are queued: a restart loses none (running jobs resume at their first unwritten image; docs/service.md).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

from .admission import admit_job
from .budget import CostBudget
from .cache import GiB, ModelCache
from .catalog import ModelCatalog
from .config import Config, load_config
from .devices import resolve_devices, worker_threads
from .errors import Conflict, MultigenError, QueueFull
from .events import EventBus, Subscription
from .exithook import register_exit_hook, unregister_exit_hook
from .folderlock import DataFolderLock
from .gallery import Gallery
from .inputs import job_inputs_dir, save_params
from .logs import ensure_logging
from .cluster import build_ledger
from .records import SessionRecord
from .runner import JobRunner
from .scheduling import FairQueue
from .stats import ServiceStats
from .store import SQLiteStore
from .stores import STORE_FILE, open_store  # noqa: F401 (STORE_FILE: kept importable here)
from .views import metafusion_session_info, now_iso, session_view
from .worker import DeviceWorker, WorkerPool
from .webhooks import build_webhooks
from .writer import ImageWriter

log = logging.getLogger(__name__)


class ServiceThread:
    """The generation service: sessions, a fair job queue, one worker per device.

    A facade: the :class:`JobLedger` holds the queue, the running jobs and their transitions; each
    :class:`DeviceWorker` takes jobs from it and a :class:`JobRunner` runs them. The service holds its data folder
    exclusively while it exists (until :meth:`stop`); collaborators are class attributes tests can swap.

    Args:
        cfg: a :class:`Config` or the path of a config.yaml.

    Raises:
        FolderInUse: another service holds the config's data folder.
    """

    worker_class: type = DeviceWorker
    cache_class: type = ModelCache
    store_class: type = SQLiteStore
    writer_class: type = ImageWriter
    runner_class: type = JobRunner
    #: ``loader(path, model_type=, config_dir=, device=, dtype=)``; None: ``multigen.pipes.load_base``
    loader: Callable[..., Any] | None = None
    #: ``pipe_factory(classname) -> class``; None: the pipes' registry
    pipe_factory: Callable[[str], Any] | None = None
    #: ``preview_fn(latents, model_type) -> PIL image``; None: ``multigen.pipes.latents_to_rgb``
    preview_fn: Callable[..., Any] | None = None
    #: False in a `multigen worker` process: the API processes deliver the webhooks
    send_webhooks: bool = True

    def __init__(self, cfg: Config | str | os.PathLike) -> None:
        self.config = cfg if isinstance(cfg, Config) else load_config(cfg)
        ensure_logging(self.config.logging_folder)
        self.folder_lock = DataFolderLock(self.config.data_dir).acquire()
        try:
            self._build()
        except BaseException:
            self.folder_lock.release()
            raise

    def _build(self) -> None:
        cls, limits = type(self), self.config.limits
        self.store = open_store(self.config, self.store_class)  # SQLite in data_dir, or `store:` (stores.py)
        self.events = EventBus()
        self.writer = self.writer_class()
        self.counters = ServiceStats()
        self.catalog = ModelCatalog(self.config.models, self.config.model_dir, cls.pipe_factory)
        self.cache = self.cache_class(self.config.models.base, int(self.config.cache_budget_gb * GiB),
                                      loader=cls.loader, pipe_factory=self.catalog.pipe_factory)
        self.queue = FairQueue(limits.max_queued_jobs, limits.max_queued_jobs_per_user)
        self.budget = CostBudget.from_limits(limits)
        # jobs stored by an earlier run are queued again, or (PostgreSQL) claimed from the store (cluster.py)
        self.ledger = build_ledger(self.config, self.store, self.events, self.counters, self.queue, self.writer)
        self.gallery = Gallery(self.store)
        self.runner = self.runner_class(store=self.store, cache=self.cache, catalog=self.catalog, writer=self.writer,
                                        events=self.events, counters=self.counters, ledger=self.ledger,
                                        preview_fn=cls.preview_fn, max_seconds_per_image=limits.max_seconds_per_image,
                                        styles=self.config.styles, wildcards=self.config.wildcards)
        self.workers: list[DeviceWorker] = []
        self._pool: WorkerPool | None = None
        self._stopped = False
        self._exit_hook: Callable[[], None] | None = None

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> ServiceThread:
        """Start one worker per device and the supervisor; returns self."""
        if self._pool is not None:
            return self
        self.folder_lock.acquire()  # again, if stop() gave it up before a start
        self.ledger.start()
        devices = self.worker_devices() if self.config.workers != 0 else []  # `workers: 0`: an API-only process
        threads = worker_threads(self.config.threads, devices) if devices else 0
        self._pool = WorkerPool(lambda d: self.worker_class(self.ledger, self.runner, d, threads, self.dtype_for(d)),
                                devices)
        self.workers = self._pool.workers
        self._pool.start()
        self.webhooks = build_webhooks(self.config, self.store, self.events)  # deliveries (webhooks.py)
        if self.send_webhooks:
            self.webhooks.start()
        self._exit_hook = register_exit_hook(self._at_exit)
        log.info("service started: %d worker(s) on %s, %d queued job(s)", len(self.workers),
                 ", ".join(devices), len(self.queue))
        return self

    def stop(self, finish_running: bool = False, timeout: float | None = 60) -> None:
        """Stop the workers and give the data folder up.

        Args:
            finish_running: let running jobs finish first; otherwise they stop at their next step
                and go back to ``queued`` (resumed from their first unwritten image at the next start).
            timeout: seconds to wait for each worker thread.
        """
        if self._pool is None or self._stopped:  # never started: only the folder (and a connection) is held
            self.store.close()
            self.folder_lock.release()
            return
        self._stopped = True
        unregister_exit_hook(self._exit_hook)
        if finish_running:
            self.ledger.drain(timeout)
        self.ledger.close()
        all_ended = self._pool.stop(timeout) & self.webhooks.stop(timeout)
        self.ledger.shutdown()
        self.events.publish("service.stopped", {}, forward=False)
        self.events.close_all()
        self.cache.clear()  # the loaded models go (those still leased by a worker past the timeout stay)
        if all_ended:  # a worker still busy past the timeout keeps using the store and the folder
            self.store.close()  # no connection left open; reads after stop() open one again
            self.folder_lock.release()
        log.info("service stopped")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False on timeout."""
        return self.ledger.wait_idle(timeout)

    def _at_exit(self) -> None:
        # metafusion's scripts queue jobs and end: finish them before the interpreter exits
        if not self._stopped and self.config.drain_on_exit:
            log.info("interpreter exiting: finishing %d queued and %d running job(s) first", *self.ledger.counts())
            self.wait_idle()
        self.stop()

    def worker_devices(self) -> list[str]:
        """The devices that get a worker (config.yaml ``devices``); tests override it with fake ones."""
        return resolve_devices(self.config.devices, self.config.file)

    def dtype_for(self, device: str) -> Any:
        """The precision of the models a worker on ``device`` loads (config.yaml ``dtype``)."""
        from multigen.pipes.loading import default_dtype

        return default_dtype(device, self.config.dtype)

    # ---- sessions ------------------------------------------------------------------------------
    def create_session(self, user: str, project: str, pipe: str, model: str, loras: Any = None) -> dict[str, Any]:
        """Open a session and return it (API.md ``Session``).

        Raises:
            InvalidInput: a bad name, or an unknown pipe/model/LoRA (naming the known ones).
            QueueFull: the user holds ``limits.max_open_sessions_per_user`` open sessions.
        """
        norm = self.catalog.check_session(user, project, pipe, model, loras)
        limit = self.config.limits.max_open_sessions_per_user
        session_id = secrets.token_hex(8)
        folder = (self.config.output_dir / user / project / session_id).resolve()
        if not folder.is_relative_to(self.config.output_dir.resolve()):  # pragma: no cover - names are checked
            raise MultigenError("session folder outside the output folder")
        with self.ledger.locked():  # count and insert together: two racing calls cannot both take the last place
            if self.store.count_sessions(user, "open") >= limit:
                raise QueueFull(f"user {user!r} has {limit} open sessions, the limit "
                                "(limits.max_open_sessions_per_user); close some first", field="user",
                                code="too_many_sessions")
            self.store.create_session(SessionRecord(id=session_id, user=user, project=project, pipe=pipe,
                                                    model=model, loras=norm, state="open", folder=str(folder),
                                                    created_at=now_iso()))
        log.info("session=%s opened: user=%s project=%s pipe=%s model=%s loras=%s", session_id, user, project,
                 pipe, model, [x["name"] for x in norm])
        view = self.get_session(session_id)
        self.events.publish("session.opened", {"session": view}, session_id=session_id)
        return view

    def open_session(self, user: str, project: str, pipe: str, model: str, loras: Any = None) -> dict[str, Any]:
        """metafusion's call: ``{"session_id": ..., "session": Session}`` or ``{"error": message, ...}``."""
        try:
            session = self.create_session(user, project, pipe, model, loras)
        except MultigenError as e:
            return {"error": e.message, "code": e.code, "field": e.field}
        return {"session_id": session["id"], "session": session}

    def get_session(self, session_id: str) -> dict[str, Any]:
        """The session (API.md ``Session``). Raises NotFound."""
        record = self.gallery.session(session_id)
        return session_view(record, self.store.image_count(session_id), self.store.job_counts(session_id))

    def get_session_info(self, session_id: str) -> dict[str, Any]:
        """metafusion's ``available_images``, ``next_job``, ``status``, and the ``Session`` keys. Raises NotFound."""
        return metafusion_session_info(self.get_session(session_id), self.ledger.next_job_of(session_id),
                                       self.ledger.is_running_in(session_id))

    def list_sessions(self, user: str | None = None, project: str | None = None,
                      state: str | None = None) -> list[dict[str, Any]]:
        """Sessions, oldest first, optionally of one user/project/state."""
        return [session_view(r, self.store.image_count(r.id), self.store.job_counts(r.id))
                for r in self.store.list_sessions(user=user, project=project, state=state)]

    def close_session(self, session_id: str) -> dict[str, Any]:
        """Close a session: queued jobs are cancelled, running ones stop at the next step; images stay."""
        with self.ledger.locked():
            closed = self.gallery.session(session_id).is_open
            if closed:
                self.ledger.cancel_session(session_id)
                self.store.update_session(session_id, state="closed", closed_at=now_iso())
                log.info("session=%s closed", session_id)
        view = self.get_session(session_id)
        if closed:
            self.events.publish("session.closed", {"session": view}, session_id=session_id)
        return view

    # ---- jobs ------------------------------------------------------------------------------------
    def queue_gen(self, session_id: str, images: Any = None, prompt: Any = "", image_callback: Callable | None = None,
                  count: int | None = None, seeds: list[int] | None = None, negative_prompt: Any = None,
                  priority: int = 0, **setup_params: Any) -> dict[str, Any]:
        """Queue a job of ``count`` images in a session.

        Every seed is fixed now (given or drawn); everything is checked before the job is stored.
        Args:
            session_id: from :meth:`open_session`.
            images: input images for image pipes (PIL images, arrays or paths).
            prompt: a string or a prompt grammar (Cfgen).
            image_callback: called with the path of each image once it is written and recorded.
            count: images to make (1..limits.max_count; default: len(seeds) or 1).
            seeds: one per image; drawn when not given.
            negative_prompt: string or grammar.
            priority: higher runs first among the user's own jobs (-100..100).
            **setup_params: the pipe's setup parameters (its parameter spec).

        Returns ``{"job_id", "position", "seeds", "count", "job"}``; raises NotFound, Conflict (closed
        session), InvalidInput (naming the field), QueueFull, OverBudget (the user's hourly budget).
        """
        session = self._open_session_record(session_id)
        self.ledger.check_room(session.user)
        ok = admit_job(self.catalog, self.config, self.budget, session, images=images, prompt=prompt, count=count,
                       seeds=seeds, negative_prompt=negative_prompt, priority=priority, setup_params=setup_params)
        job_id = secrets.token_hex(8)
        inputs_dir = job_inputs_dir(self.config.inputs_root, job_id)
        try:
            job = ok.record(job_id, session, save_params(ok.params, inputs_dir))
            position, view = self.ledger.add(job, image_callback, guard=lambda: self._open_session_record(session_id))
        except MultigenError:  # refused after all: no charge, no files
            self.budget.refund(session.user, ok.cost)
            shutil.rmtree(inputs_dir, ignore_errors=True)
            raise
        log.info("session=%s job=%s queued: %d image(s), position %d, seeds %s", session_id, job_id, ok.count,
                 position, ok.seeds)
        return {"job_id": job_id, "position": position, "seeds": ok.seeds, "count": ok.count, "job": view}

    def _open_session_record(self, session_id: str) -> SessionRecord:
        if not (session := self.gallery.session(session_id)).is_open:
            raise Conflict(f"session {session_id} is closed: open a new session to queue jobs", field="session_id")
        return session

    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job (API.md ``Job``). Raises NotFound."""
        return self.ledger.view(job_id)

    def list_jobs(self, session_id: str, state: str | None = None) -> list[dict[str, Any]]:
        """A session's jobs in queue order."""
        self.gallery.session(session_id)
        return [self.ledger.view(r.id, r) for r in self.store.list_jobs(session_id=session_id,
                                                                         states=[state] if state else None)]

    def cancel_job(self, job_id: str, image_only: bool = False) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one at its next step; ``image_only``: skip only the image
        being made, the job goes on with the next. Raises NotFound, Conflict (finished; not running to skip)."""
        return self.ledger.cancel(job_id, image_only)

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview (JPEG bytes) of a running job, or None."""
        return self.ledger.preview(job_id)

    # ---- images (metafusion's calls and the API's) -------------------------------------------------
    def get_image_count(self, session_id: str) -> dict[str, Any]:
        """metafusion's ``{"image_number": n, "comment": ...}``. Raises NotFound."""
        return self.gallery.image_count(session_id)

    def get_image_pathname(self, session_id: str, index: int) -> str:
        """Path of a session's image by index (metafusion). Raises NotFound."""
        return self.gallery.pathname(session_id, index)

    def list_images(self, session_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """A session's images in index order (API.md ``Image``), after index ``after`` when given."""
        return self.gallery.list(session_id, after)

    def get_image(self, image_id: str) -> dict[str, Any]:
        return self.gallery.image(image_id)

    def image_file(self, image_id: str) -> Path:
        return self.gallery.file(image_id)

    def image_metadata(self, image_id: str) -> dict[str, Any]:
        return self.gallery.metadata(image_id)

    # ---- service ---------------------------------------------------------------------------------
    def queue_info(self) -> dict[str, Any]:
        queued, running = self.ledger.counts()
        workers = self.ledger.workers_view([w.info() for w in self.workers])  # (PostgreSQL: the whole cluster's)
        return {"queued": queued, "running": running, "workers": workers}

    def devices(self) -> list[dict[str, Any]]:
        """The workers' devices, thread counts and dtypes."""
        return [{k: v for k, v in w.info().items() if k in ("device", "threads", "dtype", "state")}
                for w in self.workers]

    def subscribe(self, session_id: str | None = None, last_event_id: int | None = None) -> Subscription:
        """Events of one session (or all): an iterable with ``get(timeout)`` and ``close()``."""
        return self.events.subscribe(session_id=session_id, last_event_id=last_event_id)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: images, jobs, model loads and cache hits, generation times (the queue: queue_info)."""
        out = self.counters.snapshot()
        out["cache"] = dict(self.cache.counters, bytes=self.cache.used_bytes(), models=self.cache.entries())
        return out


__all__ = ["ServiceThread"]
