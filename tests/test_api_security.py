"""The server's guards, over the Flask test client on the real ServiceThread with fake pipes:
Host and Origin checks (DNS rebinding, cross-site requests) and CORS for configured origins,
per-route body limits, event-stream caps (server-wide and per user), streams of users removed
from the config, and ``/metrics`` (its token, and no per-session store query per scrape).

What waitress itself does (refusing a body before reading it) is tested over real HTTP in
test_e2e_api.py and test_serve.py.
"""
from __future__ import annotations

import base64
import inspect
import io
import threading

import pytest
from helpers_service import open_session, queue_job, wait_job
from PIL import Image

from multigen.service.config import load_config
from multigen.service.errors import ConfigError
from multigen.service.users import hash_token

CORS_TOOL = "http://tool.example:3000"


def err(r):
    return r.get_json()["error"]


def png_bytes(size=(16, 16), noise=False) -> bytes:
    buf = io.BytesIO()
    if noise:
        import os

        Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buf, format="PNG")
    else:
        Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def upload(client, headers=None):
    return client.post("/api/v1/uploads", data={"file": (io.BytesIO(png_bytes()), "a.png")},
                       content_type="multipart/form-data", headers=headers or {})


def with_cors(origins: list[str]) -> dict[str, str]:
    """make_api(**with_cors([...])): config text that sets server.cors_origins."""
    return {"cors_origins: []": f"cors_origins: [{', '.join(origins)}]"}


# ---- Host and Origin (item 7) ------------------------------------------------------------------------------
def test_anonymous_server_refuses_foreign_host_names(api, config_file):
    client = api.client()
    r = client.get("/api/v1/sessions", headers={"Host": "evil.example"})
    assert r.status_code == 403 and err(r)["code"] == "forbidden"
    assert "evil.example" in err(r)["message"] and "localhost" in err(r)["message"]
    r = client.post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image", "model": "tiny-sd"},
                    headers={"Host": "evil.example:8000"})
    assert r.status_code == 403
    assert client.get("/", headers={"Host": "rebound.example"}).status_code == 403  # the page too: it shows images
    # loopback names, with no port or the server's own port (8000 in config: the test client binds nothing)
    for host in ("localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:8000", "[::1]:8000", "[::1]", "127.0.0.2"):
        assert client.get("/api/v1/sessions", headers={"Host": host}).status_code == 200, host
    for host in ("127.0.0.1:9999", "localhost.evil.example", "127.0.0.1.nip.io", "[::2]:8000"):
        assert client.get("/api/v1/sessions", headers={"Host": host}).status_code == 403, host


def test_anonymous_server_refuses_foreign_origins_and_says_how_to_allow_one(api, config_file):
    client = api.client()
    r = upload(client, {"Origin": "http://evil.example"})  # a cross-site multipart form needs no rebinding
    assert r.status_code == 403 and err(r)["code"] == "forbidden"
    message = err(r)["message"]
    assert "server.cors_origins" in message and str(config_file) in message and "http://evil.example" in message
    assert "Access-Control-Allow-Origin" not in r.headers
    assert not list((api.svc.config.data_dir / "uploads").glob("up_*.png"))  # nothing was stored
    for origin in ("null", "http://localhost:9999", "https://localhost.evil.example"):
        assert client.get("/api/v1/sessions", headers={"Origin": origin}).status_code == 403, origin


def test_same_origin_requests_and_the_page_keep_working(api):
    client = api.client()
    page = client.get("/", headers={"Host": "127.0.0.1:8000"})
    assert page.status_code == 200 and b"<html" in page.data.lower()
    assert client.get("/static/app.js", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    # the page's own fetch() calls: Origin is the server's own
    for host, origin in (("127.0.0.1:8000", "http://127.0.0.1:8000"), ("localhost:8000", "http://localhost:8000"),
                         ("localhost", "http://localhost")):
        r = client.post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image", "model": "tiny-sd"},
                        headers={"Host": host, "Origin": origin})
        assert r.status_code == 201, (host, r.get_json())
        assert upload(client, {"Host": host, "Origin": origin}).status_code == 201


