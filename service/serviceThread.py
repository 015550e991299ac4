"""``ServiceThread``: the service as a plain Python API (metafusion's, extended).

Example (metafusion's, with our import and models)::

    from multigen.service import ServiceThread

    worker = ServiceThread("config/config.yaml")
    worker.start()
    result = worker.open_session(user="test", project="results", pipe="prompt2image",
                                 model="tiny-sdxl", loras=["tiny-sdxl-lora"])
    worker.queue_gen(session_id=result["session_id"], prompt="a cat", count=5,
                     image_callback=print, width=512, height=512, steps=4)

One :class:`DeviceWorker` per device runs the jobs (see worker.py and runner.py); jobs are
stored before they are queued, so a restart loses none: running jobs are resumed from
their first unwritten image with the same seeds.
"""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from .cache import GiB, ModelCache
from .config import Config, load_config
from .devices import resolve_devices, worker_threads
from .errors import Conflict, InvalidInput, MultigenError, NotFound, QueueFull
from .events import EventBus, Subscription
from .gallery import ImageQueries
from .inputs import save_params
from .jobs import EVENT_FOR_STATE, JobState, check_transition
from .recovery import recover
from .runner import JobRunner, RunningJob
from .scheduling import FairQueue, QueuedJob
from .stats import ServiceStats
from .store import SQLiteStore
from .validation import (check_choice, check_count_and_seeds, check_has_image, check_name,
                         check_priority, check_prompt, check_setup_params, controlnet_paths, images_to_params,
                         model_type_of, normalize_loras)
from .views import image_view, job_view, now_iso, session_view
from .worker import DeviceWorker, Supervisor
from .writer import ImageWriter

log = logging.getLogger(__name__)

STORE_FILE = "multigen.sqlite3"


