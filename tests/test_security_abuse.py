"""Issue 17, item 4: what a hostile client may try, each refused with a clear 4xx (docs/security.md).

Tokens (hashed, compared in constant time, never logged), the auth failure limit (per address and per
Basic user name, in all three dialects, behind a trusted proxy, and from a request's head), per-user quotas
(429 with Retry-After), CORS off by default, upload bombs (huge, multi-frame, odd formats) on every route
that takes an image, names that could become paths, header injection, and JSON nesting and body size.
All over the Flask test client on fake pipes; the isolation matrix is test_isolation.py.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import zlib
from typing import Any

import pytest
from helpers_service import open_session, queue_job, wait_job
from PIL import Image

from multigen.service import users as users_module
from multigen.service.api.ratelimit import AuthFailures, TooManyAuthFailures, client_address
from multigen.service.cli import main as cli_main
from multigen.service.config import load_config
from multigen.service.errors import ConfigError, InvalidInput
from multigen.service.prompt_tools import WILDCARD_RE
from multigen.service.users import add_user
from multigen.service.webhooks import WebhookSecrets

FAST = {"steps": 2, "width": 64, "height": 64}
OPENAI_FAST = {"model": "tiny-sd", "size": "64x64", "steps": 2}
#: three failures a minute, so the tests reach the limit quickly
FEW_FAILURES = {"auth_failures_per_minute: 10": "auth_failures_per_minute: 3"}


def err(r) -> dict[str, Any]:
    return r.get_json()["error"]


def basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width x height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ---- tokens ---------------------------------------------------------------------------------------------
def test_tokens_are_hashed_compared_in_constant_time_and_never_logged(make_api, config_file, capsys, caplog,
                                                                      monkeypatch):
    with caplog.at_level("DEBUG"):
        assert cli_main(["users", "add", "carol", "--config", str(config_file)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]  # printed once, on the last line
    assert token.startswith("mg_") and len(token) > 40
    assert token not in config_file.read_text()
    assert load_config(config_file).users["carol"]["token_sha256"] == users_module.hash_token(token)
    api = make_api(users=("dave",))
    client = api.client()
    compared = []
    real = users_module.hmac.compare_digest
    monkeypatch.setattr(users_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with caplog.at_level("DEBUG"):
        assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/sdapi/v1/options", headers=basic("carol", token)).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        wrong = token[:-4] + "AAAA"
        assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        assert client.get("/sdapi/v1/options", headers=basic("dave", token)).status_code == 401  # not dave's
        assert client.get(f"/api/v1/images/x?access_token={wrong}").status_code == 401
    assert compared, "tokens are compared with hmac.compare_digest"
    logged = caplog.text + "".join(str(rec.args) for rec in caplog.records)
    assert token not in logged and wrong not in logged and api.tokens["dave"] not in logged


def test_a_plain_token_in_the_config_is_refused_with_the_fix_and_without_echoing_it(config_file):
    text = config_file.read_text().replace("users: {}", "users:\n  alice:\n    token: mg_plainsecret123")
    config_file.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert e.value.key == "users.alice.token" and "multigen users add" in str(e.value)
    assert "mg_plainsecret123" not in str(e.value)


# ---- auth failures --------------------------------------------------------------------------------------
@pytest.fixture()
def limited(make_api):
    """alice and bob, 3 auth failures a minute, and a clock the test moves."""
    api = make_api(users=("alice", "bob"), **FEW_FAILURES)
    now = [1000.0]
    api.app.extensions["multigen.guard"].auth_failures._clock = lambda: now[0]
    return api, api.client(), now


def from_address(address: str) -> dict[str, Any]:
    return {"environ_base": {"REMOTE_ADDR": address}}


def test_auth_failures_per_address_get_429_with_retry_after(limited):
    api, client, now = limited
    good, bad = api.headers("alice"), {"Authorization": "Bearer mg_wrong"}
    for _ in range(5):  # successes and requests without credentials do not count
        assert client.get("/api/v1/sessions", headers=good, **from_address("10.0.0.5")).status_code == 200
        assert client.get("/api/v1/sessions", **from_address("10.0.0.5")).status_code == 401
    for _ in range(3):
        assert client.get("/api/v1/sessions", headers=bad, **from_address("10.0.0.5")).status_code == 401
    now[0] += 20
    r = client.get("/api/v1/sessions", headers=bad, **from_address("10.0.0.5"))
    assert r.status_code == 429 and err(r)["code"] == "too_many_auth_failures" and err(r)["field"] == "Authorization"
    assert r.headers["Retry-After"] == "40" and "server.auth_failures_per_minute" in err(r)["message"]
    # a valid token from that address waits too (else the answer would tell a right guess from a wrong one)
    assert client.get("/api/v1/sessions", headers=good, **from_address("10.0.0.5")).status_code == 429
    assert client.post("/api/v1/sessions", json={}, headers=good, **from_address("10.0.0.5")).status_code == 429
    # another address is not affected, and the minute passes
    assert client.get("/api/v1/sessions", headers=good, **from_address("10.0.0.6")).status_code == 200
    now[0] += 41
    assert client.get("/api/v1/sessions", headers=good, **from_address("10.0.0.5")).status_code == 200


def test_a1111_basic_failures_count_per_user_name_across_addresses(limited):
    api, client, now = limited
    for i in range(3):
        r = client.get("/sdapi/v1/options", headers=basic("alice", "mg_guess"), **from_address(f"10.1.0.{i}"))
        assert r.status_code == 401
    r = client.get("/sdapi/v1/options", headers=basic("alice", api.tokens["alice"]), **from_address("10.1.0.9"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) == 60
    assert set(r.get_json()) == {"error", "detail", "body", "errors"}  # A1111's error shape
    assert client.get("/sdapi/v1/options", headers=basic("bob", api.tokens["bob"]),
                      **from_address("10.1.0.9")).status_code == 200
    # the name is Basic's: alice's Bearer token from another address still works
    assert client.get("/sdapi/v1/options", headers=api.headers("alice"), **from_address("10.1.0.9")).status_code == 200


def test_openai_bearer_failures_get_openais_429(limited):
    api, client, now = limited
    for _ in range(3):
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-guess"}).status_code == 401
    r = client.post("/v1/images/generations", json={"prompt": "x", **OPENAI_FAST}, headers=api.headers("alice"))
    assert r.status_code == 429 and r.get_json()["error"]["type"] == "rate_limit_error"
    assert r.headers["Retry-After"] == "60"


def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(make_api):
    api = make_api(users=("alice",), **FEW_FAILURES,
                   **{"trusted_proxies: []": "trusted_proxies: [127.0.0.1]"})
    client, bad = api.client(), {"Authorization": "Bearer mg_wrong"}

    def get(forwarded: str, peer: str = "127.0.0.1", headers=bad):
        return client.get("/api/v1/sessions", headers={**headers, "X-Forwarded-For": forwarded},
                          **from_address(peer))

    for _ in range(3):
        assert get("6.6.6.6, 203.0.113.7").status_code == 401  # the proxy saw 203.0.113.7; 6.6.6.6 is a claim
    assert get("1.1.1.1, 203.0.113.7").status_code == 429
    assert get("203.0.113.8", headers=api.headers("alice")).status_code == 200  # another client behind the proxy
    # a peer that is no trusted proxy is counted by its own address, whatever it forwards
    for i in range(3):
        assert get(f"198.51.100.{i}", peer="192.0.2.1").status_code == 401
    assert get("198.51.100.99", peer="192.0.2.1").status_code == 429


def test_client_address_and_the_limiter_alone():
    trusted = frozenset({"10.0.0.1", "10.0.0.2"})
    assert client_address("10.0.0.9", "1.2.3.4", trusted) == "10.0.0.9"
    assert client_address("10.0.0.1", "1.2.3.4, 10.0.0.2", trusted) == "1.2.3.4"
    assert client_address("10.0.0.1", None, trusted) == "10.0.0.1"
    assert client_address(None, None, trusted) == "unknown"
    now = [0.0]
    limiter = AuthFailures(2, clock=lambda: now[0])
    limiter.record(["a"])
    now[0] = 30
    limiter.record(["a"])
    with pytest.raises(TooManyAuthFailures) as e:
        limiter.check(["b", "a"])
    assert e.value.headers() == {"Retry-After": "30"}
    now[0] = 60.5  # the first failure left the minute
    limiter.check(["a"])
    AuthFailures(0).record(["a"] * 100)  # 0: off
    AuthFailures(0).check(["a"])


def test_a_request_refused_from_its_head_counts_and_is_refused_before_its_body(limited):
    api, client, now = limited
    guard = api.app.extensions["multigen.guard"]
    head = {"Authorization": "Bearer mg_wrong", "Content-Length": "1000000", "Host": "localhost"}
    for _ in range(3):
        error, _ = guard.check_head("POST", "/api/v1/uploads", "", head.get, "10.9.9.9")
        assert error.http_status == 401
    error, _ = guard.check_head("POST", "/api/v1/uploads", "", head.get, "10.9.9.9")
    assert error.http_status == 429 and error.headers()["Retry-After"] == "60"
    error, _ = guard.check_head("POST", "/sdapi/v1/txt2img", "", head.get, "10.9.9.9")
    assert error.http_status == 429 and "detail" in error.to_dict()  # in the dialect's shape
    # the app counts the same failures (one limiter per app)
    r = client.get("/api/v1/sessions", headers=api.headers("alice"), **from_address("10.9.9.9"))
    assert r.status_code == 429


def test_auth_failure_keys_have_defaults_and_are_checked(config_file):
    server = load_config(config_file).server
    assert server.auth_failures_per_minute == 10 and server.trusted_proxies == []
    config_file.write_text(config_file.read_text().replace("trusted_proxies: []", "trusted_proxies: [proxy.lan]"))
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert e.value.key == "server.trusted_proxies.0"


# ---- per-user quotas ------------------------------------------------------------------------------------
def test_queued_jobs_and_open_sessions_per_user_are_429_with_retry_after(make_api):
    api = make_api(users=("alice", "bob"), start=False, **{"max_queued_jobs_per_user: 200": "max_queued_jobs_per_user: 2",
                                                          "max_open_sessions_per_user: 100": "max_open_sessions_per_user: 2"})
    client, alice = api.client(), api.headers("alice")
    s = open_session(client, headers=alice)
    queue_job(client, s["id"], headers=alice)
    queue_job(client, s["id"], headers=alice)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}, headers=alice)
    assert r.status_code == 429 and "max_queued_jobs_per_user" in err(r)["message"] and r.headers["Retry-After"]
    sb = open_session(client, headers=api.headers("bob"))
    queue_job(client, sb["id"], headers=api.headers("bob"))  # bob's own quota
    open_session(client, headers=alice)
    r = client.post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image", "model": "tiny-sd"},
                    headers=alice)
    assert r.status_code == 429 and err(r)["code"] == "too_many_sessions" and r.headers["Retry-After"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, headers=alice)  # the dialects too
    assert r.status_code == 429 and r.headers["Retry-After"]


def test_images_per_user_day_is_429_with_retry_after(make_api):
    api = make_api(users=("alice", "bob"), start=False,
                   **{"max_images_per_user_day: 0": "max_images_per_user_day: 5"})
    client, alice = api.client(), api.headers("alice")
    now = [0.0]
    api.svc.budget._clock = lambda: now[0]
    s = open_session(client, headers=alice)
    queue_job(client, s["id"], headers=alice, count=3)
    now[0] = 3600.0
    queue_job(client, s["id"], headers=alice, count=2)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}, headers=alice)
    assert r.status_code == 429 and err(r)["code"] == "over_budget" and err(r)["field"] == "count"
    assert "limits.max_images_per_user_day" in err(r)["message"] and r.headers["Retry-After"] == str(86400 - 3600)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "count": 6}, headers=alice)
    assert r.status_code == 400 and err(r)["code"] == "job_too_costly"  # never fits a day
    sb = open_session(client, headers=api.headers("bob"))
    queue_job(client, sb["id"], headers=api.headers("bob"), count=5)  # bob has his own day
    r = client.post("/v1/images/generations", json={"prompt": "x", **OPENAI_FAST}, headers=alice)
    assert r.status_code == 429 and r.headers["Retry-After"] == str(86400 - 3600)
    now[0] = 86401.0  # the first job's 3 images left the day
    queue_job(client, s["id"], headers=alice, count=3)


def test_a_job_refused_by_the_hourly_budget_does_not_use_the_daily_images(tmp_path):
    from multigen.service.budget import CostBudget, OverBudget

    budget = CostBudget(per_job=0, per_user_hour=10, images_per_user_day=5, clock=lambda: 0.0)
    budget.charge("a", 8, {}, images=2)
    with pytest.raises(OverBudget):
        budget.charge("a", 8, {}, images=2)  # over the hour: its images are not kept
    budget.charge("a", 2, {}, images=3)  # 2 + 3 images: exactly the day
    with pytest.raises(OverBudget) as e:
        budget.charge("a", 0.1, {}, images=1)
    assert "max_images_per_user_day" in e.value.message
    budget.refund("a", 2)
    budget.charge("a", 0.1, {}, images=1)


# ---- CORS -----------------------------------------------------------------------------------------------
def test_cors_is_off_by_default(make_api, config_file):
    assert load_config(config_file).server.cors_origins == []
    api = make_api(users=("alice",))
    client, origin = api.client(), {"Origin": "https://evil.example"}
    for path in ("/api/v1/sessions", "/sdapi/v1/options", "/v1/models", "/api/v1/health"):
        r = client.get(path, headers={**api.headers("alice"), **origin})
        assert "Access-Control-Allow-Origin" not in r.headers, path
        r = client.options(path, headers={**origin, "Access-Control-Request-Method": "GET"})
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers, path


# ---- upload bombs ---------------------------------------------------------------------------------------
def post_image(client, route: str, data: bytes, headers: dict[str, str], session_id: str):
    """``data`` sent as an image through ``route``: the upload API, a job's data: URL, A1111's base64 or
    OpenAI's multipart edit."""
    if route == "upload":
        return client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), "a.png")},
                           content_type="multipart/form-data", headers=headers)
    if route == "job":
        return client.post(f"/api/v1/sessions/{session_id}/jobs", json={"prompt": "x", "images": [data_url(data)]},
                           headers=headers)
    if route in ("a1111-png-info", "a1111-extra-single-image"):
        return client.post(f"/sdapi/v1/{route.removeprefix('a1111-')}", json={"image": base64.b64encode(data).decode()},
                           headers=headers)
    if route == "a1111":
        return client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [base64.b64encode(data).decode()],
                                                      **FAST}, headers=headers)
    return client.post("/v1/images/edits", data={"prompt": "x", "model": "tiny-sd", "steps": "2",
                                                  "image": (io.BytesIO(data), "i.png")},
                       content_type="multipart/form-data", headers=headers)


