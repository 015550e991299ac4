"""OpenAI's Images API (/v1) on the Flask app over fake pipes: response shapes, the jobs behind the calls,
and every error in OpenAI's shape with the status the SDK maps to its exception classes."""
from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from helpers_service import REC, open_session, queue_job
from PIL import Image

from multigen.service.api.openai_images import openai_mask
from multigen.service.errors import InvalidInput

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
FAST = {"model": "tiny-sd", "size": "64x64", "steps": 2}


def png(size: tuple[int, int] = (64, 64), colour: Any = (255, 0, 0), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, format="PNG")
    return out.getvalue()


def openai_mask_png(size: tuple[int, int] = (64, 64), hole: tuple[int, int, int, int] = (16, 16, 48, 48)) -> bytes:
    """OpenAI's mask: opaque everywhere but a transparent ``hole`` (the area to edit)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), hole)
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def openai_error(r: Any, status: int, param: str | None) -> dict[str, Any]:
    """The response is OpenAI's error shape with this status and param; returns the error."""
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:500])
    err = r.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param and err["message"] and err["code"], err
    return err


def edit(client: Any, headers: dict[str, str] | None = None, image: Any = None, mask: bytes | None = None,
         **fields: Any) -> Any:
    data: dict[str, Any] = {"prompt": "a boat", "model": "tiny-sd", "steps": "2", **fields}
    if image is not None:
        data["image"] = (io.BytesIO(image), "image.png")
    if mask is not None:
        data["mask"] = (io.BytesIO(mask), "mask.png")
    return client.post(EDIT, data=data, content_type="multipart/form-data", headers=headers or {})


def decode(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_generate_answers_openai_images_response_from_a_job_of_the_openai_project(client):
    r = client.post(GEN, json={"prompt": "a red house", "n": 2, "quality": "hd", "style": "vivid",
                               "background": "auto", "moderation": "low", "output_compression": 80,
                               "partial_images": 0, **FAST})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert isinstance(body["created"], int) and body["size"] == "64x64" and body["output_format"] == "png"
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert set(item) == {"b64_json"}
        image = decode(item)
        assert image.format == "PNG" and image.size == (64, 64)
    sessions = client.get("/api/v1/sessions?project=openai").get_json()["sessions"]
    assert [(s["user"], s["pipe"], s["model"]) for s in sessions] == [("local", "prompt2image", "tiny-sd")]
    job = client.get(f"/api/v1/sessions/{sessions[0]['id']}/jobs").get_json()["jobs"][0]
    assert job["state"] == "succeeded" and job["count"] == 2 and job["prompt"] == "a red house"
    assert job["params"]["steps"] == 2 and job["params"]["width"] == 64
    # a second call reuses the same implicit session
    assert client.post(GEN, json={"prompt": "again", **FAST}).status_code == 200
    assert len(client.get("/api/v1/sessions?project=openai").get_json()["sessions"]) == 1


def test_url_response_points_at_the_image_and_output_format_converts(client):
    r = client.post(GEN, json={"prompt": "x", "response_format": "url", **FAST})
    url = r.get_json()["data"][0]["url"]
    assert url.startswith("http://localhost/api/v1/images/")
    fetched = client.get(url.removeprefix("http://localhost"))
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.data)).size == (64, 64)
    r = client.post(GEN, json={"prompt": "x", "output_format": "jpeg", **FAST})
    assert r.get_json()["output_format"] == "jpeg" and decode(r.get_json()["data"][0]).format == "JPEG"
    r = client.post(GEN, json={"prompt": "x", "output_format": "webp", "response_format": "url", **FAST})
    assert r.get_json()["data"][0]["url"].endswith("?format=webp")


