"""Routing errors, the OpenAPI document and page, /metrics, the event stream and `multigen users add`."""
from __future__ import annotations

import contextlib
import inspect
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from helpers_service import REC, open_session, queue_job, read_sse, wait_for, wait_job

from multigen.service.api import create_app
from multigen.service.config import load_config
from multigen.service.protocol import SERVICE_METHODS, EventSubscription, GenerationService
from multigen.service.serviceThread import ServiceThread
from multigen.service.users import hash_token


def err(r):
    body = r.get_json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_routing_errors_are_json(client):
    r = client.get("/api/v1/no/such/route")
    assert r.status_code == 404 and err(r)["code"] == "not_found"
    r = client.put("/api/v1/sessions")
    assert r.status_code == 405 and err(r)["code"] == "method_not_allowed" and "POST" in r.headers["Allow"]
    r = client.delete("/api/v1/queue")
    assert r.status_code == 405


def test_openapi_document_comes_from_the_request_models(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    p2i = schemas["JobCreate_prompt2image"]
    assert p2i["additionalProperties"] is False and p2i["required"] == ["prompt"]
    assert p2i["properties"]["count"]["maximum"] == 100  # limits.max_count of the config
    assert "strength" not in p2i["properties"] and "strength" in schemas["JobCreate_image2image"]["properties"]
    assert "images" in schemas["JobCreate_image2image"]["properties"]
    assert "control" in schemas["JobCreate_cimage2image"]["properties"]
    assert set(schemas["SessionCreate"]["required"]) == {"project", "pipe", "model"}
    paths = doc["paths"]
    for path, method in [("/api/v1/sessions", "post"), ("/api/v1/sessions/{session_id}/jobs", "post"),
                         ("/api/v1/jobs/{job_id}/cancel", "post"), ("/api/v1/sessions/{session_id}/images", "get"),
                         ("/api/v1/uploads", "post"), ("/api/v1/events", "get"), ("/api/v1/queue", "get")]:
        assert method in paths[path], path
    # every $ref resolves
    text = str(doc)
    for ref in set(re.findall(r"#/components/schemas/([A-Za-z0-9_]+)", text)):
        assert ref in schemas, ref
    assert doc["x-multigen-job-schemas"]["inpainting"].endswith("JobCreate_inpainting")


def test_openapi_matches_validation(client):
    """A body the schema allows is accepted; one past a schema limit is refused."""
    doc = client.get("/api/v1/openapi.json").get_json()
    width = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]["width"]["anyOf"][0]
    s = open_session(client)
    ok = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "width": width["maximum"]})
    assert ok.status_code == 202
    bad = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "width": width["maximum"] + 8})
    assert bad.status_code == 400


def test_openapi_documents_the_query_arguments_the_code_reads(client):
    doc = client.get("/api/v1/openapi.json").get_json()

    def names(path, where="query"):
        return {p["name"] for p in doc["paths"][path]["get"].get("parameters", []) if p["in"] == where}

    assert {"session_id", "last_event_id", "access_token"} <= names("/api/v1/events")
    assert names("/api/v1/events", "header") == {"Last-Event-ID"}
    assert {"format", "access_token"} <= names("/api/v1/images/{image_id}")
    assert "access_token" in names("/api/v1/jobs/{job_id}/preview")
    assert {"project", "state", "user"} <= names("/api/v1/sessions")
    assert "400" in doc["paths"]["/api/v1/events"]["get"]["responses"]


