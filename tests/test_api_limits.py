"""Limits against requests that would exhaust the server: grammar items, list lengths, upload quotas, the
files a refused job leaves behind and the inputs a finished job keeps (docs/security.md lists them)."""
from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers_service import open_session, queue_job, wait_job
from PIL import Image

from multigen.pipes.spec import MAX_GRAMMAR_DEPTH, MAX_GRAMMAR_ITEMS, MAX_PROMPT_CHARS
from multigen.service.errors import InvalidInput, TooLarge


def err(r):
    body = r.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def png(size: tuple[int, int] = (16, 16), colour: Any = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(data or png()).decode()


def upload(client, data: bytes | None = None, headers: dict[str, str] | None = None):
    return client.post("/api/v1/uploads", data={"file": (io.BytesIO(data or png()), "a.png")},
                       content_type="multipart/form-data", headers=headers or {})


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- prompt grammar: characters, depth and items, one cap each, in the API and in queue_gen -----------------
def test_a_grammar_of_too_many_empty_lists_is_400_naming_the_field_and_the_cap(client):
    """27 MB of ``[[""],[""],...]`` held no character and was accepted, then decoded on every read."""
    s = open_session(client)
    bomb = [[""] for _ in range(MAX_GRAMMAR_ITEMS + 1)]
    for field in ("prompt", "negative_prompt"):
        body = {"prompt": "x", field: bomb}
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json=body)
        assert r.status_code == 400 and err(r)["field"] == field, r.get_json()
        assert str(MAX_GRAMMAR_ITEMS) in err(r)["message"] and "items" in err(r)["message"]
        assert len(err(r)["message"]) < 600  # the bomb is not echoed back
    # ten times more is refused from the raw body, before the JSON is decoded (no field is known then)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": [[""] for _ in range(100_001)]})
    assert r.status_code == 400 and err(r)["code"] == "too_many_items" and str(MAX_GRAMMAR_ITEMS) in err(r)["message"]
    assert client.get(f"/api/v1/sessions/{s['id']}/jobs").get_json()["jobs"] == []


def test_a_grammar_at_the_item_cap_is_taken(client):
    s = open_session(client)
    grammar = ["a"] * (MAX_GRAMMAR_ITEMS - 1)  # the list itself is an item too
    assert len(grammar) <= MAX_PROMPT_CHARS
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": grammar})
    assert r.status_code == 202, r.get_json()
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": grammar + ["b"]})
    assert r.status_code == 400 and err(r)["field"] == "prompt"


