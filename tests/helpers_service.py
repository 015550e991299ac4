"""Fakes and runners for the service tests.

* :class:`FakePipe` and friends: pipes that sleep a few ms per step, call the step
  callback, honour the cancel check and make a flat image whose colour encodes the seed.
* :func:`fake_loader`: a ``load_base`` stand-in that counts loads.
* :class:`FakeService`: a ``ServiceThread`` wired to the fakes, on fake devices.
* :func:`api_app`: the HTTP API over a :class:`ConfigFakeService` (a FakeService for the real
  models.yaml), and :func:`open_session`, :func:`queue_job`, :func:`wait_job` for its tests.
* ``python tests/helpers_service.py CONFIG [--queue SPEC.json] [--step-delay S]``: a small
  runner that starts a real ServiceThread (used by the SIGKILL test).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from multigen.pipes.errors import Cancelled, UnknownSchedulerError
from multigen.service.config import Config, load_config
from multigen.service.serviceThread import ServiceThread

FAKE_MODELS_YAML = """
base:
  m1: {id: m1, type: SD}
  m2: {id: m2, type: SD}
  m3: {id: m3, type: SD}
  xl: {id: xl, type: SDXL}
lora:
  l-sd: {id: l-sd.safetensors, type: SD}
  l-sd2: {id: l-sd2.safetensors, type: SD}
  l-xl: {id: l-xl.safetensors, type: SDXL}
pipes:
  prompt2image: {name: Prompt to Image, classname: Prompt2ImPipe}
  image2image: {name: Image to Image, classname: Im2ImPipe, need_imgs: true}
  inpainting: {name: Inpainting, classname: InpaintingPipe, need_imgs: true}
  cond2image: {name: ControlNet, classname: Cond2ImPipe, need_imgs: true, needs_cnet: true}
