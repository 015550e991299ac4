"""Step 7b on the service side: cost budgets, the wall-clock limit per image, clean job errors,
events that carry no prompts, and readers told when they missed events."""
from __future__ import annotations

import json
import logging

import pytest

from helpers_service import REC, fake_service
from multigen.service.budget import CostBudget, OverBudget, job_cost
from multigen.service.errors import InvalidInput
from multigen.service.events import LOST, EventBus
from multigen.service.failures import job_error, scrub_paths


def _open(svc, user="alice"):
    return svc.open_session(user, "p", "prompt2image", "m1")["session_id"]


# ---- cost budget -------------------------------------------------------------------------------------------------
def test_a_job_over_the_per_job_ceiling_is_refused_naming_the_limit(tmp_path):
    with fake_service(tmp_path, limits={"max_megapixel_steps_per_job": 100}) as svc:
        sid = _open(svc)
        # 100 images of 4096x4096 at 500 steps: the maxima each allow it, the ceiling does not
        with pytest.raises(InvalidInput) as e:
            svc.queue_gen(sid, prompt="x", count=100, width=4096, height=4096, steps=500)
        assert e.value.code == "job_too_costly" and "max_megapixel_steps_per_job" in e.value.message
        assert "4096x4096" in e.value.message
        ok = svc.queue_gen(sid, prompt="x", count=1, width=512, height=512, steps=20)  # 5.2 MP-steps
        assert svc.wait_idle(10) and svc.get_job(ok["job_id"])["state"] == "succeeded"
        assert svc.list_jobs(sid) and len(svc.list_jobs(sid)) == 1  # the refused job was never stored


def test_the_hourly_budget_is_per_user_and_says_when_to_retry(tmp_path):
    with fake_service(tmp_path, start=False, limits={"max_megapixel_steps_per_user_hour": 30}) as svc:
        alice, bob = _open(svc), _open(svc, "bob")
        for _ in range(2):  # 64x64 -> the models' native size is unknown to the fakes: sizes given
            svc.queue_gen(alice, prompt="x", count=1, width=1000, height=1000, steps=10)  # 10 each
        with pytest.raises(OverBudget) as e:
            svc.queue_gen(alice, prompt="x", count=1, width=1000, height=1000, steps=15)
        assert e.value.http_status == 429 and 1 <= e.value.retry_after <= 3600
        assert e.value.headers() == {"Retry-After": str(e.value.retry_after)}
        assert "max_megapixel_steps_per_user_hour" in e.value.message
        svc.queue_gen(bob, prompt="x", count=1, width=1000, height=1000, steps=25)  # bob's own hour
        with pytest.raises(InvalidInput):  # more than a whole hour's budget: never, not later
            svc.queue_gen(bob, prompt="x", count=1, width=1000, height=1000, steps=31)


def test_a_refused_job_is_not_charged(tmp_path):
    with fake_service(tmp_path, start=False, limits={"max_megapixel_steps_per_user_hour": 20}) as svc:
        sid = _open(svc)
        svc.close_session(sid)
        other = _open(svc)
        with pytest.raises(Exception):
            svc.queue_gen(sid, prompt="x", width=1000, height=1000, steps=15)  # closed: refused
        svc.queue_gen(other, prompt="x", width=1000, height=1000, steps=15)  # the budget is still whole


def test_budget_window_and_refund():
    now = [0.0]
    budget = CostBudget(per_job=0, per_user_hour=10, clock=lambda: now[0])
    budget.charge("u", 6, {})
    with pytest.raises(OverBudget) as e:
        budget.charge("u", 6, {})
    assert e.value.retry_after == 3600  # the charge at t=0 leaves the window at t=3600
    budget.refund("u", 6)
    budget.charge("u", 4, {})
    now[0] = 1800
    budget.charge("u", 4, {})
    with pytest.raises(OverBudget) as e:
        budget.charge("u", 5, {})
    assert e.value.retry_after == 1800  # 4 + 4 + 5 > 10: the charge made at t=0 must leave, at t=3600
    now[0] = 3600
    budget.charge("u", 5, {})  # it has
    assert job_cost(2, 30, 1024, 1024) == pytest.approx(62.9, abs=0.1)


