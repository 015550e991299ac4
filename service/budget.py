"""What a job may cost: a ceiling per job and a budget per user per hour, in megapixel-steps.

A job's cost is ``count x steps x width x height / 10**6`` (one image of 1024x1024 at 30 steps
costs about 31). The separate maxima (count, steps, width, height) still let one job of 100
images at 4096x4096 and 1000 steps hold a device for days; the ceiling per job refuses such a
job outright (400), and the hourly budget stops one user from filling the devices with many
jobs that are each allowed (429 with ``Retry-After``: when enough of the user's last hour has
passed). The worker's wall-clock limit per image (``limits.max_seconds_per_image``, see
runner.py) catches what an estimate cannot, such as a slow device.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable

from .errors import InvalidInput, MultigenError

#: the window of the per-user budget
HOUR_SECONDS = 3600.0


class OverBudget(MultigenError):
    """The user's hourly budget is spent: retry after ``retry_after`` seconds."""

    code = "over_budget"
    http_status = 429

    def __init__(self, message: str, retry_after: int, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def job_cost(count: int, steps: int, width: int, height: int) -> float:
    """Megapixel-steps of a job."""
    return count * steps * width * height / 1e6


class CostBudget:
    """The per-job ceiling and the per-user hourly budget (0 turns either off).

    Args:
        per_job: most megapixel-steps one job may cost (``limits.max_megapixel_steps_per_job``).
        per_user_hour: most megapixel-steps one user may queue within an hour
            (``limits.max_megapixel_steps_per_user_hour``).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, per_job: float, per_user_hour: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_job = per_job
        self.per_user_hour = per_user_hour
        self._clock = clock
        self._lock = threading.Lock()
        self._spent: dict[str, collections.deque[tuple[float, float]]] = {}

    def charge(self, user: str, cost: float, what: dict[str, Any]) -> None:
        """Check ``cost`` against both limits and, when it fits, count it against ``user``'s hour.

        Args:
            user: who queues.
            cost: the job's megapixel-steps.
            what: the numbers the cost came from, named in the message.

        Raises:
            InvalidInput: over the per-job ceiling (the job can never run as it is).
            OverBudget: over the user's hourly budget (it can, later).
        """
        sizes = ", ".join(f"{k} {v}" for k, v in what.items())
        if self.per_job and cost > self.per_job:
            raise InvalidInput(f"the job costs {cost:,.0f} megapixel-steps ({sizes}), over the limit of "
                               f"{self.per_job:,.0f} per job (limits.max_megapixel_steps_per_job): make fewer, "
                               "smaller images or use fewer steps", field="count", code="job_too_costly")
        if not self.per_user_hour:
            return
        if cost > self.per_user_hour:
            raise InvalidInput(f"the job costs {cost:,.0f} megapixel-steps ({sizes}), more than a user may queue in "
                               f"an hour ({self.per_user_hour:,.0f}, limits.max_megapixel_steps_per_user_hour): "
                               "split it into smaller jobs", field="count", code="job_too_costly")
        with self._lock:
            now = self._clock()
            spent = self._spent.setdefault(user, collections.deque())
            while spent and spent[0][0] <= now - HOUR_SECONDS:
                spent.popleft()
            total = sum(c for _, c in spent)
            if total + cost > self.per_user_hour:
                retry = self._retry_after(spent, total + cost - self.per_user_hour, now)
                raise OverBudget(f"user {user!r} has queued {total:,.0f} megapixel-steps in the last hour; this job "
                                 f"({cost:,.0f}: {sizes}) would pass the limit of {self.per_user_hour:,.0f} per hour "
                                 f"(limits.max_megapixel_steps_per_user_hour): retry in {retry} s", retry)
            spent.append((now, cost))

    def refund(self, user: str, cost: float) -> None:
        """Take back the latest charge of ``cost`` (the job was refused after it was charged)."""
        with self._lock:
            spent = self._spent.get(user)
            for i in range(len(spent or ()) - 1, -1, -1):
                if spent[i][1] == cost:  # type: ignore[index]
                    del spent[i]  # type: ignore[union-attr]
                    return

    @staticmethod
    def _retry_after(spent: collections.deque[tuple[float, float]], excess: float, now: float) -> int:
        """Seconds until the oldest charges leave the window and free at least ``excess``."""
        freed = 0.0
        for at, cost in spent:
            freed += cost
            if freed >= excess:
                return max(1, math.ceil(at + HOUR_SECONDS - now))
        return int(HOUR_SECONDS)  # the job alone is over the budget: it waits a whole window
