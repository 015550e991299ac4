"""Bearer-token auth, user isolation (404, never a leak) and the bind/auth start-up rule."""
from __future__ import annotations

import io

import pytest
from helpers_service import REC, open_session, queue_job, read_sse, wait_for, wait_job
from PIL import Image

from multigen.service.config import load_config
from multigen.service.errors import ConfigError
from multigen.service.server import check_bind_auth, is_loopback
from multigen.service.users import UserTable, add_user, hash_token


@pytest.fixture()
def two_users(make_api):
    api = make_api(users=("alice", "bob"))
    return api.client(), {u: api.headers(u) for u in api.tokens}, api.tokens, api


def err(r):
    return r.get_json()["error"]


def test_tokens_are_stored_only_as_hashes(config_file, make_api):
    tokens = make_api(users=("alice",)).tokens
    text = config_file.read_text()
    assert tokens["alice"] not in text and hash_token(tokens["alice"]) in text
    assert load_config(config_file).users["alice"]["token_sha256"] == hash_token(tokens["alice"])


def test_no_or_bad_token_is_401_public_routes_stay_open(two_users):
    client, headers, _, _ = two_users
    for h in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        r = client.get("/api/v1/sessions", headers=h)
        assert r.status_code == 401 and err(r)["code"] == "unauthorized", h
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.post("/api/v1/sessions", json={"project": "p", "pipe": "prompt2image", "model": "tiny-sd"})
    assert r.status_code == 401
    for path in ("/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs", "/"):
        assert client.get(path).status_code == 200, path
    # the metrics show every user's traffic: with users, a user's token (or server.metrics_token) is needed
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=headers["bob"]).status_code == 200
    assert client.get("/api/v1/sessions", headers=headers["alice"]).status_code == 200
    # a token in the query string is only for files and streams, not for the rest of the API
    assert client.get(f"/api/v1/sessions?access_token={two_users[2]['alice']}").status_code == 401


def test_users_never_see_each_others_things(two_users):
    client, headers, tokens, _ = two_users
    alice, bob = headers["alice"], headers["bob"]
    s = open_session(client, headers=alice)
    assert s["user"] == "alice"
    job = wait_job(client, queue_job(client, s["id"], headers=alice, steps=2)["id"], headers=alice)
    image = client.get(f"/api/v1/sessions/{s['id']}/images", headers=alice).get_json()["images"][0]
    REC.step_delay = 0.02
    running = queue_job(client, s["id"], headers=alice, steps=500)  # 10 s: bob may try to cancel it
    wait_for(lambda: client.get(f"/api/v1/jobs/{running['id']}/preview", headers=alice).status_code == 200)
    for method, path in [("get", f"/api/v1/sessions/{s['id']}"), ("delete", f"/api/v1/sessions/{s['id']}"),
                         ("get", f"/api/v1/sessions/{s['id']}/images"), ("get", f"/api/v1/sessions/{s['id']}/jobs"),
                         ("get", f"/api/v1/jobs/{job['id']}"),
                         ("post", f"/api/v1/jobs/{running['id']}/cancel"),
                         ("get", f"/api/v1/jobs/{running['id']}/preview"), ("get", f"/api/v1/images/{image['id']}"),
                         ("get", f"/api/v1/images/{image['id']}/metadata"),
                         ("get", f"/api/v1/events?session_id={s['id']}")]:
        r = getattr(client, method)(path, headers=bob)
        assert r.status_code == 404 and err(r)["code"] == "not_found", (method, path, r.get_json())
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}, headers=bob)
    assert r.status_code == 404
    assert client.get("/api/v1/sessions", headers=bob).get_json()["sessions"] == []
    running = client.get(f"/api/v1/jobs/{running['id']}", headers=alice).get_json()["job"]
    assert running["state"] == "running" and running["cancel_requested"] is False  # bob's cancel did nothing
    assert client.get(f"/api/v1/sessions/{s['id']}", headers=alice).get_json()["session"]["state"] == "open"
    # alice sees hers; files also take ?access_token= (for <img> tags)
    assert client.get(f"/api/v1/images/{image['id']}?access_token={tokens['alice']}").status_code == 200
    assert client.get(f"/api/v1/images/{image['id']}?access_token={tokens['bob']}").status_code == 404
    assert len(client.get("/api/v1/sessions", headers=headers["alice"]).get_json()["sessions"]) == 1


