"""What a job may cost: a ceiling per job and a budget per user per hour, in megapixel-steps.

A job's cost is ``count x steps x width x height / 10**6`` (one image of 1024x1024 at 30 steps
costs about 31). The separate maxima (count, steps, width, height) still let one job of 100
images at 4096x4096 and 1000 steps hold a device for days; the ceiling per job refuses such a
job outright (400), and the hourly budget stops one user from filling the devices with many
jobs that are each allowed (429 with ``Retry-After``: when enough of the user's last hour has
passed). A third, optional quota counts images per user per day (``limits.max_images_per_user_day``,
also 429 with ``Retry-After``). The worker's wall-clock limit per image (``limits.max_seconds_per_image``, see
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
#: the window of the images-per-day quota
DAY_SECONDS = 86400.0


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
    """The per-job ceiling, the per-user hourly budget and the per-user daily image quota (0 turns each off).

    Args:
        per_job: most megapixel-steps one job may cost (``limits.max_megapixel_steps_per_job``).
        per_user_hour: most megapixel-steps one user may queue within an hour
            (``limits.max_megapixel_steps_per_user_hour``).
        clock: seconds, monotonic (tests pass their own).
        images_per_user_day: most images one user may queue within a day (``limits.max_images_per_user_day``).
    """

    def __init__(self, per_job: float, per_user_hour: float, clock: Callable[[], float] = time.monotonic,
                 images_per_user_day: int = 0) -> None:
        self.per_job = per_job
        self.per_user_hour = per_user_hour
        self.images_per_user_day = images_per_user_day
        self._clock = clock
        self._lock = threading.Lock()
        #: per user: (when, megapixel-steps) of the last hour's charges
        self._spent: dict[str, collections.deque[tuple[float, float]]] = {}
        #: per user: (when, images, megapixel-steps) of the last day's charges
        self._images: dict[str, collections.deque[tuple[float, int, float]]] = {}

    @classmethod
    def from_limits(cls, limits: Any) -> CostBudget:
        """The budget the config's ``limits`` section sets."""
        return cls(limits.max_megapixel_steps_per_job, limits.max_megapixel_steps_per_user_hour,
                   images_per_user_day=limits.max_images_per_user_day)

    def charge(self, user: str, cost: float, what: dict[str, Any], images: int = 0) -> None:
        """Check ``cost`` against both limits and, when it fits, count it against ``user``'s hour.

        Args:
            user: who queues.
            cost: the job's megapixel-steps.
            what: the numbers the cost came from, named in the message.
            images: the images the job makes, counted against the daily quota.

        Raises:
            InvalidInput: over the per-job ceiling (the job can never run as it is).
            OverBudget: over the user's hourly budget or daily images (it can, later).
        """
        sizes = ", ".join(f"{k} {v}" for k, v in what.items())
        if self.per_job and cost > self.per_job:
            raise InvalidInput(f"the job costs {cost:,.0f} megapixel-steps ({sizes}), over the limit of "
                               f"{self.per_job:,.0f} per job (limits.max_megapixel_steps_per_job): make fewer, "
                               "smaller images or use fewer steps", field="count", code="job_too_costly")
        self._charge_images(user, images, cost)
        try:
            self._charge_hour(user, cost, sizes)
        except MultigenError:
            self._take_back_images(user, cost)  # a refused job is not charged
            raise

    def _charge_hour(self, user: str, cost: float, sizes: str) -> None:
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

    def _charge_images(self, user: str, images: int, cost: float) -> None:
        """Count ``images`` against the user's day, or raise (InvalidInput: more than a day's quota at once)."""
        quota = self.images_per_user_day
        if not quota or not images:
            return
        if images > quota:
            raise InvalidInput(f"the job makes {images} images, more than a user may queue in a day ({quota}, "
                               "limits.max_images_per_user_day)", field="count", code="job_too_costly")
        with self._lock:
            now = self._clock()
            made = self._images.setdefault(user, collections.deque())
            while made and made[0][0] <= now - DAY_SECONDS:
                made.popleft()
            total = sum(n for _, n, _ in made)
            if total + images > quota:
                excess, freed, retry = total + images - quota, 0, int(DAY_SECONDS)
                for at, n, _ in made:
                    freed += n
                    if freed >= excess:
                        retry = max(1, math.ceil(at + DAY_SECONDS - now))
                        break
                raise OverBudget(f"user {user!r} has queued {total} images in the last day; {images} more would pass "
                                 f"the quota of {quota} (limits.max_images_per_user_day): retry in {retry} s", retry,
                                 field="count")
            made.append((now, images, cost))

    def refund(self, user: str, cost: float) -> None:
        """Take back the latest charge of ``cost`` (the job was refused after it was charged)."""
        self._take_back_images(user, cost)
        with self._lock:
            spent = self._spent.get(user)
            for i in range(len(spent or ()) - 1, -1, -1):
                if spent[i][1] == cost:  # type: ignore[index]
                    del spent[i]  # type: ignore[union-attr]
                    return

    def _take_back_images(self, user: str, cost: float) -> None:
        with self._lock:
            made = self._images.get(user)
            for i in range(len(made or ()) - 1, -1, -1):
                if made[i][2] == cost:  # type: ignore[index]
                    del made[i]  # type: ignore[union-attr]
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
