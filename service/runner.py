"""Running one job on a worker: the pipe from the cache, one ``gen`` per image, the image chain.

For every image of the job not yet written (a job resumed after a restart skips the ones
that are), the runner expands the prompt grammar with that image's seed, applies the job's
styles (styles.py; ``random`` draws with the same seed), and calls ``gen`` with that seed
(batch size 1, so a resumed job reproduces the same pixels), then runs the image callback
chain: write the PNG and its sidecar atomically, record the image, announce ``image.created``,
and call the user's ``image_callback`` (whose exceptions are logged, never fatal). A step
callback records progress and an ETA from measured step times, keeps a rate-limited preview,
and stops the job at the next step when it is cancelled or the service stops.

The runner is given its collaborators (store, cache, catalog, writer, events, counters,
ledger) and reports a job's end to the ledger; it knows nothing of the ServiceThread.
"""
from __future__ import annotations

import io
import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Collection

from .cache import ModelCache, ModelLoadFailed, ModelTooLarge, is_out_of_memory
from .catalog import ModelCatalog
from .events import EventBus
from .failures import job_error
from .grid import write_grid
from .inputs import load_params, public_params, public_pipe_config
from .jobs import JOB_LEVEL_KEYS, JobState
from .ledger import JobLedger
from .prompt_tools import WildcardLibrary, builtin_library, expand_image_prompt, has_tools
from .records import JobRecord, NewImage, SessionRecord
from .running import RunningJob
from .stats import ServiceStats
from .store import Store
from .styles import StyleLibrary, StyledPrompt, load_styles
from .views import image_view, now_iso
from .writer import ImageWriter

log = logging.getLogger(__name__)

#: at most one preview per this many seconds: a preview then costs well under 2% of a step
PREVIEW_INTERVAL_SECONDS = 0.5
#: at most one ``job.progress`` event per this many seconds (plus the last step of each image)
PROGRESS_EVENT_INTERVAL_SECONDS = 0.25

#: ``preview_fn(latents, model_type) -> PIL image``
PreviewFn = Callable[[Any, Any], Any]


def default_preview(latents: Any, model_type: Any) -> Any:
    from multigen.pipes import latents_to_rgb

    return latents_to_rgb(latents, model_type)


@dataclass(frozen=True)
class Device:
    """Where a job runs: the worker's device, torch thread count and dtype (recorded with each image)."""

    name: str
    threads: int
    dtype: Any


class ImageTimeLimit(Exception):
    """An image took longer than ``limits.max_seconds_per_image``: its job fails (the message says so)."""

    param = None


class LoraLoadFailed(Exception):
    """A LoRA file of the job is missing or unreadable at run time (deleted or corrupt since the server
    started): the message names the file and what to do."""

    param = "loras"


class DeviceOutOfMemory(Exception):
    """An image ran out of device memory twice (the second time with VAE tiling): the message names the
    size and what to lower."""

    param = "width"


class StopJob(Exception):
    """Raised from the step callback's cancel check when a job must stop (cancel or stop())."""