"""


class Recorder:
    """What the fakes saw, shared by the test and the worker threads, and the holds that let a test
    control the timing: ``load_gates`` (a model's load waits for its event) and ``hold`` (a gen stops
    at a step until its cancel check says stop, as a cancel or ``stop()`` makes it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loads: list[tuple[str, str]] = []
        self.loading: list[str] = []  # loads started, by model file name (a gated load is here first)
        self.gens: list[dict[str, Any]] = []
        self.setups: list[dict[str, Any]] = []
        self.loras: list[list[Any]] = []
        self.load_delay = 0.0
        self.step_delay = 0.005
        #: model file name -> event its load waits for (at most HOLD_SECONDS)
        self.load_gates: dict[str, threading.Event] = {}
        #: (seed, step): the gen of that seed holds after that step until its cancel check is true
        self.hold: tuple[int, int] | None = None
        #: set once a gen reached ``hold``
        self.holding = threading.Event()

    def add(self, name: str, item: Any) -> None:
        with self.lock:
            getattr(self, name).append(item)


REC = Recorder()
#: the longest a gated load or a held gen waits: a test that never lets go fails instead of hanging
HOLD_SECONDS = 30.0


class FakeBase:
    def __init__(self, path: str, nbytes: int) -> None:
        self.path = path
        self.nbytes = nbytes


def fake_loader(path: str, model_type: Any = None, config_dir: Any = None, device: str = "cpu",
                dtype: Any = None) -> tuple[FakeBase, str]:
    name = Path(path).name
    REC.add("loading", name)
    gate = REC.load_gates.get(name)
    if gate is not None and not gate.wait(HOLD_SECONDS):
        raise RuntimeError(f"the test never let the load of {name} go on")
    time.sleep(REC.load_delay)
    REC.add("loads", (name, device))
    return FakeBase(path, nbytes=100 * 2**20), model_type or "SD"


class FakePipe:
    """Follows the pipe contract of docs/internals.md."""

    PARAMS: tuple[str, ...] = ("width", "height", "steps", "guidance_scale", "clip_skip", "scheduler",
                               "timestep_spacing", "lpw")
    ALIASES: dict[str, str] = {}

    def __init__(self, model_id: Any = None, *, pipe: Any = None, model_type: Any = None, device: Any = None,
                 dtype: Any = None, **kwargs: Any) -> None:
        self.base, self.model_type, self.device = pipe, model_type, device
        self.params: dict[str, Any] = {}
        self.loras: list[Any] = []

    def setup(self, **params: Any) -> None:
        if params.get("scheduler") not in (None, "DDIM", "Euler"):
            raise UnknownSchedulerError(f"scheduler {params['scheduler']!r} is not known; allowed: DDIM, Euler",
                                        "scheduler", "DDIM, Euler")
        self.params = {"width": 64, "height": 64, "steps": 4, **params}
        REC.add("setups", dict(params))

    def set_loras(self, loras: list[Any]) -> None:
        self.loras = list(loras)
        REC.add("loras", list(loras))

    def gen(self, inputs: dict[str, Any]) -> list[Image.Image]:
        steps = int(self.params["steps"])
        seed = int(inputs["seed"])
        REC.add("gens", {"prompt": inputs["prompt"], "seed": seed, "model": Path(self.base.path).name,
                         "device": self.device, "loras": list(self.loras), "thread": threading.current_thread().name})
        if inputs["prompt"] == "boom":
            raise RuntimeError("boom: the fake pipe failed")
        for i in range(steps):
            if inputs.get("cancel") and inputs["cancel"]():
                raise Cancelled(f"cancelled after step {i}")
            time.sleep(REC.step_delay)
            if inputs.get("callback"):
                inputs["callback"](i + 1, steps, "latents")
            if REC.hold == (seed, i + 1):
                self._hold(inputs)
        colour = (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256)
        return [Image.new("RGB", (self.params["width"], self.params["height"]), colour)]

    @staticmethod
    def _hold(inputs: dict[str, Any]) -> None:
        """Stay at this step (``REC.hold``) until the cancel check is true; then the next step stops."""
        REC.holding.set()
        end = time.monotonic() + HOLD_SECONDS
        while not (inputs.get("cancel") and inputs["cancel"]()):
            if time.monotonic() > end:
                raise RuntimeError("the test never cancelled or stopped the held job")
            time.sleep(0.002)

    def get_config(self) -> dict[str, Any]:
        return {"pipe": type(self).__name__, **{k: v for k, v in self.params.items() if isinstance(v, (int, str))}}


class FakeIm2ImPipe(FakePipe):
    PARAMS = FakePipe.PARAMS + ("image", "strength", "scale")
    ALIASES = {"fimage": "image"}


class FakeInpaintingPipe(FakePipe):
    PARAMS = FakePipe.PARAMS + ("image", "mask", "blur")
    ALIASES = {"fimage": "image", "mask_image": "mask"}


FAKE_PIPES = {"Prompt2ImPipe": FakePipe, "Im2ImPipe": FakeIm2ImPipe, "InpaintingPipe": FakeInpaintingPipe}


def fake_pipe_factory(classname: str) -> type:
    return FAKE_PIPES[classname]


def fake_preview(latents: Any, model_type: Any) -> Image.Image:
    return Image.new("RGB", (8, 8), (1, 2, 3))


class FakeService(ServiceThread):
    """A ServiceThread on the fakes; ``devices`` fake device names (one worker each)."""

    loader = staticmethod(fake_loader)
    pipe_factory = staticmethod(fake_pipe_factory)
    preview_fn = staticmethod(fake_preview)
    fake_devices = ["fake:0"]

    def worker_devices(self) -> list[str]:
        return list(self.fake_devices)

    def dtype_for(self, device: str) -> Any:
        return "float32"


def write_fake_config(tmp: Path, **top: Any) -> Path:
    """config.yaml + models.yaml for the fakes in ``tmp``; ``top`` keys override (``limits={...}``)."""
    import yaml

    (tmp / "models.yaml").write_text(FAKE_MODELS_YAML)
    cfg: dict[str, Any] = {"model_list": "models.yaml", "model_dir": "models", "logging_folder": "logs",
                           "data_dir": "data", "output_dir": "outputs", "devices": "auto", "threads": 1}
    cfg.update(top)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fake_config(tmp: Path, **top: Any) -> Config:
    return load_config(write_fake_config(tmp, **top), check_models_exist=False)


@contextlib.contextmanager
def fake_service(tmp: Path, devices: list[str] | None = None, start: bool = True,
                 service_class: type[FakeService] = FakeService, **top: Any) -> Iterator[FakeService]:
    """A started ``service_class`` (stopped at exit); fresh recorder."""
    REC.__init__()  # type: ignore[misc]
    svc = service_class(fake_config(tmp, **top))
    svc.fake_devices = devices or ["fake:0"]
    if start:
        svc.start()
    try:
        yield svc
    finally:
        svc.stop(timeout=10)
        svc.store.close()


def open_fake_session(svc: ServiceThread, user: str = "alice", project: str = "p1", pipe: str = "prompt2image",
                      model: str = "m1", loras: Any = None) -> str:
    """Open a session on a fake service (its models.yaml: :data:`FAKE_MODELS_YAML`); returns its id."""
    res = svc.open_session(user, project, pipe, model, loras)
    assert "session_id" in res, res
    return res["session_id"]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s: {predicate}")


# ---- the HTTP API over a service on fake pipes -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mirrored_pipe_class(classname: str) -> type:
    """A :class:`FakePipe` with the declarations (upper-case class attributes: ``PARAMS``, ``ALIASES``...)
    of the real pipe class ``classname``: the service and the API check requests as for the real one."""
    import multigen.pipes

    real = getattr(multigen.pipes, classname)
    declared = {name: getattr(real, name) for name in dir(real) if name.isupper()}
    return type(f"Fake{classname}", (FakePipe,), declared)


class ConfigFakeService(FakeService):
    """A :class:`FakeService` for a real models.yaml (the ``config_file`` fixture's): every pipe class it
    names is a :func:`mirrored_pipe_class`, every model a :func:`fake_loader` stand-in."""

    pipe_factory = staticmethod(mirrored_pipe_class)


@dataclasses.dataclass
class ApiApp:
    """A Flask app over a :class:`ConfigFakeService`; ``tokens`` maps the users made for it to their tokens."""

    app: Any
    svc: ConfigFakeService
    tokens: dict[str, str]

    def client(self) -> Any:
        return self.app.test_client()

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


@contextlib.contextmanager
def api_app(config_file: Path, users: tuple[str, ...] = (), start: bool = True,
            **config_text: str) -> Iterator[ApiApp]:
    """An app over a ConfigFakeService (started unless ``start=False``: jobs then stay queued until
    ``svc.start()``); fresh recorder. ``config_text`` replaces text of config.yaml first
    (``**{"max_count: 100": "max_count: 3"}``); ``users`` are added with tokens."""
    from multigen.service.api import create_app
    from multigen.service.users import add_user

    REC.__init__()  # type: ignore[misc]
    text = config_file.read_text()
    for old, new in config_text.items():
        assert old in text, f"{old!r} is not in {config_file}"
        text = text.replace(old, new)
    config_file.write_text(text)
    tokens = {name: add_user(str(config_file), name) for name in users}
    cfg = load_config(config_file)
    svc = ConfigFakeService(cfg)
    app = None
    try:
        if start:
            svc.start()
        app = create_app(cfg, svc)
        app.config["TESTING"] = True
        yield ApiApp(app, svc, tokens)
    finally:
        if app is not None:
            app.extensions["multigen.stopping"].set()  # event streams and the step timer end
        svc.stop(timeout=10)


@contextlib.contextmanager
def real_api(config_file: Path) -> Iterator[tuple[Any, ServiceThread]]:
    """A test client of the API over a started real ServiceThread (real pipes on the config's models), and
    the service; both stopped after."""
    from multigen.service.api import create_app

    cfg = load_config(config_file)
    svc = ServiceThread(cfg).start()
    app = create_app(cfg, svc)
    try:
        yield app.test_client(), svc
    finally:
        app.extensions["multigen.stopping"].set()
        svc.stop()
        svc.store.close()


def open_session(client: Any, pipe: str = "prompt2image", headers: dict[str, str] | None = None,
                 **body: Any) -> dict[str, Any]:
    """``POST /api/v1/sessions`` (project p1, tiny-sd unless given); returns the Session."""
    r = client.post("/api/v1/sessions", json={"project": "p1", "pipe": pipe, "model": "tiny-sd", **body},
                    headers=headers or {})
    assert r.status_code == 201, r.get_json()
    return r.get_json()["session"]


def queue_job(client: Any, session_id: str, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    """``POST /api/v1/sessions/{id}/jobs`` (prompt "x" unless given); returns the Job."""
    r = client.post(f"/api/v1/sessions/{session_id}/jobs", json={"prompt": "x", **body}, headers=headers or {})
    assert r.status_code == 202, r.get_json()
    return r.get_json()["job"]


def wait_job(client: Any, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             headers: dict[str, str] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Poll ``GET /api/v1/jobs/{id}`` until the job is in one of ``states``; returns it."""
    def reached() -> dict[str, Any] | None:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers or {}).get_json()["job"]
        return job if job["state"] in states else None

    return wait_for(reached, timeout)


def read_sse(stream: Iterator[bytes], until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Server-sent events from a streamed test response (``iter(response.response)``), comments skipped,
    as ``{"id": int, "event": str, "data": dict}``, until ``until(events so far)`` is true."""
    out: list[dict[str, Any]] = []
    buffer = ""
    while not until(out):
        buffer += next(stream).decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.splitlines()
                          if not line.startswith(":") and ": " in line)
            if "event" in fields:
                out.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


# ---- runner script for the SIGKILL test ------------------------------------------------------------------
class SlowService(ServiceThread):
    """A real ServiceThread whose every step takes at least ``step_delay`` s (time to kill it mid-job)."""

    step_delay = 0.0


def slow_pipe_factory(classname: str) -> type:
    """The real pipe class, with every step slowed to ``SlowService.step_delay`` (time to kill it mid-job)."""
    from multigen.pipes.registry import pipe_class

    class Slow(pipe_class(classname)):  # type: ignore[misc, valid-type]
        def gen(self, inputs: dict[str, Any]) -> Any:
            cb = inputs.get("callback")

            def slow_cb(step: int, steps: int, latents: Any) -> None:
                time.sleep(SlowService.step_delay)
                if cb:
                    cb(step, steps, latents)

            return super().gen(dict(inputs, callback=slow_cb))

    Slow.__name__ = Slow.__qualname__ = classname
    return Slow


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--queue", help="JSON: {user, project, pipe, model, job: {...queue_gen kwargs}}")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--exit-when-idle", action="store_true")
    args = p.parse_args(argv)
    SlowService.step_delay = args.step_delay
    SlowService.pipe_factory = staticmethod(slow_pipe_factory)
    svc = SlowService(args.config)
    svc.start()
    if args.queue:
        spec = json.loads(Path(args.queue).read_text())
        res = svc.open_session(spec["user"], spec["project"], spec["pipe"], spec["model"], spec.get("loras"))
        if "error" in res:
            print(json.dumps(res), flush=True)
            return 1
        out = svc.queue_gen(res["session_id"], **spec["job"])
        print(json.dumps({"session_id": res["session_id"], "job_id": out["job_id"], "seeds": out["seeds"]}),
              flush=True)
    print("READY", flush=True)
    if args.exit_when_idle:
        svc.wait_idle()
        svc.stop()
        print("IDLE", flush=True)
        return 0
    while True:  # until killed
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
