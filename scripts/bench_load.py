#!/usr/bin/env python
"""Load and soak benchmark: many HTTP clients against a real ``multigen serve`` while it generates.

N clients (``--clients``, default 32), spread over several processes so that the clients' own GIL does
not inflate what they measure, share three roles for a fixed time (``--seconds``) or a fixed number of
jobs (``--jobs``):

- **pollers** poll the newest job of their process (``GET /api/v1/jobs/{id}``) and the images of its
  session (``GET /api/v1/sessions/{id}/images?after=``) every ``--interval`` seconds;
- **streamers** (``--streams``) hold an event stream (``GET /api/v1/events?session_id=``) open: "events"
  is the time from sending a job's POST until its ``job.queued`` event arrives on the stream;
- **queuers** (``--queuers``) queue small jobs (``POST /api/v1/sessions/{id}/jobs``), one at a time each,
  waiting for it to end before the next, so the worker is never idle.

Prints p50/p99 latency and errors per endpoint, jobs done, and the server's resident memory (RSS) after
the warm-up (the first ``--warmup-jobs`` jobs) and at the end. ``--jobs 1000`` is the soak: RSS at the
end must be within 5 % of RSS after the warm-up (the ratio and PASS/FAIL are printed).

The server is a real ``multigen serve`` subprocess (own data folder, loopback, port 0) on the demo model
at its native 128x128 unless told otherwise. ``--gen-threads`` (the config's ``threads``) and
``--worker-nice`` (``$MULTIGEN_WORKER_NICE``: how much lower the CPU worker runs than the HTTP threads)
are the knobs compared in docs/performance.md.

Usage::

    .venv/bin/python scripts/bench_load.py --seconds 30            # latency under load
    .venv/bin/python scripts/bench_load.py --jobs 1000 --steps 2   # soak: RSS flat within 5 %
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import FINISHED, PROMPT, _job_id, bench_config, percentile, start_server  # noqa: E402

from multigen.service.client import MultigenClient  # noqa: E402
from multigen.service.config import DEFAULT_CONFIG  # noqa: E402

ENDPOINTS = ("job", "images", "create", "events")
#: RSS at the end may exceed RSS after the warm-up by this share before the soak fails
RSS_TOLERANCE = 0.05


def rss_of(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux, or the process is gone
        pass
    return 0


def thread_nices(pid: int) -> dict[int, int]:
    """``nice -> number of threads`` of process ``pid`` (Linux /proc; empty elsewhere)."""
    out: dict[int, int] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            nice = int(stat.read_text().rsplit(")", 1)[1].split()[16])
        except (OSError, IndexError, ValueError):  # pragma: no cover - a thread that just ended
            continue
        out[nice] = out.get(nice, 0) + 1
    return dict(sorted(out.items()))


def load_config(source: Path, folder: Path, args) -> Path:
    """bench_api's config copy, with room for this run: event streams, queue limits, torch threads."""
    path = bench_config(source, folder, "server")
    data = yaml.safe_load(path.read_text())
    server = data.setdefault("server", {})
    server["max_event_streams"] = max(int(server.get("max_event_streams") or 0), args.streams + 2)
    server["max_event_streams_per_user"] = max(int(server.get("max_event_streams_per_user") or 0), args.streams + 2)
    if args.http_threads:
        server["threads"] = args.http_threads
    limits = data.setdefault("limits", {})
    for key in ("max_megapixel_steps_per_user_hour", "max_images_per_user_day"):
        limits[key] = 0  # a soak queues more than an hour's human share
    if args.gen_threads:
        data["threads"] = args.gen_threads
    path.write_text(yaml.safe_dump(data))
    return path


class Budget:
    """Jobs still to queue (``--jobs``), shared by the queuers of every process; None queues until stopped."""

    def __init__(self, ctx, jobs: int | None):
        self.left = ctx.Value("i", jobs if jobs else -1)
        self.finished = ctx.Value("i", 0)

    def take(self) -> bool:
        with self.left.get_lock():
            if self.left.value == -1:
                return True
            if self.left.value == 0:
                return False
            self.left.value -= 1
            return True

    def give_back(self) -> None:
        """A job that could not be queued (its POST failed) is queued again later."""
        with self.left.get_lock():
            if self.left.value != -1:
                self.left.value += 1

    def done(self) -> None:
        with self.finished.get_lock():
            self.finished.value += 1