def test_queue_gen_refuses_what_the_api_refuses(make_api):
    """Python callers of ServiceThread.queue_gen get the same caps as the API's request models."""
    api = make_api(start=False)
    sid = open_session(api.client())["id"]
    deep: Any = "a"
    for _ in range(MAX_GRAMMAR_DEPTH + 1):
        deep = [deep]
    cases = [([[""] for _ in range(100_001)], str(MAX_GRAMMAR_ITEMS)),
             ("x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS)),
             (["x" * 15000, ["y" * 15000]], str(MAX_PROMPT_CHARS)),
             (deep, str(MAX_GRAMMAR_DEPTH))]
    for grammar, cap in cases:
        for field in ("prompt", "negative_prompt"):
            kwargs = {"prompt": "x", field: grammar}
            with pytest.raises(InvalidInput) as e:
                api.svc.queue_gen(sid, **kwargs)
            assert e.value.field == field and cap in e.value.message, e.value.message
    assert api.svc.list_jobs(sid) == []


# ---- every list of every request model is capped --------------------------------------------------------------
def _request_schemas(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema reachable from a request body of the document, with its path, refs followed once."""
    components = doc["components"]["schemas"]
    seen: set[str] = set()
    todo: list[tuple[str, Any]] = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                todo.append((f"{method} {path} {media}", content["schema"]))
    while todo:
        where, node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref:
                name = ref.rsplit("/", 1)[-1]
                if name not in seen:
                    seen.add(name)
                    todo.append((name, components[name]))
                continue
            yield where, node
            todo.extend((f"{where}.{k}", v) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(node))


def test_every_array_of_a_request_schema_has_max_items(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    arrays = [(where, node) for where, node in _request_schemas(doc)
              if node.get("type") == "array" or "items" in node or "prefixItems" in node]
    assert len(arrays) > 20  # the walk reached the job bodies (images, seeds, control, prompt, loras...)
    names = {where.split(".")[0] for where, _ in arrays}
    assert {"SessionCreate", "JobCreate_prompt2image", "JobCreate_cond2image"} <= names, names
    uncapped = [where for where, node in arrays if not isinstance(node.get("maxItems"), int)]
    assert not uncapped, uncapped


def test_a_session_with_too_many_loras_is_400(client):
    from multigen.pipes.spec import MAX_LORAS

    body = {"project": "p", "pipe": "prompt2image", "model": "tiny-sd"}
    r = client.post("/api/v1/sessions", json={**body, "loras": ["tiny-sd-lora"] * (MAX_LORAS + 1)})
    assert r.status_code == 400 and err(r)["field"] == "loras" and str(MAX_LORAS) in err(r)["message"]
    assert client.post("/api/v1/sessions", json={**body, "loras": ["tiny-sd-lora"] * MAX_LORAS}).status_code == 201


# ---- upload quota -----------------------------------------------------------------------------------------------
def test_the_app_takes_its_upload_quotas_from_the_config(make_api):
    api = make_api(**{"upload_quota_files_per_user: 1000": "upload_quota_files_per_user: 2",
                      "upload_quota_mb_per_user: 1024": "upload_quota_mb_per_user: 3"})
    store = api.app.extensions["multigen.uploads"]
    assert (store.quota_files, store.quota_bytes) == (2, 3 * 2**20)


def test_upload_quota_of_files_is_413_naming_the_limit_and_the_remedies(make_api):
    api = make_api(users=("alice", "bob"))
    api.app.extensions["multigen.uploads"].quota_files = 2
    client = api.client()
    alice, bob = api.headers("alice"), api.headers("bob")
    first = upload(client, headers=alice).get_json()["upload"]["id"]
    assert upload(client, headers=alice).status_code == 201
    r = upload(client, headers=alice)
    assert r.status_code == 413 and err(r)["code"] == "quota_exceeded", r.get_json()
    message = err(r)["message"]
    assert "limits.upload_quota_files_per_user" in message and "2 uploads" in message
    assert "DELETE /api/v1/uploads/" in message and "upload_keep_hours" in message
    assert upload(client, headers=bob).status_code == 201  # a quota per user
    # deleting one of her uploads makes room; others cannot delete it
    assert client.delete(f"/api/v1/uploads/{first}", headers=bob).status_code == 404
    r = client.delete(f"/api/v1/uploads/{first}", headers=alice)
    assert r.status_code == 200 and r.get_json()["upload"]["id"] == first
    assert client.delete(f"/api/v1/uploads/{first}", headers=alice).status_code == 404
    assert upload(client, headers=alice).status_code == 201
    assert upload(client, headers=alice).status_code == 413
    doc = client.get("/api/v1/openapi.json", headers=alice).get_json()
    assert "404" in doc["paths"]["/api/v1/uploads/{upload_id}"]["delete"]["responses"]


def test_upload_quota_of_bytes(make_api):
    api = make_api()
    client = api.client()
    store = api.app.extensions["multigen.uploads"]
    store.quota_bytes = 2**20
    noise = Image.frombytes("RGB", (400, 400), random.Random(0).randbytes(400 * 400 * 3))  # PNG cannot shrink it
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    assert 2**20 / 3 < len(buf.getvalue()) < 2**20 / 2  # two fit in 1 MB, three do not
    assert upload(client, buf.getvalue()).status_code == 201
    assert upload(client, buf.getvalue()).status_code == 201
    r = upload(client, buf.getvalue())
    assert r.status_code == 413 and err(r)["code"] == "quota_exceeded"
    assert "limits.upload_quota_mb_per_user" in err(r)["message"] and "1 MiB" in err(r)["message"]
    assert len([n for n in files_in(store.folder) if n.endswith(".png")]) == 2  # the refused one is not kept
    assert not [n for n in files_in(store.folder) if n.endswith(".tmp")]
    assert upload(client).status_code == 201  # a small one still fits


def test_upload_quota_counts_what_is_already_there_and_what_expires(make_api, tmp_path):
    from multigen.service.api.uploads import UploadStore
    from multigen.service.config import Limits

    api = make_api()
    client = api.client()
    store = api.app.extensions["multigen.uploads"]
    store.quota_files = 2
    ids = [upload(client).get_json()["upload"]["id"] for _ in range(2)]
    assert upload(client).status_code == 413
    # a new store over the same folder (a restart) counts the uploads it finds
    limits = Limits(upload_quota_files_per_user=2)
    again = UploadStore.from_limits(store.folder, limits)
    with pytest.raises(TooLarge) as e:
        again.save(Image.new("RGB", (8, 8)), "png", "local")
    assert e.value.code == "quota_exceeded" and e.value.http_status == 413
    assert files_in(store.folder) == sorted(f"{i}.{ext}" for i in ids for ext in ("json", "png"))
    # expired uploads give their room back
    old = store.folder.stat().st_mtime - 10 * 3600 * 24 * 365
    for ext in ("png", "json"):
        os.utime(store.folder / f"{ids[0]}.{ext}", (old, old))
    assert store.prune() == 1
    assert upload(client).status_code == 201
    assert upload(client).status_code == 413


def test_upload_quota_0_is_none():
    from multigen.service.api.uploads import UploadStore
    from multigen.service.config import Limits

    limits = Limits(upload_quota_mb_per_user=0, upload_quota_files_per_user=0)
    store = UploadStore.from_limits(Path("/nonexistent"), limits)
    assert (store.quota_bytes, store.quota_files) == (0, 0)
    defaults = UploadStore.from_limits(Path("/nonexistent"), Limits())
    assert defaults.quota_bytes == Limits().upload_quota_mb_per_user * 2**20 > 0
    assert defaults.quota_files == Limits().upload_quota_files_per_user > 0


def test_quota_keys_are_checked_in_the_config(config_file):
    from multigen.service.config import load_config
    from multigen.service.errors import ConfigError

    text = config_file.read_text()
    assert "upload_quota_mb_per_user:" in text and "upload_quota_files_per_user:" in text
    config_file.write_text(text.replace("upload_quota_mb_per_user: 1024", "upload_quota_mb_per_user: lots"))
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert "upload_quota_mb_per_user" in e.value.key and "limits.upload_quota_mb_per_user" in str(e.value)
    config_file.write_text(text.replace("upload_quota_files_per_user: 1000", "upload_quota_files_per_user: 2"))
    assert load_config(config_file).limits.upload_quota_files_per_user == 2


# ---- data: URL images of a job leave no files behind ------------------------------------------------------------
def test_refused_jobs_leave_no_files_in_uploads(make_api):
    api = make_api(start=False, **{"max_queued_jobs_per_user: 200": "max_queued_jobs_per_user: 1"})
    client = api.client()
    uploads = api.app.extensions["multigen.uploads"].folder
    i2i = open_session(client, pipe="image2image")["id"]
    cond = open_session(client, pipe="cond2image")["id"]
    inpaint = open_session(client, pipe="inpainting")["id"]
    url = data_url()
    refusals = [
        (i2i, {"images": [url], "scheduler": "no-such-scheduler"}, 400),  # the service's check
        (i2i, {"images": [url], "count": 3, "seeds": [1, 2]}, 400),
        (cond, {"images": [url], "control": [{"type": "canny"}]}, 400),  # the API's own check, after the images
        (inpaint, {"images": [url]}, 400),  # no mask: the service's check, after the image was decoded
    ]
    for sid, body, status in refusals:
        r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", **body})
        assert r.status_code == status, (body, r.get_json())
        assert files_in(uploads) == [], (body, files_in(uploads))
    job = queue_job(client, i2i, images=[url])  # accepted: the job has its own copy of the image
    assert files_in(uploads) == []
    inputs = api.svc.config.data_dir / "inputs" / job["id"]
    assert files_in(inputs) == ["image.png"]
    r = client.post(f"/api/v1/sessions/{i2i}/jobs", json={"prompt": "x", "images": [url]})
    assert r.status_code == 429 and files_in(uploads) == []  # queue full
    client.delete(f"/api/v1/sessions/{i2i}")
    r = client.post(f"/api/v1/sessions/{i2i}/jobs", json={"prompt": "x", "images": [url]})
    assert r.status_code == 409 and files_in(uploads) == []  # closed session
    assert not list((api.svc.config.data_dir / "inputs").glob("*/*.tmp"))


def test_a_job_made_from_a_data_url_runs_and_keeps_no_upload(api, client):
    s = open_session(client, pipe="image2image")
    job = queue_job(client, s["id"], images=[data_url(png((64, 64), (9, 8, 7)))], steps=2)
    assert wait_job(client, job["id"])["state"] == "succeeded"
    assert files_in(api.app.extensions["multigen.uploads"].folder) == []


# ---- a job's inputs are removed when it ends -------------------------------------------------------------------
def test_remove_job_inputs(tmp_path):
    from multigen.service.inputs import job_inputs_dir, remove_job_inputs, save_params

    folder = job_inputs_dir(tmp_path, "0123abcd")
    assert folder == tmp_path / "inputs" / "0123abcd"
    stored = save_params({"image": Image.new("RGB", (8, 8)), "steps": 2}, folder)
    assert Path(stored["image"]["$image"]).is_file()
    assert remove_job_inputs(tmp_path, "0123abcd") is True
    assert not folder.exists() and (tmp_path / "inputs").is_dir()
    assert remove_job_inputs(tmp_path, "0123abcd") is False  # nothing left: harmless
    for bad in ("..", "../x", "a/b", "", ".", "x" * 200):
        with pytest.raises(ValueError):
            remove_job_inputs(tmp_path, bad)
    json.dumps(stored)  # what is stored stays JSON
