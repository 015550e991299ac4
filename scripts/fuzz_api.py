#!/usr/bin/env python
"""Fuzz the HTTP API with schemathesis against its own OpenAPI document (``/api/v1/openapi.json``).

The server is the real Flask app served by waitress (``service.server.make_server``, the one
``multigen serve`` runs) on a free loopback port, in this process, over a ServiceThread on the
fake pipes of tests/helpers_service.py (fast, nothing drawn; jobs really queue and finish).
schemathesis' engine (what its CLI runs) then goes through its phases: examples, coverage
(boundary and invalid values of every constraint), fuzzing (positive and negative data, every
operation) and stateful (chains that follow the document's OpenAPI links: session -> job ->
images -> image file/metadata, cancel/skip, close). Every response is checked: no 5xx, the
documented status codes, content types, headers and response schemas.

tests/test_fuzz_api.py runs it with a fixed seed and a fixed budget in CI; this script runs longer.

Usage: .venv/bin/python scripts/fuzz_api.py [--examples 200] [--steps 40] [--seed 1] [--auth on|off|both]
                                           [--phases examples,coverage,fuzzing,stateful]
Prints the cases per phase and every failure (check, operation, status, a curl line); exit 1 on a failure.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))  # the fake pipes (tests/helpers_service.py)

#: the checks every response goes through
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance")
PHASES = ("examples", "coverage", "fuzzing", "stateful")
#: the event stream, read for at most this many seconds a case
STREAM_PATH, STREAM_SECONDS = "/api/v1/events", 0.3


@dataclass
class Summary:
    """What a run did: cases per phase, and its failures (``check: operation: message``)."""

    cases: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    operations: set = field(default_factory=set)
    #: responses by phase, operation and status (``stateful GET /api/v1/jobs/{job_id} 200``)
    statuses: Counter = field(default_factory=Counter)
    #: (phase, operation) pairs that sent a request
    called: set = field(default_factory=set)
    seconds: float = 0.0
    #: the transitions (OpenAPI links) the stateful phase had
    links: int = 0
    #: event-stream requests whose reading timed out before the stream said anything (a stream never ends: the
    #: fuzzer reads it for STREAM_SECONDS; on a loaded machine its first bytes may come later than that)
    stream_timeouts: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def lines(self) -> list[str]:
        out = [f"{self.total} cases in {self.seconds:.1f} s over {len(self.operations)} operations ("
               + ", ".join(f"{k}: {v}" for k, v in sorted(self.cases.items())) + f"; {self.links} links)"]
        out += [f"FAILURE {f}" for f in self.failures] + [f"ERROR {e}" for e in self.errors]
        out += [f"{len(self.stream_timeouts)} event-stream read(s) timed out before the first bytes"] * bool(
            self.stream_timeouts)
        return out


def write_config(folder: Path, models_dir: Path | None = None) -> Path:
    """A copy of the embedded config (config/) whose data, output and log folders are in ``folder``."""
    cfg = folder / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config" / "models.yaml", cfg / "models.yaml")
    text = (ROOT / "config" / "config.yaml").read_text()
    text = text.replace("model_dir: ../models", f"model_dir: {models_dir or ROOT / 'models'}")
    (cfg / "config.yaml").write_text(text)
    return cfg / "config.yaml"


@contextlib.contextmanager
def serve(config_file: Path, users: tuple[str, ...] = (), **config_text: str) -> Iterator[tuple[str, dict]]:
    """The app over a ConfigFakeService, served by waitress on a free loopback port: ``(base URL, tokens)``."""
    from helpers_service import api_app

    from multigen.service.server import make_server, serve_until, wasyncore_close_all

    config_text = {"port: 8000": "port: 0", **config_text}
    with api_app(config_file, users=users, **config_text) as api:
        server = make_server(api.app, api.svc.config)
        stopping = threading.Event()
        thread = threading.Thread(target=serve_until, args=(server, stopping), name="fuzz-waitress", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.effective_port}", api.tokens
        finally:
            api.app.extensions["multigen.stopping"].set()  # event streams end, their threads come back
            stopping.set()
            thread.join(10)
            wasyncore_close_all(server)
            server.task_dispatcher.shutdown(timeout=5)


def fuzz(base_url: str, token: str | None = None, examples: int = 50, steps: int = 20, seed: int = 1,
         phases: tuple[str, ...] = PHASES, max_time: int | None = None, scenarios: int | None = None) -> Summary:
    """One schemathesis engine run against ``base_url`` (``token``: the bearer of every request):
    ``examples`` cases per operation (fuzzing), ``scenarios`` stateful chains (3 x ``examples``
    unless given) of at most ``steps`` requests, on ``seed``."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events, from_schema

    generation = {"mode": "all", "max-examples": examples, "deterministic": True, "no-shrink": True}
    raw: dict[str, Any] = {
        "seed": seed,
        "base-url": base_url,
        "generation": generation,
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "phases": {name: {"enabled": name in phases} for name in PHASES},
        "suppress-health-check": ["all"],
        "request-timeout": 10,
        "max-stream-events": 3,
        # a stream is read until that many events or its timeout: it never ends by itself
        "operations": [{"include-path": STREAM_PATH, "request-timeout": STREAM_SECONDS}],
    }
    raw["phases"]["stateful"]["max-steps"] = max(2, steps)
    # chains want their steps to succeed (ids to follow); the phases before it send the negative data
    raw["phases"]["stateful"]["generation"] = {**generation, "mode": "positive",
                                               "max-examples": scenarios or 3 * examples}
    if max_time:
        raw["max-time"] = max_time
    if token:
        raw["headers"] = {"Authorization": f"Bearer {token}"}
    config = SchemathesisConfig.from_dict(raw)
    schema = schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json", config=config)
    summary = Summary()
    start = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            summary.cases[str(event.phase.value)] += len(recorder.cases)
            summary.operations.add(recorder.label)
            for case_id, node in recorder.cases.items():
                interaction = recorder.interactions.get(case_id)
                status = interaction.response.status_code if interaction and interaction.response else "-"
                if status == 400:  # and the field the server named
                    status = f"400 {_field(interaction.response)}"
                summary.statuses[f"{event.phase.value} {node.value.operation.label} {status}"] += 1
                summary.called.add((event.phase.value, node.value.operation.label))
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status.name == "FAILURE" and check.failure_info is not None:
                        info = check.failure_info
                        response = recorder.interactions.get(case_id)
                        status = response.response.status_code if response and response.response else "?"
                        # a stateful failure: the requests that lead to it, the last one failed
                        repro = " -> ".join(step.curl for step in info.steps[-3:]) or info.code_sample
                        summary.failures.append(f"{check.name}: {recorder.label}: [{status}] "
                                                f"{info.failure.title}: {info.failure.message[:300]} | {repro[:900]}")
        elif isinstance(event, events.PhaseStarted) and event.payload is not None:
            summary.links = event.payload.transitions_total
        elif isinstance(event, events.NonFatalError):
            text = f"{event.label}: {event.info.format()[:600]}"
            stream = event.label == f"GET {STREAM_PATH}" and "Read timed out" in text
            (summary.stream_timeouts if stream else summary.errors).append(text)
        elif isinstance(event, events.FatalError):
            summary.errors.append(f"fatal: {event.exception!r}")
    summary.seconds = time.monotonic() - start
    return summary


