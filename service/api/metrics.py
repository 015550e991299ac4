"""``GET /metrics``: Prometheus text format, from a registry of the app's own.

A scrape reads counters kept in memory and never the store: a scraper (or anyone, where it needs
no token) could otherwise make the server run queries per session as often as it likes.

- HTTP requests are counted and timed by route template and status as they happen.
- Queue depth (queued, running) and workers come from ``service.queue_info()``; jobs finished by
  state, images written, model loads, cache hits and per-image time from ``service.stats()``
  (counters since the service started), read at scrape time by :class:`ServiceCollector`.
- Open event streams come from the app's stream limiter.
- Step times: the service does not time single steps for others to read, so
  :class:`StepTimer` listens to the ``job.progress`` events and observes, for each event,
  the time since the previous one of the same image divided by the steps done in between.

Who may scrape: with ``server.metrics_token`` set, only ``Authorization: Bearer <it>``; without
it, anyone where the server runs without users, and any user's token where it has users (the
figures show every user's traffic). See docs/security.md.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from ..errors import Unauthorized
from ..jobs import JobState
from ..protocol import EventSubscription, GenerationService, ServiceEvent
from . import auth

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

FINISHED_STATES = tuple(state.value for state in JobState if state.finished)
#: methods counted by name; any other (a client may send any token) is counted as "other"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: events after which a job's step times are measured from its next progress event
JOB_RESTART_EVENTS = frozenset({"job.queued", "job.succeeded", "job.failed", "job.cancelled"})
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceCollector:
    """Reads the service's figures at scrape time (a custom collector: nothing to keep in sync)."""

    def __init__(self, app: Flask):
        self.app = app

    def describe(self):  # no samples at registration: do not call the service then
        return []

    def collect(self):
        try:
            yield from self._collect(self.app.extensions["multigen.service"])
        except Exception:  # a scrape must not fail because the service is busy or stopping
            log.exception("metrics: reading the service failed")
        yield GaugeMetricFamily("multigen_event_streams", "event streams open",
                                value=float(self.app.extensions["multigen.event_streams"].open))

    def _collect(self, service: GenerationService):
        info = service.queue_info()
        depth = GaugeMetricFamily("multigen_queue_jobs", "jobs waiting or running", labels=["state"])
        depth.add_metric(["queued"], float(info["queued"]))
        depth.add_metric(["running"], float(info["running"]))
        yield depth
        workers = GaugeMetricFamily("multigen_workers", "device workers by host and state",
                                    labels=["host", "device", "state"])
        age = GaugeMetricFamily("multigen_worker_heartbeat_age_seconds", "seconds since a worker's last heartbeat "
                                "(PostgreSQL store: every worker of the cluster)", labels=["host", "device", "worker"])
        for w in info["workers"]:
            workers.add_metric([str(w.get("host")), str(w["device"]), str(w["state"])], 1.0)
            if w.get("heartbeat_age_seconds") is not None:
                age.add_metric([str(w.get("host")), str(w["device"]), str(w["id"])], float(w["heartbeat_age_seconds"]))
        yield workers
        yield age

        stats = service.stats()
        finished = CounterMetricFamily("multigen_jobs_finished", "jobs finished since the service started",
                                       labels=["state"])
        for state in FINISHED_STATES:
            finished.add_metric([state], float(stats.get("jobs_finished", {}).get(state, 0)))
        yield finished
        yield CounterMetricFamily("multigen_images_written", "images written since the service started",
                                  value=float(stats["images_written"]))
        yield CounterMetricFamily("multigen_model_loads", "models loaded into the cache",
                                  value=float(stats["cache"]["loads"]))
        yield CounterMetricFamily("multigen_cache_hits", "pipes served from the model cache",
                                  value=float(stats["cache"]["hits"]))
        per_image = stats["image_seconds"]
        yield SummaryMetricFamily("multigen_image_seconds", "generation time per image",
                                  count_value=float(per_image["count"]), sum_value=float(per_image["sum"]))


