"""Images (polling, files, conversion, caching, path safety) and uploads through the Flask test client."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib

import pytest
from helpers_service import REC, open_session, queue_job, wait_job
from PIL import Image


def err(r):
    return r.get_json()["error"]


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (IDAT is tiny and wrong: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def run_session(client, count=3):
    """A session with one job of ``count`` images, run; returns the session and its images."""
    s = open_session(client)
    assert wait_job(client, queue_job(client, s["id"], count=count, steps=2)["id"])["state"] == "succeeded"
    return s, client.get(f"/api/v1/sessions/{s['id']}/images").get_json()["images"]


def test_images_after_polls_what_is_new(client):
    s, images = run_session(client, count=3)
    assert [im["index"] for im in images] == [0, 1, 2]
    assert [im["index"] for im in client.get(f"/api/v1/sessions/{s['id']}/images?after=0").get_json()["images"]] \
        == [1, 2]
    assert client.get(f"/api/v1/sessions/{s['id']}/images?after=2").get_json()["images"] == []
    assert client.get(f"/api/v1/sessions/{s['id']}/images?after=99999999999999999999999").get_json()["images"] == []
    assert len(client.get(f"/api/v1/sessions/{s['id']}/images?after=-5").get_json()["images"]) == 3
    r = client.get(f"/api/v1/sessions/{s['id']}/images?after=last")
    assert r.status_code == 400 and err(r)["field"] == "after"


@pytest.mark.parametrize("fmt,mime,pil", [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"),
                                          ("webp", "image/webp", "WEBP")])
def test_image_file_formats_etag_and_304(client, fmt, mime, pil):
    _, images = run_session(client, count=1)
    url = f"/api/v1/images/{images[0]['id']}?format={fmt}"
    r = client.get(url)
    assert r.status_code == 200 and r.mimetype == mime
    assert Image.open(io.BytesIO(r.data)).format == pil
    assert r.headers["ETag"] and r.headers["Last-Modified"]
    again = client.get(url, headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and not again.data
    since = client.get(url, headers={"If-Modified-Since": r.headers["Last-Modified"]})
    assert since.status_code == 304


def test_image_unknown_format_is_400(client):
    _, images = run_session(client, count=1)
    r = client.get(f"/api/v1/images/{images[0]['id']}?format=gif")
    assert r.status_code == 400 and err(r)["field"] == "format" and "webp" in err(r)["message"]


def test_metadata_names_what_made_the_image_without_server_paths(api, client):
    _, images = run_session(client, count=1)
    body = client.get(f"/api/v1/images/{images[0]['id']}/metadata").get_json()
    assert body["image"] == images[0]
    meta = body["metadata"]
    assert (meta["seed"], meta["prompt"], meta["model"], meta["params"]["steps"]) == (images[0]["seed"], "x",
                                                                                     "tiny-sd", 2)
    assert str(api.svc.config.output_dir) not in json.dumps(meta)  # no server paths reach users
    # without the sidecar, the PNG's JSON text chunk
    api.svc.image_file(images[0]["id"]).with_suffix(".json").unlink()
    assert client.get(f"/api/v1/images/{images[0]['id']}/metadata").get_json()["metadata"] == meta


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink", "encoded"])
def test_no_path_leaves_the_output_folder(api, client, tmp_path, monkeypatch, attack):
    """Whatever path the service's record holds, only files inside output_dir are served."""
    _, images = run_session(client, count=1)
    iid = images[0]["id"]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    inside = api.svc.image_file(iid)
    if attack == "absolute":  # a record pointing elsewhere
        monkeypatch.setattr(api.svc, "image_file", lambda image_id: secret)
    elif attack == "dotdot":
        monkeypatch.setattr(api.svc, "image_file", lambda image_id: inside.parent / "../../../../../secret.png")
    elif attack == "symlink":  # the file itself replaced by a link out of the folder
        inside.unlink()
        inside.symlink_to(secret)
    else:
        r = client.get("/api/v1/images/..%2F..%2F..%2Fsecret.png")
        assert r.status_code == 404 and err(r)["code"] == "not_found"
        return
    r = client.get(f"/api/v1/images/{iid}")
    assert r.status_code == 404 and err(r)["code"] == "not_found"
    assert client.get(f"/api/v1/images/{iid}/metadata").status_code == 404


def test_upload_png_jpeg_webp(client):
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encode(Image.new("RGB", (40, 24), (200, 10, 10)), fmt)
        r = client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), "x")}, content_type="multipart/form-data")
        assert r.status_code == 201, r.get_json()
        up = r.get_json()["upload"]
        assert up["width"] == 40 and up["height"] == 24 and up["format"] == fmt.lower() and up["id"].startswith("up_")


def test_upload_applies_exif_orientation(api, client):
    image = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif.tobytes())
    r = client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), "x.jpg")}, content_type="multipart/form-data")
    up = r.get_json()["upload"]
    assert (up["width"], up["height"]) == (20, 40)
    stored = api.app.extensions["multigen.uploads"].folder / f"{up['id']}.png"
    assert Image.open(stored).size == (20, 40)


