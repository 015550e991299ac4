"""Fakes and runners for the service tests.

* :class:`FakePipe` and friends: pipes that sleep a few ms per step, call the step
  callback, honour the cancel check and make a flat image whose colour encodes the seed.
* :func:`fake_loader`: a ``load_base`` stand-in that counts loads.
* :class:`FakeService`: a ``ServiceThread`` wired to the fakes, on fake devices.
* ``python tests/helpers_service.py CONFIG [--queue SPEC.json] [--step-delay S]``: a small
  runner that starts a real ServiceThread (used by the SIGKILL test).
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

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
    """What the fakes saw, shared by the test and the worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loads: list[tuple[str, str]] = []
        self.gens: list[dict[str, Any]] = []
        self.setups: list[dict[str, Any]] = []
        self.loras: list[list[Any]] = []
        self.load_delay = 0.0
        self.step_delay = 0.005

    def add(self, name: str, item: Any) -> None:
        with self.lock:
            getattr(self, name).append(item)


REC = Recorder()


class FakeBase:
    def __init__(self, path: str, nbytes: int) -> None:
        self.path = path
        self.nbytes = nbytes


def fake_loader(path: str, model_type: Any = None, config_dir: Any = None, device: str = "cpu",
                dtype: Any = None) -> tuple[FakeBase, str]:
    time.sleep(REC.load_delay)
    REC.add("loads", (Path(path).name, device))
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
        colour = (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256)
        return [Image.new("RGB", (self.params["width"], self.params["height"]), colour)]

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

    def _resolve_devices(self) -> list[str]:
        return list(self.fake_devices)

    def _dtype(self, device: str) -> Any:
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
def fake_service(tmp: Path, devices: list[str] | None = None, start: bool = True, **top: Any) -> Iterator[FakeService]:
    """A started FakeService (stopped at exit); fresh recorder."""
    REC.__init__()  # type: ignore[misc]
    svc = FakeService(fake_config(tmp, **top))
    svc.fake_devices = devices or ["fake:0"]
    if start:
        svc.start()
    try:
        yield svc
    finally:
        svc.stop(timeout=10)
        svc.store.close()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s: {predicate}")


# ---- runner script for the SIGKILL test ------------------------------------------------------------------
class SlowService(ServiceThread):
    """A real ServiceThread whose every step takes at least ``step_delay`` s (time to kill it mid-job)."""

    step_delay = 0.0


def _slow_runner_class():
    from multigen.service.runner import JobRunner

    class SlowRunner(JobRunner):
        def _one_image(self, worker, job, row, session, pipe, model_type, pos, written):  # noqa: ANN001
            orig_gen = pipe.gen

            def gen(inputs: dict[str, Any]):
                cb = inputs.get("callback")

                def slow_cb(step: int, steps: int, latents: Any) -> None:
                    time.sleep(SlowService.step_delay)
                    if cb:
                        cb(step, steps, latents)

                return orig_gen(dict(inputs, callback=slow_cb))

            pipe.gen = gen
            try:
                return super()._one_image(worker, job, row, session, pipe, model_type, pos, written)
            finally:
                del pipe.gen

    return SlowRunner


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--queue", help="JSON: {user, project, pipe, model, job: {...queue_gen kwargs}}")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--exit-when-idle", action="store_true")
    args = p.parse_args(argv)
    SlowService.step_delay = args.step_delay
    SlowService.runner_class = _slow_runner_class()
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
