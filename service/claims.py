"""Claiming jobs under a lease: the rule both stores apply in one transaction (:mod:`.store`, :mod:`.pgstore`).

A worker on any host calls ``store.claim_job(worker, held_models, lease_seconds)``; the store picks
the next queued job by the same rule as the in-process :class:`~multigen.service.scheduling.FairQueue`
and marks it ``running`` with a lease (``jobs.worker``, ``jobs.lease_until``, ``jobs.claimed_at``):

* **round-robin by user**: the users take turns, the user served longest ago (or never) first; among
  users never served, the one whose oldest queued job came first (FairQueue: who joined the queue first);
* **priority, then arrival** order a user's own jobs;
* **model affinity**: a job of a model the worker holds may take a later user's turn, but a user passed
  over ``max_affinity_skips`` times is served next whatever the worker holds.

The turn state lives in the ``user_turns`` table (``served``: a tick, 0 for never; ``skips``). The
choice itself is :func:`choose`, pure Python over the users' head jobs (:data:`HEADS_SQL`), so it is the
same code on both stores and the tests compare it with FairQueue directly.

Leases: the worker renews its job's lease (``renew_lease``) well before ``lease_until``;
``expire_leases`` puts running jobs whose lease ended back to ``queued`` (seq and seeds kept: they resume
from their first unwritten image). A lease is *lost* once it was expired (or the job was released): then
``renew_lease`` answers False and ``reserve_image``/``complete_image`` with ``worker=`` raise
:class:`LeaseLost`, so a worker that lost its job never records one of its images.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Collection, Mapping, NamedTuple, Sequence

from .errors import MultigenError

#: the users' head jobs (their highest priority, then oldest queued job), in turn order: the user served
#: longest ago (0: never) first, then the one whose oldest queued job came first. One index lookup per
#: user with the partial index ``jobs_queued`` ("user", priority DESC, seq) WHERE state = 'queued' (both
#: stores' migrations). ``{skip}``: more conditions on the queued jobs, written for the aliases q and k
#: (PostgreSQL: the ids passed over because another transaction locks them)
HEADS_SQL = """
SELECT j.id, j."user", j.model, COALESCE(t.served, 0) AS served, COALESCE(t.skips, 0) AS skips
FROM (SELECT q."user", MIN(q.seq) AS joined FROM jobs q WHERE q.state = 'queued'{skip_q} GROUP BY q."user") u
JOIN jobs j ON j.id = (SELECT k.id FROM jobs k WHERE k.state = 'queued' AND k."user" = u."user"{skip_k}
                       ORDER BY k.priority DESC, k.seq LIMIT 1)
LEFT JOIN user_turns t ON t."user" = u."user"
ORDER BY COALESCE(t.served, 0), u.joined
"""


class Head(NamedTuple):
    """A user's next job, with the user's turn state."""

    id: str
    user: str
    model: str
    served: int
    skips: int


class LeaseLost(MultigenError):
    """The worker's lease on the job is gone (expired and requeued, or released): it must stop the job
    and record none of its images."""

    code = "lease_lost"
    http_status = 409


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as it last reported itself (``heartbeat``): times are ISO 8601 UTC text."""

    id: str
    host: str
    device: str
    #: the models it holds (loaded on its device)
    models: list[str]
    started_at: str
    heartbeat_at: str


def choose(heads: Sequence[Head], held_models: Collection[str], max_affinity_skips: int
           ) -> tuple[Head, list[str]] | None:
    """The job to claim among ``heads`` (in turn order) and the users passed over for model affinity
    (their ``skips`` grow by one); None when nothing is queued. FairQueue.pop's rule, step for step."""
    if not heads:
        return None
    first = heads[0]
    if first.model not in held_models and first.skips < max_affinity_skips:
        for i, cand in enumerate(heads[1:], start=1):
            if cand.model in held_models:
                if all(h.skips < max_affinity_skips for h in heads[:i]):
                    return cand, [h.user for h in heads[:i]]
                break
    return first, []


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(when: dt.datetime | str | None) -> str | None:
    """A time as the ISO 8601 UTC text the stores keep (microseconds, ``+00:00``): text sorts as time."""
    if when is None or isinstance(when, str):
        return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def worker_record(row: Mapping[str, Any]) -> WorkerRecord:
    models = row["models"]
    return WorkerRecord(id=row["id"], host=row["host"], device=row["device"],
                        models=json.loads(models) if isinstance(models, str) else list(models),
                        started_at=iso(row["started_at"]) or "", heartbeat_at=iso(row["heartbeat_at"]) or "")