def test_docs_page_is_self_contained(client):
    r = client.get("/api/v1/docs")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and r.mimetype == "text/html" and "openapi.json" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_metrics(make_api):
    api = make_api(start=False)
    client = api.client()
    s = open_session(client)
    first = queue_job(client, s["id"], count=2, steps=2)
    client.get("/api/v1/jobs/nope")
    second = queue_job(client, s["id"], steps=2)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'multigen_queue_jobs{state="queued"} 2.0' in text
    assert "multigen_images_written_total 0.0" in text and "multigen_model_loads_total 0.0" in text

    api.svc.start()
    for job in (first, second):
        assert wait_job(client, job["id"])["state"] == "succeeded"
    text = client.get("/metrics").get_data(as_text=True)
    host = socket.gethostname()
    assert 'multigen_queue_jobs{state="queued"} 0.0' in text
    assert f'multigen_workers{{device="fake:0",host="{host}",state=' in text
    assert 'multigen_jobs_finished_total{state="succeeded"} 2.0' in text
    assert 'multigen_jobs_finished_total{state="failed"} 0.0' in text
    assert "multigen_images_written_total 3.0" in text and "multigen_image_seconds_count 3.0" in text
    # one model load for the first job, a cache hit for the second: the service's cache counts them
    assert api.svc.stats()["cache"]["loads"] == 1 and len(REC.loads) == 1
    assert "multigen_model_loads_total 1.0" in text and "multigen_cache_hits_total 1.0" in text
    assert 'multigen_http_requests_total{method="POST",route="/api/v1/sessions/<session_id>/jobs",status="202"} 2.0' \
        in text
    assert 'route="/api/v1/jobs/<job_id>",status="404"' in text
    # request times by route: one observation per request of that route, none for the others
    assert 'multigen_http_request_seconds_count{route="/api/v1/sessions/<session_id>/jobs"} 2.0' in text
    assert 'multigen_http_request_seconds_bucket{le="+Inf",route="/api/v1/sessions"} 1.0' in text


def test_metrics_time_steps_from_progress_events(make_api):
    api = make_api()
    client = api.client()
    REC.step_delay = 0.02

    def step_times() -> tuple[float, float, float]:
        """What /metrics says of the step times: the +Inf bucket, the count and the sum."""
        text = client.get("/metrics").get_data(as_text=True)
        values = [re.search(rf"^{re.escape(name)} (\S+)$", text, re.M) for name in (
            'multigen_step_seconds_bucket{le="+Inf"}', "multigen_step_seconds_count", "multigen_step_seconds_sum")]
        return tuple(float(v.group(1)) for v in values)

    assert step_times() == (0.0, 0.0, 0.0)  # registered, nothing observed yet
    s = open_session(client)
    # one image of 30 steps: progress events come at its first step, then at most every 0.25 s and
    # at its last step; the first starts the clock and every later step is observed once, however
    # many steps an event covers
    assert wait_job(client, queue_job(client, s["id"], steps=30)["id"])["state"] == "succeeded"
    # the timer reads the events in a thread of its own
    wait_for(lambda: step_times()[:2] == (29.0, 29.0))
    assert step_times()[2] > 0


def test_metrics_series_stay_bounded(client):
    """Labels come from route templates and known methods: made-up methods (a client may send any)
    used to add a series each, so /metrics grew without end."""
    for i in range(20):
        assert client.open("/api/v1/queue", method=f"BREW{i}").status_code == 405
        client.get(f"/api/v1/jobs/nope{i}")
    text = client.get("/metrics").get_data(as_text=True)
    assert "BREW" not in text
    assert 'multigen_http_requests_total{method="other",route="unmatched",status="405"} 20.0' in text
    assert 'multigen_http_requests_total{method="GET",route="/api/v1/jobs/<job_id>",status="404"} 20.0' in text
    assert "nope" not in text


def test_step_timer_observes_steps_between_progress_events(api):
    timer = api.app.extensions["multigen.metrics"].step_timer
    hist = api.app.extensions["multigen.metrics"].step_seconds

    def progress(image, step, t):
        timer.observe({"type": "job.progress", "data": {"job_id": "j", "progress": {"image": image, "step": step}}}, t)

    progress(0, 1, 10.0)
    progress(0, 3, 10.5)   # two steps in 0.5 s: two observations of 0.25 s
    progress(1, 1, 11.0)   # a new image: no observation across images
    progress(1, 2, 11.1)
    timer.observe({"type": "job.succeeded", "data": {"job": {"id": "j"}}}, 12.0)
    samples = {s.name + str(s.labels.get("le", "")): s.value for m in hist.collect() for s in m.samples}
    assert samples["multigen_step_seconds_count"] == 3
    assert abs(samples["multigen_step_seconds_sum"] - 0.6) < 1e-9
    assert samples["multigen_step_seconds_bucket0.1"] == 1 and samples["multigen_step_seconds_bucket0.25"] == 3
    assert "j" not in timer.last