def test_an_image_past_its_time_limit_fails_the_job_and_the_worker_goes_on(tmp_path):
    with fake_service(tmp_path, limits={"max_seconds_per_image": 1}) as svc:
        REC.step_delay = 0.3
        sid = _open(svc)
        slow = svc.queue_gen(sid, prompt="x", steps=8)
        REC.step_delay = 0.3
        assert svc.wait_idle(20)
        job = svc.get_job(slow["job_id"])
        assert job["state"] == "failed" and job["error"]["type"] == "ImageTimeLimit"
        assert "limits.max_seconds_per_image" in job["error"]["message"]
        REC.step_delay = 0.001
        fast = svc.queue_gen(sid, prompt="y", steps=2)
        assert svc.wait_idle(10) and svc.get_job(fast["job_id"])["state"] == "succeeded"


# ---- clean errors --------------------------------------------------------------------------------------------------
def test_a_failed_job_shows_no_raw_exception_text_and_the_log_has_it(tmp_path, caplog):
    with fake_service(tmp_path) as svc:
        sid = _open(svc)
        with caplog.at_level(logging.ERROR, logger="multigen"):
            out = svc.queue_gen(sid, prompt="boom")
            assert svc.wait_idle(10)
        error = svc.get_job(out["job_id"])["error"]
        assert error["type"] == "RuntimeError" and "boom" not in error["message"]
        assert out["job_id"] in error["message"] and "server log" in error["message"]
        assert any("boom: the fake pipe failed" in (r.exc_text or "") for r in caplog.records)


def test_bad_input_messages_keep_their_sense_but_lose_server_paths():
    assert scrub_paths("file /srv/multigen/data/inputs/ab12/image.png does not exist") == \
        "file image.png does not exist"
    err = job_error(ValueError("cannot read /home/lab/models/x.safetensors: bad header"), "j1", bad_input=True,
                    field="image")
    assert err == {"type": "ValueError", "message": "cannot read x.safetensors: bad header", "field": "image"}


# ---- events ----------------------------------------------------------------------------------------------------------
def test_job_events_carry_ids_and_progress_but_no_prompts(tmp_path):
    with fake_service(tmp_path) as svc:
        sid = _open(svc)
        sub = svc.subscribe(session_id=sid)
        out = svc.queue_gen(sid, prompt="a secret prompt", negative_prompt="another secret", steps=2)
        assert svc.wait_idle(10)
        events = list(iter(lambda: sub.get(timeout=0.2), None))
        sub.close()
        types = [e["type"] for e in events]
        assert types[0] == "job.queued" and "job.succeeded" in types and "image.created" in types
        assert "secret" not in json.dumps(events)
        done = [e for e in events if e["type"] == "job.succeeded"][0]["data"]["job"]
        assert done["id"] == out["job_id"] and done["state"] == "succeeded" and done["done"] == 1
        assert done["url"] == f"/api/v1/jobs/{out['job_id']}"
        assert svc.get_job(out["job_id"])["prompt"] == "a secret prompt"  # the job itself still has it


def test_a_reader_resuming_past_the_history_is_told_it_missed_events():
    bus = EventBus(history=5)
    for i in range(10):
        bus.publish("x", {"i": i})
    sub = bus.subscribe(last_event_id=2)  # 3..5 were dropped from the history
    events = list(iter(lambda: sub.get(0.01), None))
    assert events[0]["type"] == LOST and events[0]["data"]["oldest_kept"] == 6
    assert [e["id"] for e in events[1:]] == [6, 7, 8, 9, 10]
    within = bus.subscribe(last_event_id=7)
    assert [e["type"] for e in iter(lambda: within.get(0.01), None)] == ["x", "x", "x"]  # nothing lost


