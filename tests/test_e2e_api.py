"""End to end over real HTTP: `multigen serve` on a free loopback port, the Python client, tiny SD.

Opens a session, queues jobs, polls ``images?after=``, reads the event stream (and resumes it
with Last-Event-ID), cancels, downloads in three formats, checks two users' isolation, and
restarts the server to find every session, job and image again.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from multigen.service.client import MultigenAPIError, MultigenClient

pytestmark = pytest.mark.slow

JOB = {"steps": 2, "width": 64, "height": 64}


class Server:
    """A `multigen serve` subprocess; ``url`` once it printed ``multigen serving on``."""

    def __init__(self, config_file: Path, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", MULTIGEN_HEARTBEAT_SECONDS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "multigen.service.cli", "serve", "--config",
                                      str(config_file), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            if line.startswith("multigen serving on "):
                self.url = line.split()[-1]
                break
        # keep reading the output so the pipe never fills up
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture()
def start(config_file):
    servers: list[Server] = []

    def _start(*args: str) -> Server:
        server = Server(config_file, *args)
        servers.append(server)
        assert server.url, "".join(server.lines)
        return server

    yield _start
    for server in servers:
        server.stop()


def collect_events(client: MultigenClient, session_id: str, out: list, until: callable, timeout: float):
    for event in client.iter_events(session_id, timeout=timeout):
        out.append(event)
        if until(out):
            return


def test_session_jobs_events_cancel_download_restart(start, config_file):
    server = start()
    mg = MultigenClient(server.url, timeout=30)
    assert mg.health()["status"] == "ok"
    session = mg.create_session(project="e2e", pipe="prompt2image", model="tiny-sd")
    sid = session["id"]

    events: list = []
    finished = {"job.succeeded", "job.cancelled", "job.failed"}
    listener = threading.Thread(target=collect_events, args=(
        mg, sid, events, lambda evs: sum(e["type"] in finished for e in evs) >= 3, 180), daemon=True)
    listener.start()
    time.sleep(0.5)

    # a long job in a session of its own keeps the one worker busy: a job queued behind it is
    # certainly still queued when it is cancelled, and the long one certainly still running
    busy = mg.create_session(project="e2e-busy", pipe="prompt2image", model="tiny-sd")
    blocker = mg.create_job(busy["id"], prompt="a long one", seeds=[10], steps=300, width=64, height=64)
    deadline = time.time() + 120
    while mg.get_job(blocker["id"])["progress"]["step"] < 1:  # the model is loaded and steps run
        assert time.time() < deadline, mg.get_job(blocker["id"])
        time.sleep(0.05)
    first = mg.create_job(sid, prompt="a red house", seeds=[11, 12], **JOB)
    doomed = mg.create_job(sid, prompt="never mind", count=20, steps=4, width=64, height=64)
    cancelled = mg.cancel_job(doomed["id"])
    assert cancelled["state"] == "cancelled" and cancelled["done"] == 0  # queued: cancelled at once
    stopping = mg.cancel_job(blocker["id"])
    assert stopping["state"] == "running" and stopping["cancel_requested"]  # running: stops at its next step
    stopped = mg.wait_job(blocker["id"], timeout=60)
    assert stopped["state"] == "cancelled" and stopped["done"] == 0
    with pytest.raises(MultigenAPIError) as e:
        mg.create_job(sid, prompt="x", strength=0.5)  # not a prompt2image parameter
    assert e.value.status == 400 and e.value.field == "strength"
    last = mg.create_job(sid, prompt="a blue boat", seeds=[13], **JOB)

    # poll images?after= like a client that shows images as they come
    seen: list = []
    deadline = time.time() + 180
    while len(seen) < 3 and time.time() < deadline:
        after = seen[-1]["index"] if seen else None
        new = mg.list_images(sid, after=after)
        assert all(im["index"] > (after if after is not None else -1) for im in new)
        seen += new
        time.sleep(0.2)
    assert [im["seed"] for im in seen] == [11, 12, 13] and [im["index"] for im in seen] == [0, 1, 2]
    assert mg.wait_job(first["id"], timeout=60)["state"] == "succeeded"
    assert mg.wait_job(last["id"], timeout=60)["state"] == "succeeded"
    assert mg.wait_job(doomed["id"], timeout=60)["state"] == "cancelled"
    with pytest.raises(MultigenAPIError) as e:
        mg.cancel_job(first["id"])
    assert e.value.status == 409

    listener.join(30)
    types = [e["type"] for e in events]
    for wanted in ("job.queued", "job.started", "job.progress", "image.created", "job.succeeded", "job.cancelled"):
        assert wanted in types, types
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    progress = next(e for e in events if e["type"] == "job.progress")
    assert progress["data"]["preview_url"].endswith("/preview")
    # resume after the first event: the stream replays from there
    replay = next(mg.iter_events(sid, last_event_id=events[0]["id"], timeout=10))
    assert replay["id"] == events[1]["id"]

    files = {}
    for im in seen:
        for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
            data = mg.download_image(im["id"], format=fmt)
            opened = Image.open(io.BytesIO(data))
            assert opened.format == pil and opened.size == (64, 64)
            files[(im["id"], fmt)] = data
    assert mg.image_metadata(seen[0]["id"])["metadata"]["seed"] == 11
    metrics = mg.metrics()
    assert "multigen_images_written_total 3.0" in metrics
    assert 'multigen_jobs_finished_total{state="succeeded"} 2.0' in metrics
    assert mg.close_session(sid)["state"] == "closed"
    # a job running at SIGTERM is kept and finishes after the restart, with its seeds: stopped once
    # its first image is written, with two images of 150 steps still to go (seconds: more than a stop takes
    # on a loaded machine, so the stop finds it part-way)
    other = mg.create_session(project="e2e", pipe="prompt2image", model="tiny-sd")
    running = mg.create_job(other["id"], prompt="interrupted", seeds=[21, 22, 23], steps=150, width=64, height=64)
    deadline = time.time() + 120
    while not (at_stop := mg.get_job(running["id"]))["images"]:
        assert time.time() < deadline and at_stop["state"] in ("queued", "running"), at_stop
        time.sleep(0.02)
    assert at_stop["state"] == "running" and len(at_stop["images"]) < 3, at_stop
    assert server.stop() == 0
    # the stop found it running, part-way: it was put back in the queue with the images it had
    from multigen.service.store import SQLiteStore

    store = SQLiteStore(config_file.parent.parent / "data" / "multigen.sqlite3")
    try:
        requeued = store.get_job(running["id"])
        kept = sorted((r for r in store.list_images(job_id=running["id"]) if r.state == "done"), key=lambda r: r.pos)
    finally:
        store.close()
    assert requeued.state == "queued" and 1 <= len(kept) < 3, (requeued.state, kept)

    # a restarted server finds every session, job and image again
    again = start()
    mg2 = MultigenClient(again.url, timeout=30)
    sessions = {s["id"]: s for s in mg2.list_sessions()}
    assert sessions[sid]["state"] == "closed" and sessions[sid]["image_count"] == 3
    assert sessions[sid]["job_counts"]["succeeded"] == 2 and sessions[sid]["job_counts"]["cancelled"] == 1
    job = mg2.get_job(first["id"])
    assert job["state"] == "succeeded" and [im["seed"] for im in job["images"]] == [11, 12]
    assert [im["id"] for im in mg2.list_images(sid)] == [im["id"] for im in seen]
    for (iid, fmt), data in files.items():
        if fmt == "png":
            assert mg2.download_image(iid, format=fmt) == data
    resumed = mg2.wait_job(running["id"], timeout=120)
    assert resumed["state"] == "succeeded" and [im["seed"] for im in resumed["images"]] == [21, 22, 23]
    assert [im["index"] for im in mg2.list_images(other["id"])] == [0, 1, 2]
    assert [im["id"] for im in resumed["images"]][:len(kept)] == [r.id for r in kept]  # kept, not made again


def add_user(config_file: Path, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "multigen.service.cli", "users", "add", name, "--config",
                          str(config_file)], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_two_users_are_isolated(start, config_file):
    tokens = {name: add_user(config_file, name) for name in ("alice", "bob")}
    server = start()
    alice = MultigenClient(server.url, token=tokens["alice"])
    bob = MultigenClient(server.url, token=tokens["bob"])
    nobody = MultigenClient(server.url)
    assert nobody.health()["auth"] is True
    with pytest.raises(MultigenAPIError) as e:
        nobody.list_sessions()
    assert e.value.status == 401

    session = alice.create_session(project="mine", pipe="prompt2image", model="tiny-sd")
    assert session["user"] == "alice"
    job = alice.wait_job(alice.create_job(session["id"], prompt="secret", count=1, **JOB)["id"], timeout=120)
    image = job["images"][0]
    assert alice.download_image(image["id"])[:4] == b"\x89PNG"

    for call in (lambda: bob.get_session(session["id"]), lambda: bob.get_job(job["id"]),
                 lambda: bob.cancel_job(job["id"]), lambda: bob.list_images(session["id"]),
                 lambda: bob.download_image(image["id"]), lambda: bob.image_metadata(image["id"]),
                 lambda: bob.close_session(session["id"]),
                 lambda: bob.create_job(session["id"], prompt="x", **JOB)):
        with pytest.raises(MultigenAPIError) as e:
            call()
        assert e.value.status == 404 and e.value.code == "not_found"
    assert bob.list_sessions() == []
    assert [s["id"] for s in alice.list_sessions()] == [session["id"]]
    assert alice.get_session(session["id"])["state"] == "open"

    # an open event stream does not hold up a graceful stop
    opened = threading.Event()

    def listen():
        with bob.http.get(server.url + "api/v1/events", stream=True, timeout=60) as r:
            opened.set()
            for _ in r.iter_lines():
                pass

    threading.Thread(target=listen, daemon=True).start()
    assert opened.wait(30)
    # an open event stream ends when the server stops: it does not hold the drain to its limit
    assert server.stop() == 0
    assert not any("requests still running" in line for line in server.lines), "".join(server.lines)[-2000:]


def test_refuses_to_serve_beyond_loopback_without_users(config_file):
    out = subprocess.run([sys.executable, "-m", "multigen.service.cli", "serve", "--config", str(config_file),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "allow_anonymous" in out.stderr
    assert "multigen serving on" not in out.stdout


def raw_request(url: str, method: str, path: str, headers: dict[str, str], content_length: int | None = None,
                body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
    """One request over a plain socket that sends the head and ``body`` (maybe far less than the
    ``Content-Length`` it announces), then reads the answer to its end; returns (status, headers,
    body, seconds; header names in lower case). A server that waits for the rest of the body fails it with a timeout."""
    parts = urlsplit(url)
    head = {"Host": parts.netloc, "Connection": "close", **headers}
    if content_length is not None:
        head["Content-Length"] = str(content_length)
    data = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data.encode("latin-1") + body)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            raise AssertionError(f"no complete answer to {method} {path} in {timeout} s: {received[:200]!r}") from None
    seconds = time.monotonic() - start
    head_text, _, content = received.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), fields, content, seconds


def test_bodies_are_refused_before_they_are_read(start, config_file, tmp_path):
    """waitress buffers a body before the app sees it: without users' tokens and within its route's
    limit, a body is refused from its head, so a 50 MB POST costs the server one read."""
    token = add_user(config_file, "alice")
    server = start()
    bearer = {"Authorization": f"Bearer {token}"}
    multipart = {"Content-Type": "multipart/form-data; boundary=zz"}
    for path, headers in (("/api/v1/uploads", multipart),
                          ("/api/v1/sessions/s/jobs", {"Authorization": "Bearer mg_wrong", **multipart}),
                          ("/api/v1/sessions", {"Content-Type": "application/json"})):
        status, fields, body, _ = raw_request(server.url, "POST", path, headers, 50_000_000, b"x" * 1024)
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", (path, body)
        assert fields["content-type"] == "application/json" and fields["www-authenticate"].startswith("Bearer")
    # a token does not open every route to large bodies: 1 MiB but for uploads and jobs
    status, _, body, _ = raw_request(server.url, "POST", "/api/v1/sessions",
                                     {**bearer, "Content-Type": "application/json"}, 2 * 1024 * 1024, b"{")
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large", body
    assert "1048576" in json.loads(body)["error"]["message"]
    status, _, body, _ = raw_request(server.url, "POST", "/api/v1/uploads", {**bearer, **multipart}, 50_000_000,
                                     b"--zz")
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    # the server is fine, and an upload above the small limit still goes through
    alice = MultigenClient(server.url, token=token)
    photo = tmp_path / "photo.png"
    Image.frombytes("RGB", (700, 600), os.urandom(700 * 600 * 3)).save(photo)
    assert photo.stat().st_size > 1024 * 1024
    assert alice.upload(str(photo))["width"] == 700
    assert alice.list_sessions() == []


def test_anonymous_server_answers_loopback_names_and_its_own_origin_only(start):
    server = start()
    port = urlsplit(server.url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        status, _, _, _ = raw_request(server.url, "GET", "/api/v1/health", {"Host": host})
        assert status == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}"):
        status, _, body, _ = raw_request(server.url, "GET", "/api/v1/health", {"Host": host})
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden", host
    status, _, page, _ = raw_request(server.url, "GET", "/", {})
    assert status == 200 and b"<html" in page.lower()
    # a cross-site form post is refused from its head: the 50 MB it announces are never read
    status, _, body, _ = raw_request(server.url, "POST", "/api/v1/uploads",
                                           {"Origin": "http://evil.example",
                                            "Content-Type": "multipart/form-data; boundary=zz"},
                                           50_000_000, b"--zz")
    error = json.loads(body)["error"]
    assert status == 403 and "server.cors_origins" in error["message"]  # answered though the body never came
    status, _, body, _ = raw_request(server.url, "POST", "/api/v1/sessions",
                                           {"Content-Type": "application/json"}, 2 * 1024 * 1024, b"{")
    assert status == 413
    mg = MultigenClient(server.url)  # the server's own origin: sessions still open
    assert mg.create_session(project="p", pipe="prompt2image", model="tiny-sd")["user"] == "local"
