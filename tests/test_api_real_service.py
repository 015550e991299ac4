"""The API over the real ServiceThread (in process, tiny SD): image pipes fed by uploads and data: URLs."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from helpers_service import real_api, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture()
def real(config_file):
    with real_api(config_file) as pair:
        yield pair


def wait(client, job_id, timeout=180):
    return wait_job(client, job_id, timeout=timeout)


def jpeg(size, orientation=None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.new("RGB", size, (120, 60, 30)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_image_pipes_with_uploads_and_data_urls(real):
    client, _ = real
    up = client.post("/api/v1/uploads", data={"file": (io.BytesIO(jpeg((64, 96), orientation=6)), "in.jpg")},
                     content_type="multipart/form-data").get_json()["upload"]
    assert (up["width"], up["height"]) == (96, 64)  # EXIF orientation applied
    s = client.post("/api/v1/sessions", json={"project": "img", "pipe": "image2image", "model": "tiny-sd"}).get_json()
    r = client.post(f"/api/v1/sessions/{s['session']['id']}/jobs", json={
        "prompt": "a painting", "images": [up["id"]], "strength": 0.5, "steps": 2, "width": 64, "height": 64,
        "seeds": [5]})
    assert r.status_code == 202, r.get_json()
    job = wait(client, r.get_json()["job"]["id"])
    assert job["state"] == "succeeded", job["error"]
    image = job["images"][0]
    assert image["seed"] == 5
    png = client.get(f"/api/v1/images/{image['id']}")
    assert png.status_code == 200 and png.mimetype == "image/png"

    s2 = client.post("/api/v1/sessions", json={"project": "img", "pipe": "inpainting", "model": "tiny-sd"}).get_json()
    for mask_size, state in (((64, 64), "failed"), ((96, 64), "succeeded")):
        mask = io.BytesIO()
        Image.new("L", mask_size, 255).save(mask, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(mask.getvalue()).decode()
        r = client.post(f"/api/v1/sessions/{s2['session']['id']}/jobs", json={
            "prompt": "a door", "images": [up["id"]], "mask": data_url, "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 202, r.get_json()
        job = wait(client, r.get_json()["job"]["id"])
        assert job["state"] == state, job["error"]
        if state == "failed":  # bad input found by the pipe fails the job, with the reason
            assert job["error"]["type"] == "MaskSizeError" and "mask" in job["error"]["message"]


def test_real_service_errors_map_to_4xx(real):
    client, _ = real
    s = client.post("/api/v1/sessions", json={"project": "e", "pipe": "image2image", "model": "tiny-sd"}).get_json()
    sid = s["session"]["id"]
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", "steps": 2})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "images"  # needs an input image
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", "scheduler": "nope"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "scheduler"
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": {"bad": 1}})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "prompt"
    r = client.post("/api/v1/sessions", json={"project": "e", "pipe": "cond2image", "model": "tiny-sdxl"})
    assert r.status_code == 400 and "ControlNet" in r.get_json()["error"]["message"]  # none for SDXL models
    client.delete(f"/api/v1/sessions/{sid}")
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x"})
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "conflict"


def test_sizes_not_multiple_of_8_are_padded_and_cropped_back(real):
    client, _ = real
    s = client.post("/api/v1/sessions", json={"project": "odd", "pipe": "prompt2image", "model": "tiny-sd"}).get_json()
    r = client.post(f"/api/v1/sessions/{s['session']['id']}/jobs",
                    json={"prompt": "a boat", "steps": 2, "width": 65, "height": 70, "seeds": [3]})
    assert r.status_code == 202, r.get_json()
    job = wait(client, r.get_json()["job"]["id"])
    assert job["state"] == "succeeded", job["error"]
    img = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).data))
    assert img.size == (65, 70)


def test_negative_prompt_grammar_is_queued_and_recorded(real):
    client, _ = real
    s = client.post("/api/v1/sessions", json={"project": "neg", "pipe": "prompt2image", "model": "tiny-sd"}).get_json()
    grammar = ["ugly", ["blurry", "dark"]]
    # seeds 4 and 5 pick the two choices (cfgen.expand_prompt): each image records its own
    r = client.post(f"/api/v1/sessions/{s['session']['id']}/jobs",
                    json={"prompt": "a boat", "negative_prompt": grammar, "seeds": [4, 5], "steps": 2, "width": 64,
                          "height": 64})
    assert r.status_code == 202, r.get_json()
    job = wait(client, r.get_json()["job"]["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["negative_prompt"] == grammar
    metas = [client.get(f"/api/v1/images/{im['id']}/metadata").get_json()["metadata"] for im in job["images"]]
    assert [(m["seed"], m["negative_prompt"]) for m in metas] == [(4, "ugly, blurry"), (5, "ugly, dark")]
