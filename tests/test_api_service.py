"""Routing errors, the OpenAPI document and page, /metrics, the event stream and `multigen users add`."""
from __future__ import annotations

import subprocess
import sys

import pytest
from api_fakes import app, build_app, client, fake, open_session  # noqa: F401  (fixtures)

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
    import re
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


def test_metrics(client, fake):
    s = open_session(client)
    job = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "count": 2}).get_json()["job"]
    client.get("/api/v1/jobs/nope")
    client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"})
    fake.run_job(job["id"])
    text = client.get("/metrics").get_data(as_text=True)
    assert 'multigen_queue_jobs{state="queued"} 1.0' in text
    assert 'multigen_jobs{state="succeeded"} 1.0' in text
    assert "multigen_images_written_total 2.0" in text
    assert "multigen_model_loads_total 1.0" in text and "multigen_cache_hits_total 3.0" in text
    assert "multigen_image_seconds_count 2.0" in text and "multigen_step_seconds_bucket" in text
    assert 'multigen_http_requests_total{method="POST",route="/api/v1/sessions/<session_id>/jobs",status="202"} 2.0' \
        in text
    assert 'route="/api/v1/jobs/<job_id>",status="404"' in text
    assert "multigen_http_request_seconds_bucket" in text


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


def test_metrics_without_service_stats(client, fake):
    fake.stats = None  # the service has no stats(): jobs and images are summed from the sessions
    s = open_session(client)
    job = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "count": 3}).get_json()["job"]
    fake.run_job(job["id"])
    text = client.get("/metrics").get_data(as_text=True)
    assert "multigen_images_written_total 3.0" in text and 'multigen_jobs{state="succeeded"} 1.0' in text
    assert "multigen_model_loads_total" not in text


def test_step_timer_observes_steps_between_progress_events(app):
    timer = app.extensions["multigen.metrics"].step_timer
    hist = app.extensions["multigen.metrics"].step_seconds

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


def test_apps_have_their_own_registries(config_file, fake):
    a, _ = build_app(config_file, fake)
    b, _ = build_app(config_file, fake)
    a.test_client().get("/api/v1/health")
    text = b.test_client().get("/metrics").get_data(as_text=True)
    assert "/api/v1/health" not in text


def read_events(stream, n):
    """The next ``n`` SSE messages (not comments) from a streamed test response."""
    out = []
    buffer = ""
    while len(out) < n:
        buffer += next(stream).decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
                          and ": " in line)
            if "event" in fields:
                out.append(fields)
    return out


def test_event_stream_types_ids_and_heartbeat(app, client, fake):
    app.config["MULTIGEN_HEARTBEAT_SECONDS"] = 0.2
    s = open_session(client)
    r = client.get(f"/api/v1/events?session_id={s['id']}", buffered=False)
    assert r.status_code == 200 and r.mimetype == "text/event-stream" and r.headers["Cache-Control"] == "no-cache"
    stream = iter(r.response)
    assert next(stream).startswith(b"retry:")
    assert next(stream) == b": heartbeat\n\n"
    job = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "count": 1}).get_json()["job"]
    fake.run_job(job["id"])
    client.delete(f"/api/v1/sessions/{s['id']}")
    events = read_events(stream, 6)
    types = [e["event"] for e in events]
    assert types == ["job.queued", "job.started", "job.progress", "image.created", "job.succeeded", "session.closed"]
    assert all(e["id"] for e in events) and job["id"] in events[0]["data"]
    assert "/preview" in events[2]["data"]
    r.close()
    assert app.extensions["multigen.event_streams"].open == 0


def test_event_streams_are_capped(app, client, fake):
    limiter = app.extensions["multigen.event_streams"]
    streams = [client.get("/api/v1/events", buffered=False) for _ in range(limiter.limit)]
    assert all(r.status_code == 200 for r in streams)
    r = client.get("/api/v1/events", buffered=False)
    assert r.status_code == 503 and err(r)["code"] == "too_many_streams"
    assert client.get("/api/v1/queue").status_code == 200  # other requests still go through
    streams[0].close()  # never iterated: the slot still comes back
    again = client.get("/api/v1/events", buffered=False)
    assert again.status_code == 200
    for s in streams[1:] + [again]:
        s.close()
    assert limiter.open == 0 and len(fake.subs) == 1  # what is left is the metrics' step timer


def test_last_event_id_replays_and_a_bad_one_is_400(config_file, tmp_path):
    """Last-Event-ID resumes a stream from the service's history; one that is not an event id used to
    reach the service's integer comparison and answer 500."""
    from api_fakes import FakeService

    from multigen.service.events import EventBus

    class ReplayingService(FakeService):  # the real EventBus behind the fake's events
        def __init__(self, output_dir):
            super().__init__(output_dir)
            self.bus = EventBus()

        def emit(self, type_, data):
            self.bus.publish(type_, data, session_id=data.get("session_id"))

        def subscribe(self, session_id=None, last_event_id=None):
            return self.bus.subscribe(session_id=session_id, last_event_id=last_event_id)

    svc = ReplayingService(tmp_path / "outputs")
    app = build_app(config_file, svc)[0]
    client = app.test_client()
    limiter = app.extensions["multigen.event_streams"]
    s = open_session(client)
    job = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x"}).get_json()["job"]
    svc.run_job(job["id"])
    r = client.get(f"/api/v1/events?session_id={s['id']}", headers={"Last-Event-ID": "1"}, buffered=False)
    assert r.status_code == 200
    stream = iter(r.response)
    next(stream)  # retry + connected
    replayed = read_events(stream, 2)
    assert [e["event"] for e in replayed] == ["job.started", "job.progress"] and replayed[0]["id"] == "2"
    r.close()
    for headers, query, field in [({"Last-Event-ID": "abc"}, "", "Last-Event-ID"),
                                  ({"Last-Event-ID": "-3"}, "", "Last-Event-ID"),
                                  ({"Last-Event-ID": "9" * 40}, "", "Last-Event-ID"),
                                  ({}, "&last_event_id=1.5", "last_event_id")]:
        r = client.get(f"/api/v1/events?session_id={s['id']}{query}", headers=headers, buffered=False)
        assert r.status_code == 400 and err(r)["field"] == field, (headers, query, r.get_data(as_text=True))
    assert limiter.open == 0


def test_event_stream_ends_when_the_server_stops(app, client):
    r = client.get("/api/v1/events", buffered=False)
    stream = iter(r.response)
    next(stream)
    app.extensions["multigen.stopping"].set()
    assert list(stream) == []  # the generator ends, its thread goes back to waitress
    r.close()
    assert app.extensions["multigen.event_streams"].open == 0


def test_event_stream_cap_leaves_threads_for_other_requests(config_file, fake):
    app, _ = build_app(config_file, fake, **{"threads: 8": "threads: 3", "max_event_streams: 4": "max_event_streams: 9"})
    assert app.extensions["multigen.event_streams"].limit == 1


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
def test_web_and_health_need_no_token(config_file, fake, path):
    app, _ = build_app(config_file, fake, users=("alice",))
    assert app.test_client().get(path).status_code == 200
