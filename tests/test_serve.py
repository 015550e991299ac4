"""`multigen serve` starts a real waitress server on loopback that answers /api/v1/health, and its request
parser refuses a chunked body once it passes its route's limit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a server process, and waitress's own request parser


def test_serve_answers_health(config_file: Path, tmp_path: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "multigen.service.cli", "serve", "--config", str(config_file),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.time() + 120
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("multigen serving on "):
                url = line.split()[-1]
        assert url, "server did not print its URL"
        with urllib.request.urlopen(url + "api/v1/health", timeout=30) as r:
            body = json.load(r)
        assert r.status == 200 and body["status"] == "ok" and body["version"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_chunked_body_past_its_route_limit_is_refused_as_it_arrives(make_api):
    """A chunked body has no Content-Length to check up front: it is counted as it comes and refused
    once it passes its route's limit (1 MiB but for uploads and jobs), in the API's JSON error shape."""
    from waitress.adjustments import Adjustments

    from multigen.service.server import guarded_parser_class

    api = make_api()
    parser_class = guarded_parser_class(api.app.extensions["multigen.guard"].check_head)
    chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"

    def feed(path: str, chunks: int):
        parser = parser_class(Adjustments())
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        assert parser.received(head) == len(head) and not parser.completed
        for n in range(chunks):
            parser.received(chunk)
            if parser.completed:
                return parser, n + 1
        return parser, chunks

    parser, fed = feed("/api/v1/sessions", 40)
    assert parser.completed and fed == 17  # 16 chunks are 1 MiB of body (and a little framing)
    status, headers, body = parser.error.to_response("multigen")
    assert status.startswith("413 ") and ("Content-Type", "application/json") in headers
    assert json.loads(body)["error"]["code"] == "too_large"
    parser, _ = feed("/api/v1/uploads", 40)  # 2.5 MiB: uploads take up to the upload limit
    assert not parser.completed and parser.error is None
