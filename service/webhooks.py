"""Webhooks: when a job with a ``webhook_url`` ends, its view and image URLs are POSTed there, signed.

* **Where to** (webhook_targets.py): ``webhooks.allowed_hosts`` in config.yaml (networks, addresses, host
  names and ``*.domain`` patterns; default: loopback only) decides at queue time which URLs a job may name
  (:func:`check_webhook_url`, a 400 naming ``webhook_url``), and again at each delivery, after the
  name is resolved (:func:`allowed_addresses`): a name that resolves to an address outside the
  allowed networks (DNS rebinding) is refused, and the connection goes to the address checked.
  Redirects are not followed.
* **Durable**: a delivery is a row of the store (``webhook_deliveries``), queued when the job's end
  is announced and, at every start, for ended jobs that have a URL and no delivery yet (a crash
  between the two loses nothing). :class:`WebhookSender`, one thread (never a worker, never under
  the ledger's lock), posts due deliveries with a timeout and retries failures with exponential
  backoff up to ``max_attempts``, after which the delivery is ``failed``. Each failure is logged
  and shown on the job (``Job.webhook``).
* **Signed**: ``X-Multigen-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` keyed by
  the job's user's secret (:class:`WebhookSecrets`; docs/features.md shows a receiver's check).
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, InvalidInput
from .events import LOST, EventBus
from .jobs import EVENT_FOR_STATE, JobState
from .records import DeliveryRecord, JobRecord
from .store import Store
from .views import job_view, now_iso
from .webhook_targets import WebhookRefused, WebhookSettings, allowed_addresses

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Multigen-Signature"
#: a receiver should refuse signatures older than this (replays); :func:`verify_signature`'s default
SIGNATURE_TOLERANCE_SECONDS = 300
#: longest wait of the sender between looks at the store (new events wake it sooner)
POLL_SECONDS = 1.0
#: an attempt claimed by a process that then died is tried again this long after its POST would have timed out
CLAIM_MARGIN_SECONDS = 30
#: most characters of a receiver's answer or an error kept on the job
MAX_ERROR_CHARS = 300
END_EVENTS = {EVENT_FOR_STATE[s]: s for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)}


# ---- secrets and signatures -------------------------------------------------------------------
class WebhookSecrets:
    """The secrets webhooks are signed with, kept in the data folder (files only the server reads).

    With users configured (auth on) each user has their own (``webhook-secrets/<user>``), created when
    first needed; without, one server-wide secret (``webhook-secret``) signs every delivery.

    Args:
        data_dir: the data folder.
        per_user: one secret per user (auth on) rather than one for the server.
    """

    def __init__(self, data_dir: Path, per_user: bool) -> None:
        self.data_dir = Path(data_dir)
        self.per_user = per_user
        self.lock = threading.Lock()

    def path(self, user: str) -> Path:
        if not self.per_user:
            return self.data_dir / "webhook-secret"
        if not user or "/" in user or user.startswith("."):  # pragma: no cover - user names are checked
            raise InvalidInput(f"bad user name {user!r}", field="user")
        return self.data_dir / "webhook-secrets" / user

    def get(self, user: str) -> str:
        """The secret of ``user`` (the server's, without users), created on first use."""
        with self.lock:
            path = self.path(user)
            if path.exists():
                return path.read_text().strip()
            return self._write(path)

    def rotate(self, user: str) -> str:
        """A new secret for ``user`` (the server's, without users); the old one stops signing now."""
        with self.lock:
            return self._write(self.path(user))

    @staticmethod
    def _write(path: Path) -> str:
        secret = "whsec_" + secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
        return secret


def admin_secret(config: Any, user: str, rotate: bool = False) -> str:
    """``multigen users webhook-secret NAME [--rotate]``: a user's secret (the server's without users).

    Raises:
        ConfigError: ``user`` is not one of the config's users.
    """
    if config.users and user not in config.users:
        raise ConfigError(str(config.file), f"users.{user}", "no such user",
                          f"use one of: {', '.join(sorted(config.users))}")
    store = WebhookSecrets(config.data_dir, per_user=bool(config.users))
    return store.rotate(user) if rotate else store.get(user)


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Multigen-Signature`` value of ``body``: ``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``."""
    t = int(time.time() if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, body: bytes, header: str, tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
                     now: float | None = None) -> bool:
    """What a receiver checks: the HMAC matches and the timestamp is recent (docs/features.md)."""
    try:
        fields = dict(p.split("=", 1) for p in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


# ---- delivery -----------------------------------------------------------------------------------
def iso_at(t: float) -> str:
    """The unix time ``t`` as the store's ISO 8601 UTC text (ordered like the times themselves)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def backoff(settings: WebhookSettings, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: doubling from ``backoff_seconds``, capped."""
    return min(settings.backoff_seconds * 2 ** max(attempts - 1, 0), settings.backoff_max_seconds)


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the address that was checked (no second DNS lookup between the check and the connection)."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.pinned, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked address; the certificate is checked against the URL's host name."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.pinned = address

    def connect(self) -> None:
        sock = socket.create_connection((self.pinned, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict[str, str], settings: WebhookSettings) -> tuple[int, str]:
    """POST ``body`` to ``url`` at an allowed address; returns the status and the start of the answer.

    Raises:
        WebhookRefused: the host resolves outside the allowed hosts; OSError, http.client errors.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = allowed_addresses(host, port, settings.allowed_hosts)[0]
    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = cls(host, port, address, settings.timeout_seconds)
    try:
        path = parts.path or "/"
        conn.request("POST", path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read(MAX_ERROR_CHARS).decode("utf-8", "replace")
    finally:
        conn.close()


class WebhookSender:
    """The thread that delivers webhooks: due deliveries of the store, one at a time, never under a lock.

    Args:
        store: where deliveries (and the jobs and images they describe) are.
        events: the bus whose job-end events queue deliveries.
        settings: config.yaml's ``webhooks``.
        secrets: the users' signing secrets.
    """

    def __init__(self, store: Store, events: EventBus, settings: WebhookSettings, secrets: WebhookSecrets) -> None:
        self.store = store
        self.events = events
        self.settings = settings
        self.secrets = secrets
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.subscription: Any = None

    def start(self) -> WebhookSender:
        """Queue what a crash left undelivered and start the thread (once)."""
        if self.thread is not None:
            return self
        self.stopping.clear()
        self.subscription = self.events.subscribe()  # before the scan: a job ending meanwhile is seen twice, at most
        self.enqueue_missing()
        self.thread = threading.Thread(target=self.loop, name="webhook-sender", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop the thread (after the POST in progress, at most ``timeout`` seconds); False if it did not end.

        Pending deliveries stay in the store and go out after the next start.
        """
        thread, self.thread = self.thread, None
        if thread is None:
            return True
        self.stopping.set()
        self.subscription.close()
        thread.join(min(timeout or self.settings.timeout_seconds, self.settings.timeout_seconds + 1))
        if thread.is_alive():
            log.warning("webhook sender still busy after %s s: left to end on its own", timeout)
        return not thread.is_alive()

    # -- queueing ------------------------------------------------------------------------------
    def enqueue(self, job: JobRecord) -> bool:
        """Queue the delivery of an ended job with a ``webhook_url`` (idempotent); True when queued now."""
        url = job.params.get("webhook_url")
        state = JobState(job.state)
        if not url or not state.finished:
            return False
        now = now_iso()
        added = self.store.add_delivery(DeliveryRecord(job_id=job.id, user=job.user, url=url,
                                                       event=EVENT_FOR_STATE[state], state="pending", attempts=0,
                                                       next_try_at=now, created_at=now))
        if added:
            log.info("session=%s job=%s webhook queued for %s", job.session_id, job.id, url)
        return added

    def enqueue_missing(self) -> int:
        """Queue deliveries of ended jobs that have a URL and none yet (a crash after the job's end)."""
        n = 0
        for job in self.store.jobs_awaiting_delivery():
            try:
                n += self.enqueue(job)
            except Exception:
                log.exception("session=%s job=%s: could not queue its webhook", job.session_id, job.id)
        return n

    # -- the thread ----------------------------------------------------------------------------
    def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                event = self.subscription.get(timeout=self.seconds_to_next())
                while event is not None and not self.stopping.is_set():
                    self.on_event(event)
                    event = self.subscription.get(timeout=0)
                self.send_due()
            except Exception:  # the store was busy or broken: try again later, never die
                log.exception("webhook sender: error; going on")
                self.stopping.wait(POLL_SECONDS)

    def on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == LOST:
            self.enqueue_missing()
        elif event["type"] in END_EVENTS:
            job = self.store.get_job(event["data"]["job"]["id"])
            if job is not None:
                self.enqueue(job)

    def seconds_to_next(self) -> float:
        nxt = self.store.next_delivery_at()
        if nxt is None:
            return POLL_SECONDS
        due = datetime.fromisoformat(nxt.replace("Z", "+00:00")).timestamp()
        return max(0.0, min(POLL_SECONDS, due - time.time()))

    def send_due(self) -> None:
        for delivery in self.store.due_deliveries(now_iso()):
            if self.stopping.is_set():
                return
            self.attempt(delivery)

    def payload(self, delivery: DeliveryRecord, job: JobRecord) -> dict[str, Any]:
        """What is POSTed: the event, the job (API ``Job``), its images' ids and URLs, and the time."""
        images = self.store.list_images(job_id=job.id)
        base = self.settings.public_base_url
        view = job_view(job, images, None, None, delivery)
        return {"event": delivery.event, "job": view,
                "images": [{"id": i.id, "url": f"{base}/api/v1/images/{i.id}"} for i in images],
                "grid_url": f"{base}{view['grid_url']}" if view.get("grid_url") else None,
                "delivered_at": now_iso()}

    def attempt(self, delivery: DeliveryRecord) -> None:
        """One POST of a delivery; its outcome is stored (delivered, a retry later, or failed). Several API processes
        may share the store: the attempt is first claimed (claim_delivery), so one of them makes it."""
        if not self.store.claim_delivery(delivery.job_id, delivery.next_try_at,
                                         iso_at(time.time() + self.settings.timeout_seconds + CLAIM_MARGIN_SECONDS)):
            return
        job = self.store.get_job(delivery.job_id)
        attempts = delivery.attempts + 1
        try:
            if job is None:
                raise WebhookRefused(f"job {delivery.job_id} is no longer in the store")
            body = json.dumps(self.payload(delivery, job), default=str).encode()
            headers = {"Content-Type": "application/json", "User-Agent": "multigen-webhooks",
                       "X-Multigen-Event": delivery.event, "X-Multigen-Delivery": delivery.job_id,
                       SIGNATURE_HEADER: sign(self.secrets.get(delivery.user), body)}
            status, text = post(delivery.url, body, headers, self.settings)
            if not 200 <= status < 300:
                raise WebhookRefused(f"HTTP {status} from the receiver: {text.strip()[:200]}")
        except Exception as e:  # noqa: BLE001 - every failure is one attempt more, logged and kept on the job
            error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS] if not isinstance(e, WebhookRefused) else str(e)
            if attempts >= self.settings.max_attempts:
                self.store.update_delivery(delivery.job_id, state="failed", attempts=attempts, last_error=error,
                                           next_try_at=None)
                log.warning("job=%s webhook to %s failed for good after %d attempt(s): %s", delivery.job_id,
                            delivery.url, attempts, error)
            else:
                wait = backoff(self.settings, attempts)
                self.store.update_delivery(delivery.job_id, attempts=attempts, last_error=error,
                                           next_try_at=iso_at(time.time() + wait))
                log.warning("job=%s webhook to %s: attempt %d of %d failed (%s); next in %.1f s", delivery.job_id,
                            delivery.url, attempts, self.settings.max_attempts, error, wait)
            return
        self.store.update_delivery(delivery.job_id, state="delivered", attempts=attempts, next_try_at=None,
                                   delivered_at=now_iso())
        log.info("session=%s job=%s webhook delivered to %s (attempt %d)", job.session_id, job.id, delivery.url,
                 attempts)


def build_webhooks(config: Any, store: Store, events: EventBus) -> WebhookSender:
    """The service's sender (started with the workers): secrets per user when the config has users."""
    return WebhookSender(store, events, config.webhooks, WebhookSecrets(config.data_dir, bool(config.users)))


__all__ = ["WebhookSecrets", "WebhookSender", "build_webhooks", "sign", "verify_signature", "SIGNATURE_HEADER"]
