#!/usr/bin/env python
"""Benchmark claiming jobs (``store.claim_job``, service/claims.py) on both stores.

For each store and 1 or 2 concurrent claimers (separate processes, as workers on separate hosts would
be), a fresh database gets ``--jobs`` queued jobs of ``--users`` users over two models; the claimers
then claim until the queue is empty, timing every claim (one transaction: the fair choice, the lease,
the turn state). Prints a table: claim latency p50/p99 and claims per second (all claimers together).

For PostgreSQL it adds a reference row: a bare FIFO claim (``UPDATE ... WHERE id = (SELECT ... ORDER BY
seq LIMIT 1 FOR UPDATE SKIP LOCKED)``), no fairness and no turn state, i.e. what the fair rule and its
advisory lock cost on top of the cheapest possible claim.

PostgreSQL: ``$MULTIGEN_TEST_PG`` (a server of your own: each run uses a new schema, dropped after), else
a throw-away cluster started and removed through scripts/_postgres.sh (fsync and synchronous_commit are
off there: commits cost less than on a production server). Without either, SQLite only.

Usage: .venv/bin/python scripts/bench_claims.py [--jobs 400] [--users 8] [--lease 60]
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
PG_SCRIPT = ROOT / "scripts" / "_postgres.sh"


def open_store(kind: str, where: str) -> Any:
    if kind == "postgresql":
        from multigen.service.pgstore import PostgresStore

        return PostgresStore(where)
    from multigen.service.store import SQLiteStore

    return SQLiteStore(where)


def fill(store: Any, jobs: int, users: int) -> None:
    from multigen.service.records import JobRecord, SessionRecord

    for u in range(users):
        store.create_session(SessionRecord(id=f"s{u}", user=f"u{u}", project="p", pipe="prompt2image", model="m0",
                                           loras=[], state="open", folder=f"/out/s{u}",
                                           created_at="2026-01-01T00:00:00Z"))
    for i in range(jobs):
        u = i % users
        store.create_job(JobRecord(id=f"j{i:05d}", session_id=f"s{u}", user=f"u{u}", model=f"m{i % 2}", state="queued",
                                   priority=i % 3, count=4, seeds=[i, i + 1, i + 2, i + 3], prompt="a cat",
                                   negative_prompt=None, params={"steps": 8}, created_at="2026-01-01T00:00:00Z"))


FIFO_CLAIM = ("UPDATE jobs SET state = 'running', worker = %s, claimed_at = now(), "
              "lease_until = now() + make_interval(secs => %s) "
              "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
              "RETURNING id")


def claimer(kind: str, where: str, mode: str, k: int, lease: float, start: Any, out: Any) -> None:
    """One claimer process: claim until the queue is empty; sends (latencies, first start, last end)."""
    store = open_store(kind, where)
    held = {f"m{k % 2}"}
    times: list[float] = []
    if mode == "fifo":
        import psycopg

        conn = psycopg.connect(where, autocommit=True)
        claim = lambda: conn.execute(FIFO_CLAIM, (f"w{k}", lease)).fetchone()  # noqa: E731
    else:
        claim = lambda: store.claim_job(f"w{k}", held, lease)  # noqa: E731
    store.list_workers()  # connections open before the clock starts
    start.wait()
    t_begin = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        got = claim()
        t1 = time.perf_counter()
        if got is None:
            break
        times.append(t1 - t0)
    out.put((times, t_begin, time.perf_counter()))
    store.close()


def run(kind: str, where: str, mode: str, claimers: int, args: argparse.Namespace) -> dict[str, float]:
    store = open_store(kind, where)
    fill(store, args.jobs, args.users)
    store.close()
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(claimers), ctx.Queue()
    procs = [ctx.Process(target=claimer, args=(kind, where, mode, k, args.lease, start, out)) for k in range(claimers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(t for r in results for t in r[0])
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    n = len(lat)
    assert n == args.jobs, f"{n} claims for {args.jobs} jobs"
    return {"p50": lat[len(lat) // 2] * 1000, "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            "rate": n / wall, "per": [len(r[0]) for r in results]}


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    """A PostgreSQL URL: $MULTIGEN_TEST_PG, or a throw-away cluster; None when neither is possible."""
    url = os.environ.get("MULTIGEN_TEST_PG")
    if url:
        yield url
        return
    out = subprocess.run(["bash", str(PG_SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 2:
        print(f"no PostgreSQL ({(out.stdout + out.stderr).strip()}): SQLite only", file=sys.stderr)
        yield None
        return
    try:
        yield words[0]
    finally:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", words[1]], capture_output=True, timeout=60)


@contextlib.contextmanager
def pg_schema(url: str) -> Iterator[str]:
    import psycopg

    schema = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]
    try:
        yield f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--lease", type=float, default=60.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            where = str(Path(tmp) / f"db{n}.sqlite3")
            rows.append(("sqlite", "fair claim_job", n, run("sqlite", where, "fair", n, args)))
    with postgres() as url:
        if url:
            for mode, label in (("fair", "fair claim_job"), ("fifo", "bare FIFO SKIP LOCKED (reference)")):
                for n in (1, 2):
                    with pg_schema(url) as where:
                        rows.append(("postgresql", label, n, run("postgresql", where, mode, n, args)))
    print(f"\nclaims of {args.jobs} queued jobs ({args.users} users, 2 models); load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'store':<11} {'claim':<34} {'claimers':>8} {'p50 ms':>8} {'p99 ms':>8} {'claims/s':>9}  per claimer")
    for store, label, n, r in rows:
        print(f"{store:<11} {label:<34} {n:>8} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['rate']:>9.0f}  {r['per']}")


if __name__ == "__main__":
    main()
