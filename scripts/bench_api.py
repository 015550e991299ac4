#!/usr/bin/env python
"""Benchmark the HTTP API against the ServiceThread it serves, in one run.

Prints:
1. p50/p99 latency of job polling (``GET /api/v1/jobs/{id}``) and image polling
   (``GET /api/v1/sessions/{id}/images?after=``) with N concurrent clients, each polling both
   every ``--interval`` seconds, while a job runs (target: p99 under 50 ms, no errors);
2. time per image over HTTP (POST the job, wait for its ``job.succeeded`` on the event
   stream) against the same job queued on a ServiceThread directly (waiting on its event
   subscription) (target: at most 1.05x);
3. (``--parts a1111``) one AUTOMATIC1111 ``POST /sdapi/v1/txt2img`` call (which waits and answers
   the images in base64) against the same job through the session API (create, then poll until it
   finished), alternating, median of ``--rounds`` (target: at most 1.05x).

The server is a real ``multigen serve`` subprocess (its own data folder); the direct side is a
ServiceThread in this process, run while the server is idle. The polling clients run in
several processes, so the clients' own GIL does not inflate the latencies they measure.
Models are loaded before anything is timed.

Usage: .venv/bin/python scripts/bench_api.py [--images 4] [--steps 8] [--size 128] [--clients 32]
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import requests  # noqa: E402

from multigen.service.client import MultigenClient  # noqa: E402
from multigen.service.config import DEFAULT_CONFIG  # noqa: E402

FINISHED = ("succeeded", "failed", "cancelled")
PROMPT = "a lighthouse at dusk"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def bench_config(source: Path, folder: Path, name: str) -> Path:
    """A copy of ``source`` whose data, output and log folders are under ``folder/name``."""
    import yaml

    data = yaml.safe_load(source.read_text())
    here = source.resolve().parent
    for key in ("model_list", "model_dir"):
        if key in data:
            data[key] = str((here / data[key]).resolve())
    root = folder / name
    data.update(data_dir=str(root / "data"), output_dir=str(root / "outputs"), logging_folder=str(root / "logs"))
    data["users"] = {}
    (root).mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_server(config: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "multigen.service.cli", "serve", "--config", str(config),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("multigen serving on "):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split()[-1].rstrip("/")
    raise RuntimeError("the server did not start")


def poller(url: str, session_id: str, job_id: str, threads: int, interval: float, stop, out) -> None:
    """One client process: ``threads`` clients polling the job and the images until ``stop``."""
    results = {"job": [], "images": [], "errors": 0}
    lock = threading.Lock()

    def client() -> None:
        http = requests.Session()
        after, mine, errors = -1, {"job": [], "images": []}, 0
        while not stop.is_set():
            for kind, path in (("job", f"/api/v1/jobs/{job_id}"),
                               ("images", f"/api/v1/sessions/{session_id}/images?after={after}")):
                t0 = time.perf_counter()
                try:
                    r = http.get(url + path, timeout=30)
                    ok = r.status_code == 200
                    if ok and kind == "images":
                        new = r.json()["images"]
                        after = new[-1]["index"] if new else after
                except requests.RequestException:
                    ok = False
                mine[kind].append(time.perf_counter() - t0)
                errors += not ok
            stop.wait(interval)
        with lock:
            results["job"] += mine["job"]
            results["images"] += mine["images"]
            results["errors"] += errors

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(results)


def server_buckets(mg: MultigenClient) -> dict[tuple[str, str], float]:
    """``(route, le) -> count`` of the server's own request-time histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(mg.metrics()):
        for sample in family.samples:
            if sample.name == "multigen_http_request_seconds_bucket":
                out[(sample.labels["route"], sample.labels["le"])] = sample.value
    return out


def server_share_under(before: dict, after: dict, route: str, le: str = "0.05") -> tuple[float, int]:
    """Share of a route's requests the server itself answered within ``le`` seconds, and their count."""
    total = after.get((route, "+Inf"), 0) - before.get((route, "+Inf"), 0)
    within = after.get((route, le), 0) - before.get((route, le), 0)
    return (within / total if total else float("nan")), int(total)


