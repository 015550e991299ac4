"""A job's life: the :class:`JobState` enum and the transitions allowed between states.

Like rq's ``JobStatus``, the state is a ``str`` Enum (it goes to JSON and SQLite as it is),
and every change of state is checked here, in one place, so that no code path can, say,
move a ``cancelled`` job back to ``running``.
"""
from __future__ import annotations

from enum import Enum

from multigen.pipes.spec import JOB

from .errors import Conflict

#: what admission stores in a job's params besides its job-level parameters: the job's own LoRAs (a preset's, the
#: prompt's ``<lora:...>`` tags; ``[{"name", "weight"}]``) and why a preset's LoRA was not used
STORED_JOB_EXTRAS = frozenset({"job_loras", "performance_note"})
#: the entries of a job's stored params that are not the pipe's: taken out before ``pipe.setup``
JOB_LEVEL_KEYS = frozenset(JOB.names) | STORED_JOB_EXTRAS


class JobState(str, Enum):
    """States of a job (API.md ``Job.state``)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # so f-strings and %s give "queued", not "JobState.QUEUED"
        return self.value

    @property
    def finished(self) -> bool:
        """True for the terminal states (succeeded, failed, cancelled)."""
        return self in FINISHED


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

#: every allowed transition; RUNNING -> QUEUED is the requeue on stop() or after a crash
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

#: the event type announced for each state a job enters
EVENT_FOR_STATE = {
    JobState.QUEUED: "job.queued",
    JobState.RUNNING: "job.started",
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}


def check_transition(job_id: str, old: JobState | str, new: JobState | str) -> JobState:
    """Return ``new`` as a :class:`JobState` when ``old -> new`` is allowed.

    Raises:
        Conflict: the job is in a state that does not allow it (e.g. it already finished).
    """
    old_s, new_s = JobState(old), JobState(new)
    if new_s not in TRANSITIONS[old_s]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old_s])) or "none (it has finished)"
        raise Conflict(f"job {job_id} is {old_s.value}: it cannot become {new_s.value} "
                       f"(allowed from {old_s.value}: {allowed})", field="state", code="job_state")
    return new_s