def client_process(url: str, session_id: str, roles: dict[str, int], args, budget: Budget, stop, out) -> None:
    """One client process: its pollers, streamers and queuers, until ``stop`` (or the budget is spent)."""
    lat: dict[str, list[float]] = {k: [] for k in ENDPOINTS}
    errors: dict[str, int] = {k: 0 for k in ENDPOINTS}
    lock = threading.Lock()
    newest = {"job": None}
    sent: dict[str, float] = {}  # job id -> when its POST was sent
    arrived: dict[str, float] = {}  # job id -> when its job.queued event came on this process's stream

    def record(kind: str, seconds: float, ok: bool) -> None:
        with lock:
            lat[kind].append(seconds)
            errors[kind] += not ok

    def fail(kind: str) -> None:
        with lock:
            errors[kind] += 1

    def timed_get(http: requests.Session, kind: str, path: str) -> requests.Response | None:
        t0 = time.perf_counter()
        try:
            r = http.get(url + path, timeout=30)
        except requests.RequestException:
            record(kind, time.perf_counter() - t0, False)
            return None
        record(kind, time.perf_counter() - t0, r.status_code == 200)
        return r if r.status_code == 200 else None

    def poller() -> None:
        http, after = requests.Session(), -1
        while not stop.is_set():
            job = newest["job"]
            if job is not None:
                timed_get(http, "job", f"/api/v1/jobs/{job}")
            r = timed_get(http, "images", f"/api/v1/sessions/{session_id}/images?after={after}")
            if r is not None:
                new = r.json()["images"]
                after = new[-1]["index"] if new else after
            stop.wait(args.interval)

    def streamer() -> None:
        http = requests.Session()
        while not stop.is_set():
            try:
                with http.get(f"{url}/api/v1/events", params={"session_id": session_id}, stream=True,
                              timeout=(10, 30)) as r:
                    if r.status_code != 200:
                        fail("events")
                        stop.wait(1)
                        continue
                    kind = None
                    for line in r.iter_lines(chunk_size=None, decode_unicode=True):  # each event as it comes
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:") and kind == "job.queued":
                            got = time.perf_counter()  # the event may come before its POST's answer
                            with lock:
                                arrived.setdefault(_job_id({"data": json.loads(line[5:])}), got)
                        if stop.is_set():
                            return
            except requests.RequestException:
                if not stop.is_set():
                    fail("events")

    def queuer() -> None:
        http = requests.Session()
        body = {"prompt": PROMPT, "count": 1, "steps": args.steps, "width": args.size, "height": args.size}
        while not stop.is_set() and budget.take():
            t0 = time.perf_counter()
            try:
                r = http.post(f"{url}/api/v1/sessions/{session_id}/jobs", json=body, timeout=30)
                ok = r.status_code in (200, 201, 202)
            except requests.RequestException:
                ok, r = False, None
            with lock:
                lat["create"].append(time.perf_counter() - t0)
                errors["create"] += not ok
            if not ok:
                budget.give_back()
                stop.wait(0.5)
                continue
            job = r.json()["job"]["id"]
            with lock:
                sent[job] = t0
            newest["job"] = job
            while not stop.is_set():  # one job at a time per queuer: the queue stays short, the worker busy
                r = timed_get(http, "job", f"/api/v1/jobs/{job}")
                if r is not None and r.json()["job"]["state"] in FINISHED:
                    budget.done()
                    break
                stop.wait(0.2)

    queuers = [threading.Thread(target=queuer) for _ in range(roles["queuers"])]
    pollers = [threading.Thread(target=poller) for _ in range(roles["pollers"])]
    # a stream waits for its next event: at the end it is left behind (daemon) rather than waited for
    streamers = [threading.Thread(target=streamer, daemon=True) for _ in range(roles["streamers"])]
    for t in queuers + pollers + streamers:
        t.start()
    for t in queuers + pollers:
        t.join()
    with lock:
        lat["events"] += [arrived[job] - t0 for job, t0 in sent.items() if job in arrived]
    out.put({"lat": lat, "errors": errors})


