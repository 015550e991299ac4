"""`multigen serve` starts a real waitress server on loopback that answers /api/v1/health."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


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
