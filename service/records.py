"""What the store holds: sessions, jobs and images as typed, immutable records.

The store returns these (never rows or plain dicts); :mod:`multigen.service.views` turns them
into the API's shapes. A change is written with ``store.update_*`` and read back as a new
record, or made locally with :func:`dataclasses.replace`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SessionRecord:
    """A session: who generates what, with which pipe, model and LoRAs, and where images go."""

    id: str
    user: str
    project: str
    pipe: str
    model: str
    #: ``[{"name": str, "weight": float}]``, checked against models.yaml when the session opened
    loras: list[dict[str, Any]]
    state: str  # "open" or "closed"
    #: the session's image folder (absolute; never shown to clients)
    folder: str
    created_at: str
    closed_at: str | None = None

    @property
    def is_open(self) -> bool:
        return self.state == "open"


@dataclass(frozen=True)
class JobRecord:
    """A job of ``count`` images, with every seed fixed when it was queued."""

    id: str
    session_id: str
    user: str
    model: str
    state: str  # a JobState value
    priority: int
    count: int
    seeds: list[int]
    #: a string or a Cfgen grammar (lists/dicts), expanded per image with the image's seed
    prompt: Any
    negative_prompt: Any
    #: the pipe's setup parameters as stored (images as ``{"$image": path}``, see inputs.py)
    params: dict[str, Any]
    created_at: str
    #: arrival order in the store (0 until stored)
    seq: int = 0
    error: dict[str, Any] | None = None
    device: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    timings: dict[str, Any] | None = None
    #: the places in the job of the images skipped while it ran (none made for them; None: no skip)
    skipped: list[int] | None = None
    #: the worker holding the job's lease while it runs (claims.py); None otherwise
    worker: str | None = None
    #: 1 once a cancel was asked of the job while a worker (of any process) ran it
    cancel_requested: int = 0
    #: how many skips were asked of the job while it ran (the worker skips one image per new request)
    skip_requests: int = 0


@dataclass(frozen=True)
class ImageRecord:
    """One image of a job: reserved (``writing``) before its files are written, ``done`` after."""

    id: str
    session_id: str
    job_id: str
    #: the image's index in its session (file ``{idx:05d}.png``)
    idx: int
    #: the image's position in its job (which seed it used)
    pos: int
    seed: int
    width: int | None
    height: int | None
    #: the PNG's absolute path (never shown to clients)
    path: str
    state: str  # "writing" or "done"
    created_at: str | None = None


@dataclass(frozen=True)
class NewImage:
    """What the runner asks the store to reserve for a job's image ``pos``."""

    id: str
    session_id: str
    job_id: str
    pos: int
    seed: int
    width: int
    height: int
    #: the session's folder: the file is ``folder/{index:05d}.png``
    folder: str


@dataclass(frozen=True)
class DeliveryRecord:
    """A job's webhook delivery (webhooks.py): ``pending`` until ``delivered`` or, after its last attempt,
    ``failed``. Times are ISO 8601 UTC text (``next_try_at``: when the next attempt is due)."""

    job_id: str
    user: str
    url: str
    #: the job's end event (``job.succeeded``, ``job.failed``, ``job.cancelled``)
    event: str
    state: str
    attempts: int
    created_at: str
    next_try_at: str | None = None
    last_error: str | None = None
    delivered_at: str | None = None