class ServiceThread(ImageQueries):
    """The generation service: sessions, a fair job queue, one worker per device.

    Collaborators are class attributes so tests (and embedders) can swap them.

    Args:
        cfg: a :class:`Config` or the path of a config.yaml.
    """

    worker_class: type = DeviceWorker
    cache_class: type = ModelCache
    store_class: type = SQLiteStore
    writer_class: type = ImageWriter
    runner_class: type = JobRunner
    #: ``loader(path, model_type=, config_dir=, device=, dtype=)``; None: ``multigen.pipes.load_base``
    loader: Callable[..., Any] | None = None
    #: ``pipe_factory(classname) -> class``; None: the class of that name in ``multigen.pipes``
    pipe_factory: Callable[[str], Any] | None = None
    #: ``preview_fn(latents, model_type) -> PIL image``; None: ``multigen.pipes.latents_to_rgb``
    preview_fn: Callable[..., Any] | None = None

    def __init__(self, cfg: Config | str | os.PathLike) -> None:
        self.config = cfg if isinstance(cfg, Config) else load_config(cfg)
        limits = self.config.limits
        self.store = self.store_class(self.config.data_dir / STORE_FILE)
        self.events = EventBus()
        self.writer = self.writer_class()
        self.cache = self.cache_class(self.config.models.base, int(self.config.cache_budget_gb * GiB),
                                      loader=type(self).loader, pipe_factory=type(self).pipe_factory)
        self.queue = FairQueue(limits.max_queued_jobs, limits.max_queued_jobs_per_user)
        self.runner = self.runner_class(self)
        self.counters = ServiceStats()
        self.workers: list[DeviceWorker] = []
        self._cv = threading.Condition()
        self._running: dict[str, RunningJob] = {}
        self._callbacks: dict[str, Callable[..., Any]] = {}
        self._stop = threading.Event()
        self._draining = False
        self._started = False
        self._model_types: dict[str, str | None] = {}
        self._supervisor: Supervisor | None = None
        self._exit_hook: Callable[[], None] | None = None
        self._setup_logging()
        self._recover()  # jobs stored by an earlier run are queued again (queue_gen works before start())

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> ServiceThread:
        """Start one worker per device and the supervisor; returns self."""
        if self._started:
            return self
        devices = self._resolve_devices()
        threads = worker_threads(self.config.threads, devices)
        for device in devices:
            self.workers.append(self.worker_class(self, device, threads, self._dtype(device)))
        self._started = True
        for w in self.workers:
            w.start()
        self._supervisor = Supervisor(self.workers, self._stop)
        self._supervisor.start()
        self._exit_hook = _register_exit_hook(self._at_exit)
        log.info("service started: %d worker(s) on %s, %d queued job(s)", len(self.workers),
                 ", ".join(devices), len(self.queue))
        return self

    def stop(self, finish_running: bool = False, timeout: float | None = 60) -> None:
        """Stop the workers.

        Args:
            finish_running: let running jobs finish first; otherwise they stop at their next step
                and go back to ``queued`` (resumed from their first unwritten image at the next start).
            timeout: seconds to wait for each worker thread.
        """
        if not self._started or self._stop.is_set():
            return
        if self._exit_hook is not None:  # a no-op unless registered with atexit (see _register_exit_hook)
            atexit.unregister(self._exit_hook)
        if finish_running:
            with self._cv:
                self._draining = True
                self._cv.wait_for(lambda: not self._running, timeout)
        self._stop.set()
        with self._cv:
            for job in self._running.values():
                job.requeue_event.set()
            self._cv.notify_all()
        for w in self.workers:
            w.stop_event.set()
        for w in self.workers:
            if w.thread is not None:
                w.thread.join(timeout)
        self.events.publish("service.stopped", {})
        self.events.close_all()
        if self._supervisor is not None:
            self._supervisor.thread.join(timeout)
        self.cache.clear()  # the loaded models go (those still leased by a worker past the timeout stay)
        if not any(w.alive() for w in self.workers):  # a worker still busy past the timeout keeps using it
            self.store.close()  # no connection left open; reads after stop() open one again
        log.info("service stopped")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not len(self.queue) and not self._running, timeout)

    def _at_exit(self) -> None:
        # metafusion's scripts queue jobs and end: finish them before the interpreter exits
        if self._stop.is_set():
            return
        if self.config.drain_on_exit and not self._stop.is_set():
            if len(self.queue) or self._running:
                log.info("interpreter exiting: finishing %d queued and %d running job(s) first",
                         len(self.queue), len(self._running))
            self.wait_idle()
        self.stop()

    def _resolve_devices(self) -> list[str]:
        return resolve_devices(self.config.devices, self.config.file)

    def _setup_logging(self) -> None:
        root = logging.getLogger("multigen")
        if not any(getattr(h, "_multigen", False) for h in root.handlers):
            from .logs import setup_logging

            setup_logging(self.config.logging_folder)

    def _dtype(self, device: str) -> Any:
        try:
            from multigen.pipes.loading import default_dtype

            return default_dtype(device, self.config.dtype)
        except ImportError:  # pragma: no cover
            return None

    def _recover(self) -> None:
        recover(self.store, self.queue, self.writer)

    # ---- sessions ------------------------------------------------------------------------------
    def create_session(self, user: str, project: str, pipe: str, model: str, loras: Any = None) -> dict[str, Any]:
        """Open a session and return it (API.md ``Session``).

        Raises:
            InvalidInput: a bad name, or an unknown pipe/model/LoRA (naming the known ones).
            QueueFull: the user holds ``limits.max_open_sessions_per_user`` open sessions.
        """
        models = self.config.models
        check_name(user, "user")
        check_name(project, "project")
        check_choice(pipe, models.pipes, "pipe", "pipe")
        check_choice(model, models.base, "model", "model")
        mtype = self._model_type(model)
        norm = normalize_loras(loras, models, mtype)
        if models.pipes[pipe].needs_cnet and not controlnet_paths(models, pipe, mtype):
            raise InvalidInput(f"pipe {pipe!r} needs a ControlNet for {mtype} models and none is configured "
                               f"(add one under `controlnet:` in {models.file.name}); pipes usable with {model!r}: "
                               + ", ".join(n for n, e in models.pipes.items() if not e.needs_cnet), field="pipe")
        limit = self.config.limits.max_open_sessions_per_user
        session_id = secrets.token_hex(8)
        folder = (self.config.output_dir / user / project / session_id).resolve()
        if not folder.is_relative_to(self.config.output_dir.resolve()):  # pragma: no cover - names are checked
            raise MultigenError("session folder outside the output folder")
        with self._cv:  # count and insert together: two racing calls cannot both take the last place
            if self.store.count_sessions(user, "open") >= limit:
                raise QueueFull(f"user {user!r} has {limit} open sessions, the limit "
                                "(limits.max_open_sessions_per_user); close some first", field="user",
                                code="too_many_sessions")
            self.store.create_session({"id": session_id, "user": user, "project": project, "pipe": pipe,
                                       "model": model, "loras": norm, "state": "open", "folder": str(folder),
                                       "created_at": now_iso()})
        log.info("session=%s opened: user=%s project=%s pipe=%s model=%s loras=%s", session_id, user, project,
                 pipe, model, [x["name"] for x in norm])
        view = self.get_session_info(session_id)
        self.events.publish("session.opened", {"session": view}, session_id=session_id)
        return view

    def open_session(self, user: str, project: str, pipe: str, model: str, loras: Any = None) -> dict[str, Any]:
        """metafusion's call: ``{"session_id": ..., "session": Session}`` or ``{"error": message, ...}``."""
        try:
            session = self.create_session(user, project, pipe, model, loras)
        except MultigenError as e:
            return {"error": e.message, "code": e.code, "field": e.field}
        return {"session_id": session["id"], "session": session}

    def get_session_info(self, session_id: str) -> dict[str, Any]:
        """The session (API.md ``Session``). Raises NotFound."""
        row = self._session_row(session_id)
        return session_view(row, self.store.image_count(session_id), self.store.job_counts(session_id))

    def list_sessions(self, user: str | None = None, project: str | None = None,
                      state: str | None = None) -> list[dict[str, Any]]:
        """Sessions, oldest first, optionally of one user/project/state."""
        return [session_view(r, self.store.image_count(r["id"]), self.store.job_counts(r["id"]))
                for r in self.store.list_sessions(user=user, project=project, state=state)]

    def close_session(self, session_id: str) -> dict[str, Any]:
        """Close a session: queued jobs are cancelled, running ones stop at the next step; images stay."""
        with self._cv:
            row = self._session_row(session_id)
            if row["state"] != "closed":
                for job in self.store.list_jobs(session_id=session_id, states=[JobState.QUEUED, JobState.RUNNING]):
                    self._cancel_locked(job)
                self.store.update_session(session_id, state="closed", closed_at=now_iso())
                log.info("session=%s closed", session_id)
                closed = True
            else:
                closed = False
        view = self.get_session_info(session_id)
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
            priority: higher runs first (-100..100).
            **setup_params: the pipe's setup parameters (``PARAMS`` of its class).

        Returns:
            ``{"job_id", "position", "seeds", "count", "job"}``.

        Raises:
            NotFound, Conflict (closed session), InvalidInput (naming the field), QueueFull.
        """
        session = self._session_row(session_id)
        if session["state"] != "open":
            raise Conflict(f"session {session_id} is closed: open a new session to queue jobs", field="session_id")
        entry = self.config.models.pipes[session["pipe"]]
        pipe_cls = self._pipe_class(entry.classname)
        count, seeds = check_count_and_seeds(count, seeds, self.config.limits)
        prompt = check_prompt(prompt, "prompt")
        negative_prompt = check_prompt(negative_prompt, "negative_prompt") or None
        priority = check_priority(priority)
        params = {k: v for k, v in setup_params.items() if v is not None}
        check_setup_params(params, pipe_cls, session["pipe"], self.config.limits)
        images_to_params(entry.classname, images, params, session["pipe"])
        check_has_image(entry.classname, params, session["pipe"])
        with self._cv:
            self.queue.check_room(session["user"])
        job_id = secrets.token_hex(8)
        inputs_dir = self.config.data_dir / "inputs" / job_id
        stored = save_params(params, inputs_dir)
        row = {"id": job_id, "session_id": session_id, "user": session["user"], "model": session["model"],
               "state": JobState.QUEUED.value, "priority": priority, "count": count, "seeds": seeds,
               "prompt": prompt, "negative_prompt": negative_prompt, "params": stored, "created_at": now_iso()}
        with self._cv:
            try:
                self.queue.check_room(session["user"])
                if self._session_row(session_id)["state"] != "open":  # closed meanwhile
                    raise Conflict(f"session {session_id} is closed: open a new session to queue jobs",
                                   field="session_id")
            except MultigenError:
                _remove_tree(inputs_dir)
                raise
            self.store.create_job(row)
            seq = self.store.get_job(job_id)["seq"]
            position = self.queue.push(QueuedJob(job_id, session["user"], session["model"], priority, seq=seq))
            if image_callback is not None:
                self._callbacks[job_id] = image_callback
            self._cv.notify_all()
            view = self._job_view_locked(job_id)
        log.info("session=%s job=%s queued: %d image(s), position %d, seeds %s", session_id, job_id, count,
                 position, seeds)
        self.events.publish("job.queued", {"job": view}, session_id=session_id)
        return {"job_id": job_id, "position": position, "seeds": seeds, "count": count, "job": view}

    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job (API.md ``Job``). Raises NotFound."""
        return self._job_view(job_id)

    def list_jobs(self, session_id: str, state: str | None = None) -> list[dict[str, Any]]:
        """A session's jobs in queue order."""
        self._session_row(session_id)
        rows = self.store.list_jobs(session_id=session_id, states=[state] if state else None)
        return [self._job_view(r["id"], r) for r in rows]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one at its next step.

        Raises:
            NotFound: unknown job.
            Conflict: the job has already finished.
        """
        with self._cv:
            row = self.store.get_job(job_id)
            if row is None:
                raise NotFound(f"job {job_id} not found", field="job_id")
            if JobState(row["state"]).finished:
                raise Conflict(f"job {job_id} has already {row['state']}: nothing to cancel", field="job_id",
                               code="job_finished")
            self._cancel_locked(row)
            return self._job_view_locked(job_id)

    def _cancel_locked(self, row: dict[str, Any]) -> None:
        job_id = row["id"]
        running = self._running.get(job_id)
        if running is not None:
            running.cancel_event.set()
            log.info("session=%s job=%s cancel requested: stops at the next step", row["session_id"], job_id)
            return
        self.queue.remove(job_id)
        self._callbacks.pop(job_id, None)
        self._transition(row, JobState.CANCELLED, finished_at=now_iso())

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview (JPEG bytes) of a running job, or None."""
        job = self._running.get(job_id)
        return job.preview if job is not None else None

    # ---- service ---------------------------------------------------------------------------------
    def queue_info(self) -> dict[str, Any]:
        with self._cv:
            return {"queued": len(self.queue), "running": len(self._running),
                    "workers": [w.info() for w in self.workers]}

    def devices(self) -> list[dict[str, Any]]:
        """The workers' devices, thread counts and dtypes."""
        return [{k: v for k, v in w.info().items() if k in ("device", "threads", "dtype", "state")}
                for w in self.workers]

    def subscribe(self, session_id: str | None = None, last_event_id: int | None = None) -> Subscription:
        """Events of one session (or all): an iterable with ``get(timeout)`` and ``close()``."""
        return self.events.subscribe(session_id=session_id, last_event_id=last_event_id)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: images, jobs, model loads and cache hits, generation times."""
        out = self.counters.snapshot()
        out["cache"] = dict(self.cache.counters, bytes=self.cache.used_bytes(), models=self.cache.entries())
        out["queue"] = self.queue_info()
        return out

    # ---- worker side -----------------------------------------------------------------------------
    def _next_job(self, worker: DeviceWorker, timeout: float) -> RunningJob | None:
        with self._cv:
            if self._stop.is_set() or self._draining or worker.stop_event.is_set():
                return None
            qj = self.queue.pop(self.cache.held(worker.device))
            if qj is None:
                self._cv.wait(timeout)
                if self._stop.is_set() or self._draining or worker.stop_event.is_set():
                    return None
                qj = self.queue.pop(self.cache.held(worker.device))
                if qj is None:
                    return None
            row = self.store.get_job(qj.job_id)
            job = RunningJob(job_id=qj.job_id, session_id=row["session_id"], user=qj.user, model=qj.model,
                             priority=qj.priority, seq=qj.seq, count=row["count"], device=worker.device)
            self._running[job.job_id] = job
            self._transition(row, JobState.RUNNING, started_at=now_iso(), device=worker.device)
            return job

    def _run_job(self, worker: DeviceWorker, job: RunningJob) -> None:
        self.runner.run(worker, job)

    def _finish(self, job: RunningJob, state: JobState, error: dict[str, Any] | None = None) -> None:
        with self._cv:
            self._running.pop(job.job_id, None)
            self._callbacks.pop(job.job_id, None)
            row = self.store.get_job(job.job_id)
            self._transition(row, state, finished_at=now_iso(), error=error, timings=job.timings or None)
            self.counters.job_finished(state.value)
            self._cv.notify_all()

    def _abandon(self, job: RunningJob, exc: BaseException) -> None:
        """End a job whose run broke out of the job boundary (a bug that kills the worker loop).

        Without this the job would stay ``running`` (and in ``_running``) until the next restart:
        ``wait_idle`` and ``drain_on_exit`` would wait for it for ever.
        """
        with self._cv:
            current = self._running.get(job.job_id)
            if current is not None and current is not job:  # requeued and taken again meanwhile
                return
            self._running.pop(job.job_id, None)  # (_finish may have taken it out before it broke)
            self._callbacks.pop(job.job_id, None)
            try:
                row = self.store.get_job(job.job_id)
                if row is not None and row["state"] == JobState.RUNNING.value and job.job_id not in self.queue:
                    if job.requeue_event.is_set():  # stop(): resumed at the next start
                        self._transition(row, JobState.QUEUED)
                    else:
                        state = JobState.CANCELLED if job.cancel_event.is_set() else JobState.FAILED
                        error = None if state == JobState.CANCELLED else {
                            "type": type(exc).__name__, "message": f"internal error: {exc}"}
                        self._transition(row, state, finished_at=now_iso(), error=error,
                                         timings=job.timings or None)
                        self.counters.job_finished(state.value)
            except Exception:  # the store itself may be what broke: the restart's recovery puts it right
                log.exception("session=%s job=%s: could not record the end of the job", job.session_id, job.job_id)
            finally:
                self._cv.notify_all()

    def _requeue(self, job: RunningJob) -> None:
        with self._cv:
            self._running.pop(job.job_id, None)
            row = self.store.get_job(job.job_id)
            self._transition(row, JobState.QUEUED)
            if not self._stop.is_set():
                self.queue.push(QueuedJob(job.job_id, job.user, job.model, job.priority, seq=job.seq), force=True)
            self._cv.notify_all()

    def _transition(self, row: dict[str, Any], new: JobState, **fields: Any) -> None:
        """Every job state change: checked, stored, logged (one line) and announced."""
        new = check_transition(row["id"], row["state"], new)
        self.store.update_job(row["id"], state=new.value, **fields)
        log.info("session=%s job=%s %s -> %s%s", row["session_id"], row["id"], row["state"], new.value,
                 f" ({fields['error']['type']}: {fields['error']['message']})" if fields.get("error") else "")
        self.events.publish(EVENT_FOR_STATE[new], {"job": self._job_view_locked(row["id"])},
                            session_id=row["session_id"])

    def _job_rows(self, job_id: str, row: dict[str, Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        row = row or self.store.get_job(job_id)
        if row is None:
            raise NotFound(f"job {job_id} not found", field="job_id")
        return row, self.store.list_images(job_id=job_id)

    def _job_view(self, job_id: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
        # the store is safe across threads: only the queue position and the running job's progress
        # need the service lock, so polling does not wait on SQLite behind the other callers
        row, images = self._job_rows(job_id, row)
        with self._cv:
            return job_view(row, images, self.queue.position(job_id), self._running.get(job_id))

    def _job_view_locked(self, job_id: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
        row, images = self._job_rows(job_id, row)
        return job_view(row, images, self.queue.position(job_id), self._running.get(job_id))

    def _preview_image(self, latents: Any, model_type: Any) -> Any:
        fn = type(self).preview_fn
        if fn is None:
            from multigen.pipes import latents_to_rgb as fn
        return fn(latents, model_type)

    # ---- helpers ---------------------------------------------------------------------------------
    def _session_row(self, session_id: str) -> dict[str, Any]:
        row = self.store.get_session(session_id)
        if row is None:
            raise NotFound(f"session {session_id} not found", field="session_id")
        return row

    def _pipe_class(self, classname: str) -> Any:
        factory = type(self).pipe_factory
        if factory is not None:
            return factory(classname)
        import multigen.pipes

        return getattr(multigen.pipes, classname)

    def _model_type(self, model: str) -> str | None:
        if model not in self._model_types:
            self._model_types[model] = model_type_of(self.config.models.base[model])
        return self._model_types[model]

    def _pipe_kwargs(self, session: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments of the session's pipe class beyond the shared base (ControlNets)."""
        if not self.config.models.pipes[session["pipe"]].needs_cnet:
            return {}
        mtype = self._model_type(session["model"])
        kwargs: dict[str, Any] = {"controlnets": controlnet_paths(self.config.models, session["pipe"], mtype)}
        entry = self.config.models.pipes[session["pipe"]]
        conditions = entry.extra.get("condition_models")
        if entry.classname == "CIm2ImPipe" and isinstance(conditions, dict):  # depth/pose models, under model_dir
            kwargs["condition_models"] = {str(c): str(self.config.model_dir / str(p)) for c, p in conditions.items()}
        return kwargs


def _register_exit_hook(hook: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``hook`` when the main thread ends, before the interpreter starts shutting down.

    ``threading._register_atexit`` hooks run before concurrent.futures refuses new work
    (which torch and transformers use while loading); plain ``atexit`` runs too late for a
    job to load a model. The hook is a no-op once the service was stopped.
    """
    # the hooks cannot be unregistered: hold the service weakly, so a stopped one can be freed
    ref = weakref.WeakMethod(hook)  # type: ignore[arg-type]

    def run() -> None:
        bound = ref()
        if bound is not None:
            bound()

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(run)
            return None
    except RuntimeError:  # interpreter already shutting down
        return None
    atexit.register(run)  # pragma: no cover - Python without the private hook
    return run  # pragma: no cover


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


__all__ = ["ServiceThread"]