def refused_naming(r, route: str) -> tuple[int, str]:
    """(status, what the error names) in each route's shape."""
    body = r.get_json()
    if route.startswith("a1111"):
        return r.status_code, ".".join(str(x) for x in body["detail"][0]["loc"])
    if route == "openai":
        return r.status_code, body["error"]["param"]
    return r.status_code, body["error"]["field"]


FIELD = {"upload": "file", "job": "images.0", "a1111": "body.init_images", "openai": "image",
         "a1111-png-info": "body.image", "a1111-extra-single-image": "body.image"}


@pytest.mark.parametrize("route", list(FIELD))
def test_bombs_huge_multi_frame_and_odd_images_are_refused_on_every_image_route(make_api, route):
    api = make_api(users=("alice",))
    client, alice = api.client(), api.headers("alice")
    s = open_session(client, pipe="image2image", headers=alice)
    cases = {"bomb": bomb_png(), "huge": bomb_png(5000, 5000), "apng": animated("PNG"), "webp": animated("WEBP"),
             "gif": animated("GIF"), "tiff": animated("TIFF")}
    for name, data in cases.items():
        r = post_image(client, route, data, alice, s["id"])
        status, named = refused_naming(r, route)
        assert 400 <= status < 500 and named == FIELD[route], (name, status, r.get_data(as_text=True)[:300])
        if name in ("apng", "webp"):
            assert "animated" in r.get_data(as_text=True), name
    assert post_image(client, route, png(), alice, s["id"]).status_code < 300  # a plain one is fine


