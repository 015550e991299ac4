"""Webhooks: a job's end POSTed to a real HTTP receiver on a loopback port, signed, retried, durable.

Done when "a webhook arrives signed, is retried after a 500, and is still delivered after a restart".
The service runs on the fake pipes (no pixels matter here); the receiver is a threading http.server.
"""
from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers_service import fake_config, fake_service, open_fake_session, open_session, wait_for
from multigen.service.errors import ConfigError, InvalidInput
from multigen.service.webhook_targets import WebhookRefused, WebhookSettings, allowed_addresses, check_webhook_url
from multigen.service.webhooks import SIGNATURE_HEADER, WebhookSecrets, sign, verify_signature

FAST = {"backoff_seconds": 0.1, "backoff_max_seconds": 0.2, "timeout_seconds": 5}


class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next of ``statuses`` (then 200);
    ``hang`` makes it wait (for ``release``) before answering."""

    def __init__(self, port: int = 0, statuses: tuple[int, ...] = ()) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses)
        self.hang = False
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if outer.hang:
                    outer.release.wait(10)
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"nope" if status >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook?x=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    r = Receiver(statuses=(500,))
    yield r
    r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def secret(tmp_path: Path) -> str:
    """The server-wide secret (no users in the config)."""
    return WebhookSecrets(tmp_path / "data", per_user=False).get("local")


def test_a_webhook_arrives_signed_after_a_500_and_the_job_shows_it(tmp_path, receiver):
    with fake_service(tmp_path, webhooks=FAST) as svc:
        sid = open_fake_session(svc)
        job = svc.queue_gen(sid, prompt="a cat", count=2, webhook_url=receiver.url)["job"]
        assert job["webhook"]["state"] == "waiting" and job["params"]["webhook_url"] == receiver.url
        wait_for(lambda: svc.get_job(job["id"])["webhook"]["state"] == "delivered", 10)
        view = svc.get_job(job["id"])
    assert len(receiver.requests) == 2  # the 500, then the retry
    first, last = receiver.requests
    assert last["path"] == "/hook?x=1"
    body = last["body"]
    # verified as a receiver would (docs/features.md): HMAC-SHA256 of "<t>.<body>" with the secret
    assert verify_signature(secret(tmp_path), body, last["headers"][SIGNATURE_HEADER])
    assert not verify_signature("whsec_wrong", body, last["headers"][SIGNATURE_HEADER])
    assert not verify_signature(secret(tmp_path), body + b" ", last["headers"][SIGNATURE_HEADER])
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and last["headers"]["X-Multigen-Event"] == "job.succeeded"
    assert payload["job"]["id"] == job["id"] and payload["job"]["state"] == "succeeded"
    ids = [i["id"] for i in view["images"]]
    assert [i["id"] for i in payload["images"]] == ids and len(ids) == 2
    assert [i["url"] for i in payload["images"]] == [f"/api/v1/images/{i}" for i in ids]  # relative by default
    assert payload["delivered_at"]
    assert view["webhook"]["state"] == "delivered" and view["webhook"]["attempts"] == 2
    assert "HTTP 500" in view["webhook"]["last_error"] and view["webhook"]["delivered_at"]
    assert json.loads(first["body"])["job"]["id"] == job["id"]


def test_a_failed_and_a_cancelled_job_are_posted_too(tmp_path, receiver):
    receiver.statuses.clear()
    with fake_service(tmp_path, webhooks=FAST, start=False) as svc:
        sid = open_fake_session(svc)
        failed = svc.queue_gen(sid, prompt="boom", webhook_url=receiver.url)["job"]
        cancelled = svc.queue_gen(sid, prompt="x", webhook_url=receiver.url)["job"]
        svc.cancel_job(cancelled["id"])
        svc.start()
        wait_for(lambda: len(receiver.requests) == 2, 10)
    events = {json.loads(r["body"])["job"]["id"]: json.loads(r["body"])["event"] for r in receiver.requests}
    assert events == {failed["id"]: "job.failed", cancelled["id"]: "job.cancelled"}


def test_a_webhook_is_still_delivered_after_a_restart(tmp_path):
    port = free_port()  # nothing listens there yet: the receiver is down
    url = f"http://127.0.0.1:{port}/hook"
    with fake_service(tmp_path, webhooks=FAST) as svc:
        sid = open_fake_session(svc)
        job = svc.queue_gen(sid, prompt="a", webhook_url=url)["job"]
        lost = svc.queue_gen(sid, prompt="b", webhook_url=url)["job"]
        wait_for(lambda: svc.get_job(job["id"])["webhook"]["attempts"] >= 1, 10)
        wait_for(lambda: svc.get_job(lost["id"])["state"] == "succeeded", 10)
        view = svc.get_job(job["id"])["webhook"]
        assert view["state"] == "pending" and "Connection" in view["last_error"]
    # a crash between the job's end and its delivery's record: the next start queues it
    with sqlite3.connect(tmp_path / "data" / "multigen.sqlite3") as db:
        db.execute("DELETE FROM webhook_deliveries WHERE job_id = ?", (lost["id"],))
    receiver = Receiver(port=port)
    try:
        with fake_service(tmp_path, webhooks=FAST) as svc:
            wait_for(lambda: all(svc.get_job(j["id"])["webhook"]["state"] == "delivered" for j in (job, lost)), 10)
    finally:
        receiver.close()
    got = sorted(json.loads(r["body"])["job"]["id"] for r in receiver.requests)
    assert got == sorted([job["id"], lost["id"]])
    assert all(verify_signature(secret(tmp_path), r["body"], r["headers"][SIGNATURE_HEADER])
               for r in receiver.requests)


def test_a_delivery_fails_for_good_after_max_attempts(tmp_path, receiver, caplog):
    receiver.statuses[:] = [500] * 10
    with fake_service(tmp_path, webhooks={**FAST, "max_attempts": 3}) as svc:
        sid = open_fake_session(svc)
        job = svc.queue_gen(sid, prompt="a", webhook_url=receiver.url)["job"]
        wait_for(lambda: svc.get_job(job["id"])["webhook"]["state"] == "failed", 10)
        time.sleep(0.3)
        hook = svc.get_job(job["id"])["webhook"]
    assert hook["attempts"] == 3 and len(receiver.requests) == 3
    assert "HTTP 500" in hook["last_error"] and hook["next_try_at"] is None
    failures = [r.getMessage() for r in caplog.records if r.name == "multigen.service.webhooks"]
    assert sum("attempt" in m and "failed" in m for m in failures) == 3  # every failed attempt is logged
    assert any("failed for good after 3 attempt(s)" in m for m in failures)


def test_a_slow_receiver_never_blocks_a_worker(tmp_path, receiver):
    receiver.statuses.clear()
    receiver.hang = True
    with fake_service(tmp_path, webhooks=FAST) as svc:
        sid = open_fake_session(svc)
        first = svc.queue_gen(sid, prompt="a", webhook_url=receiver.url)["job"]
        wait_for(lambda: receiver.requests, 10)  # the receiver holds the POST
        second = svc.queue_gen(sid, prompt="b", count=2)["job"]
        wait_for(lambda: svc.get_job(second["id"])["state"] == "succeeded", 5)
        assert not receiver.release.is_set() and svc.get_job(first["id"])["webhook"]["state"] == "pending"
        receiver.release.set()
        wait_for(lambda: svc.get_job(first["id"])["webhook"]["state"] == "delivered", 10)


@pytest.mark.parametrize("url, why", [
    ("http://10.0.0.1/hook", "not allowed"), ("https://example.org/x", "not allowed"),
    ("ftp://127.0.0.1/x", "http:// or https://"), ("http://user:pw@127.0.0.1/", "credentials"),
    ("http://127.0.0.1:99999/", "not a valid URL"), ("http://127.0.0.1/" + "a" * 3000, "2048"),
])
def test_a_bad_or_non_loopback_url_is_refused_at_queue_time(tmp_path, url, why):
    with fake_service(tmp_path, start=False) as svc:
        sid = open_fake_session(svc)
        with pytest.raises(InvalidInput) as e:
            svc.queue_gen(sid, prompt="a", webhook_url=url)
        assert e.value.field == "webhook_url" and why in e.value.message
        assert svc.list_jobs(sid) == []
    if why == "not allowed":
        assert "webhooks.allowed_hosts" in e.value.message and "127.0.0.0/8" in e.value.message


def test_the_api_answers_400_naming_webhook_url_and_the_config_key(api, client):
    session = open_session(client)
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "webhook_url": "http://10.0.0.1/"})
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["error"]
    assert err["field"] == "webhook_url" and "webhooks.allowed_hosts" in err["message"]
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "grid": "maybe"})
    assert r.status_code == 400
    doc = client.get("/api/v1/openapi.json").get_json()
    text = json.dumps(doc)
    assert "webhook_url" in text and '"grid"' in text and "X-Multigen-Signature" in text
    params = {p["name"] for p in client.get("/api/v1/models").get_json()["job_params"]}
    assert {"webhook_url", "grid"} <= params


def test_allowed_hosts_widen_by_config_and_names_are_checked_again_when_resolved(tmp_path):
    settings = WebhookSettings(allowed_hosts=["10.1.0.0/16", "hooks.example.org", "*.corp.example", "localhost"])
    assert check_webhook_url("http://10.1.2.3:8080/x", settings)
    assert check_webhook_url("https://a.corp.example/x", settings)
    with pytest.raises(InvalidInput):
        check_webhook_url("http://10.2.0.1/", settings)
    with pytest.raises(InvalidInput):
        check_webhook_url("http://127.0.0.1/", settings)  # loopback is no longer listed
    # DNS rebinding: a listed name that resolves to a private or loopback address not listed is refused
    with pytest.raises(WebhookRefused, match="outside the allowed hosts"):
        allowed_addresses("localhost", 80, ["localhost"])
    assert allowed_addresses("localhost", 80, ["localhost", "127.0.0.0/8", "::1"])
    with pytest.raises(WebhookRefused):
        allowed_addresses("127.0.0.1", 80, ["10.0.0.0/8"])


def test_bad_webhook_config_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="webhooks.allowed_hosts.0"):
        fake_config(tmp_path, webhooks={"allowed_hosts": ["not a host!"]})
    with pytest.raises(ConfigError, match="webhooks.max_attempts"):
        fake_config(tmp_path, webhooks={"max_attempts": 0})
    with pytest.raises(ConfigError, match="webhooks.nope"):
        fake_config(tmp_path, webhooks={"nope": 1})
    cfg = fake_config(tmp_path, webhooks={"public_base_url": "https://gen.example.org/"})
    assert cfg.webhooks.public_base_url == "https://gen.example.org"


def test_signatures_carry_a_timestamp_against_replays():
    body = b'{"a": 1}'
    header = sign("s3cret", body, timestamp=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert verify_signature("s3cret", body, header, now=1_000_100)
    assert not verify_signature("s3cret", body, header, now=1_000_000 + 301)  # too old: a replay
    assert not verify_signature("s3cret", body, "garbage")


def test_each_user_reads_and_rotates_their_own_secret(make_api, tmp_path):
    app = make_api(users=("alice", "bob"))
    client = app.client()
    a = client.get("/api/v1/users/me/webhook-secret", headers=app.headers("alice")).get_json()
    b = client.get("/api/v1/users/me/webhook-secret", headers=app.headers("bob")).get_json()
    assert a["user"] == "alice" and a["per_user"] and a["secret"].startswith("whsec_") and a["secret"] != b["secret"]
    assert client.get("/api/v1/users/me/webhook-secret").status_code == 401
    again = client.get("/api/v1/users/me/webhook-secret", headers=app.headers("alice")).get_json()
    assert again["secret"] == a["secret"]
    rotated = client.post("/api/v1/users/me/webhook-secret/rotate", headers=app.headers("alice")).get_json()
    assert rotated["secret"] != a["secret"]
    assert WebhookSecrets(app.svc.config.data_dir, per_user=True).get("alice") == rotated["secret"]


def test_the_admin_reads_and_rotates_a_users_secret_with_the_cli(make_api, config_file, capsys):
    from multigen.service.cli import main

    app = make_api(users=("alice",))
    client = app.client()
    served = client.get("/api/v1/users/me/webhook-secret", headers=app.headers("alice")).get_json()["secret"]
    assert main(["users", "webhook-secret", "alice", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out.strip() == served
    assert main(["users", "webhook-secret", "alice", "--rotate", "--config", str(config_file)]) == 0
    rotated = capsys.readouterr().out.strip()
    assert rotated != served
    assert client.get("/api/v1/users/me/webhook-secret", headers=app.headers("alice")).get_json()["secret"] == rotated
    assert main(["users", "webhook-secret", "mallory", "--config", str(config_file)]) == 2
    assert "users.mallory" in capsys.readouterr().err
