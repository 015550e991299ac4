"""Fuzz the session API with schemathesis (pinned in setup.cfg) against its own OpenAPI document.

The real Flask app, served by waitress (``service.server.make_server``, what ``multigen serve`` runs)
on a free loopback port, over a ServiceThread on fake pipes (tests/helpers_service.py: jobs really
queue and finish, nothing is drawn). Over real HTTP rather than schemathesis' WSGI transport: the
requests then go through waitress's parser and the server's head checks (``guarded_parser_class``),
as a client's do, and event streams are read as a client reads them.

schemathesis' engine runs its phases (examples, coverage, fuzzing with positive and negative data,
stateful along the document's OpenAPI links) on a fixed seed and budget, with auth on (a user's
token; every phase) and off (no coverage phase: see PHASES); every response must be no 5xx, of a documented status and content type, with the
documented headers and a body that matches its schema. scripts/fuzz_api.py runs the same for longer.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261206
#: cases per operation in the fuzzing phase, and the longest stateful scenario
EXAMPLES, STEPS = 10, 12
#: the phases of each run: the coverage phase (~3,900 cases: every constraint's boundaries and violations,
#: each request without its token too) once, with auth on: the server's checks do not depend on auth
PHASES = {"on": ("examples", "coverage", "fuzzing", "stateful"), "off": ("examples", "fuzzing", "stateful")}
#: the fewest cases of each run (together >= 2,000)
LEAST_CASES = {"on": 2000, "off": 400}


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_api", ROOT / "scripts" / "fuzz_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_api", module)
    spec.loader.exec_module(module)
    return module


fuzz_api = _fuzz_module()


def _documented_operations(url: str) -> set[str]:
    import requests

    doc = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
    return {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}


@pytest.mark.parametrize("auth", ["off", "on"])
def test_fuzz_the_api_against_its_document(config_file, auth):
    users = ("alice",) if auth == "on" else ()
    with fuzz_api.serve(config_file, users=users) as (url, tokens):
        token = tokens.get("alice")
        operations = _documented_operations(url)
        summary = fuzz_api.fuzz(url, token, examples=EXAMPLES, steps=STEPS, seed=SEED, phases=PHASES[auth])
    report = "\n".join(summary.lines())
    assert not summary.failures and not summary.errors, report
    # the event stream answered (a read that timed out before its first bytes on a loaded machine is not an
    # error of the server's; most reads must not)
    streams = sum(n for key, n in summary.statuses.items() if " GET /api/v1/events " in key)
    assert streams > 5 * len(summary.stream_timeouts), report
    # every documented operation was called, in every phase that calls operations one by one
    for phase in {"coverage", "fuzzing"} & set(PHASES[auth]):
        called = {operation for where, operation in summary.called if where == phase}
        assert operations <= called, (phase, sorted(operations - called))
    assert summary.cases["stateful"] > 200 and summary.links >= 20, report
    # the stateful phase chained ids along the links: a session it opened was read, was sent a job (a drawn
    # id is a 404: anything else came from the link) and was closed
    assert summary.statuses.get("stateful POST /api/v1/sessions 201"), report
    assert summary.statuses.get("stateful GET /api/v1/sessions/{session_id} 200"), report
    assert [key for key in summary.statuses if key.startswith("stateful POST /api/v1/sessions/{session_id}/jobs ")
            and not key.endswith(" 404")], report
    assert summary.statuses.get("stateful DELETE /api/v1/sessions/{session_id} 200"), report
    refused = [key for key in summary.statuses if key.endswith(" 401")]
    if auth == "on":  # only the coverage phase's requests without the token were refused (as documented)
        assert refused and all(key.startswith("coverage ") for key in refused), refused
        assert summary.statuses.get("fuzzing GET /api/v1/queue 200"), report
    else:
        assert not refused, refused
    assert summary.total >= LEAST_CASES[auth], report


def test_document_is_as_strict_as_the_server(client):
    """What the fuzzer relies on: the document names every value the server takes and no other."""
    doc = client.get("/api/v1/openapi.json").get_json()

    def param(path, name, where="query", method="get"):
        return next(p for p in doc["paths"][path][method]["parameters"] if p["name"] == name and p["in"] == where)

    for path, states in (("/api/v1/sessions", ["open", "closed"]),
                         ("/api/v1/sessions/{session_id}/jobs",
                          ["queued", "running", "succeeded", "failed", "cancelled"])):
        assert param(path, "state")["schema"]["enum"] == states
    header = param("/api/v1/events", "Last-Event-ID", "header")["schema"]
    assert header["type"] == "string" and header["pattern"] == "^[0-9]{1,19}$"
    r = client.get("/api/v1/events", headers={"Last-Event-ID": "x1"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "Last-Event-ID"
    upload = doc["paths"]["/api/v1/uploads"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["encoding"]["file"]["contentType"] == "image/png, image/jpeg, image/webp"
    assert "bytes (413)" in upload["schema"]["properties"]["file"]["description"]
    events = doc["paths"]["/api/v1/events"]["get"]["responses"]
    assert events["200"]["content"]["text/event-stream"]["schema"]["required"] == ["data"]
    assert "429" in events
    session = doc["components"]["schemas"]["SessionCreate"]["properties"]
    assert "prompt2image" in session["pipe"]["enum"] and "tiny-sd" in session["model"]["enum"]
    links = doc["paths"]["/api/v1/sessions"]["post"]["responses"]["201"]["links"]
    assert links["post_sessions_session_id_jobs"]["parameters"] == {"session_id": "$response.body#/session/id"}
    ops = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    for response_links in (r.get("links", {}) for ops in doc["paths"].values() for op in ops.values()
                           for r in op["responses"].values()):
        assert {link["operationId"] for link in response_links.values()} <= ops
    job_links = doc["paths"]["/api/v1/sessions/{session_id}/jobs"]["post"]["responses"]["202"]["links"]
    assert {"get_jobs_job_id", "post_jobs_job_id_cancel", "post_jobs_job_id_skip"} <= set(job_links)


def test_control_entries_without_a_type_are_no_server_error(client):
    """Found by the fuzzer: `control: [{"scale": 0.5}]` (no `type`) for a pipe of condition images was a
    500 (KeyError: the body is dumped without its unset fields); it is a job like any other."""
    import base64
    import io

    from PIL import Image

    from helpers_service import open_session

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    tiny = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    s = open_session(client, pipe="cond2image")
    for control in ([{}], [{"scale": 0.5}]):
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [tiny], "control": control})
        assert r.status_code == 202, r.get_json()
        assert r.get_json()["job"]["params"].get("cscales", [1.0]) in ([1.0], [0.5])
