"""ServiceThread with fake pipes: sessions, limits, errors, running, cancel, fairness, affinity
(robustness, events and concurrency: test_service_robustness.py)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers_service import REC, FakeService, fake_preview, fake_service, open_fake_session, wait_for
from multigen.service.errors import Conflict, InvalidInput, NotFound, QueueFull


@pytest.fixture()
def svc(tmp_path):
    with fake_service(tmp_path) as s:
        yield s


_open = open_fake_session


# ---- sessions ---------------------------------------------------------------------------------------------
def test_open_session_errors_name_the_field_and_known_values(svc):
    bad = svc.open_session("../etc", "p", "prompt2image", "m1")
    assert bad["field"] == "user" and "not allowed" in bad["error"]
    assert svc.open_session("alice", "a/b", "prompt2image", "m1")["field"] == "project"
    res = svc.open_session("alice", "p", "nope", "m1")
    assert res["field"] == "pipe" and "image2image" in res["error"] and "prompt2image" in res["error"]
    res = svc.open_session("alice", "p", "prompt2image", "sd15")
    assert res["field"] == "model" and "m1, m2, m3, xl" in res["error"]
    res = svc.open_session("alice", "p", "prompt2image", "m1", ["nope"])
    assert res["field"] == "loras.0" and "l-sd" in res["error"]
    res = svc.open_session("alice", "p", "prompt2image", "m1", ["l-xl"])
    assert res["field"] == "loras.0" and "SDXL" in res["error"] and "l-sd" in res["error"]
    res = svc.open_session("alice", "p", "prompt2image", "m1", [{"name": "l-sd", "weight": "x"}])
    assert res["field"] == "loras.0.weight"
    res = svc.open_session("alice", "p", "cond2image", "m1")
    assert res["field"] == "model" and res["code"] == "no_controlnet" and "ControlNet" in res["error"]
    assert "prompt2image" in res["error"]
    assert svc.list_sessions() == []


def test_many_sessions_per_user_up_to_the_configured_limit(tmp_path):
    with fake_service(tmp_path, limits={"max_open_sessions_per_user": 3}) as svc:
        ids = [_open(svc, project=f"p{i}") for i in range(3)]
        res = svc.open_session("alice", "p9", "prompt2image", "m1")
        assert res["code"] == "too_many_sessions" and "3" in res["error"]
        _open(svc, user="bob")
        svc.close_session(ids[0])
        _open(svc, project="again")
        assert len(svc.list_sessions(user="alice", state="open")) == 3
        assert [s["project"] for s in svc.list_sessions(user="alice", project="p1")] == ["p1"]


def test_session_info_shape(svc):
    sid = _open(svc, loras=[{"name": "l-sd", "weight": 0.7}])
    info = svc.get_session_info(sid)
    assert set(info) >= {"id", "user", "project", "pipe", "model", "loras", "state", "created_at", "image_count",
                         "job_counts"}
    assert info["loras"] == [{"name": "l-sd", "weight": 0.7}] and info["state"] == "open"
    assert info["created_at"].endswith("Z")
    with pytest.raises(NotFound):
        svc.get_session_info("nope")


# ---- queue_gen validation -----------------------------------------------------------------------------------
def test_queue_gen_validates_before_storing(svc):
    sid = _open(svc)
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", strength=0.5)
    assert e.value.field == "strength" and "allowed" in e.value.message and "steps" in e.value.message
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", count=0)
    assert e.value.field == "count" and "1 to 100" in e.value.message
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", count=101)
    assert e.value.field == "count"
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", count=2, seeds=[1, 2, 3])
    assert e.value.field == "seeds"
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", seeds=[1, -2])
    assert e.value.field == "seeds[1]"
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", width=100000)
    assert e.value.field == "width"
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt=["a", {"w": "b"}])
    assert e.value.field == "prompt"
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", images=[Image.new("RGB", (8, 8))])
    assert e.value.field == "images"
    with pytest.raises(NotFound):
        svc.queue_gen("nope", prompt="x")
    assert svc.get_session_info(sid)["job_counts"]["queued"] == 0
    assert not (svc.config.data_dir / "inputs").exists() or not any((svc.config.data_dir / "inputs").iterdir())


def test_image_pipe_needs_an_image_and_stores_it(svc):
    sid = _open(svc, pipe="image2image")
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x")
    assert e.value.field == "images"
    with pytest.raises(InvalidInput) as e:
        svc.queue_gen(sid, prompt="x", images=["/no/such/file.png"])
    assert e.value.field == "image"
    out = svc.queue_gen(sid, prompt="x", images=[Image.new("RGB", (16, 16), (9, 9, 9))], strength=0.4)
    assert svc.wait_idle(10)
    assert svc.get_job(out["job_id"])["state"] == "succeeded"
    given = REC.setups[-1]["image"]
    assert isinstance(given, Image.Image) and given.getpixel((0, 0)) == (9, 9, 9)
    assert svc.get_job(out["job_id"])["params"]["image"] == "<image image.png>"  # no server paths shown


def test_images_as_arrays_files_and_metafusion_aliases(svc, tmp_path):
    import numpy as np

    sid = _open(svc, pipe="inpainting")
    Image.new("RGB", (16, 16), (4, 5, 6)).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    out = svc.queue_gen(sid, prompt="x", fimage=str(tmp_path / "in.png"), mask=mask, blur=2)
    (tmp_path / "in.png").unlink()  # the job keeps its own copy
    assert svc.wait_idle(10)
    assert svc.get_job(out["job_id"])["state"] == "succeeded"
    setup = REC.setups[-1]
    assert setup["fimage"].getpixel((0, 0)) == (4, 5, 6) and setup["mask"].size == (16, 16)
    assert setup["blur"] == 2


def test_closed_session_refuses_jobs(svc):
    sid = _open(svc)
    closed = svc.close_session(sid)
    assert closed["state"] == "closed" and closed["closed_at"]
    with pytest.raises(Conflict):
        svc.queue_gen(sid, prompt="x")


def test_queue_full_is_an_error_not_a_wait(tmp_path):
    with fake_service(tmp_path, start=False, limits={"max_queued_jobs": 2, "max_queued_jobs_per_user": 1}) as svc:
        a, b, c = _open(svc), _open(svc, user="bob"), _open(svc, user="carol")
        svc.queue_gen(a, prompt="x")
        with pytest.raises(QueueFull, match="max_queued_jobs_per_user"):
            svc.queue_gen(a, prompt="x")
        svc.queue_gen(b, prompt="x")
        # no worker runs (start=False), so nothing can ever make room: a call that waited for room
        # would never return, and one that returns has refused at once
        refused: list[Exception] = []

        def third() -> None:
            try:
                svc.queue_gen(c, prompt="x")
            except QueueFull as e:
                refused.append(e)

        caller = threading.Thread(target=third, daemon=True)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "queue_gen waited for room that no worker can make"
        assert len(refused) == 1 and "queue full" in str(refused[0])
        assert svc.queue_info()["queued"] == 2


# ---- running ------------------------------------------------------------------------------------------------
def test_job_runs_writes_files_calls_back_and_emits_events(svc):
    sid = _open(svc, loras=["l-sd"])
    sub = svc.subscribe(session_id=sid)
    got = []
    out = svc.queue_gen(sid, prompt="a cat", negative_prompt="blur", count=3, seeds=[5, 6, 7], steps=3,
                        image_callback=got.append, guidance_scale=4.5)
    assert out["position"] == 0 and out["seeds"] == [5, 6, 7]
    assert svc.wait_idle(10)
    job = svc.get_job(out["job_id"])
    assert job["state"] == "succeeded" and job["done"] == 3 and job["error"] is None
    assert [i["index"] for i in job["images"]] == [0, 1, 2] and [i["seed"] for i in job["images"]] == [5, 6, 7]
    assert job["images"][0]["url"] == f"/api/v1/images/{job['images'][0]['id']}"
    folder = svc.config.output_dir / "alice" / "p1" / sid
    assert got == [str(folder / f"{i:05d}.png") for i in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == [f"0000{i}.{e}" for i in range(3) for e in ("json", "png")]
    meta = json.loads((folder / "00001.json").read_text())
    assert meta["seed"] == 6 and meta["prompt"] == "a cat" and meta["threads"] == 1 and meta["batch_size"] == 1
    assert meta["loras"] == [{"name": "l-sd", "weight": 1.0}] and meta["params"]["guidance_scale"] == 4.5
    with Image.open(folder / "00001.png") as im:
        assert json.loads(im.text["multigen"])["seed"] == 6
        assert "Seed: 6" in im.text["parameters"] and "Negative prompt: blur" in im.text["parameters"]
        assert im.getpixel((0, 0)) == (6, 0, 0)
    assert svc.get_image_count(sid)["image_number"] == 3
    assert svc.get_image_pathname(sid, 2) == str(folder / "00002.png")
    with pytest.raises(NotFound):
        svc.get_image_pathname(sid, 3)
    assert [i["index"] for i in svc.list_images(sid, after=0)] == [1, 2]
    assert svc.image_file(job["images"][0]["id"]) == folder / "00000.png"
    assert svc.image_metadata(job["images"][0]["id"])["seed"] == 5
    types = []
    while (ev := sub.get(timeout=0.2)) is not None:
        types.append(ev["type"])
    sub.close()
    assert types[:2] == ["job.queued", "job.started"] and types[-1] == "job.succeeded"
    assert types.count("image.created") == 3 and "job.progress" in types
    assert not list(folder.glob(".*"))  # no temp files
    stats = svc.stats()
    assert stats["images_written"] == 3 and stats["step_seconds"]["count"] == 9
    assert stats["jobs_finished"] == {"succeeded": 1} and stats["cache"]["loads"] == 1


def test_seeds_are_fixed_at_queue_time_and_prompt_grammar_expands_per_seed(svc):
    sid = _open(svc)
    out = svc.queue_gen(sid, prompt=["a", ["cat", "dog", "cow"]], count=4)
    assert len(out["seeds"]) == 4 and all(isinstance(s, int) for s in out["seeds"])
    assert svc.wait_idle(10)
    from multigen.pipes.cfgen import expand_prompt

    assert [g["prompt"] for g in REC.gens] == [expand_prompt(["a", ["cat", "dog", "cow"]], s) for s in out["seeds"]]
    assert [g["seed"] for g in REC.gens] == out["seeds"]


def test_failing_jobs_do_not_stop_the_worker(svc, caplog):
    sid = _open(svc)
    with pytest.raises(InvalidInput) as e:  # a name no pipe takes: refused when queued, nothing stored
        svc.queue_gen(sid, prompt="x", scheduler="Nope")
    assert e.value.field == "scheduler" and "dpmpp_2m" in e.value.message
    bad = svc.queue_gen(sid, prompt="boom")
    pipe_err = svc.queue_gen(sid, prompt="x", scheduler="heun")  # known, but this (fake) pipe refuses it
    good = svc.queue_gen(sid, prompt="fine")
    assert svc.wait_idle(10)
    err = svc.get_job(bad["job_id"])["error"]
    # a server-side failure: the client gets its kind and the job id, the log the exception's text
    assert err["type"] == "RuntimeError" and bad["job_id"] in err["message"] and "boom" not in err["message"]
    assert "boom: the fake pipe failed" in caplog.text
    err = svc.get_job(pipe_err["job_id"])
    assert err["state"] == "failed" and err["error"]["type"] == "UnknownSchedulerError"
    assert err["error"]["field"] == "scheduler" and "DDIM" in err["error"]["message"]
    assert svc.get_job(good["job_id"])["state"] == "succeeded"


def test_user_callback_exceptions_are_logged_not_fatal(svc, caplog):
    sid = _open(svc)

    def bad_callback(path):
        raise ValueError("user bug")

    out = svc.queue_gen(sid, prompt="x", count=2, image_callback=bad_callback)
    assert svc.wait_idle(10)
    assert svc.get_job(out["job_id"])["state"] == "succeeded"
    assert svc.get_image_count(sid)["image_number"] == 2
    assert "image_callback raised" in caplog.text


def test_loras_never_leak_into_the_next_job(svc):
    with_lora = _open(svc, loras=[{"name": "l-sd", "weight": 0.5}])
    without = _open(svc, project="p2")
    svc.queue_gen(with_lora, prompt="x")
    svc.queue_gen(without, prompt="y")
    assert svc.wait_idle(10)
    assert [g["prompt"] for g in REC.gens] == ["x", "y"]
    assert REC.gens[0]["loras"] == [(str(svc.config.models.lora["l-sd"].path), 0.5)]
    assert REC.gens[1]["loras"] == []


def test_progress_eta_and_preview_while_running(svc):
    REC.step_delay = 0.05
    REC.hold = (31, 3)  # the first image stops after its step 3 until the cancel
    sid = _open(svc)
    out = svc.queue_gen(sid, prompt="x", seeds=[31, 32], steps=20)
    assert REC.holding.wait(10)
    job = svc.get_job(out["job_id"])
    assert job["state"] == "running" and job["position"] is None
    assert job["progress"] == {"step": 3, "steps": 20, "image": 0, "fraction": 0.075}  # 3 of 40 steps
    # every step sleeps 0.05 s, so the measured time a step is at least that: the ETA covers the 17
    # steps left of this image and the 20 of the next one
    assert job["eta_seconds"] >= 0.05 * (17 + 20)
    preview = svc.preview(out["job_id"])  # the first step always makes one
    assert preview[:2] == b"\xff\xd8"  # JPEG
    svc.cancel_job(out["job_id"])
    assert svc.wait_idle(10)
    assert svc.get_job(out["job_id"])["state"] == "cancelled"
    assert svc.preview(out["job_id"]) is None


class PreviewClock:
    """A preview_fn that notes when each preview was made (the runner's clock, perf_counter)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, latents, model_type):
        self.times.append(time.perf_counter())
        return fake_preview(latents, model_type)


def _service_with_previews(tmp_path, clock: PreviewClock):
    class Counted(FakeService):
        preview_fn = staticmethod(clock)

    return fake_service(tmp_path, service_class=Counted)


def test_a_preview_is_made_at_most_once_per_step(tmp_path, monkeypatch):
    from multigen.service import runner

    monkeypatch.setattr(runner, "PREVIEW_INTERVAL_SECONDS", 0.0)  # no rate limit: every step may make one
    clock = PreviewClock()
    with _service_with_previews(tmp_path, clock) as svc:
        out = svc.queue_gen(_open(svc), prompt="x", count=2, steps=6)
        assert svc.wait_idle(10) and svc.get_job(out["job_id"])["state"] == "succeeded"
    assert len(clock.times) == 2 * 6


def test_previews_are_rate_limited_to_one_per_interval(tmp_path):
    from multigen.service.runner import PREVIEW_INTERVAL_SECONDS

    REC_STEP = 0.02
    clock = PreviewClock()
    with _service_with_previews(tmp_path, clock) as svc:
        REC.step_delay = REC_STEP
        steps = 60  # at least 1.2 s of steps: more than two intervals
        out = svc.queue_gen(_open(svc), prompt="x", steps=steps)
        assert svc.wait_idle(30) and svc.get_job(out["job_id"])["state"] == "succeeded"
    assert steps * REC_STEP > 2 * PREVIEW_INTERVAL_SECONDS
    # the first step makes one, and a step at least an interval after the last preview the next one
    assert 2 <= len(clock.times) < steps
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    assert min(gaps) >= PREVIEW_INTERVAL_SECONDS, gaps


# ---- cancel / close -----------------------------------------------------------------------------------------
def test_cancel_queued_running_and_finished(svc):
    REC.hold = (3, 4)  # the third image holds after its step 4 until the cancel
    sid = _open(svc)
    running = svc.queue_gen(sid, prompt="x", seeds=[1, 2, 3, 4, 5], steps=10)
    queued = svc.queue_gen(sid, prompt="y")
    assert REC.holding.wait(10)
    assert svc.get_job(running["job_id"])["state"] == "running"
    assert svc.get_job(queued["job_id"])["position"] == 0
    assert svc.cancel_job(queued["job_id"])["state"] == "cancelled"
    view = svc.cancel_job(running["job_id"])
    assert view["state"] == "running" and view["cancel_requested"]
    assert svc.wait_idle(10)
    job = svc.get_job(running["job_id"])
    assert job["state"] == "cancelled" and job["done"] == 2 and job["finished_at"]
    assert svc.get_image_count(sid)["image_number"] == 2  # the third image, cut short, is not written
    with pytest.raises(Conflict):
        svc.cancel_job(running["job_id"])
    with pytest.raises(NotFound):
        svc.cancel_job("nope")
    assert [g["prompt"] for g in REC.gens].count("y") == 0


def test_close_session_cancels_its_jobs_and_keeps_images(svc):
    sid = _open(svc)
    other = _open(svc, user="bob")
    a = svc.queue_gen(sid, prompt="x", count=1, steps=2)
    assert svc.wait_idle(10)
    REC.hold = (7, 2)  # b's first image holds after its step 2 until the close cancels it
    b = svc.queue_gen(sid, prompt="x", seeds=[7, 8, 9, 10], steps=10)
    c = svc.queue_gen(sid, prompt="x")
    d = svc.queue_gen(other, prompt="z")
    assert REC.holding.wait(10)
    assert svc.get_job(b["job_id"])["state"] == "running"
    sub = svc.subscribe(session_id=sid)
    info = svc.close_session(sid)
    assert info["state"] == "closed"
    assert svc.wait_idle(10)
    assert svc.get_job(a["job_id"])["state"] == "succeeded"
    assert svc.get_job(b["job_id"])["state"] == "cancelled"
    assert svc.get_job(c["job_id"])["state"] == "cancelled"
    assert svc.get_job(d["job_id"])["state"] == "succeeded"
    assert svc.get_image_count(sid)["image_number"] == 1 and Path(svc.get_image_pathname(sid, 0)).exists()
    types = [e["type"] for e in iter(lambda: sub.get(timeout=0.2), None)]
    assert "session.closed" in types


# ---- scheduling through the service --------------------------------------------------------------------------
def test_fair_across_users_fifo_within(tmp_path):
    with fake_service(tmp_path, start=False) as svc:
        a, b = _open(svc), _open(svc, user="bob")
        for p in ("a1", "a2", "a3"):
            svc.queue_gen(a, prompt=p)
        svc.queue_gen(b, prompt="b1")
        svc.queue_gen(b, prompt="b2", priority=0)
        svc.start()
        assert svc.wait_idle(10)
        assert [g["prompt"] for g in REC.gens] == ["a1", "b1", "a2", "b2", "a3"]


def test_priority_through_the_service(tmp_path):
    with fake_service(tmp_path, start=False) as svc:
        a = _open(svc)
        svc.queue_gen(a, prompt="low")
        svc.queue_gen(a, prompt="high", priority=10)
        svc.start()
        assert svc.wait_idle(10)
        assert [g["prompt"] for g in REC.gens] == ["high", "low"]


def test_fifty_jobs_at_priority_100_do_not_jump_another_users_job(tmp_path):
    with fake_service(tmp_path, start=False, limits={"max_queued_jobs_per_user": 100}) as svc:
        a, b = _open(svc), _open(svc, user="bob")
        for i in range(50):
            svc.queue_gen(a, prompt=f"a{i}", priority=100, steps=1)
        other = svc.queue_gen(b, prompt="bob's", priority=0, steps=1)
        assert other["position"] == 1
        svc.start()
        assert svc.wait_idle(30)
        assert [g["prompt"] for g in REC.gens][:3] == ["a0", "bob's", "a1"]


def test_workers_prefer_jobs_whose_model_they_hold(tmp_path):
    # fair order after alice's job is bob's (m2), then carol's (m1); the worker, holding m1 once
    # alice's job ran, takes carol's first: one load saved (service/scheduling.py, affinity)
    with fake_service(tmp_path, start=False) as svc:
        m1_loaded = threading.Event()
        REC.load_gates["m1"] = m1_loaded  # alice's job waits in its load while the others queue
        alice = _open(svc, model="m1")
        bob, carol = _open(svc, user="bob", model="m2"), _open(svc, user="carol", model="m1")
        svc.queue_gen(alice, prompt="a1")
        svc.start()
        try:
            wait_for(lambda: "m1" in REC.loading)
            bob_job = svc.queue_gen(bob, prompt="b1")
            carol_job = svc.queue_gen(carol, prompt="c1")
            assert svc.get_job(bob_job["job_id"])["position"] == 0  # bob's turn comes first...
            assert svc.get_job(carol_job["job_id"])["position"] == 1
        finally:
            m1_loaded.set()
        assert svc.wait_idle(10)
        assert [g["prompt"] for g in REC.gens] == ["a1", "c1", "b1"]  # ...but carol's job uses the held model
        assert [name for name, _ in REC.loads] == ["m1", "m2"]


def test_model_loads_happen_outside_locks_other_workers_need(tmp_path):
    with fake_service(tmp_path, devices=["fake:0", "fake:1"], start=False) as svc:
        m1_loaded = threading.Event()
        REC.load_gates["m1"] = m1_loaded  # m1's load stays blocked until the test lets it go
        s1 = _open(svc, model="m1")
        s2 = _open(svc, user="bob", model="m2")
        slow = svc.queue_gen(s1, prompt="slow-load")
        svc.start()
        try:
            wait_for(lambda: "m1" in REC.loading)  # one worker is inside m1's load
            fast = svc.queue_gen(s2, prompt="fast")
            # the other worker loads m2 and runs its job to the end while m1's load is still blocked
            wait_for(lambda: svc.get_job(fast["job_id"])["state"] == "succeeded")
            assert [name for name, _ in REC.loads] == ["m2"] and not m1_loaded.is_set()
            assert svc.get_job(slow["job_id"])["state"] == "running"
        finally:
            m1_loaded.set()
        assert svc.wait_idle(10)
        assert svc.get_job(slow["job_id"])["state"] == "succeeded"
        assert [g["prompt"] for g in REC.gens] == ["fast", "slow-load"]
