"""``RunningJob``: what the service knows of a job while a worker runs it (in memory only).

The ledger creates one when a worker takes a job and drops it when the job ends; the runner
updates its progress; views show it. It holds no reference to any of them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunningJob:
    """A job taken by a worker: its identity, the stop signals and the live progress."""

    job_id: str
    session_id: str
    user: str
    model: str
    priority: int
    seq: int
    count: int
    device: str | None = None
    #: the host the job runs on, and the worker holding its lease (claims.py; None: run without a lease)
    host: str | None = None
    worker: str | None = None
    #: set by a cancel: the job stops at its next step and ends ``cancelled``
    cancel_event: threading.Event = field(default_factory=threading.Event)
    #: set by stop(): the job stops at its next step and goes back to ``queued``
    requeue_event: threading.Event = field(default_factory=threading.Event)
    #: set when the worker's lease on the job was lost (with requeue_event): another worker has or gets it
    lease_lost: threading.Event = field(default_factory=threading.Event)
    #: the store's ``skip_requests`` already acted on (a job run by another process is skipped through the store)
    skips_seen: int = 0
    #: set by a skip: the image being made stops at its next step, unwritten, and the job goes on with the next
    skip_event: threading.Event = field(default_factory=threading.Event)
    #: the places of the job's images skipped so far
    skipped: list[int] = field(default_factory=list)
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
    setup_params: dict[str, Any] = field(default_factory=dict)  # what the pipe was set up with for this job

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_event.is_set()

    def should_stop(self) -> bool:
        """A cancel or a stop() that requeues: the job stops."""
        return self.cancel_event.is_set() or self.requeue_event.is_set()

    def should_stop_image(self) -> bool:
        """The cancel check given to ``gen``: the job stops, or only the image being made is skipped."""
        return self.should_stop() or self.skip_event.is_set()