def test_apps_have_their_own_registries(api):
    other = create_app(api.app.extensions["multigen.config"], api.svc)
    try:
        api.client().get("/api/v1/health")
        text = other.test_client().get("/metrics").get_data(as_text=True)
        assert "/api/v1/health" not in text
    finally:
        other.extensions["multigen.stopping"].set()


def test_service_thread_is_a_generation_service(config_file):
    """ServiceThread has every method of the Protocol the API is written against, taking the same arguments."""
    svc = ServiceThread(load_config(config_file))  # not started: nothing runs
    try:
        assert isinstance(svc, GenerationService)
        sub = svc.subscribe()
        assert isinstance(sub, EventSubscription)
        sub.close()
        assert sub.closed and sub.get(timeout=0) is None
    finally:
        svc.stop()
    assert set(SERVICE_METHODS) >= {"create_session", "queue_gen", "cancel_job", "subscribe", "stats"}
    for name in SERVICE_METHODS:
        assert_accepts(inspect.signature(getattr(GenerationService, name)),
                       inspect.signature(getattr(ServiceThread, name)), name)


def assert_accepts(proto: inspect.Signature, impl: inspect.Signature, name: str) -> None:
    """Every call the Protocol's signature allows binds to the implementation's the same way."""
    P = inspect.Parameter
    impl_params = list(impl.parameters.values())
    by_name = {p.name: p for p in impl_params}
    for i, p in enumerate(proto.parameters.values()):
        if p.kind is P.POSITIONAL_OR_KEYWORD:  # may be passed by position: same place, same name
            assert i < len(impl_params) and impl_params[i].name == p.name, (name, p.name, impl)
            assert impl_params[i].kind is P.POSITIONAL_OR_KEYWORD, (name, p.name)
        elif p.kind is P.KEYWORD_ONLY:  # by name: a parameter of that name (not swallowed by **kwargs)
            q = by_name.get(p.name)
            assert q is not None and q.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY), (name, p.name)
        else:  # *args / **kwargs
            assert any(q.kind is p.kind for q in impl_params), (name, p.name)
        q = by_name.get(p.name)
        if p.default is not P.empty and q is not None:  # optional in the Protocol: optional there too
            assert q.default == p.default, (name, p.name, q.default, p.default)
    covered = set(proto.parameters)
    for q in impl_params:  # what the Protocol does not pass must not be required
        assert q.name in covered or q.default is not P.empty or q.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD), \
            (name, q.name)


def test_create_app_needs_a_generation_service(config_file, api):
    """No service, or one lacking a call the API makes, is refused when the app is built, not at the first request."""
    cfg = load_config(config_file)
    with pytest.raises(TypeError, match="stats"):
        create_app(cfg, None)

    class NoStats:  # a service as it was before /metrics read stats()
        def __getattr__(self, name):
            if name == "stats":
                raise AttributeError(name)
            return getattr(api.svc, name)

    with pytest.raises(TypeError, match=r"NoStats lacks stats$"):
        create_app(cfg, NoStats())


