"""A small Python client of the multigen HTTP API, for scripts and desktop tools.

Example::

    from multigen.service.client import MultigenClient

    mg = MultigenClient("http://127.0.0.1:8000", token=None)
    session = mg.create_session(project="demo", pipe="prompt2image", model="tiny-sd")
    job = mg.create_job(session["id"], prompt="a lighthouse", count=2, steps=4, width=64, height=64)
    job = mg.wait_job(job["id"])
    for image in mg.list_images(session["id"]):
        open(f"{image['index']}.png", "wb").write(mg.download_image(image["id"]))
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

FINISHED = ("succeeded", "failed", "cancelled")


class MultigenAPIError(Exception):
    """An error answer of the API: its HTTP status and the ``{"error": {...}}`` fields."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


class MultigenClient:
    """One method per endpoint of API.md.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        token: bearer token when the server has users.
        timeout: seconds per request.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> MultigenClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send a request; an error answer raises :class:`MultigenAPIError`."""
        kwargs.setdefault("timeout", self.timeout)
        r = self.http.request(method, self.base_url + path, **kwargs)
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": r.text[:300]}
            raise MultigenAPIError(r.status_code, err.get("code", ""), err.get("message", ""), err.get("field"))
        return r

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # --- service
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/health")

    def models(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/models")

    def queue(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/queue")

    def openapi(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/openapi.json")

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text

    # --- sessions
    def create_session(self, project: str, pipe: str, model: str, loras: list[Any] | None = None,
                       user: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"project": project, "pipe": pipe, "model": model, "loras": loras or []}
        if user:
            body["user"] = user
        return self._json("POST", "/api/v1/sessions", json=body)["session"]

    def list_sessions(self, project: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("project", project), ("state", state)) if v}
        return self._json("GET", "/api/v1/sessions", params=params)["sessions"]

    def get_session(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/sessions/{session_id}")["session"]

    def close_session(self, session_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/v1/sessions/{session_id}")["session"]

    # --- jobs
    def create_job(self, session_id: str, prompt: Any, **params: Any) -> dict[str, Any]:
        """Queue a job; ``params`` are the job fields of API.md (count, seeds, steps, images, ...)."""
        return self._json("POST", f"/api/v1/sessions/{session_id}/jobs", json={"prompt": prompt, **params})["job"]

    def list_jobs(self, session_id: str, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else {}
        return self._json("GET", f"/api/v1/sessions/{session_id}/jobs", params=params)["jobs"]

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/jobs/{job_id}")["job"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/jobs/{job_id}/cancel")["job"]

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview JPEG of a running job, or None when there is none yet."""
        try:
            return self.request("GET", f"/api/v1/jobs/{job_id}/preview").content
        except MultigenAPIError as e:
            if e.status == 404 and e.code == "no_preview":
                return None
            raise

    def wait_job(self, job_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict[str, Any]:
        """Poll until the job is finished; returns it.

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["state"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)

    # --- images
    def list_images(self, session_id: str, after: int | None = None) -> list[dict[str, Any]]:
        params = {} if after is None else {"after": after}
        return self._json("GET", f"/api/v1/sessions/{session_id}/images", params=params)["images"]

    def download_image(self, image_id: str, format: str = "png") -> bytes:
        return self.request("GET", f"/api/v1/images/{image_id}", params={"format": format}).content

    def image_metadata(self, image_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/images/{image_id}/metadata")

    # --- uploads
    def upload(self, image: str | Path | bytes | BinaryIO, filename: str = "image.png") -> dict[str, Any]:
        """Upload a PNG, JPEG or WebP image (a path, bytes or a binary file); returns ``{id, width, ...}``."""
        if isinstance(image, (str, Path)):
            with open(image, "rb") as f:
                data = f.read()
            filename = Path(image).name
        elif isinstance(image, bytes):
            data = image
        else:
            data = image.read()
        return self._json("POST", "/api/v1/uploads", files={"file": (filename, data)})["upload"]

    # --- events
    def iter_events(self, session_id: str | None = None, last_event_id: str | None = None,
                    timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield events ``{"type", "data", "id"}`` from the event stream until it ends or ``timeout`` passes.

        Heartbeat comments are skipped. Stop early by breaking out of the loop.
        """
        params = {"session_id": session_id} if session_id else {}
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        deadline = None if timeout is None else time.monotonic() + timeout
        read_timeout = 20.0 if timeout is None else min(20.0, timeout)
        with self.request("GET", "/api/v1/events", params=params, headers=headers, stream=True,
                          timeout=(self.timeout, read_timeout)) as r:
            try:
                yield from _parse_events(r.iter_lines(decode_unicode=True), deadline)
            except requests.exceptions.ConnectionError:  # a read timeout while streaming
                if deadline is None or time.monotonic() < deadline:
                    raise


def _parse_events(lines: Iterator[str], deadline: float | None) -> Iterator[dict[str, Any]]:
    event: dict[str, Any] = {}
    for line in lines:
        if deadline is not None and time.monotonic() > deadline:
            return
        if line is None or line.startswith(":"):
            continue
        if line == "":
            if "type" in event:
                yield {"type": event["type"], "data": json.loads(event.get("data") or "null"), "id": event.get("id")}
            event = {}
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            event["type"] = value
        elif key == "data":
            event["data"] = event.get("data", "") + value
        elif key == "id":
            event["id"] = value
