"""Running one job on a worker: the pipe from the cache, one ``gen`` per image, the image chain.

For every image of the job not yet written (a job resumed after a restart skips the ones
that are), the runner calls ``gen`` with that image's seed (batch size 1, so a resumed job
reproduces the same pixels), then runs the image callback chain: write the PNG and its
sidecar atomically, record the image, announce ``image.created``, and call the user's
``image_callback`` (whose exceptions are logged, never fatal). A step callback records
progress and an ETA from measured step times, keeps a rate-limited preview, and stops the
job at the next step when it is cancelled or the service stops.
"""
from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .inputs import load_params, public_params, public_pipe_config
from .jobs import JobState
from .views import now_iso

if TYPE_CHECKING:  # pragma: no cover
    from .serviceThread import ServiceThread
    from .worker import DeviceWorker

log = logging.getLogger(__name__)

#: at most one preview per this many seconds: a preview then costs well under 2% of a step
PREVIEW_INTERVAL_SECONDS = 0.5
#: at most one ``job.progress`` event per this many seconds (plus the last step of each image)
PROGRESS_EVENT_INTERVAL_SECONDS = 0.25


class StopJob(Exception):
    """Raised from the step callback's cancel check when a job must stop (cancel or stop())."""


@dataclass
class RunningJob:
    """What the service knows of a job taken by a worker (in memory only)."""

    job_id: str
    session_id: str
    user: str
    model: str
    priority: int
    seq: int
    count: int
    device: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    requeue_event: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] = field(default_factory=lambda: {"step": 0, "steps": 0, "image": 0, "fraction": 0.0})
    eta_seconds: float | None = None
    preview: bytes | None = None
    preview_at: float = 0.0
    progress_event_at: float = 0.0
    gen_seconds: float = 0.0  # wall time inside gen() so far
    steps_done: int = 0
    preview_seconds: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)  # prepare/gen/preview seconds, model_loaded
    model_defaults: dict[str, Any] = field(default_factory=dict)  # what models.yaml filled in for this job

    def should_stop(self) -> bool:
        """The cancel check given to ``gen``: a cancel or a stop() that requeues."""
        return self.cancel_event.is_set() or self.requeue_event.is_set()


