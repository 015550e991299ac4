"""Sessions, jobs and the queue through the Flask test client, over a ServiceThread on fake pipes."""
from __future__ import annotations

import pytest
from helpers_service import REC, open_session, queue_job, wait_for, wait_job

#: a 1x1 PNG: the input image of the image pipes' jobs
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAE"
         "lFTkSuQmCC")


def err(r):
    body = r.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_open_get_list_close_session(client):
    s = open_session(client, loras=["tiny-sd-lora", {"name": "tiny-sd-lora", "weight": 0.5}])
    assert s["user"] == "local" and s["state"] == "open" and s["job_counts"]["queued"] == 0
    assert s["loras"] == [{"name": "tiny-sd-lora", "weight": 1.0}, {"name": "tiny-sd-lora", "weight": 0.5}]
    assert client.get(f"/api/v1/sessions/{s['id']}").get_json()["session"]["id"] == s["id"]
    open_session(client, project="p2", user="alice")
    listed = client.get("/api/v1/sessions?project=p1").get_json()["sessions"]
    assert [x["id"] for x in listed] == [s["id"]]
    assert len(client.get("/api/v1/sessions?user=alice").get_json()["sessions"]) == 1
    r = client.delete(f"/api/v1/sessions/{s['id']}")
    assert r.status_code == 200 and r.get_json()["session"]["state"] == "closed"
    assert r.get_json()["session"]["closed_at"]
    assert client.get("/api/v1/sessions?state=closed").get_json()["sessions"][0]["id"] == s["id"]
    assert client.delete(f"/api/v1/sessions/{s['id']}").status_code == 200  # closing twice is harmless
    r = client.get("/api/v1/sessions?state=shut")
    assert r.status_code == 400 and err(r)["field"] == "state"


def test_closing_a_session_cancels_its_queued_jobs(make_api):
    api = make_api(start=False)  # no worker: the jobs stay queued
    client = api.client()
    s = open_session(client)
    jobs = [queue_job(client, s["id"]) for _ in range(2)]
    closed = client.delete(f"/api/v1/sessions/{s['id']}").get_json()["session"]
    assert closed["job_counts"]["cancelled"] == 2 and closed["job_counts"]["queued"] == 0
    assert [client.get(f"/api/v1/jobs/{j['id']}").get_json()["job"]["state"] for j in jobs] == ["cancelled"] * 2
    assert client.get("/api/v1/queue").get_json()["queued"] == 0


@pytest.mark.parametrize("body,field,words", [
    ({"project": "p", "pipe": "nope", "model": "tiny-sd"}, "pipe", ["known:", "prompt2image"]),
    ({"project": "p", "pipe": "prompt2image", "model": "nope"}, "model", ["known:", "tiny-sd"]),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": ["nope"]}, "loras", ["tiny-sd-lora"]),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": [{"name": "tiny-sdxl-lora"}]},
     "loras", ["SDXL", "tiny-sd-lora"]),
    ({"project": "p", "pipe": "cond2image", "model": "tiny-sdxl"}, None, ["ControlNet"]),
    ({"project": "../etc", "pipe": "prompt2image", "model": "tiny-sd"}, "project", []),
    ({"pipe": "prompt2image", "model": "tiny-sd"}, "project", ["required"]),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "colour": 1}, "colour", ["allowed:"]),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": [{"name": "tiny-sd-lora",
                                                                             "weight": "x"}]}, "loras", []),
])
def test_session_bad_input_is_400_naming_the_field_and_the_known_values(client, body, field, words):
    r = client.post("/api/v1/sessions", json=body)
    e = err(r)
    assert r.status_code == 400, e
    assert field is None or e["field"].startswith(field), e
    assert all(w in e["message"] for w in words), e
    assert client.get("/api/v1/sessions").get_json()["sessions"] == []