def test_event_stream_types_ids_and_heartbeat(api, client):
    api.app.config["MULTIGEN_HEARTBEAT_SECONDS"] = 0.2
    s = open_session(client)
    r = client.get(f"/api/v1/events?session_id={s['id']}", buffered=False)
    assert r.status_code == 200 and r.mimetype == "text/event-stream" and r.headers["Cache-Control"] == "no-cache"
    stream = iter(r.response)
    assert next(stream).startswith(b"retry:")
    assert next(stream) == b": heartbeat\n\n"
    job = queue_job(client, s["id"], steps=4)
    assert wait_job(client, job["id"])["state"] == "succeeded"
    client.delete(f"/api/v1/sessions/{s['id']}")
    events = read_sse(stream, lambda out: out and out[-1]["event"] == "session.closed")
    types = [e["event"] for e in events]
    # progress comes at the first step, then at most every 0.25 s, and at the image's last step
    assert [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]] == [
        "job.queued", "job.started", "job.progress", "image.created", "job.succeeded", "session.closed"]
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    assert all(e["data"]["session_id"] == s["id"] for e in events)
    by_type = {e["event"]: e["data"] for e in events}
    assert by_type["job.queued"]["job"]["id"] == job["id"] and by_type["job.queued"]["job"]["state"] == "queued"
    assert by_type["job.started"]["job"]["state"] == "running"
    progress = by_type["job.progress"]
    assert progress["job_id"] == job["id"] and progress["preview_url"] == f"/api/v1/jobs/{job['id']}/preview"
    assert progress["progress"]["step"] == progress["progress"]["steps"] == 4 and progress["progress"]["image"] == 0
    assert by_type["image.created"]["job_id"] == job["id"] and by_type["image.created"]["index"] == 0
    assert by_type["image.created"]["url"] == f"/api/v1/images/{by_type['image.created']['id']}"
    assert by_type["job.succeeded"]["job"]["state"] == "succeeded" and by_type["job.succeeded"]["job"]["done"] == 1
    assert by_type["session.closed"]["session"]["state"] == "closed"
    r.close()
    assert api.app.extensions["multigen.event_streams"].open == 0


def test_event_streams_are_capped(api, client):
    limiter = api.app.extensions["multigen.event_streams"]
    streams = [client.get("/api/v1/events", buffered=False) for _ in range(limiter.limit)]
    assert all(r.status_code == 200 for r in streams)
    r = client.get("/api/v1/events", buffered=False)
    assert r.status_code == 429 and err(r)["code"] == "too_many_streams" and r.headers["Retry-After"]
    streams[0].close()  # never iterated: the slot still comes back
    again = client.get("/api/v1/events", buffered=False)
    assert again.status_code == 200
    for s in streams[1:] + [again]:
        s.close()
    # what is left: the metrics' step timer and the webhook sender (webhooks.py)
    assert limiter.open == 0 and api.svc.events.subscriber_count == 2


def test_last_event_id_replays_and_a_bad_one_is_400(api, client):
    """Last-Event-ID resumes a stream from the service's history; one that is not an event id used to
    reach the service's integer comparison and answer 500."""
    limiter = api.app.extensions["multigen.event_streams"]
    s = open_session(client)
    r = client.get(f"/api/v1/events?session_id={s['id']}", buffered=False)
    stream = iter(r.response)
    next(stream)  # retry + connected
    job = queue_job(client, s["id"], steps=2)
    live = read_sse(stream, lambda out: out and out[-1]["event"] == "job.succeeded")
    r.close()
    assert live[0]["event"] == "job.queued" and live[0]["data"]["job"]["id"] == job["id"]

    r = client.get(f"/api/v1/events?session_id={s['id']}", headers={"Last-Event-ID": str(live[0]["id"])},
                   buffered=False)
    assert r.status_code == 200
    stream = iter(r.response)
    next(stream)
    replayed = read_sse(stream, lambda out: len(out) == len(live) - 1)
    assert replayed == live[1:] and replayed[0]["event"] == "job.started"
    r.close()
    for headers, query, field in [({"Last-Event-ID": "abc"}, "", "Last-Event-ID"),
                                  ({"Last-Event-ID": "-3"}, "", "Last-Event-ID"),
                                  ({"Last-Event-ID": "9" * 40}, "", "Last-Event-ID"),
                                  ({}, "&last_event_id=1.5", "last_event_id")]:
        r = client.get(f"/api/v1/events?session_id={s['id']}{query}", headers=headers, buffered=False)
        assert r.status_code == 400 and err(r)["field"] == field, (headers, query, r.get_data(as_text=True))
    assert limiter.open == 0


def test_event_stream_ends_when_the_server_stops(api, client):
    r = client.get("/api/v1/events", buffered=False)
    stream = iter(r.response)
    next(stream)
    api.app.extensions["multigen.stopping"].set()
    assert list(stream) == []  # the generator ends, its thread goes back to waitress
    r.close()
    assert api.app.extensions["multigen.event_streams"].open == 0


