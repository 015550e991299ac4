"""Counters of the service for status pages and Prometheus (``ServiceThread.stats()``)."""
from __future__ import annotations

import collections
import threading
from typing import Any

#: recent per-image and per-step times kept for percentiles
RECENT = 256


class ServiceStats:
    """Images written, jobs finished by state, generation times per image and per step.

    ``recent`` lists keep the last :data:`RECENT` observations (for percentiles or a
    histogram); ``count`` and ``sum`` are totals since start.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.images_written = 0
        self.jobs_finished: collections.Counter[str] = collections.Counter()
        self.image_seconds: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.image_seconds_sum = 0.0
        self.image_count = 0
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.step_seconds_sum = 0.0
        self.step_count = 0

    def observe_image(self, seconds: float) -> None:
        with self._lock:
            self.image_seconds.append(seconds)
            self.image_seconds_sum += seconds
            self.image_count += 1

    def observe_step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds.append(seconds)
            self.step_seconds_sum += seconds
            self.step_count += 1

    def job_finished(self, state: str) -> None:
        with self._lock:
            self.jobs_finished[state] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"images_written": self.images_written, "jobs_finished": dict(self.jobs_finished),
                    "image_seconds": {"count": self.image_count, "sum": round(self.image_seconds_sum, 4),
                                      "recent": list(self.image_seconds)},
                    "step_seconds": {"count": self.step_count, "sum": round(self.step_seconds_sum, 4),
                                     "recent": list(self.step_seconds)}}