# ---- names that become paths ----------------------------------------------------------------------------
TRAVERSAL = ["../x", "..", "a/../../x", "/etc/passwd", "..%2F..%2Fx", "a\\..\\x", ".hidden", "a\x00b"]


def test_names_that_become_paths_are_refused_or_stay_inside(make_api, config_file, tmp_path):
    api = make_api(users=("alice",))
    client, alice = api.client(), api.headers("alice")
    body = {"project": "p", "pipe": "prompt2image", "model": "tiny-sd"}
    s = open_session(client, headers=alice)
    for bad in TRAVERSAL:
        # name -> (the request, the field its 4xx names) for each name the server makes a path of
        table = {
            "project": (lambda: client.post("/api/v1/sessions", json={**body, "project": bad}, headers=alice),
                        ("project",)),
            "model": (lambda: client.post("/api/v1/sessions", json={**body, "model": bad}, headers=alice), ("model",)),
            "lora": (lambda: client.post("/api/v1/sessions", json={**body, "loras": [{"name": bad}]}, headers=alice),
                     ("loras.0.name", "loras.0", "loras")),
            "style": (lambda: client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "styles": [bad]},
                                          headers=alice), ("styles.0", "styles")),
            "wildcard": (lambda: client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": f"__{bad}__"},
                                             headers=alice), ("prompt",)),
            "upload id in a job": (lambda: client.post(f"/api/v1/sessions/{s['id']}/jobs",
                                                       json={"prompt": "x", "images": [bad]}, headers=alice),
                                   ("images.0", "images")),
        }
        for name, (call, fields) in table.items():
            r = call()
            if name == "wildcard" and not WILDCARD_RE.search(f"__{bad}__"):
                assert r.status_code == 202  # no wildcard reference: plain prompt text, no file is looked for
                continue
            assert 400 <= r.status_code < 500 and err(r).get("field") in fields, (name, bad, r.get_json())
        from urllib.parse import quote

        for path in (f"/api/v1/sessions/{quote(bad, safe='')}", f"/api/v1/images/{quote(bad, safe='')}",
                     f"/api/v1/jobs/{quote(bad, safe='')}/grid", f"/api/v1/uploads/{quote(bad, safe='')}"):
            r = client.open(path, method="DELETE" if "uploads" in path else "GET", headers=alice)
            assert r.status_code == 404, (path, r.status_code)
        with pytest.raises(InvalidInput):
            add_user(str(config_file), bad)  # user names become folders and webhook secret files
        assert cli_main(["users", "add", bad, "--config", str(config_file)]) == 2
        assert cli_main(["users", "webhook-secret", bad, "--config", str(config_file)]) == 2  # no such user
        if "/" in bad or bad.startswith("."):
            with pytest.raises(InvalidInput):  # and the file store refuses a path by itself
                WebhookSecrets(tmp_path, per_user=True).path(bad)
    # the A1111 dialect's names: a model or style that would be a path is a 422
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"}, headers=alice)
    assert r.status_code == 422
    # Basic credentials naming a path are just an unknown user
    assert client.get("/sdapi/v1/options", headers=basic("../alice", api.tokens["alice"])).status_code == 401