def test_event_stream_ends_when_the_service_stops(api, client):
    r = client.get("/api/v1/events", buffered=False)
    stream = iter(r.response)
    next(stream)
    api.svc.stop(timeout=10)
    rest = [chunk.decode() for chunk in stream if not chunk.startswith(b":")]  # ends: the service closed it
    assert len(rest) == 1 and "event: service.stopped" in rest[0]  # what was sent before still goes out
    r.close()
    assert api.app.extensions["multigen.event_streams"].open == 0


def test_event_stream_cap_leaves_threads_for_other_requests(make_api):
    api = make_api(**{"threads: 8": "threads: 3", "max_event_streams: 4": "max_event_streams: 9"})
    assert api.app.extensions["multigen.event_streams"].limit == 1


@contextlib.contextmanager
def waitress_server(app):
    """The app on waitress as ``multigen serve`` runs it (its config's host and port, 0: a free one);
    yields the URL and the server."""
    from multigen.service.server import make_server, serve_until, wasyncore_close_all

    server = make_server(app, app.extensions["multigen.config"])
    stopping = threading.Event()
    loop = threading.Thread(target=serve_until, args=(server, stopping), name="test-waitress", daemon=True)
    loop.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", server
    finally:
        app.extensions["multigen.stopping"].set()  # event streams end and give their threads back
        stopping.set()
        loop.join(10)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=10)
        wasyncore_close_all(server)


@pytest.mark.slow
def test_other_requests_go_through_while_every_stream_slot_is_held(make_api):
    """On waitress, with every event-stream slot held by an open stream (each holds a server thread
    for as long as it lasts), the next stream is refused and the API still answers: a job is queued,
    runs and is polled to its end, and its image is downloaded."""
    api = make_api(**{"port: 8000": "port: 0"})
    limiter = api.app.extensions["multigen.event_streams"]
    with waitress_server(api.app) as (url, server):
        streams = []
        try:
            for _ in range(limiter.limit):
                stream = urllib.request.urlopen(url + "/api/v1/events", timeout=30)
                assert stream.status == 200 and stream.readline().startswith(b"retry:")  # live, holding a thread
                streams.append(stream)
            assert limiter.open == limiter.limit and server.task_dispatcher.active_count == limiter.limit
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + "/api/v1/events", timeout=30)
            assert e.value.code == 429 and json.load(e.value)["error"]["code"] == "too_many_streams"

            def call(method: str, path: str, body: dict | None = None) -> dict:
                data = None if body is None else json.dumps(body).encode()
                req = urllib.request.Request(url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.load(r)

            sid = call("POST", "/api/v1/sessions", {"project": "p1", "pipe": "prompt2image",
                                                    "model": "tiny-sd"})["session"]["id"]
            job = call("POST", f"/api/v1/sessions/{sid}/jobs", {"prompt": "x", "steps": 2})["job"]
            done = wait_for(lambda: (j := call("GET", f"/api/v1/jobs/{job['id']}")["job"])["state"] == "succeeded"
                            and j)
            with urllib.request.urlopen(url + done["images"][0]["url"], timeout=30) as r:
                assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n"
            assert limiter.open == limiter.limit  # the streams were held open all along
        finally:
            for stream in streams:
                stream.close()


@pytest.mark.slow
def test_users_add_cli(config_file):
    out = subprocess.run([sys.executable, "-m", "multigen.service.cli", "users", "add", "carol", "--config",
                          str(config_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]
    assert token.startswith("mg_") and hash_token(token) in config_file.read_text()
    assert token not in config_file.read_text()
    again = subprocess.run([sys.executable, "-m", "multigen.service.cli", "users", "add", "carol", "--config",
                            str(config_file)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "multigen.service.cli", "users", "add", "../x", "--config",
                          str(config_file)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "user name" in bad.stderr


@pytest.mark.parametrize("path", ["/", "/api/v1/health"])
def test_web_and_health_need_no_token(make_api, path):
    assert make_api(users=("alice",)).client().get(path).status_code == 200
