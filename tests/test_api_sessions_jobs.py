"""Sessions, jobs and the queue through the Flask test client, over the fake service."""
from __future__ import annotations

import pytest
from api_fakes import app, build_app, client, fake, open_session  # noqa: F401  (fixtures)


def err(r):
    body = r.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_open_get_list_close_session(client, fake):
    s = open_session(client, loras=["tiny-sd-lora", {"name": "tiny-sd-lora", "weight": 0.5}])
    assert s["user"] == "local" and s["state"] == "open" and s["job_counts"]["queued"] == 0
    assert fake.calls[0][2]["loras"] == ["tiny-sd-lora", {"name": "tiny-sd-lora", "weight": 0.5}]
    assert client.get(f"/api/v1/sessions/{s['id']}").get_json()["session"]["id"] == s["id"]
    open_session(client, project="p2", user="alice")
    listed = client.get("/api/v1/sessions?project=p1").get_json()["sessions"]
    assert [x["id"] for x in listed] == [s["id"]]
    assert len(client.get("/api/v1/sessions?user=alice").get_json()["sessions"]) == 1
    r = client.delete(f"/api/v1/sessions/{s['id']}")
    assert r.status_code == 200 and r.get_json()["session"]["state"] == "closed"
    assert client.get("/api/v1/sessions?state=closed").get_json()["sessions"][0]["id"] == s["id"]
    assert client.delete(f"/api/v1/sessions/{s['id']}").status_code == 200  # closing twice is harmless


@pytest.mark.parametrize("body,field,code", [
    ({"project": "p", "pipe": "nope", "model": "tiny-sd"}, "pipe", "unknown_pipe"),
    ({"project": "p", "pipe": "prompt2image", "model": "nope"}, "model", "unknown_model"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": ["nope"]}, "loras.0", "unknown_lora"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": [{"name": "tiny-sdxl-lora"}]},
     "loras.0.name", "lora_mismatch"),
    ({"project": "../etc", "pipe": "prompt2image", "model": "tiny-sd"}, "project", "invalid"),
    ({"project": "p", "pipe": "cond2image", "model": "tiny-sdxl"}, "model", "no_controlnet"),
    ({"pipe": "prompt2image", "model": "tiny-sd"}, "project", "missing"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "colour": 1}, "colour", "unknown_parameter"),
    ({"project": "p", "pipe": "prompt2image", "model": "tiny-sd", "loras": [{"name": "tiny-sd-lora",
                                                                             "weight": "x"}]},
     "loras.0.LoraRef.weight", "invalid"),
])
def test_session_bad_input_is_400_naming_the_field(client, body, field, code):
    r = client.post("/api/v1/sessions", json=body)
    e = err(r)
    assert r.status_code == 400 and e["code"] == code, e
    assert e["field"] == field or e["field"].startswith(field.split(".")[0]), e
    if code.startswith("unknown_") and code != "unknown_parameter":
        assert "known:" in e["message"]  # names the allowed values


def test_session_body_errors_415_and_400(client):
    r = client.post("/api/v1/sessions", data="project=p", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and err(r)["code"] == "unsupported_media_type"
    r = client.post("/api/v1/sessions", data="{not json", content_type="application/json")
    assert r.status_code == 400 and err(r)["code"] == "malformed_json"
    r = client.post("/api/v1/sessions", json=[1, 2])
    assert r.status_code == 400 and err(r)["code"] == "invalid_body"


def test_service_error_result_becomes_400(client):
    r = client.post("/api/v1/sessions", json={"project": "refuse", "pipe": "prompt2image", "model": "tiny-sd"})
    assert r.status_code == 400 and "too many" in err(r)["message"]


def test_unknown_ids_are_404(client):
    for path in ("/api/v1/sessions/nope", "/api/v1/jobs/nope", "/api/v1/images/nope", "/api/v1/images/nope/metadata",
                 "/api/v1/jobs/nope/preview", "/api/v1/sessions/nope/images"):
        r = client.get(path)
        assert r.status_code == 404 and err(r)["code"] == "not_found", path
    assert client.delete("/api/v1/sessions/nope").status_code == 404
    assert client.post("/api/v1/jobs/nope/cancel").status_code == 404
    assert client.post("/api/v1/sessions/nope/jobs", json={"prompt": "x"}).status_code == 404


def test_queue_job_passes_parameters_and_returns_202(client, fake):
    s = open_session(client)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
        "prompt": "a cat", "negative_prompt": "dogs", "seeds": [1, 2, 3], "steps": 2, "width": 64, "height": 64,
        "guidance_scale": 5.5, "clip_skip": 1, "priority": 2})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()["job"]
    assert job["state"] == "queued" and job["seeds"] == [1, 2, 3] and job["count"] == 3
    kwargs = fake.calls[-1][2]
    assert kwargs["count"] == 3 and kwargs["steps"] == 2 and kwargs["guidance_scale"] == 5.5
    assert kwargs["negative_prompt"] == "dogs" and kwargs["priority"] == 2
    assert "strength" not in kwargs  # only given parameters go to the pipe: its defaults apply
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["job"]["id"] == job["id"]
    assert [j["id"] for j in client.get(f"/api/v1/sessions/{s['id']}/jobs").get_json()["jobs"]] == [job["id"]]
    assert client.get(f"/api/v1/sessions/{s['id']}/jobs?state=running").get_json()["jobs"] == []
    r = client.get(f"/api/v1/sessions/{s['id']}/jobs?state=done")
    assert r.status_code == 400 and err(r)["field"] == "state"
    # Cfgen grammar as JSON
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": ["a cat", "a dog"], "count": 2})
    assert r.status_code == 202 and fake.calls[-1][2]["prompt"] == ["a cat", "a dog"]


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "strength": 0.5}, "strength"),   # not a Prompt2ImPipe parameter
    ({"prompt": "x", "images": ["up_x"]}, "images"),
    ({"prompt": "x", "width": 32}, "width"),
    ({"prompt": "x", "width": 100000}, "width"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "count": 0}, "count"),
    ({"prompt": "x", "count": 101}, "count"),
    ({"prompt": "x", "seeds": [-1]}, "seeds.0"),
    ({"prompt": "x", "seeds": [1, 2], "count": 3}, "seeds"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "timestep_spacing": "odd"}, "timestep_spacing"),
    ({"negative_prompt": "x"}, "prompt"),
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