class StepTimer:
    """Observes denoising step times from ``job.progress`` events, in a thread of its own.

    Args:
        service: whose ``job.progress`` events are timed.
        histogram: where the step times go.
        stop_event: ends the thread when set (the app's ``multigen.stopping``).
    """

    def __init__(self, service: GenerationService, histogram: Histogram, stop_event: threading.Event | None = None):
        self.service = service
        self.histogram = histogram
        self.last: dict[str, tuple[float, int, int]] = {}  # job -> (time, image, step)
        self.stop_event = stop_event or threading.Event()
        self.sub: EventSubscription | None = None
        self.thread = threading.Thread(target=self._run, name="multigen-step-timer", daemon=True)

    def start(self) -> StepTimer:
        """Subscribe (now, so no event is missed) and start listening."""
        self.sub = self.service.subscribe()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def observe(self, event: ServiceEvent, now: float) -> None:
        """Account for one event (public for tests)."""
        kind, data = event["type"], event["data"]
        if kind in JOB_RESTART_EVENTS:  # the job's next progress event starts afresh
            self.last.pop(data["job"]["id"], None)
        if kind != "job.progress":
            return
        job_id, progress = data["job_id"], data["progress"]
        image, step = int(progress["image"]), int(progress["step"])
        prev = self.last.get(job_id)
        self.last[job_id] = (now, image, step)
        if prev is None or prev[1] != image or step <= prev[2]:
            return
        per_step = (now - prev[0]) / (step - prev[2])
        for _ in range(step - prev[2]):
            self.histogram.observe(per_step)

    def _run(self) -> None:
        sub = self.sub
        try:
            while not self.stop_event.is_set() and not sub.closed:
                event = sub.get(timeout=1.0)
                if event is None:
                    continue
                try:
                    self.observe(event, time.monotonic())
                except Exception:  # one odd event must not end the step times for good
                    log.exception("metrics: cannot time event %s", event["type"])
        finally:
            sub.close()


class HttpMetrics:
    """Per-app registry, request counter and latency histogram."""

    def __init__(self, app: Flask):
        self.registry = CollectorRegistry()
        self.requests = Counter("multigen_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("multigen_http_request_seconds", "HTTP request time by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.registry.register(ServiceCollector(app))
        self.step_seconds = Histogram("multigen_step_seconds", "time of one denoising step (from progress events)",
                                      registry=self.registry, buckets=STEP_BUCKETS)
        self.step_timer = StepTimer(app.extensions["multigen.service"], self.step_seconds,
                                    app.extensions["multigen.stopping"]).start()
        app.before_request(self._start)
        app.after_request(self._record)

    @staticmethod
    def _start() -> None:
        g.metrics_start = time.perf_counter()

    def _record(self, response: Response) -> Response:
        # the route template, never the raw path, and known methods only: ids or made-up methods
        # would make one series per request, and the registry would grow without end
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in HTTP_METHODS else "other"
        self.requests.labels(method, route, str(response.status_code)).inc()
        start = g.get("metrics_start")
        if start is not None and response.mimetype != "text/event-stream":
            self.latency.labels(route).observe(time.perf_counter() - start)
        return response


def check_scraper() -> None:
    """Raises Unauthorized unless the request may read the metrics (see the module's docstring)."""
    token = current_app.extensions["multigen.config"].server.metrics_token
    header = request.headers.get("Authorization", "")

    def check() -> None:
        if token:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                raise Unauthorized("/metrics needs `Authorization: Bearer <server.metrics_token>`",
                                   field="Authorization")
        elif auth.auth_enabled():
            auth.user_for_credentials(current_app.extensions["multigen.users"], request.method, request.endpoint,
                                      header, None)

    # failures here count against the client like the API's: /metrics must not be a way around the limit
    current_app.extensions["multigen.guard"].failure_limited(check, header, bool(header), request.remote_addr,
                                                             request.headers.get("X-Forwarded-For"))


@bp.get("/metrics")
def metrics():
    check_scraper()
    registry = current_app.extensions["multigen.metrics"].registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
