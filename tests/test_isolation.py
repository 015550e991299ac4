"""The isolation matrix: every route of the server (the session API, AUTOMATIC1111's ``/sdapi/v1`` and
OpenAI's ``/v1``), called by user B on user A's things.

Each route is in exactly one of three lists:

- :data:`OWNED`: it takes an id of a session, job, image or upload: B gets 404 for A's (the same as for an
  id that does not exist), and A's thing is unchanged afterwards;
- :data:`CALLER_SCOPED`: it acts on "the caller's own" things (a listing, the A1111 progress, interrupt
  and skip of the caller's job, options, webhook secrets, generation calls): B's call never shows or
  touches A's;
- :data:`NO_OBJECT`: it takes no user's object (health, model lists, the page): B's answer names none of A's
  ids or projects.

A route in none of them fails :func:`test_every_route_is_in_the_matrix`: add it to the matrix with its check.
All over the Flask test client on fake pipes (helpers_service.api_app), with two users.
"""
from __future__ import annotations

import base64
import io
from typing import Any

from helpers_service import REC, open_session, queue_job, wait_for, wait_job
from PIL import Image

#: (endpoint, method) -> the path B calls, with {session}, {job}, {running}, {image}, {upload} of A's
OWNED: dict[tuple[str, str], str] = {
    ("sessions.get_session", "GET"): "/api/v1/sessions/{session}",
    ("sessions.close_session", "DELETE"): "/api/v1/sessions/{session}",
    ("images.list_images", "GET"): "/api/v1/sessions/{session}/images",
    ("jobs.create_job", "POST"): "/api/v1/sessions/{session}/jobs",
    ("jobs.list_jobs", "GET"): "/api/v1/sessions/{session}/jobs",
    ("jobs.get_job", "GET"): "/api/v1/jobs/{job}",
    ("jobs.cancel_job", "POST"): "/api/v1/jobs/{running}/cancel",
    ("jobs.skip_image", "POST"): "/api/v1/jobs/{running}/skip",
    ("jobs.job_preview", "GET"): "/api/v1/jobs/{running}/preview",
    ("jobs.job_grid", "GET"): "/api/v1/jobs/{job}/grid",
    ("images.image_file", "GET"): "/api/v1/images/{image}",
    ("images.image_metadata", "GET"): "/api/v1/images/{image}/metadata",
    ("uploads.delete_upload", "DELETE"): "/api/v1/uploads/{upload}",
    ("events.events", "GET"): "/api/v1/events?session_id={session}",
}

#: routes acting on the caller's own things; each is checked in test_caller_scoped_routes_never_reach_a
CALLER_SCOPED = frozenset({
    ("sessions.create_session", "POST"), ("sessions.list_sessions", "GET"), ("jobs.queue", "GET"),
    ("uploads.create_upload", "POST"), ("service.webhook_secret", "GET"), ("service.rotate_webhook_secret", "POST"),
    ("a1111.progress", "GET"), ("a1111.interrupt", "POST"), ("a1111.skip", "POST"),
    ("a1111.txt2img", "POST"), ("a1111.img2img", "POST"), ("a1111.get_options", "GET"), ("a1111.set_options", "POST"),
    ("openai.create_generation", "POST"), ("openai.create_edit", "POST"),
})

#: routes that take no user's object (lists of models and samplers, the page, a PNG's text sent in the body)
NO_OBJECT = frozenset({
    ("web.index", "GET"), ("web.favicon", "GET"), ("web.static_file", "GET"),
    ("service.health", "GET"), ("service.docs", "GET"), ("service.openapi", "GET"), ("service.models", "GET"),
    ("service.presets", "GET"), ("service.styles", "GET"), ("service.wildcards", "GET"), ("metrics.metrics", "GET"),
    *((f"a1111.{name}", "GET") for name in (
        "cmd_flags", "embeddings", "face_restorers", "hypernetworks", "latent_upscale_modes", "loras", "memory",
        "prompt_styles", "samplers", "schedulers", "script_info", "scripts", "sd_models", "sd_modules", "sd_vae",
        "upscalers")),
    ("a1111.refresh_checkpoints", "POST"), ("a1111.refresh_loras", "POST"), ("a1111.refresh_vae", "POST"),
    ("a1111.png_info", "POST"), ("a1111.extra_single_image", "POST"),
    ("openai.list_models", "GET"), ("openai.get_model", "GET"),
    *(("openai.unknown_route", m) for m in ("GET", "POST", "PUT", "PATCH", "DELETE")),
})
#: a path for each NO_OBJECT route with arguments
NO_OBJECT_PATHS = {"web.static_file": "/static/app.js", "openai.get_model": "/v1/models/tiny-sd",
                   "openai.unknown_route": "/v1/files"}


