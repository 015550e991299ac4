"""A fake ServiceThread for the API tests: the docs/internals.md contract, in memory.

Jobs do not run by themselves: ``run_job(job_id)`` writes its images (small PNGs with a JSON
sidecar under the output folder) and emits the events a real worker would, so tests decide
exactly when things happen.
"""
from __future__ import annotations

import itertools
import json
import queue
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, PngImagePlugin

from multigen.service.errors import Conflict, InvalidInput, NotFound, QueueFull

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


class FakeSubscription:
    def __init__(self, bus: "FakeService", session_id: str | None):
        self.bus, self.session_id = bus, session_id
        self.q: queue.Queue = queue.Queue()
        self.closed = False

    def get(self, timeout: float | None = None) -> dict | None:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        while not self.closed:
            ev = self.get(0.1)
            if ev is not None:
                yield ev

    def close(self) -> None:
        self.closed = True
        self.bus.subs.discard(self)


class FakeService:
    """In-memory sessions, jobs and images with the ServiceThread's method names and dict shapes."""

    def __init__(self, output_dir: Path, max_queued: int = 100):
        self.output_dir = Path(output_dir)
        self.sessions: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.images: dict[str, dict] = {}
        self.paths: dict[str, str] = {}
        self.previews: dict[str, bytes] = {}
        self.calls: list[tuple[str, tuple, dict]] = []
        self.subs: set[FakeSubscription] = set()
        self.max_queued = max_queued
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        self.stats_enabled = True

    # --- events
    def emit(self, type_: str, data: dict) -> None:
        ev = {"type": type_, "data": data, "id": str(next(self._event_ids))}
        for sub in list(self.subs):
            if sub.session_id in (None, data.get("session_id")):
                sub.q.put(ev)

    def subscribe(self, session_id: str | None = None) -> FakeSubscription:
        sub = FakeSubscription(self, session_id)
        self.subs.add(sub)
        return sub

    # --- lifecycle
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    # --- sessions
    def open_session(self, user, project, pipe, model, loras=None):
        self.calls.append(("open_session", (user, project, pipe, model), {"loras": loras}))
        if project == "refuse":
            return {"error": "too many open sessions for this user"}
        sid = f"s{next(self._ids)}"
        self.sessions[sid] = {"id": sid, "user": user, "project": project, "pipe": pipe, "model": model,
                              "loras": list(loras or []), "state": "open", "created_at": now()}
        return {"session_id": sid}

    def get_session_info(self, session_id):
        s = self.sessions.get(session_id)
        if s is None:
            return None
        jobs = [j for j in self.jobs.values() if j["session_id"] == session_id]
        counts = {st: sum(1 for j in jobs if j["state"] == st) for st in STATES}
        return dict(s, image_count=self.get_image_count(session_id), job_counts=counts)

    def get_image_count(self, session_id):
        return sum(1 for im in self.images.values() if im["session_id"] == session_id)

    def get_image_pathname(self, session_id, index):
        for iid, im in self.images.items():
            if im["session_id"] == session_id and im["index"] == index:
                return self.paths[iid]
        return None

    def list_sessions(self, user=None, project=None, state=None):
        out = []
        for sid, s in self.sessions.items():
            if (user is None or s["user"] == user) and (project is None or s["project"] == project) and (
                    state is None or s["state"] == state):
                out.append(self.get_session_info(sid))
        return out

    def close_session(self, session_id):
        s = self.sessions[session_id]
        s["state"] = "closed"
        for j in self.jobs.values():
            if j["session_id"] == session_id and j["state"] in ("queued", "running"):
                self._finish(j, "cancelled")
        self.emit("session.closed", {"session_id": session_id})

    # --- jobs
    def queue_gen(self, session_id, images=None, prompt=None, image_callback=None, count=1, seeds=None,
                  negative_prompt=None, priority=0, **setup_params):
        self.calls.append(("queue_gen", (session_id,), dict(images=images, prompt=prompt, count=count, seeds=seeds,
                                                            negative_prompt=negative_prompt, priority=priority,
                                                            **setup_params)))
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"no session {session_id}", field="session_id")
        if s["state"] == "closed":
            raise Conflict("session is closed", field="session_id")
        if prompt == "boom":
            raise RuntimeError("an unexpected bug")
        if prompt == "bad-scheduler":
            from multigen.service.errors import InvalidInput as II
            raise II("unknown scheduler", field="scheduler")
        queued = sum(1 for j in self.jobs.values() if j["state"] == "queued")
        if queued >= self.max_queued:
            raise QueueFull(f"the queue holds {self.max_queued} jobs, the most allowed")
        if images:
            for p in images:
                if not Path(p).is_file():
                    raise InvalidInput(f"no image {p}", field="images")
        seeds = list(seeds) if seeds else [secrets.randbelow(2**32) for _ in range(count)]
        jid = f"j{next(self._ids)}"
        params = dict(setup_params, prompt=prompt, negative_prompt=negative_prompt)
        self.jobs[jid] = {"id": jid, "session_id": session_id, "state": "queued", "position": queued, "count": count,
                          "done": 0, "seeds": seeds, "params": params,
                          "progress": {"step": 0, "steps": setup_params.get("steps", 4), "image": 0, "fraction": 0.0},
                          "eta_seconds": None, "error": None, "images": [], "created_at": now(),
                          "started_at": None, "finished_at": None}
        self.emit("job.queued", {"session_id": session_id, "job_id": jid})
        return {"job_id": jid, "position": queued, "seeds": seeds}

    def get_job(self, job_id):
        j = self.jobs.get(job_id)
        return None if j is None else dict(j, images=[self.images[i] for i in j["images"]])

    def list_jobs(self, session_id, state=None):
        if session_id not in self.sessions:
            raise NotFound(f"no session {session_id}")
        return [self.get_job(j) for j, row in self.jobs.items()
                if row["session_id"] == session_id and state in (None, row["state"])]

    def cancel_job(self, job_id):
        j = self.jobs.get(job_id)
        if j is None:
            raise NotFound(f"no job {job_id}")
        if j["state"] in ("queued", "running"):
            self._finish(j, "cancelled")
        return self.get_job(job_id)

    def _finish(self, j: dict, state: str) -> None:
        j["state"] = state
        j["finished_at"] = now()
        j["position"] = None
        self.emit(f"job.{state}", {"session_id": j["session_id"], "job_id": j["id"]})

    def run_job(self, job_id: str, size: int = 64) -> list[dict]:
        """Do what a worker does: write every image of the job, emit events, succeed."""
        j = self.jobs[job_id]
        s = self.sessions[j["session_id"]]
        j["state"], j["started_at"] = "running", now()
        self.emit("job.started", {"session_id": s["id"], "job_id": job_id})
        folder = self.output_dir / s["user"] / s["project"] / s["id"]
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for n, seed in enumerate(j["seeds"]):
            index = self.get_image_count(s["id"])
            path = folder / f"{index:05d}.png"
            meta = {"seed": seed, "prompt": j["params"].get("prompt"), "index": index}
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", json.dumps(meta))
            Image.new("RGB", (size, size), (seed % 256, n * 40 % 256, 90)).save(path, pnginfo=info)
            path.with_suffix(".json").write_text(json.dumps(meta))
            iid = f"i{next(self._ids)}"
            image = {"id": iid, "session_id": s["id"], "job_id": job_id, "index": index, "seed": seed,
                     "width": size, "height": size, "url": f"/api/v1/images/{iid}", "created_at": now()}
            self.images[iid] = image
            self.paths[iid] = str(path)
            j["images"].append(iid)
            j["done"] += 1
            self.previews[job_id] = _jpeg(size)
            self.emit("job.progress", {"session_id": s["id"], "job_id": job_id,
                                       "preview_url": f"/api/v1/jobs/{job_id}/preview"})
            self.emit("image.created", {"session_id": s["id"], "job_id": job_id, "image": image})
            out.append(image)
        self._finish(j, "succeeded")
        return out

    def list_images(self, session_id, after=None):
        ims = [im for im in self.images.values() if im["session_id"] == session_id
               and (after is None or im["index"] > after)]
        return sorted(ims, key=lambda im: im["index"])

    def get_image(self, image_id):
        return self.images.get(image_id)

    def preview(self, job_id):
        return self.previews.get(job_id)

    def queue_info(self):
        running = [j for j in self.jobs.values() if j["state"] == "running"]
        return {"queued": sum(1 for j in self.jobs.values() if j["state"] == "queued"), "running": len(running),
                "workers": [{"device": "cpu", "state": "busy" if running else "idle",
                             "job_id": running[0]["id"] if running else None, "model": "tiny-sd"}]}

    def devices(self):
        return ["cpu"]

    def stats(self):
        if not self.stats_enabled:
            raise AttributeError("stats")
        return {"images_written": len(self.images), "jobs_finished": {},
                "image_seconds": {"count": len(self.images), "sum": 0.5 * len(self.images), "recent": []},
                "cache": {"loads": 1, "hits": 3, "evictions": 0}}