def test_query_tokens_never_reach_the_logs(two_users, caplog, monkeypatch):
    """?access_token= (for <img> and EventSource) is accepted on files and streams; whatever happens to
    such a request (served, refused, a bug), the token is not written to the log, while the failing
    request's path is."""
    client, headers, tokens, api = two_users
    token = tokens["alice"]
    s = open_session(client, headers=headers["alice"])
    job = wait_job(client, queue_job(client, s["id"], headers=headers["alice"], steps=2)["id"],
                   headers=headers["alice"])
    image = client.get(f"/api/v1/sessions/{s['id']}/images", headers=headers["alice"]).get_json()["images"][0]
    with caplog.at_level("DEBUG"):
        assert client.get(f"/api/v1/images/{image['id']}?access_token={token}").status_code == 200
        assert client.get(f"/api/v1/images/nope?access_token={token}").status_code == 404
        assert client.get(f"/api/v1/images/{image['id']}?access_token={tokens['bob']}").status_code == 404
        assert client.get(f"/api/v1/jobs/{job['id']}/preview?access_token=mg_wrong").status_code == 401
        assert client.get(f"/api/v1/events?session_id=nope&access_token={token}").status_code == 404

        def broken(image_id):
            raise RuntimeError("the store broke")

        monkeypatch.setattr(api.svc, "get_image", broken)
        r = client.get(f"/api/v1/images/{image['id']}?access_token={token}&format=webp")
        assert r.status_code == 500 and err(r)["code"] == "internal_error"
    logged = caplog.text + "".join(str(rec.args) for rec in caplog.records)
    assert token not in logged and tokens["bob"] not in logged and "access_token" not in logged
    assert f"GET '/api/v1/images/{image['id']}'" in caplog.text and "the store broke" in caplog.text  # quoted: %r


def test_body_user_must_match_token(two_users):
    client, headers, _, _ = two_users
    r = client.post("/api/v1/sessions", json={"user": "bob", "project": "p", "pipe": "prompt2image",
                                              "model": "tiny-sd"}, headers=headers["alice"])
    assert r.status_code == 403 and err(r)["field"] == "user"


def test_uploads_are_private(two_users):
    client, headers, _, _ = two_users
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    up = client.post("/api/v1/uploads", data={"file": (io.BytesIO(buf.getvalue()), "a.png")},
                     content_type="multipart/form-data", headers=headers["alice"]).get_json()["upload"]
    s = open_session(client, pipe="image2image", headers=headers["bob"])
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [up["id"]]},
                    headers=headers["bob"])
    assert r.status_code == 404 and err(r)["field"] == "images.0"


def test_queue_hides_other_users_job_ids(two_users):
    client, headers, _, _ = two_users
    REC.step_delay = 0.02
    s = open_session(client, headers=headers["alice"])
    job = queue_job(client, s["id"], headers=headers["alice"], steps=500)
    wait_for(lambda: client.get("/api/v1/queue", headers=headers["alice"]).get_json()["workers"][0]["job_id"]
             == job["id"])  # running on the worker
    assert client.get("/api/v1/queue", headers=headers["bob"]).get_json()["workers"][0]["job_id"] is None
    health = client.get("/api/v1/health").get_json()
    assert health["queue"]["running"] == 1 and "job_id" not in health["queue"]["workers"][0]