@pytest.mark.parametrize("body,field,code", [
    ({"project": "p", "pipe": "nope", "model": "tiny-sd"}, "pipe", "unknown_pipe"),
    ({"project": "p", "pipe": "prompt2image", "model": "nope"}, "model", "unknown_model"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": ["nope"]}, "loras.0", "unknown_lora"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": [{"name": "tiny-sdxl-lora"}]},
     "loras.0.name", "lora_mismatch"),
    ({"project": "p", "pipe": "cond2image", "model": "tiny-sdxl"}, "model", "no_controlnet"),
    ({"project": "../etc", "pipe": "prompt2image", "model": "tiny-sd"}, "project", "invalid"),
    ({"pipe": "prompt2image", "model": "tiny-sd"}, "project", "missing"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "colour": 1}, "colour", "unknown_parameter"),
])
def test_session_errors_have_their_codes(client, body, field, code):
    e = err(client.post("/api/v1/sessions", json=body))
    assert (e["code"], e["field"]) == (code, field), e


def test_session_body_errors_415_and_400(client):
    r = client.post("/api/v1/sessions", data="project=p", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and err(r)["code"] == "unsupported_media_type"
    r = client.post("/api/v1/sessions", data="{not json", content_type="application/json")
    assert r.status_code == 400 and err(r)["code"] == "malformed_json"
    r = client.post("/api/v1/sessions", json=[1, 2])
    assert r.status_code == 400 and err(r)["code"] == "invalid_body"


def test_too_many_open_sessions_is_429(make_api):
    client = make_api(**{"max_open_sessions_per_user: 100": "max_open_sessions_per_user: 2"}).client()
    first = open_session(client)
    open_session(client, project="p2")
    r = client.post("/api/v1/sessions", json={"project": "p3", "pipe": "prompt2image", "model": "tiny-sd"})
    assert r.status_code == 429 and err(r)["code"] == "too_many_sessions" and "2" in err(r)["message"]
    open_session(client, user="bob")  # the limit is per user
    client.delete(f"/api/v1/sessions/{first['id']}")
    open_session(client, project="p3")  # a closed session frees its place


def test_unknown_ids_are_404(client):
    for path in ("/api/v1/sessions/nope", "/api/v1/jobs/nope", "/api/v1/images/nope", "/api/v1/images/nope/metadata",
                 "/api/v1/jobs/nope/preview", "/api/v1/sessions/nope/images", "/api/v1/sessions/nope/jobs"):
        r = client.get(path)
        assert r.status_code == 404 and err(r)["code"] == "not_found", path
    assert client.delete("/api/v1/sessions/nope").status_code == 404
    assert client.post("/api/v1/jobs/nope/cancel").status_code == 404
    assert client.post("/api/v1/sessions/nope/jobs", json={"prompt": "x"}).status_code == 404


def test_queue_job_passes_parameters_and_returns_202(make_api):
    api = make_api(start=False)
    client = api.client()
    s = open_session(client)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
        "prompt": "a cat", "negative_prompt": "dogs", "seeds": [1, 2, 3], "steps": 2, "width": 64, "height": 64,
        "guidance_scale": 5.5, "clip_skip": 1, "priority": 2})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()["job"]
    assert job["state"] == "queued" and job["position"] == 0 and job["seeds"] == [1, 2, 3] and job["count"] == 3
    assert (job["prompt"], job["negative_prompt"], job["priority"]) == ("a cat", "dogs", 2)
    assert job["params"] == {"steps": 2, "width": 64, "height": 64, "guidance_scale": 5.5, "clip_skip": 1}
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["job"]["id"] == job["id"]
    assert [j["id"] for j in client.get(f"/api/v1/sessions/{s['id']}/jobs").get_json()["jobs"]] == [job["id"]]
    assert client.get(f"/api/v1/sessions/{s['id']}/jobs?state=running").get_json()["jobs"] == []
    r = client.get(f"/api/v1/sessions/{s['id']}/jobs?state=done")
    assert r.status_code == 400 and err(r)["field"] == "state"
    # Cfgen grammar as JSON
    grammar = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": ["a cat", ["a dog", "a fox"]],
                                                                      "count": 2})
    assert grammar.status_code == 202 and grammar.get_json()["job"]["prompt"] == ["a cat", ["a dog", "a fox"]]

    api.svc.start()
    done = wait_job(client, job["id"])
    assert done["state"] == "succeeded" and [im["seed"] for im in done["images"]] == [1, 2, 3]
    # only the parameters given reach the pipe: its defaults apply to the rest
    assert REC.setups[0] == {"steps": 2, "width": 64, "height": 64, "guidance_scale": 5.5, "clip_skip": 1}
    assert [g["seed"] for g in REC.gens[:3]] == [1, 2, 3] and REC.gens[0]["prompt"] == "a cat"
    assert wait_job(client, grammar.get_json()["job"]["id"])["state"] == "succeeded"
    assert all(g["prompt"].startswith("a cat") for g in REC.gens[3:]) and len(REC.gens) == 5


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "strength": 0.5}, "strength"),   # not a Prompt2ImPipe parameter
    ({"prompt": "x", "images": ["up_x"]}, "images"),
    ({"prompt": "x", "width": 32}, "width"),
    ({"prompt": "x", "width": 100000}, "width"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "count": 0}, "count"),
    ({"prompt": "x", "count": 101}, "count"),
    ({"prompt": "x", "seeds": [-1]}, "seeds.0"),
    ({"prompt": "x", "seeds": [1, 2], "count": 3}, "seeds"),  # the service's check
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "timestep_spacing": "odd"}, "timestep_spacing"),
    ({"negative_prompt": "x"}, "prompt"),
    ({"prompt": "x", "scheduler": "nope"}, "scheduler"),
    # the API used to pass these on: a job of 0 images, and more seeds than limits.max_count
    ({"prompt": "x", "seeds": []}, "seeds"),
    ({"prompt": "x", "seeds": list(range(101))}, "seeds"),
    # past the pipes' own ranges (the API allowed clip_skip up to 12: a queued job that then failed)
    ({"prompt": "x", "clip_skip": 11}, "clip_skip"),
])
def test_bad_job_parameters_are_400_naming_them(client, body, field):
    s = open_session(client)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json=body)
    e = err(r)
    assert r.status_code == 400 and e["field"].split(".")[0] == field.split(".")[0], e
    if e["code"] == "unknown_parameter":
        assert "allowed:" in e["message"] and "steps" in e["message"]
    assert client.get(f"/api/v1/sessions/{s['id']}").get_json()["session"]["job_counts"]["queued"] == 0