def test_image_pipe_takes_its_own_parameters(client, fake):
    s = open_session(client, pipe="cimage2image")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
        "prompt": "x", "strength": 0.4, "control": [{"type": "canny", "scale": 0.7}]})
    assert r.status_code == 202, r.get_json()
    assert fake.calls[-1][2]["ctypes"] == ["canny"] and fake.calls[-1][2]["cscales"] == [0.7]
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "control": [{"type": "nope"}]})
    assert r.status_code == 400 and err(r)["field"].startswith("control.0")
    s2 = open_session(client, pipe="cond2image")
    r = client.post(f"/api/v1/sessions/{s2['id']}/jobs", json={"prompt": "x", "control": [{"type": "canny"}]})
    assert r.status_code == 400 and err(r)["field"] == "control"


def test_job_into_closed_session_is_409(client):
    s = open_session(client)
    client.delete(f"/api/v1/sessions/{s['id']}")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"})
    assert r.status_code == 409 and err(r)["code"] == "conflict"


def test_service_errors_map_to_their_status(client, fake):
    s = open_session(client)
    fake.max_queued = 1
    assert client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}).status_code == 202
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"})
    assert r.status_code == 429 and err(r)["code"] == "queue_full"
    fake.max_queued = 100
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "bad-scheduler"})
    assert r.status_code == 400 and err(r)["field"] == "scheduler"


def test_unexpected_error_is_logged_500_in_json_shape(client, caplog):
    s = open_session(client)
    with caplog.at_level("ERROR", logger="multigen.service.api.app"):
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "boom"})
    assert r.status_code == 500 and err(r)["code"] == "internal_error"
    assert any("an unexpected bug" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)


def test_cancel_queued_then_finished_is_409(client, fake):
    s = open_session(client)
    job = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}).get_json()["job"]
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.get_json()["job"]["state"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and err(r)["code"] == "job_finished"


def test_preview_and_queue(client, fake):
    s = open_session(client)
    job = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}).get_json()["job"]
    r = client.get(f"/api/v1/jobs/{job['id']}/preview")
    assert r.status_code == 404 and err(r)["code"] == "no_preview"
    q = client.get("/api/v1/queue").get_json()
    assert q["queued"] == 1 and q["running"] == 0 and q["workers"][0]["device"] == "cpu"
    fake.run_job(job["id"])
    r = client.get(f"/api/v1/jobs/{job['id']}/preview")
    assert r.status_code == 200 and r.mimetype == "image/jpeg" and r.data[:2] == b"\xff\xd8"
    done = client.get(f"/api/v1/jobs/{job['id']}").get_json()["job"]
    assert done["state"] == "succeeded" and done["done"] == 1 and done["images"][0]["url"].startswith("/api/v1/")


def test_health_and_models(client):
    h = client.get("/api/v1/health").get_json()
    assert h["status"] == "ok" and h["devices"] == ["cpu"] and "queued" in h["queue"]
    m = client.get("/api/v1/models").get_json()
    assert {"tiny-sd", "tiny-sdxl"} <= {x["name"] for x in m["models"]}
    by_name = {x["name"]: x for x in m["models"]}
    assert by_name["tiny-sd"]["native_size"] == [512, 512] and by_name["tiny-sdxl"]["native_size"] == [1024, 1024]
    assert by_name["tiny-sd"]["defaults"] == {}
    assert "tiny-sd-lora" in {x["name"] for x in m["loras"]}
    assert "prompt2image" in {p["name"] for p in m["pipes"]} and isinstance(m["schedulers"], list)


def test_no_service_is_503(config_file, fake):
    app, _ = build_app(config_file, fake)
    app.extensions["multigen.service"] = None
    r = app.test_client().post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image", "model": "tiny-sd"})
    assert r.status_code == 503 and err(r)["code"] == "service_unavailable"


def test_masked_pipe_ranges_and_types_are_the_pipes_own(client, fake):
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
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "blur_compose": 8, "blur": MAX_BLUR,
                                                            "clip_skip": MAX_CLIP_SKIP})
    assert r.status_code == 202, r.get_json()
    assert fake.calls[-1][2]["blur_compose"] == 8 and fake.calls[-1][2]["clip_skip"] == MAX_CLIP_SKIP
    for body, field in [({"blur_compose": "soft"}, "blur_compose"), ({"blur": MAX_BLUR + 1}, "blur"),
                        ({"blur_compose": MAX_BLUR + 1}, "blur_compose")]:
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", **body})
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
    from multigen.service.api.schemas import MAX_PROMPT_CHARS

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
def test_scale_is_a_factor_or_a_size_pair(client, fake, scale, status):
    s = client.post("/api/v1/sessions", json={"project": "p", "pipe": "image2image", "model": "tiny-sd"}).get_json()
    body = {"prompt": "x", "images": ["data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"],
            "scale": scale}
    r = client.post(f"/api/v1/sessions/{s['session']['id']}/jobs", json=body)
    assert r.status_code == status, r.get_json()
    if status == 400:
        assert err(r)["field"].startswith("scale")