def routes(app) -> set[tuple[str, str]]:
    return {(rule.endpoint, method) for rule in app.url_map.iter_rules()
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_route_is_in_the_matrix(make_api):
    api = make_api(users=("alice", "bob"))
    lists = [set(OWNED), CALLER_SCOPED, NO_OBJECT]
    assert not (lists[0] & lists[1] or lists[0] & lists[2] or lists[1] & lists[2]), "a route is in two lists"
    present = routes(api.app)
    missing = present - lists[0] - lists[1] - lists[2]
    assert not missing, f"routes with no isolation check: {sorted(missing)}: add each to the matrix of this file"
    stale = (lists[0] | lists[1] | lists[2]) - present
    assert not stale, f"the matrix lists routes the app does not have: {sorted(stale)}"


def test_owned_routes_answer_404_to_another_user_and_leave_the_thing_alone(make_api):
    api = make_api(users=("alice", "bob"))
    client, alice, bob = api.client(), api.headers("alice"), api.headers("bob")
    s = open_session(client, headers=alice)
    job = wait_job(client, queue_job(client, s["id"], headers=alice, steps=2, count=2, grid=True)["id"], headers=alice)
    image = client.get(f"/api/v1/sessions/{s['id']}/images", headers=alice).get_json()["images"][0]
    buf = io.BytesIO(base64.b64decode(png_b64()))
    upload = client.post("/api/v1/uploads", data={"file": (buf, "a.png")}, content_type="multipart/form-data",
                         headers=alice).get_json()["upload"]
    REC.step_delay = 0.02
    running = queue_job(client, s["id"], headers=alice, steps=500)  # 10 s: bob tries to cancel and skip it
    wait_for(lambda: client.get(f"/api/v1/jobs/{running['id']}/preview", headers=alice).status_code == 200)
    ids = {"session": s["id"], "job": job["id"], "running": running["id"], "image": image["id"],
           "upload": upload["id"]}
    try:
        for (endpoint, method), template in OWNED.items():
            path = template.format(**ids)
            kwargs: dict[str, Any] = {"json": {"prompt": "x"}} if method == "POST" else {}
            if method == "GET" and endpoint != "events.events":  # the route works for the owner...
                assert client.get(path, headers=alice).status_code == 200, (endpoint, path)
            r = client.open(path, method=method, headers=bob, **kwargs)  # ...and is 404 to another user
            assert r.status_code == 404, (endpoint, path, r.status_code, r.get_data(as_text=True)[:300])
            assert r.get_json()["error"]["code"] == "not_found", endpoint
            unknown = client.open(template.format(**{k: "0" * 16 for k in ids}), method=method, headers=bob,
                                  **kwargs)
            assert unknown.get_json()["error"]["code"] == "not_found"  # the same as an id that does not exist
        # and nothing of alice's changed
        now = client.get(f"/api/v1/jobs/{running['id']}", headers=alice).get_json()["job"]
        assert now["state"] == "running" and now["cancel_requested"] is False
        assert client.get(f"/api/v1/sessions/{s['id']}", headers=alice).get_json()["session"]["state"] == "open"
        assert len(client.get(f"/api/v1/sessions/{s['id']}/jobs", headers=alice).get_json()["jobs"]) == 2
        # the upload is still alice's: a job of hers may name it, one of bob's may not
        sb = open_session(client, pipe="image2image", headers=bob)
        r = client.post(f"/api/v1/sessions/{sb['id']}/jobs", json={"prompt": "x", "images": [upload["id"]]},
                        headers=bob)
        assert r.status_code == 404 and r.get_json()["error"]["field"] == "images.0"
        assert client.delete(f"/api/v1/uploads/{upload['id']}", headers=alice).status_code == 200
    finally:
        client.post(f"/api/v1/jobs/{running['id']}/cancel", headers=alice)


def test_caller_scoped_routes_never_reach_a(make_api):
    api = make_api(users=("alice", "bob"))
    client, alice, bob = api.client(), api.headers("alice"), api.headers("bob")
    fast = {"steps": 2, "width": 64, "height": 64}
    # alice's own A1111 and OpenAI calls made her implicit sessions; bob's calls make his, never use hers
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "a", **fast}, headers=alice).status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": "a", "model": "tiny-sd", "size": "64x64",
                                                       "steps": 2}, headers=alice).status_code == 200
    hers = {x["id"] for x in client.get("/api/v1/sessions", headers=alice).get_json()["sessions"]}
    assert len(hers) == 2
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "b", **fast}, headers=bob).status_code == 200
    assert client.post("/sdapi/v1/img2img", json={"prompt": "b", "init_images": [png_b64()], **fast},
                       headers=bob).status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": "b", "model": "tiny-sd", "size": "64x64",
                                                       "steps": 2}, headers=bob).status_code == 200
    r = client.post("/v1/images/edits", data={"prompt": "b", "model": "tiny-sd", "steps": "2",
                                              "image": (io.BytesIO(base64.b64decode(png_b64())), "i.png")},
                    content_type="multipart/form-data", headers=bob)
    assert r.status_code == 200, r.get_json()
    for sid in hers:  # alice's sessions hold only her jobs
        assert len(client.get(f"/api/v1/sessions/{sid}/jobs", headers=alice).get_json()["jobs"]) == 1
    his = client.get("/api/v1/sessions", headers=bob).get_json()["sessions"]
    assert his and all(x["user"] == "bob" for x in his) and not hers & {x["id"] for x in his}
    # a session for another user: refused; an upload is the caller's (alice cannot delete bob's)
    r = client.post("/api/v1/sessions", json={"user": "alice", "project": "p", "pipe": "prompt2image",
                                              "model": "tiny-sd"}, headers=bob)
    assert r.status_code == 403 and r.get_json()["error"]["field"] == "user"
    up = client.post("/api/v1/uploads", data={"file": (io.BytesIO(base64.b64decode(png_b64())), "a.png")},
                     content_type="multipart/form-data", headers=bob).get_json()["upload"]
    assert client.delete(f"/api/v1/uploads/{up['id']}", headers=alice).status_code == 404
    # options and webhook secrets are per user
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 5}, headers=bob).status_code == 200
    assert client.get("/sdapi/v1/options", headers=alice).get_json()["CLIP_stop_at_last_layers"] == 1
    assert client.get("/sdapi/v1/options", headers=bob).get_json()["CLIP_stop_at_last_layers"] == 5
    secret_a = client.get("/api/v1/users/me/webhook-secret", headers=alice).get_json()
    secret_b = client.get("/api/v1/users/me/webhook-secret", headers=bob).get_json()
    assert secret_a != secret_b
    assert client.post("/api/v1/users/me/webhook-secret/rotate", headers=bob).status_code == 200
    assert client.get("/api/v1/users/me/webhook-secret", headers=alice).get_json() == secret_a
    # alice's running A1111 job: bob's progress does not show it, his interrupt and skip do not touch it
    REC.step_delay = 0.02
    a1111 = next(x for x in client.get("/api/v1/sessions?project=a1111", headers=alice).get_json()["sessions"])
    running = queue_job(client, a1111["id"], headers=alice, steps=500)
    try:
        wait_for(lambda: client.get(f"/api/v1/jobs/{running['id']}", headers=alice).get_json()["job"]["state"]
                 == "running")
        assert running["id"] in client.get("/sdapi/v1/progress", headers=alice).get_json()["state"]["job"]
        progress = client.get("/sdapi/v1/progress", headers=bob).get_json()
        assert running["id"] not in str(progress) and progress["state"]["job_count"] == 0
        assert client.post("/sdapi/v1/interrupt", headers=bob).status_code == 200
        assert client.post("/sdapi/v1/skip", headers=bob).status_code == 200
        now = client.get(f"/api/v1/jobs/{running['id']}", headers=alice).get_json()["job"]
        assert now["state"] == "running" and now["cancel_requested"] is False
        queue = client.get("/api/v1/queue", headers=bob).get_json()
        assert running["id"] not in str(queue)
        assert running["id"] in str(client.get("/api/v1/queue", headers=alice).get_json())
    finally:
        client.post(f"/api/v1/jobs/{running['id']}/cancel", headers=alice)


def test_routes_without_objects_show_nothing_of_another_user(make_api):
    api = make_api(users=("alice", "bob"))
    client, alice, bob = api.client(), api.headers("alice"), api.headers("bob")
    s = open_session(client, headers=alice, project="alices-secret-project")
    job = wait_job(client, queue_job(client, s["id"], headers=alice, steps=2, prompt="alices secret prompt")["id"],
                   headers=alice)
    secrets_of_a = (s["id"], job["id"], "alices-secret-project", "alices secret prompt")
    for endpoint, method in sorted(NO_OBJECT):
        rule = next(r for r in api.app.url_map.iter_rules() if r.endpoint == endpoint)
        path = NO_OBJECT_PATHS.get(endpoint, rule.rule)
        kwargs: dict[str, Any] = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
        r = client.open(path, method=method, headers=bob, **kwargs)
        assert r.status_code < 500, (endpoint, path, r.status_code)
        body = r.get_data(as_text=True)
        assert not [x for x in secrets_of_a if x in body], (endpoint, path)