def polling_latency(mg: MultigenClient, url: str, sid: str, args) -> None:
    job = mg.create_job(sid, prompt=PROMPT, count=args.load_images, steps=args.steps, width=args.size,
                        height=args.size)
    while mg.get_job(job["id"])["state"] == "queued":
        time.sleep(0.05)
    before = server_buckets(mg)
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    procs = max(1, min(args.clients, args.client_processes))
    per = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
    workers = [ctx.Process(target=poller, args=(url, sid, job["id"], n, args.interval, stop, out)) for n in per]
    for w in workers:
        w.start()
    done = mg.wait_job(job["id"], timeout=3600, poll=0.5)
    stop.set()
    res = {"job": [], "images": [], "errors": 0}
    for _ in workers:
        part = out.get(timeout=120)
        res["job"] += part["job"]
        res["images"] += part["images"]
        res["errors"] += part["errors"]
    for w in workers:
        w.join()
    after = server_buckets(mg)
    print(f"\npolling: {args.clients} clients in {procs} processes, each polling the job and the images every "
          f"{args.interval} s while a job of {done['count']} images ran ({done['state']}); "
          f"{len(res['job'])} job polls, {len(res['images'])} image polls, {res['errors']} errors")
    for kind in ("job", "images"):
        lat = res[kind]
        p99 = percentile(lat, 99) * 1000
        verdict = "OK" if p99 < 50 and not res["errors"] else "over target (p99 < 50 ms, no errors)"
        print(f"  {kind:6s} p50 {percentile(lat, 50) * 1000:7.2f} ms   p99 {p99:7.2f} ms   {verdict}")
    for kind, route in (("job", "/api/v1/jobs/<job_id>"), ("images", "/api/v1/sessions/<session_id>/images")):
        share, n = server_share_under(before, after, route)
        print(f"  server side ({kind}): {share * 100:.1f}% of {n} requests handled within 50 ms")
    print(f"  load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def _job_id(event: dict) -> str | None:
    data = event.get("data") or {}
    return data.get("job_id") or (data.get("job") or {}).get("id")


def time_direct(svc, session_id: str, params: dict, count: int) -> float:
    """Seconds per image of a job queued on the ServiceThread, until its ``job.succeeded`` event."""
    sub = svc.subscribe(session_id=session_id)
    try:
        t0 = time.perf_counter()
        job_id = svc.queue_gen(session_id, prompt=PROMPT, count=count, **params)["job_id"]
        while True:
            event = sub.get(timeout=600)
            if event is None:
                raise RuntimeError("no event for 600 s")
            if event["type"] in ("job.succeeded", "job.failed", "job.cancelled") and _job_id(event) == job_id:
                assert event["type"] == "job.succeeded", event
                return (time.perf_counter() - t0) / count
    finally:
        sub.close()


def time_http(mg: MultigenClient, session_id: str, params: dict, count: int) -> float:
    """Seconds per image of a job queued over HTTP, until its ``job.succeeded`` on the event stream."""
    events = mg.iter_events(session_id, timeout=600)
    holder: dict = {}

    def read() -> None:
        for event in events:
            if event["type"] in ("job.succeeded", "job.failed", "job.cancelled") and _job_id(event) == holder.get("id"):
                holder["end"], holder["type"] = time.perf_counter(), event["type"]
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)  # let the stream connect before the job is queued
    t0 = time.perf_counter()
    holder["id"] = mg.create_job(session_id, prompt=PROMPT, count=count, **params)["id"]
    reader.join(600)
    assert holder.get("type") == "job.succeeded", holder
    return (holder["end"] - t0) / count


def time_session_job(mg: MultigenClient, session_id: str, params: dict, count: int) -> float:
    """Seconds of a job through the session API: create it, poll until it finished (every 50 ms, as an
    A1111 call's own wait polls)."""
    t0 = time.perf_counter()
    job = mg.wait_job(mg.create_job(session_id, prompt=PROMPT, count=count, **params)["id"], timeout=600, poll=0.05)
    assert job["state"] == "succeeded", job
    return time.perf_counter() - t0


