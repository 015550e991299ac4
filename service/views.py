"""Sessions, jobs and images as the plain dicts of API.md (``Session``, ``Job``, ``Image``).

The one place where the store's records (:mod:`multigen.service.records`) become what
clients see. Times are ISO 8601 UTC. No server path appears in these dicts.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .inputs import public_params
from .jobs import JobState
from .records import DeliveryRecord, ImageRecord, JobRecord, SessionRecord
from .running import RunningJob

JOB_STATES = tuple(s.value for s in JobState)


def now_iso() -> str:
    """The current time, ISO 8601 UTC with milliseconds (``2026-11-25T13:30:00.123Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def image_view(rec: ImageRecord) -> dict[str, Any]:
    """API.md ``Image``."""
    return {"id": rec.id, "session_id": rec.session_id, "job_id": rec.job_id, "index": rec.idx,
            "seed": rec.seed, "width": rec.width, "height": rec.height,
            "url": f"/api/v1/images/{rec.id}", "created_at": rec.created_at}


def session_view(rec: SessionRecord, image_count: int, job_counts: dict[str, int]) -> dict[str, Any]:
    """API.md ``Session``, with its image count and its jobs counted by state."""
    return {"id": rec.id, "user": rec.user, "project": rec.project, "pipe": rec.pipe,
            "model": rec.model, "loras": rec.loras, "state": rec.state, "created_at": rec.created_at,
            "closed_at": rec.closed_at, "image_count": image_count,
            "job_counts": {s: int(job_counts.get(s, 0)) for s in JOB_STATES}}


def metafusion_session_info(session: dict[str, Any], next_job: dict[str, Any] | None,
                            running: bool) -> dict[str, Any]:
    """metafusion's ``get_session_info`` answer (``available_images``, ``next_job``, ``status``)
    with our ``Session`` keys beside it."""
    status = "running" if running else "queued" if next_job else session["state"]
    return {"available_images": session["image_count"], "next_job": next_job or "None", "status": status,
            **session}


def job_event_view(rec: JobRecord, done: int, position: int | None, live: RunningJob | None = None) -> dict[str, Any]:
    """What a job event carries: ids, state and progress, never prompts or parameters (an event is
    copied to every subscriber and kept in the replay history; clients fetch the job for the rest)."""
    progress, eta = _progress(rec, done, live)
    return {"id": rec.id, "session_id": rec.session_id, "state": rec.state, "count": rec.count, "done": done,
            "position": position if rec.state == JobState.QUEUED else None, "progress": progress,
            "eta_seconds": eta, "error": rec.error, "device": rec.device, "url": f"/api/v1/jobs/{rec.id}"}


def _progress(rec: JobRecord, done: int, live: RunningJob | None) -> tuple[dict[str, Any], float | None]:
    """A job's progress and ETA: live while it runs, else derived from its state and written images."""
    if live is not None and rec.state == JobState.RUNNING:
        return dict(live.progress), live.eta_seconds
    finished = rec.state == JobState.SUCCEEDED
    steps = rec.params.get("steps") or 0
    progress = {"step": steps if finished else 0, "steps": steps, "image": done,
                "fraction": 1.0 if finished else round(done / rec.count, 4) if rec.count else 0.0}
    return progress, 0.0 if finished else None


def webhook_view(rec: JobRecord, delivery: DeliveryRecord | None) -> dict[str, Any] | None:
    """A job's ``webhook``: None without a ``webhook_url``; ``waiting`` until the job ends, then its delivery's
    ``pending``/``delivered``/``failed``, attempts, last error and next try (webhooks.py)."""
    url = rec.params.get("webhook_url")
    if not url:
        return None
    if delivery is None:
        return {"url": url, "state": "waiting", "attempts": 0, "last_error": None, "next_try_at": None,
                "delivered_at": None}
    return {"url": url, "state": delivery.state, "attempts": delivery.attempts, "last_error": delivery.last_error,
            "next_try_at": delivery.next_try_at, "delivered_at": delivery.delivered_at}


def grid_url(rec: JobRecord) -> str | None:
    """Where a succeeded ``grid`` job of 2+ images serves its grid (grid.py), else None."""
    grid = rec.params.get("grid") and rec.count > 1 and rec.state == JobState.SUCCEEDED
    return f"/api/v1/jobs/{rec.id}/grid" if grid else None


def job_view(rec: JobRecord, images: list[ImageRecord], position: int | None,
             live: RunningJob | None = None, delivery: DeliveryRecord | None = None) -> dict[str, Any]:
    """API.md ``Job`` from its record, its written images, while it runs its live state, and its webhook's
    delivery."""
    state = rec.state
    count = rec.count
    done = len(images)
    progress, eta = _progress(rec, done, live)
    live = live if state == JobState.RUNNING else None  # a process's live state may lag the store's end
    return {"id": rec.id, "session_id": rec.session_id, "user": rec.user, "state": state,
            "position": position if state == JobState.QUEUED else None, "count": count, "done": done,
            "seeds": rec.seeds, "prompt": rec.prompt, "negative_prompt": rec.negative_prompt,
            "priority": rec.priority, "params": public_params(rec.params), "progress": progress,
            "eta_seconds": eta, "error": rec.error, "device": rec.device,
            "cancel_requested": state == JobState.RUNNING and bool(rec.cancel_requested or
                                                                   (live is not None and live.cancel_requested)),
            "skip_requested": bool(live is not None and live.skip_event.is_set()), "skipped": list(rec.skipped or []),
            "timings": dict(live.timings) if live is not None else rec.timings,
            "images": [image_view(i) for i in images], "created_at": rec.created_at,
            "started_at": rec.started_at, "finished_at": rec.finished_at,
            "grid_url": grid_url(rec), "webhook": webhook_view(rec, delivery)}