class JobRunner:
    """Runs jobs for the service's workers (the service gives it store, cache, writer and events)."""

    def __init__(self, service: ServiceThread) -> None:
        self.service = service

    # -- the job --------------------------------------------------------------------------
    def run(self, worker: DeviceWorker, job: RunningJob) -> None:
        """Run ``job`` to its end state; every exception is caught here, at the job boundary."""
        svc = self.service
        t0 = time.perf_counter()
        try:
            row = svc.store.get_job(job.job_id)
            session = svc.store.get_session(job.session_id)
            if row is None or session is None:
                raise LookupError(f"job {job.job_id} or its session vanished from the store")
            pipe_entry = svc.config.models.pipes[session["pipe"]]
            kwargs = svc._pipe_kwargs(session)
            with svc.cache.lease(session["model"], pipe_entry.classname, worker.device, worker.dtype,
                                 **kwargs) as lease:
                job.timings["model_loaded"] = not lease.hit
                pipe = lease.pipe
                pipe.set_loras([(str(svc.config.models.lora[x["name"]].path), float(x["weight"]))
                                for x in session["loras"]])  # exactly this job's LoRAs: nothing leaks
                # the model's defaults (models.yaml) under the job's own parameters
                params = {k: v for k, v in load_params(row["params"]).items() if v is not None}
                defaults = svc.config.models.base[session["model"]].defaults
                job.model_defaults = {k: v for k, v in defaults.items() if k in pipe.PARAMS and k not in params}
                pipe.setup(**job.model_defaults, **params)
                # model load (if any) + LoRAs + setup: what a job pays before its first step
                job.timings["prepare_seconds"] = round(time.perf_counter() - t0, 6)
                done = {img["pos"] for img in svc.store.list_images(job_id=job.job_id)}
                for pos in range(row["count"]):
                    if pos in done:
                        continue
                    self._one_image(worker, job, row, session, pipe, lease.model_type, pos, len(done))
                    done.add(pos)
        except Exception as e:  # the job boundary: a failing job never kills the loop
            job.timings.update(gen_seconds=round(job.gen_seconds, 6), preview_seconds=round(job.preview_seconds, 6))
            if job.cancel_event.is_set():
                svc._finish(job, JobState.CANCELLED)
            elif job.requeue_event.is_set():
                svc._requeue(job)
            else:
                self._fail(job, e)
            return
        job.timings.update(gen_seconds=round(job.gen_seconds, 6), preview_seconds=round(job.preview_seconds, 6))
        svc._finish(job, JobState.SUCCEEDED)  # every image written: a cancel that came after the last step is moot

    def _fail(self, job: RunningJob, e: Exception) -> None:
        from multigen.pipes.errors import PipeError

        error: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
        if isinstance(e, PipeError):
            error["field"] = e.param
            log.warning("session=%s job=%s: bad input: %s", job.session_id, job.job_id, e)
        else:
            log.exception("session=%s job=%s: failed", job.session_id, job.job_id)
        self.service._finish(job, JobState.FAILED, error=error)

    # -- one image --------------------------------------------------------------------------
    def _one_image(self, worker: DeviceWorker, job: RunningJob, row: dict[str, Any], session: dict[str, Any],
                   pipe: Any, model_type: Any, pos: int, written: int) -> None:
        svc = self.service
        seed = int(row["seeds"][pos])
        prompt = _expand(row["prompt"], seed, "prompt")
        negative = _expand(row["negative_prompt"], seed, "negative_prompt") if row["negative_prompt"] else ""
        count = row["count"]
        t0 = time.perf_counter()
        before = job.gen_seconds

        last = [t0]

        def on_step(step: int, steps: int, latents: Any) -> None:
            now = time.perf_counter()
            svc.counters.observe_step(now - last[0])  # the first one includes prompt encoding
            job.gen_seconds = before + (now - t0)
            job.steps_done += 1
            steps = steps or step
            job.progress = {"step": step, "steps": steps, "image": pos,
                            "fraction": round(min(1.0, (written + step / max(steps, 1)) / count), 4)}
            per_step = job.gen_seconds / job.steps_done
            remaining = (steps - step) + (count - written - 1) * steps
            job.eta_seconds = round(per_step * remaining, 2)
            if latents is not None and now - job.preview_at >= PREVIEW_INTERVAL_SECONDS:
                self._preview(job, latents, model_type)
                job.preview_at = time.perf_counter()
            last[0] = time.perf_counter()  # preview time is not step time
            if now - job.progress_event_at >= PROGRESS_EVENT_INTERVAL_SECONDS or step == steps:
                job.progress_event_at = now
                svc.events.publish("job.progress", {"job_id": job.job_id, "progress": dict(job.progress),
                                                    "eta_seconds": job.eta_seconds,
                                                    "preview_url": f"/api/v1/jobs/{job.job_id}/preview"},
                                   session_id=job.session_id)

        images = pipe.gen({"prompt": prompt, "negative_prompt": negative, "seed": seed,
                           "callback": on_step, "cancel": job.should_stop})
        job.gen_seconds = before + (time.perf_counter() - t0)
        svc.counters.observe_image(time.perf_counter() - t0)
        if job.should_stop():  # a pipe that returned after an interrupt: discard the partial image
            raise StopJob("stopped")
        if not images:
            raise RuntimeError(f"{type(pipe).__name__}.gen returned no image")
        config = pipe.get_config() if hasattr(pipe, "get_config") else {}
        self._save(worker, job, row, session, images[0], pos, seed, prompt, negative, config)

    def _preview(self, job: RunningJob, latents: Any, model_type: Any) -> None:
        t0 = time.perf_counter()
        try:
            image = self.service._preview_image(latents, model_type)
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=80)
            job.preview = buf.getvalue()
        except Exception:  # a preview is a nicety: never fail a job for it
            log.debug("session=%s job=%s: preview failed", job.session_id, job.job_id, exc_info=True)
        job.preview_seconds += time.perf_counter() - t0

    def _save(self, worker: DeviceWorker, job: RunningJob, row: dict[str, Any], session: dict[str, Any],
              image: Any, pos: int, seed: int, prompt: str, negative: str, config: dict[str, Any]) -> None:
        """The image callback chain: write atomically, record, announce, then the user's callback."""
        svc = self.service
        folder = Path(session["folder"])
        width, height = image.size
        rec = svc.store.reserve_image({"id": secrets.token_hex(8), "session_id": job.session_id,
                                       "job_id": job.job_id, "pos": pos, "seed": seed, "width": width,
                                       "height": height, "path": str(folder / "{index}.png")})
        created = now_iso()
        meta = {
            "image_id": rec["id"], "session_id": job.session_id, "job_id": job.job_id, "index": rec["idx"],
            "job_image": pos, "user": session["user"], "project": session["project"], "pipe": session["pipe"],
            "model": session["model"], "loras": session["loras"], "prompt": prompt, "negative_prompt": negative,
            "prompt_grammar": row["prompt"] if not isinstance(row["prompt"], str) else None,
            "seed": seed, "width": width, "height": height, "batch_size": 1,
            "params": public_params({**job.model_defaults, **row["params"]}),
            "threads": worker.threads, "device": worker.device, "dtype": str(worker.dtype).replace("torch.", ""),
            "created_at": created, "pipe_config": public_pipe_config(config, svc.config.models.path_names),
        }
        path = svc.writer.write(folder, rec["idx"], image, meta)
        svc.store.complete_image(rec["id"], created)
        rec.update(state="done", created_at=created)
        svc.counters.images_written += 1
        log.info("session=%s job=%s image %d/%d written: %s (seed %d)", job.session_id, job.job_id,
                 pos + 1, row["count"], path.name, seed)
        svc.events.publish("image.created", svc._image_view(rec), session_id=job.session_id)
        callback: Callable[..., Any] | None = svc._callbacks.get(job.job_id)
        if callback is not None:
            try:
                callback(str(path))
            except Exception:  # the user's code: logged, never fatal
                log.exception("session=%s job=%s: image_callback raised", job.session_id, job.job_id)


def _expand(prompt: Any, seed: int, param: str) -> str:
    if isinstance(prompt, str) or prompt is None:
        return prompt or ""
    from multigen.pipes.cfgen import expand_prompt

    return expand_prompt(prompt, seed, param)