def test_upload_rejects_other_formats_bombs_and_big_files(make_api):
    client = make_api(**{"upload_max_bytes: 20971520": "upload_max_bytes: 200000",
                         "upload_max_pixels: 16777216": "upload_max_pixels: 250000"}).client()

    def post(data):
        return client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), "f")}, content_type="multipart/form-data")

    r = post(encode(Image.new("RGB", (8, 8)), "GIF"))
    assert r.status_code == 415 and err(r)["code"] == "unsupported_media_type" and "PNG" in err(r)["message"]
    r = post(b"not an image at all")
    assert r.status_code == 415
    r = post(png_bomb(30000, 30000))
    assert r.status_code == 413 and "pixels" in err(r)["message"]
    r = post(os.urandom(200001))
    assert r.status_code == 413 and err(r)["code"] == "too_large"
    r = post(os.urandom(400000))  # past MAX_CONTENT_LENGTH: werkzeug's 413, same JSON shape
    assert r.status_code == 413 and err(r)["code"] == "too_large"
    r = post(encode(Image.new("RGB", (64, 64)), "PNG")[:60])  # truncated
    assert r.status_code in (400, 415)
    r = client.post("/api/v1/uploads", json={"file": "x"})
    assert r.status_code == 415
    r = client.post("/api/v1/uploads", data={"other": "x"}, content_type="multipart/form-data")
    assert r.status_code == 400 and err(r)["field"] == "file"


def test_job_images_from_uploads_and_data_urls(client):
    s = open_session(client, pipe="inpainting")
    png = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    up = client.post("/api/v1/uploads", data={"file": (io.BytesIO(png), "a.png")},
                     content_type="multipart/form-data").get_json()["upload"]
    mask = encode(Image.new("L", (64, 64), 255), "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(mask).decode()
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [up["id"]], "mask": data_url,
                                                               "strength": 0.6, "blur": 4})
    assert r.status_code == 202, r.get_json()
    params = r.get_json()["job"]["params"]
    assert params["strength"] == 0.6 and params["blur"] == 4
    assert params["image"].startswith("<image") and params["mask"].startswith("<image")  # files, by name only
    assert wait_job(client, r.get_json()["job"]["id"])["state"] == "succeeded"
    setup = REC.setups[-1]  # what the pipe was given: the upload's and the data: URL's images
    assert setup["image"].getpixel((0, 0)) == (1, 2, 3) and setup["mask"].getpixel((0, 0)) == 255
    assert setup["image"].size == setup["mask"].size == (64, 64)


@pytest.mark.parametrize("ref,status,field", [
    ("up_doesnotexist1", 404, "images.0"),
    ("../../etc/passwd", 404, "images.0"),
    ("data:image/png;base64,!!!notbase64", 400, "images.0"),
    ("data:text/plain;base64,aGVsbG8=", 415, "images.0"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a....").decode(), 415, "images.0"),
])
def test_job_image_refs_errors(client, ref, status, field):
    s = open_session(client, pipe="image2image")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [ref]})
    assert r.status_code == status and err(r)["field"] == field, r.get_json()


def test_job_images_are_capped_before_any_is_stored(api, client):
    """Every data: URL of a job is decoded and stored: a list of thousands of tiny ones used to be taken."""
    from multigen.service.api.schemas import MAX_JOB_IMAGES

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    tiny = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    s = open_session(client, pipe="image2image")
    uploads = api.app.extensions["multigen.uploads"].folder
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [tiny] * 500})
    assert r.status_code == 400 and err(r)["field"] == "images", r.get_json()
    assert not uploads.exists() or not any(uploads.iterdir())
    doc = client.get("/api/v1/openapi.json").get_json()
    cap = doc["components"]["schemas"]["JobCreate_image2image"]["properties"]["images"]["anyOf"][0]["maxItems"]
    assert 1 <= cap <= MAX_JOB_IMAGES  # as many as the pipe takes
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [tiny] * (cap + 1)})
    assert r.status_code == 400 and err(r)["field"] == "images", r.get_json()
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [tiny] * cap})
    assert r.status_code == 202, r.get_json()


def test_data_url_size_checked_before_decoding(make_api):
    client = make_api(**{"upload_max_bytes: 20971520": "upload_max_bytes: 1000"}).client()
    s = open_session(client, pipe="image2image")
    big = "data:image/png;base64," + base64.b64encode(os.urandom(3000)).decode()
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [big]})
    assert r.status_code == 413 and err(r)["field"] == "images.0"


def test_uploads_record_owner(api, client):
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    up = client.post("/api/v1/uploads", data={"file": (io.BytesIO(png), "a.png")},
                     content_type="multipart/form-data").get_json()["upload"]
    meta = json.loads((api.app.extensions["multigen.uploads"].folder / f"{up['id']}.json").read_text())
    assert meta["user"] == "local"


