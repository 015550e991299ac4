"""Sessions, jobs and images as the plain dicts of API.md (``Session``, ``Job``, ``Image``).

The store keeps rows; these functions shape them for clients. Times are ISO 8601 UTC.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .inputs import public_params
from .jobs import JobState

JOB_STATES = tuple(s.value for s in JobState)


def now_iso() -> str:
    """The current time, ISO 8601 UTC with milliseconds (``2026-11-25T13:30:00.123Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def image_view(row: dict[str, Any]) -> dict[str, Any]:
    """API.md ``Image`` from an images row."""
    return {"id": row["id"], "session_id": row["session_id"], "job_id": row["job_id"], "index": row["idx"],
            "seed": row["seed"], "width": row["width"], "height": row["height"],
            "url": f"/api/v1/images/{row['id']}", "created_at": row["created_at"]}


def session_view(row: dict[str, Any], image_count: int, job_counts: dict[str, int]) -> dict[str, Any]:
    """API.md ``Session`` from a sessions row and its counts."""
    return {"id": row["id"], "user": row["user"], "project": row["project"], "pipe": row["pipe"],
            "model": row["model"], "loras": row["loras"], "state": row["state"], "created_at": row["created_at"],
            "closed_at": row["closed_at"], "image_count": image_count,
            "job_counts": {s: int(job_counts.get(s, 0)) for s in JOB_STATES}}


def job_view(row: dict[str, Any], images: list[dict[str, Any]], position: int | None,
             running: Any = None) -> dict[str, Any]:
    """API.md ``Job`` from a jobs row, its written images and, while it runs, its live state."""
    state = row["state"]
    count = row["count"]
    done = len(images)
    if running is not None and state == JobState.RUNNING:
        progress = dict(running.progress)
        eta = running.eta_seconds
    else:
        finished = state == JobState.SUCCEEDED
        steps = row["params"].get("steps") or 0
        progress = {"step": steps if finished else 0, "steps": steps, "image": done,
                    "fraction": 1.0 if finished else round(done / count, 4) if count else 0.0}
        eta = 0.0 if finished else None
    return {"id": row["id"], "session_id": row["session_id"], "user": row["user"], "state": state,
            "position": position if state == JobState.QUEUED else None, "count": count, "done": done,
            "seeds": row["seeds"], "prompt": row["prompt"], "negative_prompt": row["negative_prompt"],
            "priority": row["priority"], "params": public_params(row["params"]), "progress": progress,
            "eta_seconds": eta, "error": row["error"], "device": row["device"],
            "cancel_requested": bool(running is not None and running.cancel_event.is_set()),
            "timings": dict(running.timings) if running is not None else row.get("timings"),
            "images": [image_view(i) for i in images], "created_at": row["created_at"],
            "started_at": row["started_at"], "finished_at": row["finished_at"]}