def test_events_carry_only_own_sessions(two_users):
    client, headers, tokens, _ = two_users
    sa = open_session(client, headers=headers["alice"])
    sb = open_session(client, headers=headers["bob"])
    r = client.get("/api/v1/events", headers=headers["bob"], buffered=False)
    stream = iter(r.response)
    assert next(stream).startswith(b"retry:")
    ja = queue_job(client, sa["id"], headers=headers["alice"], steps=2)
    jb = queue_job(client, sb["id"], headers=headers["bob"], steps=2)  # runs after alice's
    events = read_sse(stream, lambda out: out and out[-1]["event"] == "job.succeeded")
    assert {e["data"]["session_id"] for e in events} == {sb["id"]}
    assert events[0]["event"] == "job.queued" and events[-1]["data"]["job"]["id"] == jb["id"]
    assert all(ja["id"] not in str(e) for e in events)
    r.close()
    # EventSource cannot send headers: the stream also takes ?access_token=
    r = client.get(f"/api/v1/events?session_id={sb['id']}&access_token={tokens['bob']}", buffered=False)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    r.close()


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                       ("example.com", False), ("::", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_bind_auth_rule(config_file):
    cfg = load_config(config_file)
    assert check_bind_auth(cfg) == "anonymous-loopback"
    cfg.server.host = "0.0.0.0"
    with pytest.raises(ConfigError, match="allow_anonymous"):
        check_bind_auth(cfg)
    cfg.server.allow_anonymous = True
    assert check_bind_auth(cfg) == "anonymous-allowed"
    cfg.users = {"alice": {"token_sha256": hash_token("t")}}
    assert check_bind_auth(cfg) == "tokens"


def test_users_added_while_running_take_effect(config_file, make_api, caplog):
    """`multigen users add` needs no restart; a config broken meanwhile keeps the users the server had."""
    api = make_api(users=("alice",))
    tokens, client = api.tokens, api.client()
    table = api.app.extensions["multigen.users"]
    carol = add_user(str(config_file), "carol")
    table.refresh(force=True)
    for token in (carol, tokens["alice"]):
        r = client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.get_json()
    good = config_file.read_text()
    config_file.write_text(good + "users: [not, a, mapping]\n")
    table.refresh(force=True)
    assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {carol}"}).status_code == 200
    assert "kept the 2 users" in caplog.text and "users" in caplog.text
    # removing a user's entry takes their access away
    config_file.write_text(good.replace(f"  carol:\n    token_sha256: {hash_token(carol)}\n", ""))
    table.refresh(force=True)
    assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {carol}"}).status_code == 401
    assert client.get("/api/v1/sessions", headers=_bearer(tokens["alice"])).status_code == 200


def test_user_table_stats_the_file_at_most_every_interval(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("users: {}\n")
    table = UserTable(cfg, {}, check_every=3600)
    cfg.write_text(f"users:\n  dan:\n    token_sha256: {hash_token('t')}\n")
    assert table.user_for_token("t") is None  # not looked at yet
    table.refresh(force=True)
    assert table.user_for_token("t") == "dan"


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


# ---- OpenAI's Images API (/v1): Bearer like the OpenAI SDK sends, Basic user:token, errors in its shape ----
def _basic(user, token):
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def _openai_401(r):
    assert r.status_code == 401, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key", error
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_openai_routes_need_the_token_and_answer_401_in_openai_shape(two_users):
    client, headers, tokens, _ = two_users
    body = {"prompt": "x", "model": "tiny-sd", "size": "64x64", "steps": 2}
    for h in ({}, _bearer("sk-wrong"), _basic("alice", tokens["bob"]), {"Authorization": "Token x"}):
        _openai_401(client.post("/v1/images/generations", json=body, headers=h))
        _openai_401(client.get("/v1/models", headers=h))
    _openai_401(client.get("/v1/no-such-route"))  # an unknown route tells nothing without a token
    _openai_401(client.get(f"/v1/models?access_token={tokens['alice']}"))  # query tokens: files and streams only
    assert client.get("/v1/models", headers=headers["alice"]).status_code == 200
    assert client.get("/v1/models", headers=_basic("alice", tokens["alice"])).status_code == 200


def test_openai_calls_run_as_the_tokens_user_and_their_urls_stay_private(two_users):
    client, headers, tokens, _ = two_users
    body = {"prompt": "x", "model": "tiny-sd", "size": "64x64", "steps": 2, "response_format": "url",
            "user": "someone-else"}  # OpenAI's end-user id: the caller stays the token's user
    r = client.post("/v1/images/generations", json=body, headers=_basic("alice", tokens["alice"]))
    assert r.status_code == 200, r.get_json()
    path = r.get_json()["data"][0]["url"].removeprefix("http://localhost")
    sessions = client.get("/api/v1/sessions?project=openai", headers=headers["alice"]).get_json()["sessions"]
    assert [s["user"] for s in sessions] == ["alice"]
    assert client.get("/api/v1/sessions?project=openai", headers=headers["bob"]).get_json()["sessions"] == []
    assert client.get(path, headers=headers["alice"]).status_code == 200
    assert client.get(f"{path}?access_token={tokens['alice']}").status_code == 200  # an <img> or a plain fetch
    assert client.get(path, headers=headers["bob"]).status_code == 404
    assert client.get(path).status_code == 401
