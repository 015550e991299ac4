"""Which queued job a free worker runs next: fair across users, with model affinity.

Pure logic, no threads and no I/O (the service calls it under its own lock):

* **round-robin by user**: the users take turns; the user served longest ago (or never) goes
  next, so a user who just ran waits for the others even when their queue had emptied;
* **priority orders a user's own jobs** (then arrival): it never moves a job ahead of another
  user's turn, so queueing many jobs at priority 100 gains nothing over other users;
* **model affinity**: a worker that already holds some models may take a later user's turn
  when that user's head job uses one of them (a load saved), but a user passed over this
  way ``max_affinity_skips`` times is served next whatever the worker holds, so affinity
  never starves anyone.
* **bounded**: past ``max_jobs`` (or ``max_jobs_per_user``) :meth:`FairQueue.push` raises
  :class:`QueueFull` instead of blocking or dropping work.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Collection

from .errors import QueueFull

#: how often a user's turn may be given away for model affinity before it must be honoured
DEFAULT_MAX_AFFINITY_SKIPS = 2


@dataclass
class QueuedJob:
    """What the scheduler knows of a queued job."""

    job_id: str
    user: str
    model: str
    priority: int = 0
    seq: int = field(default=0, compare=False)  # arrival order, set by push() unless given

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class FairQueue:
    """The bounded, fair job queue.

    Args:
        max_jobs: most queued jobs in all.
        max_jobs_per_user: most queued jobs of one user.
        max_affinity_skips: see the module docstring.
    """

    def __init__(self, max_jobs: int = 1000, max_jobs_per_user: int | None = None,
                 max_affinity_skips: int = DEFAULT_MAX_AFFINITY_SKIPS) -> None:
        self.max_jobs = max_jobs
        self.max_jobs_per_user = max_jobs_per_user
        self.max_affinity_skips = max_affinity_skips
        self._by_user: dict[str, list[QueuedJob]] = {}
        # a user's turn: (when last served, 0 if never; when they joined the queue), smallest first
        self._served: dict[str, int] = {}
        self._joined: dict[str, int] = {}
        self._ticks = itertools.count(1)
        self._skips: dict[str, int] = collections.defaultdict(int)
        self._jobs: dict[str, QueuedJob] = {}
        self._seq = itertools.count(1)
        self._order_cache: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def count(self, user: str) -> int:
        """Queued jobs of ``user``."""
        return len(self._by_user.get(user, ()))

    def check_room(self, user: str, n: int = 1) -> None:
        """Raise :class:`QueueFull` when ``n`` more jobs of ``user`` would not fit."""
        if len(self._jobs) + n > self.max_jobs:
            raise QueueFull(f"queue full: {len(self._jobs)} jobs are queued, the limit is "
                            f"limits.max_queued_jobs = {self.max_jobs}; retry when some have run",
                            field="queue")
        if self.max_jobs_per_user is not None and self.count(user) + n > self.max_jobs_per_user:
            raise QueueFull(f"queue full for user {user!r}: {self.count(user)} jobs are queued, the limit is "
                            f"limits.max_queued_jobs_per_user = {self.max_jobs_per_user}", field="queue")

    def push(self, job: QueuedJob, force: bool = False) -> int:
        """Queue ``job``; returns its 0-based position.

        Args:
            job: the job; its ``seq`` is set unless it already has one (restored jobs keep theirs).
            force: skip the bounds (jobs restored from the store after a restart are never refused).

        Raises:
            QueueFull: past ``max_jobs`` or ``max_jobs_per_user``.
        """
        if job.job_id in self._jobs:
            raise ValueError(f"job {job.job_id} is already queued")
        if not force:
            self.check_room(job.user)
        if not job.seq:
            job.seq = next(self._seq)
        else:  # keep later arrivals after restored ones
            self._seq = itertools.count(max(job.seq + 1, next(self._seq)))
        jobs = self._by_user.setdefault(job.user, [])
        jobs.append(job)
        jobs.sort(key=QueuedJob.sort_key)
        if job.user not in self._joined:
            self._joined[job.user] = next(self._ticks)
        self._jobs[job.job_id] = job
        self._order_cache = None
        return self.position(job.job_id)  # type: ignore[return-value]

    def remove(self, job_id: str) -> QueuedJob | None:
        """Take a job out (cancelled); returns it, or None when it was not queued."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        jobs = self._by_user[job.user]
        jobs.remove(job)
        if not jobs:
            self._drop_user(job.user)
        self._order_cache = None
        return job

    def _drop_user(self, user: str) -> None:
        del self._by_user[user]
        del self._joined[user]
        self._skips.pop(user, None)

    def _turns(self) -> list[str]:
        """Users with queued jobs, next turn first."""
        return sorted(self._by_user, key=lambda u: (self._served.get(u, 0), self._joined[u]))

    def _candidates(self) -> list[QueuedJob]:
        """Each user's head job (their highest priority, then oldest), in turn order."""
        return [self._by_user[u][0] for u in self._turns()]

    def pop(self, held_models: Collection[str] = ()) -> QueuedJob | None:
        """The next job for a worker holding ``held_models``, removed from the queue; None when empty."""
        candidates = self._candidates()
        if not candidates:
            return None
        chosen = candidates[0]
        if chosen.model not in held_models and self._skips[chosen.user] < self.max_affinity_skips:
            for i, cand in enumerate(candidates[1:], start=1):
                if cand.model in held_models:
                    if all(self._skips[c.user] < self.max_affinity_skips for c in candidates[:i]):
                        for c in candidates[:i]:
                            self._skips[c.user] += 1
                        chosen = cand
                    break
        self._take(chosen)
        return chosen

    def _take(self, job: QueuedJob) -> None:
        del self._jobs[job.job_id]
        jobs = self._by_user[job.user]
        jobs.remove(job)
        self._skips[job.user] = 0
        self._served[job.user] = next(self._ticks)
        if not jobs:
            self._drop_user(job.user)
        self._order_cache = None

    def order(self) -> list[str]:
        """Job ids in the order they would run if no model affinity applied."""
        clone = FairQueue(max_jobs=self.max_jobs)
        clone._by_user = {u: list(js) for u, js in self._by_user.items()}
        clone._served, clone._joined = dict(self._served), dict(self._joined)
        clone._ticks = itertools.count(max([0, *self._served.values(), *self._joined.values()]) + 1)
        clone._jobs = dict(self._jobs)
        out = []
        while True:
            job = clone.pop()
            if job is None:
                return out
            out.append(job.job_id)

    def position(self, job_id: str) -> int | None:
        """0-based place of a queued job in :meth:`order`; None when it is not queued."""
        if job_id not in self._jobs:
            return None
        if self._order_cache is None:
            self._order_cache = {j: i for i, j in enumerate(self.order())}
        return self._order_cache.get(job_id)

    def reset(self, jobs: list[QueuedJob], served: dict[str, int]) -> None:
        """Become a mirror of a queue kept elsewhere (the shared store: cluster.py): ``jobs`` in arrival order,
        ``served`` each user's last turn (a tick, as the store's ``user_turns``); a user joins at the
        arrival of their oldest queued job, as claims.HEADS_SQL orders them."""
        self._by_user, self._jobs, self._skips = {}, {}, collections.defaultdict(int)
        self._served, self._joined = dict(served), {}
        for job in jobs:
            self._by_user.setdefault(job.user, []).append(job)
            self._jobs[job.job_id] = job
            self._joined.setdefault(job.user, job.seq)
        for user_jobs in self._by_user.values():
            user_jobs.sort(key=QueuedJob.sort_key)
        top = max([0, *self._served.values(), *self._joined.values()])
        self._ticks, self._seq = itertools.count(top + 1), itertools.count(top + 1)
        self._order_cache = None

    def models(self) -> set[str]:
        """Models of the queued jobs (a worker may preload or keep them)."""
        return {j.model for j in self._jobs.values()}