def share_out(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole numbers."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config.yaml (data goes to a temp folder)")
    p.add_argument("--model", default="demo")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--clients", type=int, default=32, help="all clients: pollers + streamers + queuers")
    p.add_argument("--streams", type=int, default=4, help="of the clients, how many hold an event stream")
    p.add_argument("--queuers", type=int, default=4, help="of the clients, how many queue jobs")
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between one poller's rounds")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--seconds", type=float, default=None, help="run this long (default 30)")
    run.add_argument("--jobs", type=int, default=None, help="run until this many jobs ended (1000: the soak)")
    p.add_argument("--warmup-jobs", type=int, default=None,
                   help="jobs before the first RSS reading (default: a tenth of --jobs, else 5)")
    p.add_argument("--gen-threads", type=int, default=None, help="torch threads of the worker (config `threads`)")
    p.add_argument("--worker-nice", type=int, default=None,
                   help="niceness of the CPU worker over the HTTP threads ($MULTIGEN_WORKER_NICE; 0 = same)")
    p.add_argument("--http-threads", type=int, default=None, help="waitress threads (config server.threads)")
    args = p.parse_args(argv)
    if args.jobs is None and args.seconds is None:
        args.seconds = 30.0
    warmup = args.warmup_jobs if args.warmup_jobs is not None else (max(1, args.jobs // 10) if args.jobs else 5)
    procs = max(1, min(args.clients, args.client_processes))
    pollers = args.clients - args.streams - args.queuers
    if pollers < 0:
        p.error("--streams + --queuers is more than --clients")
    if args.worker_nice is not None:
        os.environ["MULTIGEN_WORKER_NICE"] = str(args.worker_nice)

    tmp = Path(tempfile.mkdtemp(prefix="multigen-load-"))
    proc, url = start_server(load_config(args.config, tmp, args))
    try:
        mg = MultigenClient(url, timeout=60)
        sessions = [mg.create_session(project=f"load{i}", pipe="prompt2image", model=args.model)["id"]
                    for i in range(procs)]
        first = mg.create_job(sessions[0], prompt=PROMPT, count=1, steps=args.steps, width=args.size,
                              height=args.size)
        mg.wait_job(first["id"], timeout=600)  # the model is loaded before anything is measured
        health = mg.health()
        print(f"server {url} (pid {proc.pid}): {health.get('devices')}; {args.model} {args.size}x{args.size}, "
              f"{args.steps} steps; gen threads {args.gen_threads or 'default'}, worker nice "
              f"{args.worker_nice if args.worker_nice is not None else 'default'}", flush=True)

        ctx = mp.get_context("spawn")
        stop, out, budget = ctx.Event(), ctx.Queue(), Budget(ctx, args.jobs)
        roles = [{"pollers": a, "streamers": b, "queuers": c} for a, b, c in
                 zip(share_out(pollers, procs), share_out(args.streams, procs), share_out(args.queuers, procs))]
        workers = [ctx.Process(target=client_process, args=(url, sessions[i], roles[i], args, budget, stop, out))
                   for i in range(procs)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        rss_start = rss_peak = 0
        load_avg = []
        while True:
            time.sleep(0.5)
            rss = rss_of(proc.pid)
            rss_peak = max(rss_peak, rss)
            load_avg.append(os.getloadavg()[0])
            if not rss_start and budget.finished.value >= warmup:
                rss_start = rss
                print(f"after {budget.finished.value} warm-up jobs: server RSS {rss / 2**20:.1f} MiB; its threads "
                      f"by nice value: {thread_nices(proc.pid)}", flush=True)
            if args.seconds is not None and time.monotonic() - t0 >= args.seconds:
                break
            if args.jobs is not None and budget.finished.value >= args.jobs:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode})")
        elapsed = time.monotonic() - t0
        rss_end = rss_of(proc.pid)
        stop.set()
        lat = {k: [] for k in ENDPOINTS}
        errors = {k: 0 for k in ENDPOINTS}
        for _ in workers:
            part = out.get(timeout=120)
            for k in ENDPOINTS:
                lat[k] += part["lat"][k]
                errors[k] += part["errors"][k]
        for w in workers:
            w.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a stuck server must not keep the temp folder
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    done = budget.finished.value
    print(f"\n{args.clients} clients in {procs} processes ({pollers} pollers every {args.interval} s, {args.streams} "
          f"event streams, {args.queuers} queuers) for {elapsed:.1f} s: {done} jobs ended "
          f"({done / elapsed:.2f}/s); load average {statistics.median(load_avg):.2f} on {os.cpu_count()} cores")
    worst = 0.0
    for kind, label in (("job", "GET /jobs/{id}"), ("images", "GET /sessions/{id}/images"),
                        ("create", "POST /sessions/{id}/jobs"), ("events", "event job.queued after POST")):
        values = lat[kind]
        p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
        if kind in ("job", "images"):
            worst = max(worst, p99)
        print(f"  {label:30s} n={len(values):6d}  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  errors {errors[kind]}")
    polls_ok = worst < 50 and not errors["job"] and not errors["images"]
    print(f"polling p99 {worst:.2f} ms: {'OK' if polls_ok else 'over target (p99 < 50 ms, no errors)'}")
    if rss_start:
        ratio = rss_end / rss_start
        verdict = "PASS" if ratio <= 1 + RSS_TOLERANCE else "FAIL"
        print(f"server RSS after warm-up {rss_start / 2**20:.1f} MiB, at the end {rss_end / 2**20:.1f} MiB "
              f"(peak {rss_peak / 2**20:.1f}): ratio {ratio:.3f} {verdict} (within {RSS_TOLERANCE:.0%})")
    else:
        print(f"server RSS at the end {rss_end / 2**20:.1f} MiB (the {warmup} warm-up jobs did not all end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