def test_a_reader_resuming_with_an_id_from_before_a_restart_is_told():
    bus = EventBus()
    bus.publish("x", {})
    sub = bus.subscribe(last_event_id=500)
    events = list(iter(lambda: sub.get(0.01), None))
    assert [e["type"] for e in events] == [LOST] and "restarted" in events[0]["data"]["reason"]


def test_a_slow_reader_is_told_before_it_reads_on():
    bus = EventBus(subscriber_queue=3)
    sub = bus.subscribe()
    for i in range(6):
        bus.publish("x", {"i": i})
    events = list(iter(lambda: sub.get(0.01), None))
    assert events[0]["type"] == LOST and events[0]["id"] == 3 and events[0]["data"]["dropped"] == 3
    assert [e["id"] for e in events[1:]] == [4, 5, 6]


# ---- input images leave with their job ------------------------------------------------------------------------------
def test_a_jobs_input_images_are_kept_while_it_can_run_and_removed_when_it_ends(tmp_path):
    from PIL import Image

    with fake_service(tmp_path, start=False) as svc:
        sid = svc.open_session("alice", "p", "image2image", "m1")["session_id"]
        img = Image.new("RGB", (16, 16), (1, 2, 3))
        done = svc.queue_gen(sid, prompt="x", images=[img])
        cancelled = svc.queue_gen(sid, prompt="y", images=[img])
        inputs = svc.config.data_dir / "inputs"
        assert (inputs / done["job_id"]).is_dir() and (inputs / cancelled["job_id"]).is_dir()  # queued: kept
        svc.cancel_job(cancelled["job_id"])
        assert not (inputs / cancelled["job_id"]).exists()
        svc.start()
        assert svc.wait_idle(10)
        job = svc.get_job(done["job_id"])
        assert job["state"] == "succeeded" and not (inputs / done["job_id"]).exists()
        meta = svc.image_metadata(job["images"][0]["id"])
        assert meta["params"]["image"] == "<image image.png>"  # named by file name, not a server path


def test_python_callers_get_the_lora_cap_too(tmp_path):
    from multigen.pipes.spec import MAX_LORAS

    with fake_service(tmp_path, start=False) as svc:
        res = svc.open_session("alice", "p", "prompt2image", "m1", ["l-sd"] * (MAX_LORAS + 1))
        assert res["field"] == "loras" and str(MAX_LORAS) in res["error"]


def test_a_body_of_millions_of_lists_is_refused_before_it_is_decoded(config_file, monkeypatch):
    import flask

    from helpers_service import api_app

    with api_app(config_file) as api:
        client = api.app.test_client()
        sid = client.post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image",
                                                    "model": "tiny-sd"}).get_json()["session"]["id"]
        body = b'{"prompt": [' + b",".join([b'[""]'] * 2_000_000) + b"]}"  # 12 MB of empty lists
        decoded = []
        original = flask.Request.get_json
        monkeypatch.setattr(flask.Request, "get_json", lambda self, *a, **k: decoded.append(1) or original(self, *a, **k))
        r = client.post(f"/api/v1/sessions/{sid}/jobs", data=body, content_type="application/json")
        monkeypatch.undo()
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "too_many_items"
        assert decoded == []  # refused from the raw bytes: the JSON was never decoded


def test_client_text_in_log_lines_is_quoted_so_it_cannot_forge_lines(config_file, caplog):
    from helpers_service import api_app

    with api_app(config_file) as api, caplog.at_level(logging.INFO, logger="multigen"):
        guard = api.app.extensions["multigen.guard"]
        headers = {"Host": "evil.example"}
        error, _ = guard.check_head("POST", "/api/v1/uploads\n2026-01-01 INFO forged line", "",
                                    lambda name: headers.get(name))
        assert error is not None and error.http_status == 403
    lines = [r.getMessage() for r in caplog.records if "refused before its body" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines) and "\\n2026-01-01 INFO forged line" in lines[0]