class JobRunner:
    """Runs one job at a time for a worker; every collaborator is given, none is looked up.

    Args:
        store, cache, catalog, writer, events, counters: the service's parts.
        ledger: where the job's end is reported and its image callback lives.
        preview_fn: latents -> preview image (default: ``multigen.pipes.latents_to_rgb``).
        max_seconds_per_image: wall-clock seconds one image may take (0: no limit).
        styles: the style library jobs name (default: the built-in styles only).
        wildcards: the wildcard files prompts name (default: the built-in ones only).
    """

    def __init__(self, *, store: Store, cache: ModelCache, catalog: ModelCatalog, writer: ImageWriter,
                 events: EventBus, counters: ServiceStats, ledger: JobLedger,
                 preview_fn: PreviewFn | None = None, max_seconds_per_image: float = 0,
                 styles: StyleLibrary | None = None, wildcards: WildcardLibrary | None = None) -> None:
        self.store = store
        self.cache = cache
        self.catalog = catalog
        self.writer = writer
        self.events = events
        self.counters = counters
        self.ledger = ledger
        self.preview_fn = preview_fn or default_preview
        self.max_seconds_per_image = max_seconds_per_image
        self.styles = styles if styles is not None else load_styles(None)
        self.wildcards = wildcards if wildcards is not None else builtin_library()

    def held_models(self, device: str) -> Collection[str]:
        """The models loaded on ``device`` (a worker prefers jobs that use them)."""
        return self.cache.held(device)

    # -- the job --------------------------------------------------------------------------
    def run(self, device: Device, job: RunningJob) -> None:
        """Run ``job`` to its end state; every exception is caught here, at the job boundary."""
        t0 = time.perf_counter()
        try:
            record = self.store.get_job(job.job_id)
            session = self.store.get_session(job.session_id)
            if record is None or session is None:
                raise LookupError(f"job {job.job_id} or its session vanished from the store")
            classname = self.catalog.pipe(session.pipe).classname
            with self.cache.lease(session.model, classname, device.name, device.dtype,
                                  **self.catalog.pipe_kwargs(session)) as lease:
                job.timings["model_loaded"] = not lease.hit
                device = replace(device, dtype=lease.entry.dtype)  # a models.yaml dtype replaces the worker's
                pipe = lease.pipe
                # exactly this job's LoRAs (the session's and the job's own): nothing leaks into the next job
                self._set_loras(pipe, self.catalog.job_lora_files(session.loras, record.params.get("job_loras")))
                # the model's defaults (models.yaml) under the job's own parameters
                # the job's styles are applied to each image's prompt (_one_image), not set up
                params = {k: v for k, v in load_params(record.params).items()
                          if v is not None and k not in JOB_LEVEL_KEYS}
                job.model_defaults = {k: v for k, v in self.catalog.defaults(session.model).items()
                                      if k in pipe.PARAMS and k not in params}
                job.setup_params = {**job.model_defaults, **params}
                pipe.setup(**job.setup_params)
                # model load (if any) + LoRAs + setup: what a job pays before its first step
                job.timings["prepare_seconds"] = round(time.perf_counter() - t0, 6)
                # written images, and those skipped (a resumed job makes neither again)
                done = {img.pos for img in self.store.list_images(job_id=job.job_id)} | set(record.skipped or ())
                job.skipped = list(record.skipped or ())
                for pos in range(record.count):
                    if pos in done:
                        continue
                    self._one_image(device, job, record, session, pipe, lease.model_type, pos, len(done))
                    done.add(pos)
                # the store's word, not this loop's: a database that lost commits it had acknowledged (a crash
                # with synchronous_commit off, a failover to an asynchronous standby) lacks an image: make it again
                for pos in sorted(set(range(record.count)) - set(job.skipped) -
                                  {img.pos for img in self.store.list_images(job_id=job.job_id)}):
                    log.warning("session=%s job=%s image %d is not in the store after it was written: making it "
                                "again", job.session_id, job.job_id, pos + 1)
                    self._one_image(device, job, record, session, pipe, lease.model_type, pos, record.count - 1)
            if record.params.get("grid") and record.count > 1:  # the images side by side (grid.py)
                write_grid(self.store, record, session, fsync=getattr(self.writer, "fsync", True))
        except Exception as e:  # the job boundary: a failing job never kills the loop
            self._record_times(job)
            if job.cancel_event.is_set():
                self.ledger.finish(job, JobState.CANCELLED)
            elif job.requeue_event.is_set():
                self.ledger.requeue(job)
            else:
                self._fail(job, e)
            return
        self._record_times(job)
        self.ledger.finish(job, JobState.SUCCEEDED)  # every image written: a cancel after the last step is moot

    @staticmethod
    def _set_loras(pipe: Any, files: list[tuple[str, float]]) -> None:
        """``pipe.set_loras(files)``; a LoRA file gone or unreadable since the start fails the job, naming it."""
        try:
            pipe.set_loras(files)
        except Exception as e:
            from multigen.pipes.errors import PipeError

            missing = [Path(f).name for f, _ in files if not Path(f).is_file()]
            if not missing and (is_out_of_memory(e) or isinstance(e, PipeError)):  # the device, or the pipe's refusal
                raise
            try:
                pipe.set_loras([])  # no half-applied LoRA stays on the cached pipe for the next job
            except Exception:
                log.debug("clearing the LoRAs after a failed load failed too", exc_info=True)
            if missing:
                raise LoraLoadFailed(f"LoRA file {', '.join(missing)} is missing on the server (deleted or moved "
                                     "since it started): ask the admin to restore it or fix models.yaml, or run "
                                     "the job without that LoRA") from e
            names = ", ".join(Path(f).name for f, _ in files)
            raise LoraLoadFailed(f"the LoRA file(s) {names} could not be loaded ({type(e).__name__}: "
                                 f"{str(e)[:200]}): a file may be corrupt or not a LoRA for this model; ask the "
                                 "admin to check it, or run the job without it") from e

    @staticmethod
    def _record_times(job: RunningJob) -> None:
        job.timings.update(gen_seconds=round(job.gen_seconds, 6), preview_seconds=round(job.preview_seconds, 6))

    def _fail(self, job: RunningJob, e: Exception) -> None:
        from multigen.pipes.errors import PipeError

        bad_input = isinstance(e, (PipeError, ImageTimeLimit, ModelTooLarge, ModelLoadFailed, LoraLoadFailed,
                                      DeviceOutOfMemory))
        if bad_input:
            log.warning("session=%s job=%s: refused: %s", job.session_id, job.job_id, e)
        else:  # the whole story for the admin; the job's error says where to find it
            log.exception("session=%s job=%s: failed", job.session_id, job.job_id)
        error = job_error(e, job.job_id, bad_input=bad_input, field=getattr(e, "param", None))
        self.ledger.finish(job, JobState.FAILED, error=error)

    # -- one image --------------------------------------------------------------------------
    def _one_image(self, device: Device, job: RunningJob, record: JobRecord, session: SessionRecord,
                   pipe: Any, model_type: Any, pos: int, written: int) -> None:
        seed = int(record.seeds[pos])
        prompt = _expand(record.prompt, seed, "prompt")
        negative = _expand(record.negative_prompt, seed, "negative_prompt") if record.negative_prompt else ""
        # the prompt tools (prompt_tools.py): arrays by the image's place in the job, wildcards by its seed
        in_order = bool(record.params.get("wildcards_in_order"))
        prompt = expand_image_prompt(prompt, self.wildcards, seed, pos, in_order, "prompt",
                                     with_arrays=isinstance(record.prompt, str))
        negative = expand_image_prompt(negative, self.wildcards, seed, pos, in_order, "negative_prompt")
        styles = record.params.get("styles")
        styled = self.styles.apply(styles, prompt, negative, seed) if styles else None
        count = record.count
        t0 = time.perf_counter()
        before = job.gen_seconds

        last = [t0]

        def on_step(step: int, steps: int, latents: Any) -> None:
            now = time.perf_counter()
            if self.max_seconds_per_image and now - t0 > self.max_seconds_per_image:
                raise ImageTimeLimit(f"image {pos + 1} of {count} took more than {self.max_seconds_per_image} s "
                                     f"(limits.max_seconds_per_image), at step {step} of {steps}: use fewer steps or "
                                     "a smaller size, or ask the admin to raise the limit")
            self.counters.observe_step(now - last[0])  # the first one includes prompt encoding
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
                self.events.publish("job.progress", {"job_id": job.job_id, "progress": dict(job.progress),
                                                     "eta_seconds": job.eta_seconds,
                                                     "preview_url": f"/api/v1/jobs/{job.job_id}/preview"},
                                    session_id=job.session_id)

        inputs = {"prompt": styled.prompt if styled else prompt,
                  "negative_prompt": styled.negative_prompt if styled else negative, "seed": seed,
                  "callback": on_step, "cancel": job.should_stop_image}
        try:
            try:
                images = pipe.gen(dict(inputs))
            except Exception as e:
                if not is_out_of_memory(e) or job.should_stop():
                    raise
                images = self._retry_after_oom(job, pipe, inputs, pos, count, e)
        except Exception:
            if not self._skipped(job, pos):
                raise
            return
        job.gen_seconds = before + (time.perf_counter() - t0)
        self.counters.observe_image(time.perf_counter() - t0)
        if job.should_stop():  # a pipe that returned after an interrupt: discard the partial image
            raise StopJob("stopped")
        if self._skipped(job, pos):  # ...or after a skip: discard it and go on with the next image
            return
        if not images:
            raise RuntimeError(f"{type(pipe).__name__}.gen returned no image")
        config = pipe.get_config() if hasattr(pipe, "get_config") else {}
        self._save(device, job, record, session, GenOutput(images[0], pos, seed, prompt, negative, config, styled))

    def _retry_after_oom(self, job: RunningJob, pipe: Any, inputs: dict[str, Any], pos: int, count: int,
                         first: Exception) -> Any:
        """Image ``pos`` ran out of device memory: free the device's cache and try it once more with VAE
        tiling on (decoding in tiles needs less memory); a second OOM fails the job, naming the size."""
        config = pipe.get_config() if hasattr(pipe, "get_config") else {}
        size = "x".join(str(config.get(k, job.setup_params.get(k, "?"))) for k in ("width", "height"))
        log.warning("session=%s job=%s image %d of %d (%s) ran out of device memory; retrying once with VAE "
                    "tiling: %s", job.session_id, job.job_id, pos + 1, count, size, first)
        _free_device_memory()
        tiled = "vae_tiling" in getattr(pipe, "PARAMS", ())
        if tiled:  # the same setup with tiling on; the job's own setup is restored after
            pipe.setup(**{**job.setup_params, "vae_tiling": True})
        try:
            return pipe.gen(dict(inputs))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            _free_device_memory()
            raise DeviceOutOfMemory(
                f"image {pos + 1} of {count} ({size}) ran out of device memory twice"
                f"{', the second time with VAE tiling' if tiled else ''}: lower width and height (or the upscale "
                "factor), or use a smaller model or quantize/offload in models.yaml") from e
        finally:
            if tiled:
                pipe.setup(**job.setup_params)

    def _skipped(self, job: RunningJob, pos: int) -> bool:
        """Whether image ``pos`` was skipped (and the job goes on): recorded on the job, the skip signal cleared."""
        if not job.skip_event.is_set() or job.should_stop():
            return False
        job.skip_event.clear()
        job.skipped.append(pos)
        self.store.update_job(job.job_id, skipped=sorted(job.skipped))
        log.info("session=%s job=%s image %d of %d skipped", job.session_id, job.job_id, pos + 1, job.count)
        return True

    def _preview(self, job: RunningJob, latents: Any, model_type: Any) -> None:
        t0 = time.perf_counter()
        try:
            image = self.preview_fn(latents, model_type)
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=80)
            job.preview = buf.getvalue()
            self.ledger.preview_ready(job)
        except Exception:  # a preview is a nicety: never fail a job for it
            log.debug("session=%s job=%s: preview failed", job.session_id, job.job_id, exc_info=True)
        job.preview_seconds += time.perf_counter() - t0

    def _save(self, device: Device, job: RunningJob, record: JobRecord, session: SessionRecord,
              out: GenOutput) -> None:
        """The image callback chain: write atomically, record, announce, then the user's callback."""
        width, height = out.image.size
        image = self.store.reserve_image(NewImage(id=secrets.token_hex(8), session_id=job.session_id,
                                                  job_id=job.job_id, pos=out.pos, seed=out.seed, width=width,
                                                  height=height, folder=session.folder), worker=job.worker)
        created = now_iso()
        meta = {
            "image_id": image.id, "session_id": job.session_id, "job_id": job.job_id, "index": image.idx,
            "job_image": out.pos, "user": session.user, "project": session.project, "pipe": session.pipe,
            "model": session.model, "loras": session.loras, "prompt": out.styled.prompt if out.styled else out.prompt,
            "negative_prompt": out.styled.negative_prompt if out.styled else out.negative,
            "prompt_grammar": record.prompt if not isinstance(record.prompt, str) else None,
            "seed": out.seed, "width": width, "height": height, "batch_size": 1,
            "params": public_params({**job.model_defaults, **record.params}),
            "threads": device.threads, "device": device.name, "dtype": str(device.dtype).replace("torch.", ""),
            "host": job.host, "worker": job.worker,
            "created_at": created, "pipe_config": public_pipe_config(out.config, self.catalog.path_names()),
        }
        if out.styled:  # what the model got is `prompt`; what the user wrote (expanded) is kept too
            meta.update(styles=list(out.styled.styles), prompt_before_styles=out.prompt,
                        negative_prompt_before_styles=out.negative)
        for key in ("performance", "performance_note", "aspect_ratio", "job_loras"):  # presets.py, at admission
            if record.params.get(key):
                meta[key] = record.params[key]
        if has_tools(record.prompt) or has_tools(record.negative_prompt):  # the prompts as written, before expansion
            meta.update(prompt_template=record.prompt, negative_prompt_template=record.negative_prompt)
        if "model_id" in meta["pipe_config"]:
            # the session's name: two models.yaml entries on one folder share a path (the path names only one)
            meta["pipe_config"]["model_id"] = session.model
        # the files are renamed into place inside the store's transaction, under the job's lease (when it has one)
        pending = self.writer.prepare(Path(session.folder), image.idx, out.image, meta)
        try:
            self.store.complete_image(image.id, created, worker=job.worker, publish=pending.publish)
        except BaseException:
            pending.discard()
            raise
        path = pending.path
        self.counters.images_written += 1
        log.info("session=%s job=%s image %d/%d written: %s (seed %d)", job.session_id, job.job_id,
                 out.pos + 1, record.count, path.name, out.seed)
        done = replace(image, state="done", created_at=created)
        self.events.publish("image.created", image_view(done), session_id=job.session_id)
        self.ledger.image_written(job, str(path))


@dataclass(frozen=True)
class GenOutput:
    """One generated image and what made it: the prompts before the styles, and after them (``styled``:
    None for a job without styles)."""

    image: Any
    pos: int
    seed: int
    prompt: str
    negative: str
    config: dict[str, Any]
    styled: StyledPrompt | None = None


def _free_device_memory() -> None:
    """Return cached device memory after an out-of-memory error (nothing to do without CUDA)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - a broken CUDA state must not hide the OOM
        log.debug("emptying the CUDA cache failed", exc_info=True)


def _expand(prompt: Any, seed: int, param: str) -> str:
    if isinstance(prompt, str) or prompt is None:
        return prompt or ""
    from multigen.pipes.cfgen import expand_prompt

    return expand_prompt(prompt, seed, param)