def time_a1111_call(url: str, model: str, params: dict, count: int) -> float:
    """Seconds of one ``POST /sdapi/v1/txt2img`` of ``count`` images, its base64 answer read."""
    body = {"prompt": PROMPT, "batch_size": count, "override_settings": {"sd_model_checkpoint": model}, **params}
    t0 = time.perf_counter()
    r = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=600)
    r.raise_for_status()
    assert len(r.json()["images"]) == count, r.text[:500]
    return time.perf_counter() - t0


def a1111_against_session(mg: MultigenClient, url: str, sid: str, params: dict, args) -> None:
    """The A1111 dialect's cost over the session API for the same job (same server, model loaded)."""
    time_a1111_call(url, args.model, params, 1)  # its implicit session opened, the model warm
    a1111, session = [], []
    for _ in range(args.rounds):
        session.append(time_session_job(mg, sid, params, args.images))
        a1111.append(time_a1111_call(url, args.model, params, args.images))
    s, a = statistics.median(session), statistics.median(a1111)
    print(f"\nA1111 txt2img against the session API: {args.images} images, {args.steps} steps, "
          f"{args.size}x{args.size}, {args.model}, median of {args.rounds} calls each, alternating")
    print(f"  session API (create + wait) {s * 1000:8.1f} ms   (runs: {', '.join(f'{x * 1000:.0f}' for x in session)})")
    print(f"  /sdapi/v1/txt2img           {a * 1000:8.1f} ms   (runs: {', '.join(f'{x * 1000:.0f}' for x in a1111)})")
    print(f"  ratio of medians {a / s:.3f}x   {'OK' if a / s <= 1.05 else 'over target (at most 1.05x)'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="HTTP API against ServiceThread: polling latency, time per image.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config.yaml (data goes to a temp folder)")
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--images", type=int, default=4, help="images per timed job")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed jobs per side, alternating")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between one client's polls")
    p.add_argument("--load-images", type=int, default=8, help="images of the job that runs under polling")
    p.add_argument("--parts", default="latency,time,a1111",
                   help="which measurements, comma-separated: latency, time, a1111")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="multigen-bench-"))
    proc, url = start_server(bench_config(args.config, tmp, "server"))
    svc = None
    try:
        mg = MultigenClient(url, timeout=60)
        params = {"steps": args.steps, "width": args.size, "height": args.size}
        sid = mg.create_session(project="bench", pipe="prompt2image", model=args.model)["id"]
        mg.wait_job(mg.create_job(sid, prompt=PROMPT, count=1, **params)["id"], timeout=600)  # model load
        print(f"server {url}: {mg.health()['devices']}", flush=True)
        if "latency" in args.parts:
            polling_latency(mg, url, sid, args)
        if "a1111" in args.parts:
            a1111_against_session(mg, url, sid, params, args)
        if "time" not in args.parts:
            return 0

        from multigen.service.config import load_config
        from multigen.service.serviceThread import ServiceThread

        logging.getLogger("multigen").setLevel(logging.WARNING)
        svc = ServiceThread(load_config(bench_config(args.config, tmp, "direct"))).start()
        logging.getLogger("multigen").setLevel(logging.WARNING)
        dsid = svc.open_session("bench", "bench", "prompt2image", args.model)["session_id"]
        time_direct(svc, dsid, params, 1)  # model load
        direct, http = [], []
        for _ in range(args.rounds):
            direct.append(time_direct(svc, dsid, params, args.images))
            http.append(time_http(mg, sid, params, args.images))
        d, h = statistics.median(direct), statistics.median(http)
        print(f"\ntime per image: {args.images} images, {args.steps} steps, {args.size}x{args.size}, {args.model}, "
              f"median of {args.rounds} jobs each, alternating")
        print(f"  ServiceThread directly {d * 1000:8.1f} ms   (runs: {', '.join(f'{x * 1000:.0f}' for x in direct)})")
        print(f"  over HTTP              {h * 1000:8.1f} ms   (runs: {', '.join(f'{x * 1000:.0f}' for x in http)})")
        print(f"  ratio of medians {h / d:.3f}x   {'OK' if h / d <= 1.05 else 'over target (at most 1.05x)'};"
              f" ratio of the fastest runs {min(http) / min(direct):.3f}x")
        print(f"  load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other work on the machine "
              "shows up as spread between runs)")
    finally:
        if svc is not None:
            svc.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