def _jpeg(size: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


# --- fixtures shared by tests/test_api_*.py (imported there by name)
import pytest  # noqa: E402

from multigen.service.api import create_app  # noqa: E402
from multigen.service.config import load_config  # noqa: E402
from multigen.service.users import add_user  # noqa: E402


@pytest.fixture()
def fake(tmp_path: Path) -> FakeService:
    return FakeService(tmp_path / "outputs")


def build_app(config_file: Path, fake: FakeService, users: tuple[str, ...] = (), **config_text: str):
    """An app over ``fake``; returns ``(app, {user: token})``. ``config_text`` replaces lines of the config."""
    text = config_file.read_text()
    for old, new in config_text.items():
        text = text.replace(old, new)
    config_file.write_text(text)
    tokens = {name: add_user(str(config_file), name) for name in users}
    cfg = load_config(config_file)
    fake.output_dir = cfg.output_dir
    app = create_app(cfg, fake)
    app.config["TESTING"] = True
    return app, tokens


@pytest.fixture()
def app(config_file: Path, fake: FakeService):
    return build_app(config_file, fake)[0]


@pytest.fixture()
def client(app):
    return app.test_client()


def open_session(client, pipe: str = "prompt2image", headers: dict | None = None, **extra) -> dict:
    body = {"project": "p1", "pipe": pipe, "model": "tiny-sd", **extra}
    r = client.post("/api/v1/sessions", json=body, headers=headers or {})
    assert r.status_code == 201, r.get_json()
    return r.get_json()["session"]
