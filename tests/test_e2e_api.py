"""End to end over real HTTP: `multigen serve` on a free loopback port, the Python client, tiny SD.

Opens a session, queues jobs, polls ``images?after=``, reads the event stream (and resumes it
with Last-Event-ID), cancels, downloads in three formats, checks two users' isolation, and
restarts the server to find every session, job and image again.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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

    first = mg.create_job(sid, prompt="a red house", seeds=[11, 12], **JOB)
    doomed = mg.create_job(sid, prompt="never mind", count=20, steps=4, width=64, height=64)
    cancelled = mg.cancel_job(doomed["id"])
    assert cancelled["state"] in ("cancelled", "running", "queued")
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
    assert "multigen_images_written_total 3.0" in metrics and 'multigen_jobs{state="cancelled"} 1.0' in metrics
    assert mg.close_session(sid)["state"] == "closed"
    # a job running at SIGTERM is kept and finishes after the restart, with its seeds
    other = mg.create_session(project="e2e", pipe="prompt2image", model="tiny-sd")
    running = mg.create_job(other["id"], prompt="interrupted", seeds=[21, 22, 23], steps=4, width=64, height=64)
    deadline = time.time() + 60
    while mg.get_job(running["id"])["state"] == "queued" and time.time() < deadline:
        time.sleep(0.05)
    assert server.stop() == 0

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
    t0 = time.time()
    assert server.stop() == 0 and time.time() - t0 < 30


def test_refuses_to_serve_beyond_loopback_without_users(config_file):
    out = subprocess.run([sys.executable, "-m", "multigen.service.cli", "serve", "--config", str(config_file),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "allow_anonymous" in out.stderr
    assert "multigen serving on" not in out.stdout