def test_openai_model_names_and_no_model_run_the_first_base_model(client):
    for model, answer in (("dall-e-3", "url"), ("dall-e-2", "url"), ("gpt-image-1", "b64_json"),
                          (None, "b64_json")):
        body = {"prompt": "x", "steps": 2, **({"model": model} if model else {})}
        r = client.post(GEN, json=body)
        assert r.status_code == 200, model
        assert list(r.get_json()["data"][0]) == [answer], model  # OpenAI's default response_format per model
    sessions = client.get("/api/v1/sessions?project=openai").get_json()["sessions"]
    assert {s["model"] for s in sessions} == {"demo"}  # the first base model of models.yaml


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 101}, "n"),
    ({"prompt": "x", "n": "two"}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "model": "no-such-model"}, "model"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "8192x8192"}, "size"),
    ({"n": 1}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x", "response_format": "bytes"}, "response_format"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "no_such_field": 1}, "no_such_field"),
    ({"prompt": "x", "count": 2}, "n"),
    ({"prompt": "x", "width": 64}, "size"),
])
def test_bad_generation_requests_are_400_in_openai_shape_naming_the_param(client, body, param):
    err = openai_error(client.post(GEN, json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert no_jobs(client)


def no_jobs(client: Any) -> bool:
    """No job was queued in the openai project (a refused call leaves nothing to run)."""
    sessions = client.get("/api/v1/sessions?project=openai").get_json()["sessions"]
    return all(sum(s["job_counts"].values()) == 0 for s in sessions)


def test_an_unknown_model_names_the_known_ones(client):
    err = openai_error(client.post(GEN, json={"prompt": "x", "model": "dall-e-9"}), 400, "model")
    assert err["code"] == "model_not_found" and "tiny-sd" in err["message"] and "dall-e-3" in err["message"]


def test_limits_max_count_bounds_n(make_api):
    client = make_api(**{"max_count: 100": "max_count: 3"}).client()
    assert "from 1 to 3" in openai_error(client.post(GEN, json={"prompt": "x", "n": 4}), 400, "n")["message"]
    assert len(client.post(GEN, json={"prompt": "x", "n": 3, **FAST}).get_json()["data"]) == 3


def test_the_body_must_be_json(client):
    err = openai_error(client.post(GEN, data="prompt=x", content_type="application/x-www-form-urlencoded"), 415,
                       None)
    assert err["type"] == "invalid_request_error"
    openai_error(client.post(GEN, data="{not json", content_type="application/json"), 400, None)
    openai_error(client.post(GEN, json=["a list"]), 400, None)


def test_a_user_field_names_the_owner_without_auth(client):
    assert client.post(GEN, json={"prompt": "x", "user": "carol", **FAST}).status_code == 200
    sessions = client.get("/api/v1/sessions?project=openai&user=carol").get_json()["sessions"]
    assert [s["user"] for s in sessions] == ["carol"]
    openai_error(client.post(GEN, json={"prompt": "x", "user": "bad name!", **FAST}), 400, "user")


def test_edit_with_mask_runs_inpainting_with_the_mask_converted(client):
    r = edit(client, image=png(), mask=openai_mask_png(), n="2", size="64x64", response_format="b64_json",
             input_fidelity="high", quality="high")
    assert r.status_code == 200, r.get_json()
    assert [decode(item).size for item in r.get_json()["data"]] == [(64, 64), (64, 64)]
    session = client.get("/api/v1/sessions?project=openai").get_json()["sessions"][0]
    assert (session["pipe"], session["model"]) == ("inpainting", "tiny-sd")
    job = client.get(f"/api/v1/sessions/{session['id']}/jobs").get_json()["jobs"][0]
    assert job["count"] == 2 and job["params"]["steps"] == 2


def test_edit_without_mask_is_image_to_image_at_the_input_size(client):
    r = edit(client, image=png((48, 32)), strength="0.5")
    assert r.status_code == 200, r.get_json()
    session = client.get("/api/v1/sessions?project=openai").get_json()["sessions"][0]
    assert session["pipe"] == "image2image"
    job = client.get(f"/api/v1/sessions/{session['id']}/jobs").get_json()["jobs"][0]
    assert job["params"]["strength"] == 0.5 and "width" not in job["params"]
    # the SDK sends a list of images as image[]: one is taken
    r = client.post(EDIT, data={"prompt": "x", "model": "tiny-sd", "steps": "2",
                                "image[]": (io.BytesIO(png()), "a.png")}, content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()


def test_openai_mask_becomes_white_where_transparent():
    mask = Image.open(io.BytesIO(openai_mask_png())).convert("RGBA")
    ours = openai_mask(mask, (64, 64))
    assert ours.mode == "L" and ours.getpixel((32, 32)) == 255 and ours.getpixel((0, 0)) == 0
    with pytest.raises(InvalidInput) as e:
        openai_mask(mask, (32, 32))
    assert e.value.field == "mask"


def test_bad_edit_requests_are_400_naming_image_or_mask(client):
    openai_error(edit(client), 400, "image")  # no image
    openai_error(edit(client, image=b"not an image at all"), 400, "image")
    openai_error(edit(client, image=png()[:60]), 400, "image")  # truncated
    openai_error(edit(client, image=png(), mask=b"junk"), 400, "mask")
    err = openai_error(edit(client, image=png(), mask=openai_mask_png((32, 32), (0, 0, 8, 8))), 400, "mask")
    assert "same size" in err["message"]
    assert "alpha" in openai_error(edit(client, image=png(), mask=png()), 400, "mask")["message"]
    two = {"prompt": "x", "image[]": [(io.BytesIO(png()), "a.png"), (io.BytesIO(png()), "b.png")]}
    assert "one image" in openai_error(client.post(EDIT, data=two, content_type="multipart/form-data"), 400,
                                       "image")["message"]
    openai_error(edit(client, image=png(), prompt=""), 400, "prompt")
    openai_error(edit(client, image=png(), n="0"), 400, "n")
    openai_error(edit(client, image=png(), model="nope"), 400, "model")
    openai_error(client.post(EDIT, json={"prompt": "x"}), 415, "image")
    assert no_jobs(client)


def test_models_list_and_retrieve_in_openai_shape(client):
    listed = client.get("/v1/models").get_json()
    assert listed["object"] == "list"
    ids = [m["id"] for m in listed["data"]]
    assert ids[:2] == ["demo", "tiny-sd"]
    for m in listed["data"]:
        assert set(m) == {"id", "object", "created", "owned_by"} and m["object"] == "model"
        assert isinstance(m["created"], int)
    assert client.get("/v1/models/tiny-sd").get_json()["id"] == "tiny-sd"
    alias = client.get("/v1/models/dall-e-3").get_json()
    assert alias["id"] == "dall-e-3" and alias["root"] == "demo"
    openai_error(client.get("/v1/models/nope"), 404, "model")


def test_unknown_routes_and_methods_under_v1_answer_openai_errors(client):
    err = openai_error(client.get("/v1/images/variations"), 404, None)
    assert err["type"] == "invalid_request_error"
    openai_error(client.post("/v1/chat/completions", json={}), 404, None)
    openai_error(client.get("/v1/"), 404, None)
    r = client.get(GEN)
    openai_error(r, 405, None)
    assert r.headers["Allow"] == "POST"
    # the session API keeps its own shape
    assert set(client.get("/api/v1/nope").get_json()["error"]) >= {"code", "message"}


def test_a_body_over_the_limit_is_413_in_openai_shape(client):
    r = client.post(GEN, data=b"{" + b" " * (1024 * 1024 + 10) + b"}", content_type="application/json")
    openai_error(r, 413, None)


def test_a_full_queue_is_429_with_retry_after(make_api):
    api = make_api(start=False, **{"max_queued_jobs_per_user: 200": "max_queued_jobs_per_user: 1"})
    client = api.client()
    queue_job(client, open_session(client)["id"])  # stays queued: the service is not started
    r = client.post(GEN, json={"prompt": "x", **FAST})
    err = openai_error(r, 429, None)
    assert err["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) > 0


def test_a_call_past_sync_call_timeout_is_504_and_its_job_cancelled(make_api):
    api = make_api(start=False, **{"sync_call_timeout: 600": "sync_call_timeout: 0.3"})
    client = api.client()
    r = client.post(GEN, json={"prompt": "x", **FAST})
    err = openai_error(r, 504, None)
    assert err["type"] == "server_error" and r.headers["x-should-retry"] == "false"
    session = client.get("/api/v1/sessions?project=openai").get_json()["sessions"][0]
    assert session["job_counts"]["cancelled"] == 1


def test_a_job_that_fails_on_the_server_is_a_server_error_not_retried(client):
    r = client.post(GEN, json={"prompt": "boom", **FAST})  # the fake pipe raises
    err = openai_error(r, 500, None)
    assert err["type"] == "server_error" and err["code"] == "job_failed" and r.headers["x-should-retry"] == "false"
    assert len(REC.gens) == 1


def test_refusals_before_the_body_is_read_are_in_openai_shape(make_api):
    api = make_api(users=("alice",))
    guard = api.app.extensions["multigen.guard"]
    headers = {"Content-Length": str(10**9)}
    error, _ = guard.check_head("POST", GEN, "", headers.get)
    body = error.to_dict()["error"]
    assert error.http_status == 401 and body["type"] == "invalid_request_error" and body["code"] == "invalid_api_key"
    headers["Authorization"] = f"Bearer {api.tokens['alice']}"
    error, limit = guard.check_head("POST", EDIT, "", headers.get)
    assert error.http_status == 413 and set(error.to_dict()["error"]) == {"message", "type", "param", "code"}
    assert limit > 1024 * 1024  # edits carry an image: the upload limit
    error, _ = guard.check_head("POST", "/api/v1/sessions", "", headers.get)
    assert set(error.to_dict()["error"]) <= {"code", "message", "field"}  # the session API keeps its shape


def test_a_client_that_disconnects_cancels_its_job(make_api):
    client = make_api(start=False).client()  # the job stays queued: only the disconnect can end the call
    r = client.post(GEN, json={"prompt": "x", **FAST}, environ_base={"waitress.client_disconnected": lambda: True})
    assert r.status_code == 499
    session = client.get("/api/v1/sessions?project=openai").get_json()["sessions"][0]
    assert session["job_counts"]["cancelled"] == 1 and session["job_counts"]["queued"] == 0
