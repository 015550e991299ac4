"""Units of the service: job transitions, model cache, event bus, image writer, recovery details."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers_service import REC, FakeBase, fake_config, fake_pipe_factory, fake_service, wait_for
from multigen.service.cache import ModelCache, ModelTooLarge
from multigen.service.errors import Conflict, InvalidInput
from multigen.service.events import EventBus
from multigen.service.jobs import JobState, check_transition
from multigen.service.records import NewImage
from multigen.service.writer import ImageWriter, a1111_parameters


# ---- jobs -----------------------------------------------------------------------------------------------------
def test_job_transitions_are_checked_in_one_place():
    assert check_transition("j", "queued", "running") is JobState.RUNNING
    assert check_transition("j", JobState.RUNNING, "queued") is JobState.QUEUED  # requeue on stop
    with pytest.raises(Conflict, match="cancelled: it cannot become running"):
        check_transition("j", "cancelled", "running")
    with pytest.raises(Conflict, match="allowed from succeeded: none"):
        check_transition("j", "succeeded", "failed")
    assert json.dumps({"s": JobState.FAILED}) == '{"s": "failed"}' and f"{JobState.QUEUED}" == "queued"
    assert JobState.CANCELLED.finished and not JobState.RUNNING.finished


# ---- cache ----------------------------------------------------------------------------------------------------
class Loader:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, path, model_type=None, config_dir=None, device="cpu", dtype=None):
        time.sleep(self.delay)
        with self.lock:
            self.calls.append(Path(path).name)
        return FakeBase(path, nbytes=100 * 2**20), model_type or "SD"


def _cache(tmp_path, budget_mib: int, loader: Loader) -> ModelCache:
    cfg = fake_config(tmp_path)
    return ModelCache(cfg.models.base, budget_mib * 2**20, loader=loader, pipe_factory=fake_pipe_factory)


def test_cache_shares_the_base_between_pipe_classes_and_counts_hits(tmp_path):
    loader = Loader()
    cache = _cache(tmp_path, 1000, loader)
    a = cache.get("m1", "Prompt2ImPipe", "cpu", "float32")
    b = cache.get("m1", "Im2ImPipe", "cpu", "float32")
    assert a.base is b.base and loader.calls == ["m1"]
    assert cache.get("m1", "Prompt2ImPipe", "cpu", "float32") is a  # pipe objects are kept too
    cache.get("m1", "Prompt2ImPipe", "cpu", "float16")  # another dtype is another entry
    cache.get("m1", "Prompt2ImPipe", "cuda:1", "float32")  # and another device
    assert loader.calls == ["m1", "m1", "m1"]
    assert cache.counters["hits"] == 2 and cache.counters["loads"] == 3
    assert cache.held("cpu") == {"m1"} and cache.held("cuda:1") == {"m1"}
    with pytest.raises(InvalidInput, match="known: m1, m2, m3, xl"):
        cache.get("nope", "Prompt2ImPipe", "cpu", "float32")


def test_cache_evicts_least_recently_used_within_budget_but_never_a_leased_model(tmp_path):
    loader = Loader()
    cache = _cache(tmp_path, 250, loader)  # two 100 MiB models fit
    cache.get("m1", "Prompt2ImPipe", "cpu", "float32")
    cache.get("m2", "Prompt2ImPipe", "cpu", "float32")
    cache.get("m1", "Prompt2ImPipe", "cpu", "float32")  # m1 is now the most recently used
    cache.get("m3", "Prompt2ImPipe", "cpu", "float32")
    assert cache.held("cpu") == {"m1", "m3"} and cache.counters["evictions"] == 1
    with cache.lease("m1", "Prompt2ImPipe", "cpu", "float32"):
        with cache.lease("m3", "Prompt2ImPipe", "cpu", "float32"):
            with pytest.raises(ModelTooLarge, match=r"'m2' needs 0.0977 GiB .* 0.0488 GiB missing"):
                cache.get("m2", "Prompt2ImPipe", "cpu", "float32")  # over budget: both others are in use
            assert cache.held("cpu") == {"m1", "m3"}
    cache.get("xl", "Prompt2ImPipe", "cpu", "float32")
    assert len(cache.held("cpu")) == 2 and "xl" in cache.held("cpu")
    assert cache.used_bytes("cpu") <= 250 * 2**20


def test_cache_loads_once_per_key_and_in_parallel_across_keys(tmp_path):
    # m1's and m2's loads each wait inside the loader until the other one is loading too: loads done
    # one after the other would never meet (the barrier breaks after 10 s). m1's load then holds
    # until m2's caller is done, while the other two callers of m1 wait for it
    both_loading = threading.Barrier(2, timeout=10)
    m2_done = threading.Event()

    class MeetingLoader(Loader):
        def __call__(self, path, *args, **kwargs):
            both_loading.wait()
            if Path(path).name == "m1":
                assert m2_done.wait(10), "m2's caller never finished while m1 was loading"
            return super().__call__(path, *args, **kwargs)

    loader = MeetingLoader()
    cache = _cache(tmp_path, 1000, loader)
    got: dict[int, object] = {}
    errors: list[BaseException] = []

    def get(i: int, model: str) -> None:
        try:
            got[i] = cache.get(model, "Prompt2ImPipe", "cpu", "float32")
            if model == "m2":
                m2_done.set()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=get, args=(i, m)) for i, m in enumerate(("m1", "m1", "m2", "m1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(loader.calls) == ["m1", "m2"]  # m1 loaded once although asked three times at once
    assert got[0] is got[1] is got[3] and got[2] is not got[0]
    assert cache.counters["loads"] == 2 and cache.counters["hits"] == 2


# ---- events ---------------------------------------------------------------------------------------------------
def test_event_bus_bounded_queues_drop_oldest_and_close_wakes_readers():
    bus = EventBus(subscriber_queue=3)
    sub = bus.subscribe()
    for i in range(5):
        bus.publish("x", {"i": i})
    lost = sub.get(0)  # the reader is told first that it missed events (service/events.py)
    assert lost["type"] == "events.lost" and lost["data"]["dropped"] == 2
    assert [sub.get(0)["data"]["i"] for _ in range(3)] == [2, 3, 4] and sub.dropped == 2
    got = []
    reader = threading.Thread(target=lambda: got.append(sub.get(timeout=5)))
    reader.start()
    time.sleep(0.05)
    sub.close()
    reader.join(2)
    assert got == [None] and bus.subscriber_count == 0
    with bus.subscribe() as s2:
        bus.publish("y", {})
        assert next(iter(s2))["type"] == "y"
    assert bus.subscriber_count == 0


# ---- writer ---------------------------------------------------------------------------------------------------
def test_writer_is_atomic_and_carries_parameters(tmp_path, monkeypatch):
    writer = ImageWriter()
    meta = {"prompt": "a cat", "negative_prompt": "dog", "seed": 5, "width": 8, "height": 8, "model": "m",
            "params": {"steps": 4, "guidance_scale": 7.0, "scheduler": "euler"}, "threads": 2,
            "loras": [{"name": "l", "weight": 0.5}]}
    path = writer.write(tmp_path / "s", 3, Image.new("RGB", (8, 8)), meta)
    assert path.name == "00003.png" and json.loads((tmp_path / "s" / "00003.json").read_text()) == meta
    with Image.open(path) as im:
        assert im.text["parameters"] == ("a cat\nNegative prompt: dog\nSteps: 4, Sampler: euler, CFG scale: 7.0, "
                                         "Seed: 5, Size: 8x8, Model: m, Lora: l:0.5, Threads: 2")
    assert ImageWriter.read_metadata(path) == meta

    class Boom(Exception):
        pass

    def failing_save(self, fp, *a, **k):
        fp.write(b"half a png")
        raise Boom()

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(Boom):
        writer.write(tmp_path / "s", 4, Image.new("RGB", (8, 8)), meta)
    assert not (tmp_path / "s" / "00004.png").exists()
    assert not list((tmp_path / "s").glob(".*"))  # the temp file is removed on failure
    (tmp_path / "s" / ".00005.png.123.tmp").write_bytes(b"left by a killed process")
    assert ImageWriter.remove_temp_files(tmp_path / "s") == 1
    assert "Seed: 1" in a1111_parameters({"seed": 1, "prompt": "p"})


# ---- recovery and stop ----------------------------------------------------------------------------------------
def test_image_written_but_not_recorded_before_a_crash_is_adopted_not_redone(tmp_path):
    with fake_service(tmp_path, start=False) as svc:
        sid = svc.open_session("alice", "p", "prompt2image", "m1")["session_id"]
        out = svc.queue_gen(sid, prompt="x", seeds=[1, 2])
        # the state a kill leaves between "files renamed" and "row marked done": job running, row writing
        svc.store.update_job(out["job_id"], state="running")
        folder = Path(svc.store.get_session(sid).folder)
        rec = svc.store.reserve_image(NewImage(id="img0", session_id=sid, job_id=out["job_id"], pos=0, seed=1,
                                               width=64, height=64, folder=str(folder)))
        svc.writer.write(folder, rec.idx, Image.new("RGB", (64, 64), (1, 0, 0)), {"seed": 1})
        (folder / ".00001.png.999.tmp").write_bytes(b"half")
    with fake_service(tmp_path) as svc:
        assert svc.wait_idle(10)
        job = svc.get_job(out["job_id"])
        assert job["state"] == "succeeded" and [i["seed"] for i in job["images"]] == [1, 2]
        assert [g["seed"] for g in REC.gens] == [2]  # image 0 was adopted, not generated again
        assert sorted(p.name for p in folder.iterdir()) == ["00000.json", "00000.png", "00001.json", "00001.png"]


def test_stop_can_let_the_running_job_finish(tmp_path):
    with fake_service(tmp_path) as svc:
        REC.step_delay = 0.02
        sid = svc.open_session("alice", "p", "prompt2image", "m1")["session_id"]
        running = svc.queue_gen(sid, prompt="x", count=3, steps=5)
        waiting = svc.queue_gen(sid, prompt="y")
        wait_for(lambda: svc.get_job(running["job_id"])["state"] == "running")
        svc.stop(finish_running=True)
        assert svc.get_job(running["job_id"])["state"] == "succeeded"
        assert svc.get_job(waiting["job_id"])["state"] == "queued"


def test_job_transitions_are_logged_to_the_daily_file(tmp_path):
    import logging

    from multigen.service.logs import setup_logging

    setup_logging(tmp_path / "logs", console=False)
    try:
        with fake_service(tmp_path) as svc:
            sid = svc.open_session("alice", "p", "prompt2image", "m1")["session_id"]
            out = svc.queue_gen(sid, prompt="x")
            assert svc.wait_idle(10)
        text = (tmp_path / "logs" / "multigen.log").read_text()
        for change in ("queued -> running", "running -> succeeded"):
            assert f"session={sid} job={out['job_id']} {change}" in text
    finally:
        for h in list(logging.getLogger("multigen").handlers):
            if getattr(h, "_multigen", False):
                logging.getLogger("multigen").removeHandler(h)
                h.close()


def test_a_device_listed_twice_is_a_config_error():
    # two workers on one device would share the cache's pipe objects (params, scheduler, LoRAs) and race
    from multigen.service.devices import resolve_devices
    from multigen.service.errors import ConfigError

    assert resolve_devices(["cpu"]) == ["cpu"]
    with pytest.raises(ConfigError) as e:
        resolve_devices(["cpu", "cpu"])
    assert "devices" in str(e.value) and "twice" in str(e.value)


def test_queue_time_checks_agree_with_the_pipes():
    # what the pipe refuses at run time must be refused at queue time, and what it takes must be taken
    from multigen.pipes import MaskedIm2ImPipe
    from multigen.pipes.base import MAX_CLIP_SKIP
    from multigen.service.config import Limits
    from multigen.service.errors import InvalidInput
    from multigen.service.validation import check_has_image, check_setup_params

    limits = Limits()
    check_setup_params({"clip_skip": MAX_CLIP_SKIP}, MaskedIm2ImPipe, "masked", limits)
    with pytest.raises(InvalidInput) as e:
        check_setup_params({"clip_skip": MAX_CLIP_SKIP + 1}, MaskedIm2ImPipe, "masked", limits)
    assert e.value.field == "clip_skip"
    check_has_image("MaskedIm2ImPipe", {"fimage": "in.png", "mask": "m.png"}, "masked")  # metafusion's alias
    with pytest.raises(InvalidInput):
        check_has_image("MaskedIm2ImPipe", {"mask": "m.png"}, "masked")


def test_a_restarting_worker_never_exposes_an_unstarted_thread(monkeypatch):
    # stop() joins worker.thread; a supervisor restart racing with it must not have published a thread
    # that is not started yet ("cannot join thread before it is started" crashed stop())
    import threading

    from multigen.service.worker import DeviceWorker

    class Idle:
        def next_job(self, device, prefer, stop, timeout):  # noqa: ANN001
            return None

    worker = DeviceWorker(Idle(), None, "cpu", 1, None)
    worker.stop_event.set()
    seen = []
    original = threading.Thread.start

    def spy(thread):  # noqa: ANN001
        seen.append(worker.thread is thread)
        return original(thread)

    monkeypatch.setattr(threading.Thread, "start", spy)
    worker.start()
    monkeypatch.undo()
    worker.thread.join(5)
    assert seen == [False] and not worker.alive()