def _field(response: Any) -> str:
    import json

    try:
        error = json.loads(response.content or b"{}")["error"]
        return str(error.get("field") or error.get("message", "")[:120])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=200, help="cases per operation (fuzzing phase)")
    p.add_argument("--steps", type=int, default=40, help="most steps of a stateful scenario")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--auth", choices=("on", "off", "both"), default="both")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--max-time", type=int, default=None, help="seconds, per auth mode")
    p.add_argument("-v", "--verbose", action="store_true", help="also the responses by phase, operation, status")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    phases = tuple(x for x in args.phases.split(",") if x)
    failed = False
    for mode in (("on", "off") if args.auth == "both" else (args.auth,)):
        with tempfile.TemporaryDirectory(prefix="multigen-fuzz-") as tmp:
            users = ("alice",) if mode == "on" else ()
            with serve(write_config(Path(tmp)), users=users) as (url, tokens):
                summary = fuzz(url, tokens.get("alice"), args.examples, args.steps, args.seed, phases, args.max_time)
        print(f"auth {mode}: " + "\n  ".join(summary.lines()), flush=True)
        if args.verbose:
            print("\n".join(f"  {n:6d}  {key}" for key, n in sorted(summary.statuses.items())), flush=True)
        failed = failed or bool(summary.failures or summary.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