def test_unused_uploads_are_deleted_after_keep_hours(make_api):
    api = make_api(**{"upload_keep_hours: 168": "upload_keep_hours: 2"})
    client = api.client()
    store = api.app.extensions["multigen.uploads"]

    def upload():
        r = client.post("/api/v1/uploads", data={"file": (io.BytesIO(encode(Image.new("RGB", (8, 8)), "PNG")), "a.png")},
                        content_type="multipart/form-data")
        return r.get_json()["upload"]["id"]

    old, used, fresh = upload(), upload(), upload()
    three_hours_ago = store.folder.stat().st_mtime - 3 * 3600
    for upload_id in (old, used):
        for ext in ("png", "json"):
            os.utime(store.folder / f"{upload_id}.{ext}", (three_hours_ago, three_hours_ago))
    crash_leftover = store.folder / ".up_leftover.tmp"
    crash_leftover.write_bytes(b"x")
    os.utime(crash_leftover, (three_hours_ago, three_hours_ago))
    s = open_session(client, pipe="image2image")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [used]})
    assert r.status_code == 202, r.get_json()  # a job's use renews the upload
    assert store.prune() == 1
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(
        f"{u}.{ext}" for u in (used, fresh) for ext in ("png", "json"))
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [old]})
    assert r.status_code == 404 and err(r)["field"] == "images.0" and old in err(r)["message"]


def test_upload_keep_hours_0_keeps_everything(api, client):
    store = api.app.extensions["multigen.uploads"]
    store.keep_seconds = 0
    r = client.post("/api/v1/uploads", data={"file": (io.BytesIO(encode(Image.new("RGB", (8, 8)), "PNG")), "a.png")},
                    content_type="multipart/form-data")
    upload_id = r.get_json()["upload"]["id"]
    assert store.prune(now=store.folder.stat().st_mtime + 10 ** 9) == 0
    assert (store.folder / f"{upload_id}.png").is_file()


@pytest.mark.parametrize("fmt,pil", [("webp", "WEBP"), ("jpeg", "JPEG"), ("jpg", "JPEG")])
def test_converted_images_are_encoded_once(api, client, monkeypatch, fmt, pil):
    """A conversion decoded and re-encoded up to 16 megapixels on every request; now the result is kept."""
    _, images = run_session(client, count=1)
    url = f"/api/v1/images/{images[0]['id']}?format={fmt}"
    encodes: list[str] = []
    real_save = Image.Image.save

    def counting_save(self, fp, format=None, **params):
        encodes.append(str(format).upper())
        return real_save(self, fp, format=format, **params)

    monkeypatch.setattr(Image.Image, "save", counting_save)
    first = client.get(url)
    assert first.status_code == 200 and Image.open(io.BytesIO(first.data)).format == pil
    assert encodes == [pil]
    cached = [p for p in (api.svc.config.data_dir / "converted").rglob("*") if p.is_file()]
    assert len(cached) == 1 and cached[0].read_bytes() == first.data
    mtime = cached[0].stat().st_mtime_ns
    second = client.get(url)
    assert second.status_code == 200 and second.data == first.data and second.mimetype == first.mimetype
    assert encodes == [pil]  # not encoded again
    assert cached[0].stat().st_mtime_ns == mtime
    assert second.headers["ETag"] == first.headers["ETag"]
    assert client.get(url, headers={"If-None-Match": first.headers["ETag"]}).status_code == 304
    assert not list((api.svc.config.data_dir / "converted").rglob("*.tmp"))


def test_a_gone_image_takes_its_converted_copies_along(api, client):
    _, images = run_session(client, count=1)
    iid = images[0]["id"]
    assert client.get(f"/api/v1/images/{iid}?format=webp").status_code == 200
    folder = api.svc.config.data_dir / "converted"
    assert [p for p in folder.rglob("*") if p.is_file()]
    api.svc.image_file(iid).unlink()
    r = client.get(f"/api/v1/images/{iid}?format=webp")
    assert r.status_code == 404 and err(r)["code"] == "not_found"  # never the stale copy
    assert not [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_files_are_cached_privately_per_token(make_api, fmt):
    api = make_api(users=("alice",))
    client, headers = api.client(), api.headers("alice")
    s = open_session(client, headers=headers)
    job = queue_job(client, s["id"], headers=headers, steps=2)
    done = wait_job(client, job["id"], headers=headers)
    url = f"/api/v1/images/{done['images'][0]['id']}?format={fmt}"
    for r in (client.get(url, headers=headers), client.get(url, headers=headers)):
        assert r.status_code == 200
        cache = r.headers["Cache-Control"]
        assert "private" in cache and "public" not in cache and "max-age=3600" in cache, cache
        assert "Authorization" in r.headers.get("Vary", ""), dict(r.headers)
    r = client.get(url, headers={**headers, "If-None-Match": r.headers["ETag"]})
    assert r.status_code == 304 and "private" in r.headers["Cache-Control"]
    assert "Authorization" in r.headers.get("Vary", "")
