"""Claiming jobs under a lease (claims.py), on both stores: the fair rule is FairQueue's, leases expire
and requeue, a lost lease records nothing, and concurrent claimers (threads; for PostgreSQL, processes)
never get one job twice. PostgreSQL comes from pg_check.py, as for test_store_contract.py."""
from __future__ import annotations

import contextlib
import datetime as dt
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pg_check import fresh_schema_url, postgres_url  # noqa: F401 (a fixture)

from multigen.service.claims import LeaseLost
from multigen.service.records import JobRecord, NewImage, SessionRecord
from multigen.service.scheduling import FairQueue, QueuedJob
from multigen.service.store import SQLiteStore, Store

LATER = dt.timedelta(seconds=3600)


class Db:
    """A fresh database of one kind: ``open()`` a store on it (closed after the test)."""

    def __init__(self, kind: str, opener: Callable[[], Any], url: str | None = None) -> None:
        self.kind, self._opener, self.url, self.opened = kind, opener, url, []

    def open(self) -> Any:
        store = self._opener()
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path) -> Iterator[Db]:
    yield from _db(request.param, request, tmp_path)


@pytest.fixture()
def pg_db(request, tmp_path: Path) -> Iterator[Db]:
    """PostgreSQL only (what SQLite's one-writer transactions cannot meet)."""
    yield from _db("postgresql", request, tmp_path)


def _db(kind: str, request: Any, tmp_path: Path) -> Iterator[Db]:
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            found = Db("sqlite", lambda: SQLiteStore(tmp_path / "db.sqlite3"))
        else:
            from multigen.service.pgstore import PostgresStore

            url = stack.enter_context(fresh_schema_url(request.getfixturevalue("postgres_url")))
            found = Db("postgresql", lambda: PostgresStore(url), url)
        stack.callback(lambda: [s.close() for s in found.opened])
        yield found


@pytest.fixture()
def store(db: Db) -> Store:
    return db.open()


def _sessions(store: Store, users: list[str]) -> None:
    for u in users:
        store.create_session(SessionRecord(id=f"s-{u}", user=u, project="p", pipe="prompt2image", model="m",
                                           loras=[], state="open", folder=f"/out/{u}",
                                           created_at="2026-01-01T00:00:00Z"))


def _push(store: Store, queue: FairQueue | None, jid: str, user: str, model: str = "m", priority: int = 0,
          count: int = 2) -> JobRecord:
    job = store.create_job(JobRecord(id=jid, session_id=f"s-{user}", user=user, model=model, state="queued",
                                     priority=priority, count=count, seeds=[2**63 + 7 * i for i in range(count)],
                                     prompt="p", negative_prompt=None, params={}, created_at="2026-01-01T00:00:00Z"))
    if queue is not None:
        queue.push(QueuedJob(jid, user, model, priority))
    return job


def _image(job: JobRecord, pos: int) -> NewImage:
    return NewImage(id=f"{job.id}-{pos}", session_id=job.session_id, job_id=job.id, pos=pos, seed=job.seeds[pos],
                    width=8, height=8, folder=f"/out/{job.user}")


# ---- the fair rule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [7, 11])
def test_claims_take_the_same_order_as_fairqueue_for_the_same_pushes(store, seed):
    for round_ in range(3):  # rounds on one database: each drains its queue, with users of its own
        rng = random.Random(seed * 100 + round_)
        users = [f"{u}{round_}" for u in ("alice", "bob", "carol")]
        _sessions(store, users)
        queue, n = FairQueue(max_jobs=10_000), 0
        for user, size in zip(users, (8, 5, 3)):  # backlogs, queued one user after another
            for _ in range(size):
                n += 1
                _push(store, queue, f"r{round_}j{n:03d}", user, rng.choice(["m1", "m2", "m3"]), rng.choice([0, 0, 5]))
        claimed, expected = [], []
        while len(queue):
            held = set(rng.sample(["m1", "m2", "m3"], rng.randint(0, 2)))
            job, want = store.claim_job("w1", held, 60), queue.pop(held)
            claimed.append(job.id)
            expected.append(want.job_id)
            if rng.random() < 0.3:  # more work arrives while the others run
                n += 1
                _push(store, queue, f"r{round_}j{n:03d}", rng.choice(users), rng.choice(["m1", "m2"]),
                      rng.choice([0, 5]))
        assert claimed == expected
        assert store.claim_job("w1", {"m1"}, 60) is None
        assert {store.get_job(j).state for j in claimed} == {"running"}