def test_wildcard_and_style_files_that_are_symlinks_out_of_their_folder_are_not_used(make_api, config_file, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("the server's secret\n")
    folder = config_file.parent / "wildcards"
    folder.mkdir(exist_ok=True)
    (folder / "mine.txt").write_text("red\nblue\n")
    os.symlink(outside, folder / "evil.txt")
    api = make_api(users=("alice",), start=False)
    client, alice = api.client(), api.headers("alice")
    names = [w["name"] if isinstance(w, dict) else w for w in
             client.get("/api/v1/wildcards", headers=alice).get_json()["wildcards"]]
    assert "mine" in names and "evil" not in names
    s = open_session(client, headers=alice)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "__evil__"}, headers=alice)
    assert r.status_code == 400 and err(r)["field"] == "prompt" and "secret" not in r.get_data(as_text=True)


def test_an_image_file_that_is_a_symlink_out_of_the_output_folder_is_not_served(make_api, tmp_path):
    api = make_api(users=("alice",))
    client, alice = api.client(), api.headers("alice")
    s = open_session(client, headers=alice)
    wait_job(client, queue_job(client, s["id"], headers=alice, steps=2)["id"], headers=alice)
    image = client.get(f"/api/v1/sessions/{s['id']}/images", headers=alice).get_json()["images"][0]
    path = api.svc.image_file(image["id"])
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    os.remove(path)
    os.symlink(secret, path)
    for suffix in ("", "?format=webp"):
        r = client.get(f"/api/v1/images/{image['id']}{suffix}", headers=alice)
        assert r.status_code == 404 and err(r)["field"] == "image_id"