def test_cors_origins_pass_get_the_header_and_preflights(make_api):
    api = make_api(**with_cors([CORS_TOOL]))
    client = api.client()
    r = upload(client, {"Origin": CORS_TOOL})
    assert r.status_code == 201 and r.headers["Access-Control-Allow-Origin"] == CORS_TOOL
    assert "Origin" in r.headers["Vary"]
    errors = client.get("/api/v1/jobs/nope", headers={"Origin": CORS_TOOL})  # errors too: the tool reads them
    assert errors.status_code == 404 and errors.headers["Access-Control-Allow-Origin"] == CORS_TOOL
    pre = client.options("/api/v1/sessions", headers={"Origin": CORS_TOOL, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == CORS_TOOL
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "content-type" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert int(pre.headers["Access-Control-Max-Age"]) > 0
    bad = client.options("/api/v1/sessions", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert bad.status_code == 403 and "Access-Control-Allow-Origin" not in bad.headers
    assert client.get("/api/v1/sessions", headers={"Origin": "http://evil.example"}).status_code == 403


def test_with_users_host_is_not_checked_and_a_foreign_origin_gets_no_cors(make_api):
    """Bearer tokens are not sent by browsers on their own (no cookies): a request that carries one was
    sent by its holder, from whatever page. It is served, without CORS headers unless the origin is listed."""
    api = make_api(users=("alice",), **with_cors([CORS_TOOL]))
    client, alice = api.client(), api.headers("alice")
    assert client.get("/api/v1/sessions", headers={"Host": "gpu.lab.example", **alice}).status_code == 200
    r = client.get("/api/v1/sessions", headers={"Origin": "http://evil.example", **alice})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = client.get("/api/v1/sessions", headers={"Origin": CORS_TOOL, **alice})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == CORS_TOOL
    # a preflight carries no token: the listed origin is answered, another is told how to get listed
    pre = client.options("/api/v1/sessions", headers={"Origin": CORS_TOOL, "Access-Control-Request-Method": "GET",
                                                      "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == CORS_TOOL
    bad = client.options("/api/v1/sessions", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "GET"})
    assert bad.status_code == 403 and "server.cors_origins" in err(bad)["message"]
    assert client.get("/api/v1/sessions", headers={"Origin": CORS_TOOL}).status_code == 401  # still needs a token


@pytest.mark.parametrize("value,problem", [("['*']", "'*'"), ("[null]", "null"), ("['http://a.example/']", "path"),
                                           ("['a.example']", "scheme"), ("http://a.example", "list")])
def test_cors_origins_are_checked_at_start(config_file, value, problem):
    text = config_file.read_text().replace("cors_origins: []", f"cors_origins: {value}")
    config_file.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert "cors_origins" in e.value.key and str(config_file) in str(e.value) and problem in str(e.value)


def test_new_server_keys_have_their_defaults(config_file):
    server = load_config(config_file).server
    assert server.cors_origins == [] and server.metrics_token == "" and server.max_event_streams_per_user == 2


# ---- body sizes (item 4; waitress's part is in test_e2e_api.py) ----------------------------------------------
def test_small_routes_take_small_bodies_uploads_and_jobs_large_ones(api):
    client = api.client()
    big_json = b'{"project": "' + b"x" * (2 * 1024 * 1024) + b'", "pipe": "prompt2image", "model": "tiny-sd"}'
    r = client.post("/api/v1/sessions", data=big_json, content_type="application/json")
    assert r.status_code == 413 and err(r)["code"] == "too_large" and "1048576" in err(r)["message"]
    s = open_session(client, pipe="image2image")
    r = client.post("/api/v1/jobs/nope/cancel", data=b"x" * (2 * 1024 * 1024), content_type="text/plain")
    assert r.status_code == 413
    photo = png_bytes((700, 600), noise=True)  # > 1 MiB: an inline image in a job body still fits
    assert len(photo) > 1024 * 1024
    url = "data:image/png;base64," + base64.b64encode(photo).decode()
    job = queue_job(client, s["id"], prompt="x", images=[url], steps=2, width=64, height=64)
    assert wait_job(client, job["id"])["state"] == "succeeded"
    r = client.post("/api/v1/uploads", data={"file": (io.BytesIO(photo), "big.png")}, content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()


# ---- event streams: caps (item 10) and removed users (item 9) ------------------------------------------------
def test_event_streams_are_capped_per_user_and_server_wide_with_429(make_api):
    api = make_api(users=("alice", "bob", "carol"), **{"max_event_streams: 4": "max_event_streams: 3"})
    client = api.client()
    opened = []

    def stream(user):
        r = client.get("/api/v1/events", headers=api.headers(user), buffered=False)
        if r.status_code == 200:
            opened.append(r)
        return r

    assert stream("alice").status_code == 200 and stream("alice").status_code == 200
    r = stream("alice")
    assert r.status_code == 429 and err(r)["code"] == "too_many_streams_per_user"
    assert int(r.headers["Retry-After"]) > 0 and "2 event streams" in err(r)["message"]
    assert stream("bob").status_code == 200  # alice's streams do not count against bob
    r = stream("carol")  # the server's 3 are taken
    assert r.status_code == 429 and err(r)["code"] == "too_many_streams" and int(r.headers["Retry-After"]) > 0
    opened.pop(0).close()  # one of alice's ends: a slot is free again, for anyone
    assert stream("carol").status_code == 200
    for r in opened:
        r.close()


def test_global_stream_cap_without_users_is_429(make_api):
    api = make_api(**{"max_event_streams: 4": "max_event_streams: 1"})
    client = api.client()
    first = client.get("/api/v1/events", buffered=False)
    assert first.status_code == 200
    r = client.get("/api/v1/events", buffered=False)
    assert r.status_code == 429 and err(r)["code"] == "too_many_streams" and r.headers["Retry-After"]
    first.close()


def test_stream_of_a_removed_user_ends_with_a_final_event(make_api, config_file):
    api = make_api(users=("alice", "carol"))
    api.app.config["MULTIGEN_HEARTBEAT_SECONDS"] = 0.1
    api.app.extensions["multigen.users"].check_every = 0.05
    client = api.client()
    r = client.get("/api/v1/events", headers=api.headers("carol"), buffered=False)
    assert r.status_code == 200
    stream = iter(r.response)
    assert next(stream).startswith(b"retry:")
    assert next(stream) == b": heartbeat\n\n"  # alive while carol is a user
    text = config_file.read_text()
    entry = f"  carol:\n    token_sha256: {hash_token(api.tokens['carol'])}\n"
    assert entry in text
    config_file.write_text(text.replace(entry, ""))
    chunks = []
    for chunk in stream:  # ends by itself: the user is checked again at each heartbeat
        chunks.append(chunk.decode())
        # the users table notices the edit within its check interval (0.05 s, half a heartbeat): the stream
        # must end at the first or second heartbeat after it, not go on
        assert sum(c.startswith(": heartbeat") for c in chunks) <= 2, "the stream of a removed user goes on"
    last = chunks[-1]
    assert "event: stream.ended" in last and '"reason":"unauthorized"' in last
    r.close()
    assert api.app.extensions["multigen.event_streams"].open == 0  # its slot is free
    assert client.get("/api/v1/events", headers=api.headers("carol")).status_code == 401
    alice = client.get("/api/v1/events", headers=api.headers("alice"), buffered=False)
    assert alice.status_code == 200
    alice.close()


# ---- /metrics (item 11) --------------------------------------------------------------------------------------
def test_metrics_token(make_api):
    token = "metrics-" + "t" * 32
    api = make_api(**{'metrics_token: ""': f"metrics_token: {token}"})
    client = api.client()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {token}"}):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401 and err(r)["code"] == "unauthorized", headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and b"multigen_queue_jobs" in r.data


def test_metrics_with_users_need_a_token_when_no_metrics_token_is_set(make_api):
    api = make_api(users=("alice",))
    client = api.client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=api.headers("alice")).status_code == 200


def test_metrics_token_must_be_long(config_file):
    config_file.write_text(config_file.read_text().replace('metrics_token: ""', "metrics_token: short"))
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert e.value.key == "server.metrics_token" and "shorter than 16 characters" in str(e.value)


def test_scrapes_query_no_store_per_session(api):
    client = api.client()
    for _ in range(4):
        s = open_session(client)
        wait_job(client, queue_job(client, s["id"], steps=2)["id"])
    api.svc.wait_idle(timeout=10)
    store = api.svc.store
    calls: list[str] = []
    me = threading.current_thread()  # the test client serves requests in this thread; workers use their own

    def counting(name, method):
        def wrapper(*args, **kwargs):
            if threading.current_thread() is me:
                calls.append(name)
            return method(*args, **kwargs)
        return wrapper

    for name, method in inspect.getmembers(store, inspect.ismethod):
        if not name.startswith("_"):
            setattr(store, name, counting(name, method))
    first = client.get("/metrics")
    second = client.get("/metrics")
    assert first.status_code == second.status_code == 200
    # the queue's depth and the workers (of the whole cluster, with a shared store): three queries, however
    # many sessions there are
    assert sorted(calls) == sorted(["job_counts", "list_workers", "list_jobs"] * 2), calls
    text = second.get_data(as_text=True)
    assert 'multigen_jobs_finished_total{state="succeeded"} 4.0' in text
    assert "multigen_images_written_total 4.0" in text and 'multigen_queue_jobs{state="queued"} 0.0' in text