def test_no_user_waits_behind_another_users_whole_backlog(store):
    _sessions(store, ["alice", "bob", "carol"])
    for i in range(10):
        _push(store, None, f"a{i}", "alice")
    for i in range(3):
        _push(store, None, f"b{i}", "bob")
    _push(store, None, "c0", "carol")
    users = [store.claim_job("w", (), 60).user for _ in range(14)]
    assert users[:3] == ["alice", "bob", "carol"]  # one turn each, in arrival order
    assert users[3:8] == ["alice", "bob", "alice", "bob", "alice"] and set(users[8:]) == {"alice"}


def test_priority_orders_a_users_own_jobs_only(store):
    _sessions(store, ["alice", "bob"])
    _push(store, None, "a-low", "alice")
    _push(store, None, "b-first", "bob")
    _push(store, None, "a-high", "alice", priority=100)
    _push(store, None, "a-mid", "alice", priority=50)
    assert [store.claim_job("w", (), 60).id for _ in range(4)] == ["a-high", "b-first", "a-mid", "a-low"]


def test_affinity_takes_a_later_turn_at_most_max_skips_times_per_user(store):
    _sessions(store, ["alice", "bob"])
    for i in range(4):
        _push(store, None, f"a{i}", "alice", model="sdxl")
    for i in range(4):
        _push(store, None, f"b{i}", "bob", model="flux")
    # alice's turn, but the worker holds flux: bob's flux jobs go first until alice was passed over twice
    got = [store.claim_job("w", {"flux"}, 60, max_affinity_skips=2).id for _ in range(4)]
    assert got == ["b0", "b1", "a0", "b2"]
    assert store.claim_job("w", {"flux"}, 60, max_affinity_skips=0).id == "a1"  # no affinity: alice's turn
    assert store.claim_job("w", {"flux"}, 60).id == "b3"  # bob's turn, and a held model: affinity not needed
    assert store.claim_job("w", {"flux"}, 60).id == "a2"  # only alice has jobs left


# ---- leases -----------------------------------------------------------------------------------------------
def test_an_expired_lease_requeues_the_job_with_its_seeds_and_the_lost_lease_records_nothing(store):
    _sessions(store, ["alice"])
    queued = _push(store, None, "j1", "alice", count=3)
    job = store.claim_job("w1", (), 30)
    assert (job.id, job.state, job.seq, job.seeds) == ("j1", "running", queued.seq, queued.seeds)
    first = store.reserve_image(_image(job, 0), worker="w1")
    store.complete_image(first.id, "2026-01-01T00:00:01Z", worker="w1")
    half = store.reserve_image(_image(job, 1), worker="w1")  # reserved, its file never written
    assert store.renew_lease("j1", "w1", 30) and store.expire_leases() == []  # a live lease stays
    assert store.expire_leases(dt.datetime.now(dt.timezone.utc) + LATER) == ["j1"]
    back = store.get_job("j1")
    assert (back.state, back.seq, back.seeds) == ("queued", queued.seq, queued.seeds)
    # the worker that lost it can neither renew, nor reserve, nor complete, nor end it
    assert store.renew_lease("j1", "w1", 30) is False
    with pytest.raises(LeaseLost):
        store.reserve_image(_image(job, 2), worker="w1")
    with pytest.raises(LeaseLost):
        store.complete_image(half.id, "2026-01-01T00:00:02Z", worker="w1")
    assert store.release_job("j1", "w1", "succeeded") is False and store.get_job("j1").state == "queued"
    # another worker claims it again: the same seeds, image 0 kept, image 1 under its reserved index
    again = store.claim_job("w2", (), 30)
    assert (again.id, again.seeds, again.seq) == ("j1", queued.seeds, queued.seq)
    assert [i.pos for i in store.list_images(job_id="j1")] == [0]
    assert store.reserve_image(_image(again, 1), worker="w2").idx == half.idx
    assert store.reserve_image(_image(again, 2), worker="w2").idx == half.idx + 1
    with pytest.raises(LeaseLost):
        store.reserve_image(_image(again, 2), worker="w1")
    assert store.renew_lease("j1", "w2", 30) is True
    assert store.release_job("j1", "w2", "succeeded", finished_at="2026-01-01T00:00:09Z") is True
    done = store.get_job("j1")
    assert (done.state, done.finished_at) == ("succeeded", "2026-01-01T00:00:09Z")
    assert store.renew_lease("j1", "w2", 30) is False  # released: nothing to renew