def test_image_pipe_takes_its_own_parameters(client):
    s = open_session(client, pipe="cimage2image")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
        "prompt": "x", "images": [PIXEL], "strength": 0.4, "control": [{"type": "canny", "scale": 0.7}]})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()["job"]
    assert job["params"]["ctypes"] == ["canny"] and job["params"]["cscales"] == [0.7]
    assert wait_job(client, job["id"])["state"] == "succeeded"
    setup = REC.setups[-1]
    assert (setup["ctypes"], setup["cscales"], setup["strength"]) == (["canny"], [0.7], 0.4)
    assert setup["image"].size == (1, 1)  # the data: URL's image, stored with the job
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [PIXEL],
                                                               "control": [{"type": "nope"}]})
    assert r.status_code == 400 and err(r)["field"].startswith("control.0")
    s2 = open_session(client, pipe="cond2image")
    r = client.post(f"/api/v1/sessions/{s2['id']}/jobs", json={"prompt": "x", "control": [{"type": "canny"}]})
    assert r.status_code == 400 and err(r)["field"] == "control"
    r = client.post(f"/api/v1/sessions/{s2['id']}/jobs", json={"prompt": "x"})
    assert r.status_code == 400 and err(r)["field"] == "images"  # the service's check: an image pipe needs one


def test_job_into_closed_session_is_409(client):
    s = open_session(client)
    client.delete(f"/api/v1/sessions/{s['id']}")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"})
    assert r.status_code == 409 and err(r)["code"] == "conflict" and err(r)["field"] == "session_id"


def test_full_queue_is_429(make_api):
    client = make_api(start=False, **{"max_queued_jobs: 1000": "max_queued_jobs: 1"}).client()
    s = open_session(client)
    queue_job(client, s["id"])
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"})
    assert r.status_code == 429 and err(r)["code"] == "queue_full" and "max_queued_jobs" in err(r)["message"]
    assert client.get("/api/v1/queue").get_json()["queued"] == 1


