"""The benchmark scripts keep working where no GPU is: bench_gpu.py's CPU dry run and a short bench_load.py.

Both run real generation (tiny models) and bench_load starts a real server, so both are ``slow``.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


@pytest.mark.slow
def test_bench_gpu_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu.md"
    # SDXL takes SD's code path: two families keep the test short
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), "--dry-run", "--families", "SD,FLUX",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    for family in ("SD", "FLUX"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {family} 64x64")]
        assert len(rows) >= 2, table  # eager and channels_last, ours against plain
        assert re.search(rf"^\| {family} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$", table, re.M), table  # count
        assert re.search(rf"^\| {family} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ % \|$", table, re.M), table  # previews
    assert "torch.compile (eager)" in table
    assert re.search(r"^\| \w+ \| cpu, cpu \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$", table, re.M), table


@pytest.mark.slow
def test_bench_load_short_run_reports_every_endpoint_and_rss():
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_load.py"), "--seconds", "3", "--clients", "6",
                           "--streams", "1", "--queuers", "1", "--client-processes", "2", "--steps", "2",
                           "--size", "64", "--warmup-jobs", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for label in ("GET /jobs/{id}", "GET /sessions/{id}/images", "POST /sessions/{id}/jobs",
                  "event job.queued after POST"):
        assert re.search(re.escape(label) + r"\s+n=\s*\d+\s+p50 .* ms\s+p99 .* ms\s+errors \d+", text), text
    assert re.search(r"GET /jobs/\{id\}\s+n=\s*[1-9]\d*\s.*errors 0", text), text
    assert re.search(r"server RSS after warm-up [0-9.]+ MiB, at the end [0-9.]+ MiB .*ratio [0-9.]+ (PASS|FAIL)",
                     text), text
    assert "polling p99" in text


# ---- the option bench_load.py chose: the CPU worker below the HTTP threads (service/devices.py) ----------


def test_worker_nice_applies_to_a_lone_cpu_worker_only(monkeypatch):
    from multigen.service.devices import WORKER_NICE, worker_nice

    monkeypatch.delenv("MULTIGEN_WORKER_NICE", raising=False)
    assert worker_nice(["cpu"]) == WORKER_NICE > 0
    assert worker_nice(["cuda:0"]) == worker_nice(["cuda:0", "cuda:1"]) == 0
    monkeypatch.setenv("MULTIGEN_WORKER_NICE", "0")
    assert worker_nice(["cpu"]) == 0
    monkeypatch.setenv("MULTIGEN_WORKER_NICE", "5")
    assert worker_nice(["cpu"]) == 5
    monkeypatch.delenv("MULTIGEN_WORKER_NICE")
    assert worker_nice(["cpu"], 3) == 3  # config.yaml's server.worker_nice


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_run_lowered_lowers_the_threads_it_starts_not_the_caller():
    import os
    import threading

    from multigen.service.devices import run_lowered

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice_of_this_thread()
    seen: dict[str, int] = {}
    ready = threading.Event()

    def start() -> str:
        def worker() -> None:
            seen["worker"] = nice_of_this_thread()
            ready.set()

        threading.Thread(target=worker).start()
        ready.wait(5)
        seen["starter"] = nice_of_this_thread()
        return "started"

    assert run_lowered(start, 3) == "started"
    assert seen == {"starter": min(19, mine + 3), "worker": min(19, mine + 3)}
    assert nice_of_this_thread() == mine
    with pytest.raises(ZeroDivisionError):
        run_lowered(lambda: 1 / 0, 3)
    assert run_lowered(lambda: nice_of_this_thread(), 0) == mine  # 0: runs here, as it is
