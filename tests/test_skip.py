"""Skipping the image a running job is making (A1111's ``skip``; ``POST /api/v1/jobs/{id}/skip``): the image
stops at its next step, unwritten, the job goes on with its next image and succeeds with the others; the
skipped place is stored, so a restart does not make it again. Fake pipes: nothing is drawn."""
from __future__ import annotations

import base64

import pytest

from helpers_service import REC, fake_service, open_fake_session, wait_for
from multigen.service.errors import Conflict


def test_a_skip_drops_the_image_being_made_and_the_job_goes_on(tmp_path):
    with fake_service(tmp_path) as svc:
        REC.hold = (12, 2)  # the second image holds after its step 2 until its cancel check is true
        sid = open_fake_session(svc)
        out = svc.queue_gen(sid, prompt="x", count=3, seeds=[11, 12, 13], steps=4)
        assert REC.holding.wait(10)
        view = svc.cancel_job(out["job_id"], image_only=True)
        assert view["state"] == "running" and view["skip_requested"] and not view["cancel_requested"]
        assert svc.wait_idle(10)
        job = svc.get_job(out["job_id"])
        assert job["state"] == "succeeded" and job["done"] == 2 and job["skipped"] == [1], job
        assert [i["seed"] for i in svc.list_images(sid)] == [11, 13]  # image 12 was begun, never written
        assert [g["seed"] for g in REC.gens] == [11, 12, 13] and not job["skip_requested"]
        with pytest.raises(Conflict) as e:  # a finished job has no image to skip
            svc.cancel_job(out["job_id"], image_only=True)
        assert e.value.field == "job_id"


def test_a_skipped_image_is_not_made_again_after_a_restart(tmp_path):
    with fake_service(tmp_path) as svc:
        REC.hold = (12, 2)
        sid = open_fake_session(svc)
        out = svc.queue_gen(sid, prompt="x", count=3, seeds=[11, 12, 13], steps=4)
        assert REC.holding.wait(10)
        REC.holding.clear()
        REC.hold = (13, 2)  # then the third image holds until stop() says stop
        svc.cancel_job(out["job_id"], image_only=True)
        assert REC.holding.wait(10)
        svc.stop()
        job = svc.get_job(out["job_id"])
        assert job["state"] == "queued" and job["skipped"] == [1] and job["done"] == 1
    with fake_service(tmp_path) as svc:
        assert svc.wait_idle(10)
        job = svc.get_job(out["job_id"])
        assert job["state"] == "succeeded" and job["skipped"] == [1] and job["done"] == 2
        assert [g["seed"] for g in REC.gens] == [13]  # neither the written nor the skipped image again


def test_skip_over_http_in_both_dialects_acts_on_the_callers_running_job(make_api):
    api = make_api(users=("alice", "bob"))
    client = api.client()
    alice, bob = api.headers("alice"), api.headers("bob")
    # a queued job has no image being made: 409; a job of another user: 404
    REC.hold = (22, 1)
    session = api.svc.create_session("alice", "a1111", "prompt2image", "tiny-sd")
    job = api.svc.queue_gen(session["id"], prompt="x", count=3, seeds=[21, 22, 23], steps=3)["job"]
    assert REC.holding.wait(10)
    assert client.post(f"/api/v1/jobs/{job['id']}/skip", headers=bob).status_code == 404
    assert client.post("/sdapi/v1/skip", headers=bob).get_json() == {}  # bob has no job: nothing happens
    progress = client.get("/sdapi/v1/progress", headers=bob).get_json()
    assert progress["state"]["job_count"] == 0
    basic = {"Authorization": "Basic " + base64.b64encode(f"alice:{api.tokens['alice']}".encode()).decode()}
    assert client.post("/sdapi/v1/skip", headers=basic).get_json() == {}
    wait_for(lambda: api.svc.get_job(job["id"])["state"] == "succeeded", timeout=10)
    done = api.svc.get_job(job["id"])
    assert done["skipped"] == [1] and [i["seed"] for i in done["images"]] == [21, 23]
    # the session API's own route
    REC.holding.clear()
    REC.hold = (32, 1)
    second = api.svc.queue_gen(session["id"], prompt="x", count=2, seeds=[31, 32], steps=3)["job"]
    assert REC.holding.wait(10)
    r = client.post(f"/api/v1/jobs/{second['id']}/skip", headers=alice)
    assert r.status_code == 200 and r.get_json()["job"]["skip_requested"]
    wait_for(lambda: api.svc.get_job(second["id"])["state"] == "succeeded", timeout=10)
    assert api.svc.get_job(second["id"])["skipped"] == [1]
    r = client.post(f"/api/v1/jobs/{second['id']}/skip", headers=alice)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "job_finished"


def test_a_queued_job_has_no_image_to_skip(make_api):
    api = make_api(start=False)  # jobs stay queued
    client = api.client()
    session = client.post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image", "model": "tiny-sd"})
    job = client.post(f"/api/v1/sessions/{session.get_json()['session']['id']}/jobs", json={"prompt": "x"})
    job_id = job.get_json()["job"]["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/skip")
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "job_not_running"
    assert api.svc.get_job(job_id)["state"] == "queued"  # nothing else changed
