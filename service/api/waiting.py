"""Jobs for the HTTP dialects whose calls wait for their images: AUTOMATIC1111's ``/sdapi/v1`` and
OpenAI's Images API.

Those servers answer a generation call with its images. Here each call is an ordinary job in an
*implicit session* of the caller (project ``a1111`` or ``openai``; one session per pipe, model and
LoRA set, reused while it is open), so it is fair-queued with everyone else's work, survives a
restart (the job resumes and its images stay in the session; the waiting call itself ends with its
connection), shows in the session API, the events and the web page, and counts in /metrics.

The call waits for its job as those servers do, at most ``server.sync_call_timeout`` seconds: past
it the job is cancelled and the call fails with :class:`CallTimedOut`. A client that disconnects
while it waits cancels its job (waitress tells, with ``channel_request_lookahead`` on). Only the
service's public calls are used (:class:`~multigen.service.protocol.GenerationService`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import current_app, request

from ..errors import Conflict, MultigenError
from ..protocol import GenerationService
from .context import config

log = logging.getLogger(__name__)

#: how often a waiting call looks at its job (seconds): a job view is one store read
POLL_SECONDS = 0.05
#: job states after which nothing more happens
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class CallTimedOut(MultigenError):
    """A waiting call's job ran past ``server.sync_call_timeout`` (it was cancelled)."""

    code = "timeout"
    http_status = 504


class ServerStopping(MultigenError):
    """The server is stopping while a call waits: the job is kept (it resumes at the next start) and the
    call ends now, before the server closes its connection (which would look like a client that left)."""

    code = "service_stopping"
    http_status = 503


class ClientGone(MultigenError):
    """The client disconnected while its call waited (its job was cancelled); nobody reads the answer."""

    code = "client_closed_request"
    http_status = 499


def _same_loras(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return [(x["name"], float(x["weight"])) for x in a] == [(x["name"], float(x["weight"])) for x in b]


def implicit_session(svc: GenerationService, user: str, project: str, pipe: str, model: str,
                     loras: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The caller's open session of ``project`` for this pipe, model and LoRA set, opened when there is none.

    Raises:
        InvalidInput: an unknown pipe, model or LoRA, or a LoRA of another family (naming the field).
    """
    loras = [{"name": x["name"], "weight": float(x.get("weight", 1.0))} for x in loras or []]
    for session in svc.list_sessions(user=user, project=project, state="open"):
        if session["pipe"] == pipe and session["model"] == model and _same_loras(session["loras"], loras):
            return session
    return svc.create_session(user, project, pipe, model, loras)


def client_disconnected() -> Callable[[], bool]:
    """Whether the current request's client has gone (always False where the server cannot tell)."""
    check = request.environ.get("waitress.client_disconnected")
    return check if callable(check) else (lambda: False)


def wait_for_job(svc: GenerationService, job_id: str, timeout: float | None = None,
                 gone: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Wait until the job finishes and return it (``state`` succeeded, failed or cancelled).

    Args:
        timeout: seconds; default ``server.sync_call_timeout``.
        gone: whether the caller disconnected (default: :func:`client_disconnected`).

    Raises:
        CallTimedOut: the job ran past the timeout (it is cancelled).
        ClientGone: the client disconnected (the job is cancelled).
        ServerStopping: the server is stopping (the job is kept and resumes at the next start).
    """
    timeout = config().server.sync_call_timeout if timeout is None else timeout
    gone = gone or client_disconnected()
    deadline = time.monotonic() + timeout
    stopping = current_app.extensions.get("multigen.stopping")
    while True:
        job = svc.get_job(job_id)
        if job["state"] in FINISHED:
            return job
        if stopping is not None and stopping.is_set():  # not cancelled: it resumes after the restart
            raise ServerStopping(f"the server is stopping; job {job_id} is kept and resumes when it starts again "
                                 f"(GET /api/v1/jobs/{job_id})")
        if gone():
            _cancel(svc, job_id)
            log.info("job %s cancelled: its client disconnected while waiting", job_id)
            raise ClientGone(f"the client of job {job_id} disconnected; the job was cancelled")
        if time.monotonic() > deadline:
            _cancel(svc, job_id)
            raise CallTimedOut(f"job {job_id} did not finish within server.sync_call_timeout ({timeout:g} s); it was "
                               "cancelled: ask for fewer or smaller images, or raise the timeout", field="timeout")
        time.sleep(POLL_SECONDS)


def _cancel(svc: GenerationService, job_id: str) -> None:
    try:
        svc.cancel_job(job_id)
    except Conflict:  # it finished meanwhile
        pass


def current_job(svc: GenerationService, user: str, project: str) -> dict[str, Any] | None:
    """The caller's job in ``project`` that runs now, else the one that will run first, else None.

    Only the caller's own sessions are looked at: another user's job never shows here.
    """
    running, queued = [], []
    for session in svc.list_sessions(user=user, project=project):
        for state, found in (("running", running), ("queued", queued)):
            found.extend(svc.list_jobs(session["id"], state=state))
    if running:
        return running[0]
    return min(queued, key=lambda j: j.get("position") or 0) if queued else None


def job_images(svc: GenerationService, job: dict[str, Any]) -> list[tuple[dict[str, Any], bytes]]:
    """The job's images in order, each with its PNG bytes."""
    out = []
    for image in sorted(job.get("images") or [], key=lambda im: im["index"]):
        out.append((image, svc.image_file(image["id"]).read_bytes()))
    return out