def test_unexpected_error_is_logged_500_in_json_shape(api, client, caplog, monkeypatch):
    s = open_session(client)

    def broken(*args, **kwargs):
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr(api.svc, "queue_gen", broken)
    with caplog.at_level("ERROR", logger="multigen.service.api.app"):
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"})
    assert r.status_code == 500 and err(r)["code"] == "internal_error"
    assert "an unexpected bug" not in r.get_data(as_text=True)  # logged, not shown
    assert any(rec.exc_info and "an unexpected bug" in str(rec.exc_info[1]) for rec in caplog.records)


def test_cancel_queued_then_finished_is_409(make_api):
    client = make_api(start=False).client()
    s = open_session(client)
    job = queue_job(client, s["id"])
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.get_json()["job"]["state"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and err(r)["code"] == "job_finished"


def test_cancel_running_stops_after_the_current_step(client):
    REC.step_delay = 0.02
    s = open_session(client)
    job = queue_job(client, s["id"], steps=500)
    wait_job(client, job["id"], states=("running",))
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.get_json()["job"]["cancel_requested"] is True
    done = wait_job(client, job["id"])
    assert done["state"] == "cancelled" and done["images"] == [] and done["progress"]["step"] < 500


def test_preview_exists_only_while_a_job_runs(make_api):
    api = make_api(start=False)
    client = api.client()
    REC.step_delay = 0.02
    s = open_session(client)
    job = queue_job(client, s["id"], steps=500)
    r = client.get(f"/api/v1/jobs/{job['id']}/preview")
    assert r.status_code == 404 and err(r)["code"] == "no_preview"
    q = client.get("/api/v1/queue").get_json()
    assert (q["queued"], q["running"], q["workers"]) == (1, 0, [])

    api.svc.start()
    preview = wait_for(lambda: (r := client.get(f"/api/v1/jobs/{job['id']}/preview")).status_code == 200 and r)
    assert preview.mimetype == "image/jpeg" and preview.data[:2] == b"\xff\xd8"
    assert preview.headers["Cache-Control"] == "no-store" and "Authorization" in preview.headers["Vary"]
    q = client.get("/api/v1/queue").get_json()
    assert (q["queued"], q["running"]) == (0, 1)
    assert q["workers"][0]["device"] == "fake:0" and q["workers"][0]["job_id"] == job["id"]
    client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert wait_job(client, job["id"])["state"] == "cancelled"
    assert client.get(f"/api/v1/jobs/{job['id']}/preview").status_code == 404

    REC.step_delay = 0.001
    done = wait_job(client, queue_job(client, s["id"], steps=2)["id"])
    assert done["state"] == "succeeded" and done["done"] == 1 and done["images"][0]["url"].startswith("/api/v1/")
    assert client.get(f"/api/v1/jobs/{done['id']}/preview").status_code == 404  # finished: no preview


def test_health_and_models(client):
    h = client.get("/api/v1/health").get_json()
    assert h["status"] == "ok" and h["version"] and h["auth"] is False
    assert [d["device"] for d in h["devices"]] == ["fake:0"] and h["devices"][0]["dtype"] == "float32"
    assert h["queue"]["queued"] == 0 and h["queue"]["workers"][0]["job_id"] is None
    m = client.get("/api/v1/models").get_json()
    assert {"tiny-sd", "tiny-sdxl"} <= {x["name"] for x in m["models"]}
    by_name = {x["name"]: x for x in m["models"]}
    assert by_name["tiny-sd"]["native_size"] == [512, 512] and by_name["tiny-sdxl"]["native_size"] == [1024, 1024]
    assert by_name["tiny-sd"]["defaults"] == {}
    assert "tiny-sd-lora" in {x["name"] for x in m["loras"]}
    assert "prompt2image" in {p["name"] for p in m["pipes"]} and "DDIMScheduler" in m["schedulers"]


def test_masked_pipe_ranges_and_types_are_the_pipes_own(client):
    """blur_compose is a blur radius (a number) in the pipe, and the schema says so: it used to say boolean,
    so the API refused every number and the pipe every boolean."""
    from multigen.pipes.base import MAX_CLIP_SKIP
    from multigen.pipes.im2im import MAX_BLUR

    doc = client.get("/api/v1/openapi.json").get_json()
    props = doc["components"]["schemas"]["JobCreate_masked_image2image"]["properties"]
    compose, blur, skip = (props[k]["anyOf"][0] for k in ("blur_compose", "blur", "clip_skip"))
    assert compose["type"] == "integer" and compose["maximum"] == blur["maximum"] == MAX_BLUR
    assert skip["maximum"] == MAX_CLIP_SKIP
    s = open_session(client, pipe="masked_image2image")
    job = queue_job(client, s["id"], images=[PIXEL], mask=PIXEL, blur_compose=8, blur=MAX_BLUR,
                    clip_skip=MAX_CLIP_SKIP)
    assert wait_job(client, job["id"])["state"] == "succeeded"
    assert (REC.setups[-1]["blur_compose"], REC.setups[-1]["clip_skip"]) == (8, MAX_CLIP_SKIP)
    for body, field in [({"blur_compose": "soft"}, "blur_compose"), ({"blur": MAX_BLUR + 1}, "blur"),
                        ({"blur_compose": MAX_BLUR + 1}, "blur_compose")]:
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [PIXEL], "mask": PIXEL,
                                                                   **body})
        assert r.status_code == 400 and err(r)["field"] == field, (body, r.get_json())