def test_a_short_lease_expires_on_the_stores_own_clock_and_jobs_without_a_lease_are_left_alone(store):
    _sessions(store, ["alice"])
    _push(store, None, "j1", "alice")
    _push(store, None, "j2", "alice")
    store.update_job("j2", state="running")  # run by the in-process ledger: no lease, recovery's business
    assert store.claim_job("w1", (), 0.001).id == "j1"
    threading.Event().wait(0.05)
    assert store.expire_leases() == ["j1"] and store.get_job("j2").state == "running"


def test_release_to_queued_gives_the_job_back_and_workers_report_their_heartbeat(store):
    _sessions(store, ["alice"])
    _push(store, None, "j1", "alice")
    assert store.claim_job("w1", (), 60).id == "j1"
    assert store.release_job("j1", "w1") is True and store.get_job("j1").state == "queued"
    assert store.claim_job("w2", (), 60).id == "j1"
    assert store.list_workers() == []
    store.heartbeat("w1", "gpu-a", "cuda:0", ["m2", "m1"])
    store.heartbeat("w0", "gpu-b", "cuda:0", [])
    first = store.list_workers()
    store.heartbeat("w1", "gpu-a", "cuda:0", ["m3"])
    workers = store.list_workers()
    assert [(w.id, w.host, w.device, w.models) for w in workers] == [("w1", "gpu-a", "cuda:0", ["m3"]),
                                                                     ("w0", "gpu-b", "cuda:0", [])]
    assert workers[0].started_at == first[0].started_at and workers[0].heartbeat_at >= first[0].heartbeat_at
    assert dt.datetime.fromisoformat(workers[0].heartbeat_at).tzinfo is not None


# ---- concurrent claimers ----------------------------------------------------------------------------------
def _fifty(store: Store) -> set[str]:
    _sessions(store, ["alice", "bob", "carol"])
    return {_push(store, None, f"j{i:02d}", ["alice", "bob", "carol"][i % 3], f"m{i % 2}").id for i in range(50)}


def test_concurrent_claiming_threads_never_get_one_job_twice(db):
    jobs = _fifty(db.open())
    stores = [db.open() for _ in range(4)] if db.kind == "sqlite" else [db.open()] * 4
    got: list[list[str]] = [[] for _ in stores]

    def claim(k: int) -> None:
        while (job := stores[k].claim_job(f"w{k}", {f"m{k % 2}"}, 60)) is not None:
            got[k].append(job.id)
            time.sleep(0.003)  # the job runs: the others claim meanwhile (SQLite's busy wait is not fair)

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    claimed = [j for g in got for j in g]
    assert sorted(claimed) == sorted(jobs) and len(set(claimed)) == 50
    assert sum(1 for g in got if g) >= 2  # the work was shared
    assert db.open().list_jobs(states=["queued"]) == []


CLAIMER = """
import sys, time
from multigen.service.pgstore import PostgresStore
from multigen.service.store import SQLiteStore
kind, where, worker = sys.argv[1:]
store = PostgresStore(where) if kind == "postgresql" else SQLiteStore(where)
print("ready", flush=True)
sys.stdin.readline()
while (job := store.claim_job(worker, set(), 60)) is not None:
    print(job.id, flush=True)
    time.sleep(0.003)  # the job runs
store.close()
"""


@pytest.mark.slow
def test_two_processes_claim_fifty_jobs_with_none_twice_and_none_lost(db):
    jobs = _fifty(db.open())
    where = db.url if db.kind == "postgresql" else str(db.open().path)  # SQLite: two processes of one host
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, db.kind, where, f"proc{k}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:  # both connected before either claims
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    claimed = outs[0] + outs[1]
    assert sorted(claimed) == sorted(jobs) and len(set(claimed)) == 50
    assert all(outs), "both processes claimed jobs"


