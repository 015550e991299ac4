"""``GenerationService``: what the HTTP API needs of the service, as a typed Protocol.

:class:`~multigen.service.serviceThread.ServiceThread` is the implementation; the API
(``multigen.service.api``) is written against this Protocol only, so the calls it makes are
listed in one place and a test can check that ServiceThread provides each of them.

The service checks what it is given and raises :class:`~multigen.service.errors.MultigenError`
subclasses (with ``code``, ``http_status`` and ``field``); the API lets them reach its one
error handler. Sessions, jobs and images are plain dicts in API.md's shapes (``Session``,
``Job``, ``Image``), with no server file paths in them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable


class ServiceEvent(TypedDict):
    """One event of the service's bus (``job.queued``, ``job.progress``, ``image.created``, ...)."""

    id: int  # increasing: an SSE client resumes after it with ``Last-Event-ID``
    type: str
    data: dict[str, Any]
    session_id: str | None  # None for service-wide events (``service.stopped``)
    time: float


@runtime_checkable
class EventSubscription(Protocol):
    """One reader's stream of events."""

    def get(self, timeout: float | None = None) -> ServiceEvent | None:
        """The next event, or None after ``timeout`` seconds or once closed."""
        ...

    def close(self) -> None:
        """Stop receiving events; a reader blocked in :meth:`get` wakes up."""
        ...

    @property
    def closed(self) -> bool:
        """True once closed (by the reader, or by the service when it stops)."""
        ...


@runtime_checkable
class GenerationService(Protocol):
    """The service calls of the API, the event stream and ``/metrics``.

    Lookups of unknown ids raise ``NotFound``; bad input raises ``InvalidInput`` naming the field;
    limits raise ``QueueFull``; a closed session or a finished job raises ``Conflict``.
    """

    # ---- sessions
    def create_session(self, user: str, project: str, pipe: str, model: str,
                       loras: list[str | dict[str, Any]] | None = None) -> dict[str, Any]:
        """Open a session of ``user``; returns the ``Session``.

        Raises:
            InvalidInput: a bad name, an unknown pipe/model/LoRA (naming the known ones), a LoRA for
                another model family, a ControlNet pipe with no ControlNet for the model.
            QueueFull: the user holds the most open sessions allowed.
        """
        ...

    def get_session(self, session_id: str) -> dict[str, Any]:
        """The ``Session``. Raises NotFound."""
        ...

    def list_sessions(self, user: str | None = None, project: str | None = None,
                      state: str | None = None) -> list[dict[str, Any]]:
        """Sessions, oldest first, optionally of one user/project/state."""
        ...

    def close_session(self, session_id: str) -> dict[str, Any]:
        """Close a session (again is harmless): queued jobs cancelled, the running one stops; returns it."""
        ...

    # ---- jobs
    def queue_gen(self, session_id: str, *, images: list[Any] | None = None, prompt: Any = "",
                  count: int | None = None, seeds: list[int] | None = None, negative_prompt: Any = None,
                  priority: int = 0, **setup_params: Any) -> dict[str, Any]:
        """Queue a job of ``count`` images; returns ``{"job_id", "position", "seeds", "count", "job"}``.

        Raises:
            NotFound: unknown session. Conflict: the session is closed.
            InvalidInput: a bad parameter (naming it). QueueFull: the queue is full.
        """
        ...

    def get_job(self, job_id: str) -> dict[str, Any]:
        """The ``Job``. Raises NotFound."""
        ...

    def list_jobs(self, session_id: str, state: str | None = None) -> list[dict[str, Any]]:
        """A session's jobs in queue order. Raises NotFound."""
        ...

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (queued: at once, running: at its next step); returns it.

        Raises:
            NotFound: unknown job. Conflict: already finished (code ``job_finished``).
        """
        ...

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview (JPEG bytes) of a running job, else None."""
        ...

    # ---- images
    def list_images(self, session_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """A session's ``Image`` records in index order, those after index ``after`` when given."""
        ...

    def get_image(self, image_id: str) -> dict[str, Any]:
        """The ``Image``. Raises NotFound."""
        ...

    def image_file(self, image_id: str) -> Path:
        """The image's PNG file (its JSON sidecar lies next to it). Raises NotFound."""
        ...

    # ---- the service
    def queue_info(self) -> dict[str, Any]:
        """``{"queued", "running", "workers": [{"device", "state", "job_id", "model", ...}]}``."""
        ...

    def devices(self) -> list[dict[str, Any]]:
        """The workers' devices: ``[{"device", "threads", "dtype", "state"}]``."""
        ...

    def subscribe(self, session_id: str | None = None, last_event_id: int | None = None) -> EventSubscription:
        """Events of one session (or all), after replaying those past ``last_event_id`` when given."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics: ``images_written``, ``image_seconds {count, sum}``, ``cache {loads, hits}``."""
        ...


#: the names of GenerationService's methods
SERVICE_METHODS = tuple(name for name, member in vars(GenerationService).items()
                        if callable(member) and not name.startswith("_"))


def missing_methods(service: object) -> list[str]:
    """The :class:`GenerationService` methods ``service`` lacks (none for a complete one)."""
    return [name for name in SERVICE_METHODS if not callable(getattr(service, name, None))]


__all__ = ["SERVICE_METHODS", "EventSubscription", "GenerationService", "ServiceEvent", "missing_methods"]