def test_deeply_nested_bodies_are_400_not_500(client):
    """Deep nesting used to end in a RecursionError (JSON decoder) or a serialisation depth error: a 500."""
    s = open_session(client)
    url = f"/api/v1/sessions/{s['id']}/jobs"
    r = client.post(url, data='{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", content_type="application/json")
    assert r.status_code == 400 and err(r)["code"] == "malformed_json", r.get_json()
    for depth in (40, 400):
        r = client.post(url, data='{"prompt": ' + "[" * depth + '"a"' + "]" * depth + "}",
                        content_type="application/json")
        assert r.status_code == 400 and err(r)["field"] == "prompt", r.get_json()
        neg = '{"w": ' * depth + '"a"' + ', "p": 0.5}' * depth
        r = client.post(url, data='{"prompt": "x", "negative_prompt": ' + neg + "}", content_type="application/json")
        assert r.status_code == 400 and err(r)["field"] == "negative_prompt", r.get_json()
    # a grammar of ordinary depth still queues
    r = client.post(url, json={"prompt": ["a", ["b", ["c", {"w": "d", "p": 0.5}]]]})
    assert r.status_code == 202, r.get_json()


def test_huge_prompts_are_400(client):
    """A multi-megabyte prompt was queued: the text encoder would chew on it for minutes."""
    from multigen.pipes.spec import MAX_PROMPT_CHARS

    s = open_session(client)
    url = f"/api/v1/sessions/{s['id']}/jobs"
    for body, field in [({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
                        ({"prompt": ["x" * 15000, ["y" * 15000, "z"]]}, "prompt"),
                        ({"prompt": "x", "negative_prompt": "n" * (5 * 1024 * 1024)}, "negative_prompt")]:
        r = client.post(url, json=body)
        assert r.status_code == 400 and err(r)["field"] == field, r.get_json()
        assert str(MAX_PROMPT_CHARS) in err(r)["message"]
    assert client.post(url, json={"prompt": "x" * MAX_PROMPT_CHARS}).status_code == 202


@pytest.mark.parametrize("scale,status", [(0.5, 202), ([96, 64], 202), (0.0, 400), (17, 400), ([96], 400),
                                          ([96, 8], 400)])
def test_scale_is_a_factor_or_a_size_pair(client, scale, status):
    s = open_session(client, pipe="image2image")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [PIXEL], "scale": scale})
    assert r.status_code == status, r.get_json()
    if status == 400:
        assert err(r)["field"].startswith("scale")
    else:
        assert r.get_json()["job"]["params"]["scale"] == scale