def test_postgres_passes_over_a_job_another_transaction_holds_without_waiting(pg_db):
    import psycopg

    db = pg_db
    store = db.open()
    _sessions(store, ["alice", "bob"])
    _push(store, None, "a0", "alice")
    _push(store, None, "a1", "alice")
    _push(store, None, "b0", "bob")
    with psycopg.connect(db.url) as other:  # e.g. a cancel being written: the row is locked
        other.execute("SELECT 1 FROM jobs WHERE id = 'a0' FOR UPDATE")
        t0 = time.perf_counter()
        # alice's head is held (say, a cancel being written): her turn goes to her next job, without waiting
        assert store.claim_job("w", (), 60).id == "a1"
        assert store.claim_job("w", (), 60).id == "b0"
        assert time.perf_counter() - t0 < 2
        other.execute("UPDATE jobs SET state = 'cancelled' WHERE id = 'a0'")
    assert store.claim_job("w", (), 60) is None and store.get_job("a0").state == "cancelled"


# ---- what processes sharing a store tell each other through it (cluster.py) ------------------------------
def test_compare_and_set_stop_requests_previews_and_the_queue_snapshot(store):
    _sessions(store, ["alice", "bob"])
    _push(store, None, "a0", "alice", priority=1)
    _push(store, None, "b0", "bob")
    _push(store, None, "a1", "alice", model="m2")
    jobs, served = store.queue_snapshot()
    assert [(j.job_id, j.user, j.model, j.priority) for j in jobs] == [("a0", "alice", "m", 1), ("b0", "bob", "m", 0),
                                                                        ("a1", "alice", "m2", 0)]
    assert [j.seq for j in jobs] == sorted(j.seq for j in jobs) and served == {}
    assert store.claim_job("w1", (), 60).id == "a0"
    assert store.queue_snapshot()[1] == {"alice": 1} and store.job_counts() == {"queued": 2, "running": 1}
    # a queued job is cancelled only while it is still queued: a claim in between wins
    assert store.update_job_if("a0", "queued", state="cancelled") is False and store.get_job("a0").state == "running"
    assert store.update_job_if("b0", "queued", state="cancelled", finished_at="2026-01-01T00:00:01Z") is True
    assert (store.get_job("b0").state, store.get_job("b0").finished_at) == ("cancelled", "2026-01-01T00:00:01Z")
    # stop requests reach only a running job, for its worker to read
    assert store.request_stop("a1") is False and store.request_stop("a1", skip=True) is False
    assert store.request_stop("a0", skip=True) and store.request_stop("a0", skip=True)
    assert store.request_stop("a0")
    running = store.get_job("a0")
    assert (running.cancel_requested, running.skip_requests, running.worker) == (1, 2, "w1")
    # the latest preview of a running job, replaced, then deleted
    assert store.get_preview("a0") is None
    store.set_preview("a0", b"\xff\xd8one")
    store.set_preview("a0", b"\xff\xd8two")
    assert store.get_preview("a0") == b"\xff\xd8two"
    store.set_preview("a0", None)
    assert store.get_preview("a0") is None


def test_an_image_is_put_in_place_only_under_a_live_lease(store, tmp_path):
    _sessions(store, ["alice"])
    job = _push(store, None, "j1", "alice", count=2)
    assert store.claim_job("w1", (), 60).id == "j1"
    published: list[int] = []
    first = store.reserve_image(_image(job, 0), worker="w1")
    store.complete_image(first.id, "2026-01-01T00:00:01Z", worker="w1", publish=lambda: published.append(0))
    second = store.reserve_image(_image(job, 1), worker="w1")
    store.expire_leases(dt.datetime.now(dt.timezone.utc) + LATER)
    with pytest.raises(LeaseLost):
        store.complete_image(second.id, "2026-01-01T00:00:02Z", worker="w1", publish=lambda: published.append(1))
    assert published == [0] and [i.pos for i in store.list_images(job_id="j1")] == [0]
    # a publish that fails leaves the image reserved, not done
    assert store.claim_job("w2", (), 60).id == "j1"
    with pytest.raises(OSError):
        store.complete_image(second.id, "2026-01-01T00:00:03Z", worker="w2", publish=_disk_full)
    assert [i.pos for i in store.list_images(job_id="j1")] == [0]
    store.complete_image(second.id, "2026-01-01T00:00:04Z", worker="w2", publish=lambda: published.append(1))
    assert published == [0, 1] and [i.pos for i in store.list_images(job_id="j1")] == [0, 1]


def _disk_full() -> None:
    raise OSError(28, "No space left on device")