# ---- header injection -----------------------------------------------------------------------------------
def test_no_client_text_reaches_a_response_header(make_api):
    api = make_api(users=("alice",))
    client, alice = api.client(), api.headers("alice")
    evil = 'a"\r\nSet-Cookie: x=1'
    r = client.post("/api/v1/sessions", json={"project": evil, "pipe": "prompt2image", "model": "tiny-sd"},
                    headers=alice)
    assert r.status_code == 400 and err(r)["field"] == "project"
    s = open_session(client, headers=alice)
    job = wait_job(client, queue_job(client, s["id"], headers=alice, steps=2, count=2, grid=True,
                                     prompt=evil)["id"], headers=alice)
    image = client.get(f"/api/v1/sessions/{s['id']}/images", headers=alice).get_json()["images"][0]
    up = client.post("/api/v1/uploads", data={"file": (io.BytesIO(png()), f"{evil}.png")},
                     content_type="multipart/form-data", headers=alice)
    assert up.status_code == 201
    for r in (client.get(f"/api/v1/images/{image['id']}", headers=alice),
              client.get(f"/api/v1/images/{image['id']}?format=jpeg", headers=alice),
              client.get(f"/api/v1/jobs/{job['id']}/grid", headers=alice), up,
              client.get(f"/api/v1/images/{evil}", headers=alice)):
        assert r.status_code in (200, 201, 404)
        for name, value in r.headers.items():
            assert "\r" not in value and "\n" not in value and "Set-Cookie" not in value, (name, value)
        assert "Set-Cookie" not in r.headers
        disposition = r.headers.get("Content-Disposition")  # send_file's: the server's own file name
        assert disposition is None or re.fullmatch(r"inline; filename=[A-Za-z0-9_.-]+", disposition), disposition


# ---- JSON bodies ----------------------------------------------------------------------------------------
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_json_is_a_400_in_every_dialect(make_api, depth):
    api = make_api(users=("alice",), start=False)
    client, alice = api.client(), {**api.headers("alice"), "Content-Type": "application/json"}
    s = open_session(client, headers=alice)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", data=f'{{"prompt": {nested(depth)}}}', headers=alice)
    assert r.status_code == 400 and err(r)["code"] in ("malformed_json", "invalid"), r.get_json()
    r = client.post("/api/v1/sessions", data=nested(depth), headers=alice)
    assert r.status_code == 400
    r = client.post("/sdapi/v1/txt2img", data=f'{{"prompt": "x", "styles": {nested(depth)}}}', headers=alice)
    assert r.status_code == 422
    r = client.post("/v1/images/generations", data=f'{{"prompt": {nested(depth)}}}', headers=alice)
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error"


def test_an_oversize_json_body_is_413_before_it_is_parsed(make_api, monkeypatch):
    api = make_api(users=("alice",))
    client, alice = api.client(), {**api.headers("alice"), "Content-Type": "application/json"}
    parsed = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1))
    big = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    for path in ("/api/v1/sessions", "/sdapi/v1/options", "/v1/images/generations"):
        r = client.post(path, data=big, headers=alice)
        assert r.status_code == 413, (path, r.status_code)
    assert not parsed
    guard = api.app.extensions["multigen.guard"]
    head = {**alice, "Content-Length": str(len(big)), "Host": "localhost"}
    error, _ = guard.check_head("POST", "/api/v1/sessions", "", head.get)
    assert error is not None and error.http_status == 413


@pytest.mark.slow
def test_on_waitress_failures_with_bodies_are_counted_from_the_head(make_api):
    """Over real HTTP: POSTs with a wrong token are refused from their heads (body unread) and counted
    against the client's address; past the limit the valid token from that address gets 429 too."""
    import http.client

    from test_api_service import waitress_server

    api = make_api(users=("alice",), **FEW_FAILURES, **{"port: 8000": "port: 0"})
    with waitress_server(api.app) as (url, server):
        port = int(server.effective_port)

        def post(token: str) -> tuple[int, dict[str, str]]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/api/v1/sessions", body=b'{"project": "p"}',
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                return r.status, dict(r.getheaders())
            finally:
                conn.close()

        assert [post("mg_wrong")[0] for _ in range(3)] == [401, 401, 401]
        status, headers = post(api.tokens["alice"])
        assert status == 429 and int(headers["Retry-After"]) > 0


@pytest.mark.parametrize("metrics_token", [False, True])
def test_metrics_token_guesses_count_too(make_api, metrics_token):
    """/metrics checks its own token (or a user's): its failures count like the API's."""
    token = "m" * 20
    api = make_api(users=("alice",), **FEW_FAILURES,
                   **({'metrics_token: ""': f"metrics_token: {token}"} if metrics_token else {}))
    client = api.client()
    for _ in range(3):
        assert client.get("/metrics", headers={"Authorization": "Bearer mg_guess"}).status_code == 401
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token if metrics_token else api.tokens['alice']}"})
    assert r.status_code == 429 and r.headers["Retry-After"]
    assert client.get("/api/v1/sessions", headers=api.headers("alice")).status_code == 429
