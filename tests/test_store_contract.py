"""The Store contract, one suite over both stores: SQLite (store.py) and PostgreSQL (pgstore.py).

Each test gets a fresh store: a new SQLite file, or a new schema of a real PostgreSQL (pg_check.py:
scripts/test starts one; without it these skip, and fail under CI=true). SQLite-only behaviour
(WAL, connections per thread, its migration history) is in test_store.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pg_check import SCRIPT, fresh_schema_url, postgres_url  # noqa: F401 (a fixture)

from multigen.service.records import DeliveryRecord, ImageRecord, JobRecord, NewImage, SessionRecord
from multigen.service.store import SCHEMA_VERSION, SQLiteStore, Store

U64_MAX = 2**64 - 1


@dataclasses.dataclass
class Backend:
    """One store's database: ``open()`` a store on it (again), ``execute(sql)`` on it directly."""

    kind: str
    open: Callable[[], Any]
    execute: Callable[[str], None]
    #: the schema version this code writes
    version: int


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path: Path) -> Iterator[Backend]:
    """A fresh database of each kind; every store opened on it is closed after the test."""
    opened: list[Any] = []

    def track(store: Any) -> Any:
        opened.append(store)
        return store

    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            path = tmp_path / "db.sqlite3"

            def sql(text: str) -> None:
                with contextlib.closing(sqlite3.connect(path)) as conn:
                    conn.execute(text)
                    conn.commit()

            found = Backend("sqlite", lambda: track(SQLiteStore(path)), sql, SCHEMA_VERSION)
        else:
            import psycopg

            from multigen.service.pgstore import PG_SCHEMA_VERSION, PostgresStore

            url = stack.enter_context(fresh_schema_url(request.getfixturevalue("postgres_url")))

            def sql(text: str) -> None:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(text)  # type: ignore[arg-type]

            found = Backend("postgresql", lambda: track(PostgresStore(url)), sql, PG_SCHEMA_VERSION)
        stack.callback(lambda: [s.close() for s in opened])  # before the schema is dropped
        yield found


@pytest.fixture()
def store(backend: Backend) -> Store:
    return backend.open()


def _session(store: Store, sid: str = "s1", user: str = "alice", project: str = "p",
             created_at: str = "2026-01-01T00:00:00Z") -> SessionRecord:
    record = SessionRecord(id=sid, user=user, project=project, pipe="prompt2image", model="m",
                           loras=[{"name": "l", "weight": 0.5}], state="open", folder=f"/out/{sid}",
                           created_at=created_at)
    store.create_session(record)
    return record


def _job(store: Store, jid: str, sid: str = "s1", count: int = 2, seeds: list[int] | None = None,
         state: str = "queued", params: dict[str, Any] | None = None) -> JobRecord:
    return store.create_job(JobRecord(id=jid, session_id=sid, user="alice", model="m", state=state, priority=0,
                                      count=count, seeds=seeds if seeds is not None else list(range(count)),
                                      prompt=["a", ["b", "c"]], negative_prompt=None,
                                      params=params if params is not None else {"steps": 3},
                                      created_at="2026-01-01T00:00:00Z"))


def _reserve(store: Store, jid: str, pos: int, sid: str = "s1", iid: str | None = None, seed: int | None = None
             ) -> ImageRecord:
    return store.reserve_image(NewImage(id=iid or f"{jid}-{pos}", session_id=sid, job_id=jid, pos=pos,
                                        seed=pos if seed is None else seed, width=8, height=8, folder=f"/out/{sid}"))


def _delivery(jid: str, next_try_at: str | None = "2026-01-01T00:00:05Z", state: str = "pending") -> DeliveryRecord:
    return DeliveryRecord(job_id=jid, user="alice", url="https://hooks.example/x", event="job.succeeded",
                          state=state, attempts=0, created_at="2026-01-01T00:00:00Z", next_try_at=next_try_at)


# ---- the interface ----------------------------------------------------------------------------------------
def test_the_store_implements_every_method_of_the_protocol(store):
    wanted = {n for n in vars(Store) if not n.startswith("_") and callable(vars(Store)[n])}
    assert Store in type(store).__mro__ and len(wanted) == 35
    for name in wanted:  # every method, with the protocol's parameters and defaults
        assert inspect.signature(getattr(type(store), name)) == inspect.signature(getattr(Store, name)), name


# ---- sessions ---------------------------------------------------------------------------------------------
def test_sessions_round_trip_filter_update_and_count(store):
    first = _session(store, "s1", "alice", "p", created_at="2026-01-01T00:00:01Z")
    _session(store, "s2", "bob", "q", created_at="2026-01-01T00:00:00Z")
    _session(store, "s3", "alice", "q", created_at="2026-01-01T00:00:01Z")  # same time as s1: arrival order
    got = store.get_session("s1")
    assert got == first and isinstance(got, SessionRecord) and got.is_open
    assert store.get_session("nope") is None
    assert [s.id for s in store.list_sessions()] == ["s2", "s1", "s3"]
    assert [s.id for s in store.list_sessions(user="alice")] == ["s1", "s3"]
    assert [s.id for s in store.list_sessions(user="alice", project="q")] == ["s3"]
    store.update_session("s2", state="closed", closed_at="2026-01-02T00:00:00Z", loras=[])
    closed = store.get_session("s2")
    assert (closed.state, closed.closed_at, closed.loras, closed.is_open) == ("closed", "2026-01-02T00:00:00Z", [],
                                                                              False)
    assert [s.id for s in store.list_sessions(state="closed")] == ["s2"]
    assert store.count_sessions("alice", "open") == 2 and store.count_sessions("bob", "open") == 0
    store.update_session("s1")  # nothing to change: no error


# ---- jobs -------------------------------------------------------------------------------------------------
def test_jobs_keep_every_parameter_and_seed_and_json_columns(store):
    _session(store)
    job = _job(store, "j1", count=3, seeds=[0, 7, U64_MAX], params={"steps": 3, "z": 1, "a": {"nested": [1, 2]}})
    got = store.get_job("j1")
    assert isinstance(got, JobRecord) and got == job
    assert got.seeds == [0, 7, U64_MAX] and got.prompt == ["a", ["b", "c"]]
    assert list(got.params) == ["steps", "z", "a"]  # JSON kept as written: the keys' order too
    assert store.get_job("nope") is None
    store.update_job("j1", state="failed", error={"type": "X", "message": "m"}, device="cuda:0",
                     started_at="2026-01-01T00:00:01Z", finished_at="2026-01-01T00:00:02Z",
                     timings={"load": 1.5, "gen": [0.1, 0.2]}, skipped=[1, 2],
                     negative_prompt=["ugly", ["blurry", "dark"]], prompt={"a": ["b"]})
    got = store.get_job("j1")
    assert got.error == {"type": "X", "message": "m"} and got.device == "cuda:0"
    assert (got.started_at, got.finished_at) == ("2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z")
    assert got.timings == {"load": 1.5, "gen": [0.1, 0.2]} and got.skipped == [1, 2]
    assert got.negative_prompt == ["ugly", ["blurry", "dark"]] and got.prompt == {"a": ["b"]}
    store.update_job("j1", error=None, skipped=None)
    assert store.get_job("j1").error is None and store.get_job("j1").skipped is None
    store.update_job("j1")  # nothing to change


def test_jobs_list_by_session_and_state_in_arrival_order_and_count(store):
    _session(store, "s1")
    _session(store, "s2", "bob")
    created = [_job(store, "j1"), _job(store, "j2", sid="s2"), _job(store, "j3"), _job(store, "j4", sid="s2")]
    seqs = [j.seq for j in created]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4 and seqs[0] > 0
    assert [store.get_job(j.id).seq for j in created] == seqs
    store.update_job("j3", state="running")
    store.update_job("j4", state="succeeded")
    assert [j.id for j in store.list_jobs()] == ["j1", "j2", "j3", "j4"]
    assert [j.id for j in store.list_jobs(session_id="s1")] == ["j1", "j3"]
    assert [j.id for j in store.list_jobs(states=["queued", "running"])] == ["j1", "j2", "j3"]
    assert [j.id for j in store.list_jobs(session_id="s2", states=iter(["succeeded"]))] == ["j4"]
    assert store.list_jobs(states=["failed"]) == [] and store.list_jobs(states=[]) == []
    assert store.job_counts("s1") == {"queued": 1, "running": 1}
    assert store.job_counts("s2") == {"queued": 1, "succeeded": 1} and store.job_counts("none") == {}


# ---- images -----------------------------------------------------------------------------------------------
def test_image_reservations_are_idempotent_and_indices_grow_per_session(store):
    _session(store, "s1")
    _session(store, "s2")
    _job(store, "j1")
    _job(store, "j2")
    _job(store, "k1", sid="s2")
    a = _reserve(store, "j1", 0)
    b = _reserve(store, "j2", 0)
    again = _reserve(store, "j1", 0, iid="other-id")  # a resumed job asks again: same row, same index
    other = _reserve(store, "k1", 0, sid="s2")
    assert (a.idx, b.idx, again.idx, other.idx) == (0, 1, 0, 0)  # indexes count per session
    assert isinstance(a, ImageRecord) and a.state == "writing" and a.created_at is None
    assert again == a and a.path == "/out/s1/00000.png" and b.path == "/out/s1/00001.png"
    assert (a.session_id, a.job_id, a.pos, a.seed, a.width, a.height) == ("s1", "j1", 0, 0, 8, 8)
    assert store.image_count("s1") == 0  # reserved, not written yet
    assert store.get_image(a.id) is None and store.image_by_index("s1", 0) is None
    store.complete_image(a.id, "2026-01-01T00:00:09Z")
    assert store.image_count("s1") == 1 and store.image_count("s2") == 0
    done = store.get_image(a.id)
    assert done.state == "done" and done.created_at == "2026-01-01T00:00:09Z"
    assert store.image_by_index("s1", 0) == done and store.image_by_index("s1", 1) is None
    assert [i.idx for i in store.list_images(session_id="s1")] == [0]
    assert [i.idx for i in store.list_images(session_id="s1", state="writing")] == [1]
    assert [i.id for i in store.list_images(session_id="s1", state=None)] == [a.id, b.id]
    store.complete_image(b.id, "t")
    assert [i.idx for i in store.list_images(session_id="s1", after=0)] == [1]
    assert store.list_images(session_id="s1", after=1) == []
    assert [i.id for i in store.list_images(job_id="j2")] == [b.id]
    assert [(i.session_id, i.idx) for i in store.list_images(state=None)] == [("s1", 0), ("s1", 1), ("s2", 0)]


def test_seeds_at_both_ends_round_trip(store):
    _session(store)
    _job(store, "j1", count=2, seeds=[0, U64_MAX])
    low, high = _reserve(store, "j1", 0, seed=0), _reserve(store, "j1", 1, seed=U64_MAX)
    assert (low.seed, high.seed) == (0, U64_MAX)
    for image in (low, high):
        store.complete_image(image.id, "t")
    assert [i.seed for i in store.list_images(job_id="j1")] == [0, U64_MAX]
    assert store.get_image(high.id).seed == U64_MAX and store.image_by_index("s1", 1).seed == U64_MAX
    assert store.get_job("j1").seeds == [0, U64_MAX]


def test_concurrent_reservations_from_threads_never_collide(store):
    _session(store)
    for t in range(4):
        _job(store, f"j{t}", count=10)
    errors: list[BaseException] = []
    same: list[ImageRecord] = []

    def worker(t: int) -> None:
        try:
            for pos in range(10):
                _reserve(store, f"j{t}", pos)
                same.append(_reserve(store, "j0", 9, iid=f"race-{t}-{pos}"))  # every thread wants j0's last image
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    images = store.list_images(session_id="s1", state=None)
    assert sorted(i.idx for i in images) == list(range(40))
    assert len({(i.job_id, i.pos) for i in images}) == 40
    assert len({(i.id, i.idx) for i in same}) == 1  # one reservation, whoever asked first


# ---- webhook deliveries -----------------------------------------------------------------------------------
def test_deliveries_are_added_once_and_come_due_in_order(store):
    _session(store)
    for jid in ("j1", "j2", "j3"):
        _job(store, jid, state="succeeded", params={"steps": 3, "webhook_url": "https://hooks.example/x"})
    _job(store, "plain", state="succeeded")  # no webhook_url
    _job(store, "waiting", params={"webhook_url": "https://hooks.example/x"})  # not ended
    assert [j.id for j in store.jobs_awaiting_delivery()] == ["j1", "j2", "j3"]
    assert store.next_delivery_at() is None and store.due_deliveries("2027-01-01T00:00:00Z") == []
    assert store.add_delivery(_delivery("j1", "2026-01-01T00:00:05Z")) is True
    assert store.add_delivery(_delivery("j1", "2026-01-01T00:00:01Z")) is False  # one per job: the first stays
    assert store.get_delivery("j1") == _delivery("j1", "2026-01-01T00:00:05Z")
    assert store.get_delivery("j2") is None
    assert store.add_delivery(_delivery("j2", "2026-01-01T00:00:03Z"))
    assert [j.id for j in store.jobs_awaiting_delivery()] == ["j3"]
    assert store.next_delivery_at() == "2026-01-01T00:00:03Z"
    assert [d.job_id for d in store.due_deliveries("2026-01-01T00:00:04Z")] == ["j2"]
    assert [d.job_id for d in store.due_deliveries("2026-01-01T00:00:09Z")] == ["j2", "j1"]
    assert [d.job_id for d in store.due_deliveries("2026-01-01T00:00:09Z", limit=1)] == ["j2"]
    store.update_delivery("j2", state="delivered", attempts=1, delivered_at="2026-01-01T00:00:04Z", last_error=None)
    got = store.get_delivery("j2")
    assert (got.state, got.attempts, got.delivered_at) == ("delivered", 1, "2026-01-01T00:00:04Z")
    store.update_delivery("j1", attempts=2, next_try_at="2026-01-01T00:01:00Z", last_error="HTTP 500")
    assert store.get_delivery("j1").last_error == "HTTP 500" and store.get_delivery("j1").attempts == 2
    assert store.next_delivery_at() == "2026-01-01T00:01:00Z"
    assert store.due_deliveries("2026-01-01T00:00:59Z") == []
    store.update_delivery("j1")  # nothing to change


# ---- migrations and life cycle ----------------------------------------------------------------------------
def test_a_fresh_store_is_migrated_and_reopening_is_a_no_op(backend):
    store = backend.open()
    assert store.schema_version == backend.version
    _session(store)
    _job(store, "j1")
    store.close()
    again = backend.open()  # a second open (another process, a restart) finds nothing to do
    assert again.schema_version == backend.version
    assert again.get_session("s1").loras == [{"name": "l", "weight": 0.5}] and again.get_job("j1").count == 2
    assert backend.open().schema_version == backend.version  # two open at once


def test_stores_opened_at_once_migrate_the_database_once(backend):
    # several processes starting together: the migrations run in one transaction under a lock
    stores: list[Any] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(backend.open())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(stores) == 6
    assert {s.schema_version for s in stores} == {backend.version}
    _session(stores[0])
    assert all(s.get_session("s1") is not None for s in stores)


def test_a_newer_schema_refuses_to_start_naming_both_versions(backend):
    backend.open().close()
    newer = backend.version + 7
    backend.execute(f"INSERT INTO schema_version (version) VALUES ({newer})")
    with pytest.raises(RuntimeError, match=rf"schema version {newer} is newer than this multigen knows "
                                           rf"\({backend.version}\); upgrade multigen"):
        backend.open()


def test_close_releases_connections_and_reads_reopen_them(store):
    _session(store)
    store.close()
    assert store.get_session("s1") is not None  # as after ServiceThread.stop(): reads still work
    store.close()
    store.close()  # twice is fine


@pytest.mark.slow
# ---- end to end -------------------------------------------------------------------------------------------
def test_a_service_on_postgresql_runs_jobs_and_a_restart_resumes_one(tmp_path, postgres_url):  # noqa: F811
    """A ServiceThread on fake pipes with ``store: postgresql://...``: a job runs to success; a job stopped
    mid-way is queued again in the database, and a new service on the same database finishes it; so does
    a job queued before a restart that never ran."""
    from helpers_service import REC, fake_service, open_fake_session

    from multigen.service.pgstore import PostgresStore

    with fresh_schema_url(postgres_url) as url:
        with fake_service(tmp_path, store=url) as svc:
            assert isinstance(svc.store, PostgresStore)
            assert not (svc.config.data_dir / "multigen.sqlite3").exists()
            sid = open_fake_session(svc)
            first = svc.queue_gen(sid, prompt="x", count=2, seeds=[1, 2**64 - 1], steps=2)
            assert svc.wait_idle(10)
            assert svc.get_job(first["job_id"])["state"] == "succeeded"
            REC.hold = (12, 2)  # the second image holds after its step 2 until stop() says stop
            out = svc.queue_gen(sid, prompt="y", count=3, seeds=[11, 12, 13], steps=4)
            assert REC.holding.wait(10)
            svc.stop()
            job = svc.get_job(out["job_id"])
            assert job["state"] == "queued" and job["done"] == 1
        with fake_service(tmp_path, store=url) as svc:
            assert svc.wait_idle(10)
            assert svc.get_job(out["job_id"])["state"] == "succeeded"
            assert [g["seed"] for g in REC.gens] == [12, 13]  # the written image is not made again
            images = svc.store.list_images(session_id=sid)
            assert [(i.idx, i.seed) for i in images] == [(0, 1), (1, 2**64 - 1), (2, 11), (3, 12), (4, 13)]
            assert all(Path(i.path).is_file() for i in images)
        with fake_service(tmp_path, start=False, store=url) as svc:  # no workers: the job stays queued
            queued = svc.queue_gen(sid, prompt="z", count=1, seeds=[21], steps=2)
        with fake_service(tmp_path, store=url) as svc:
            assert svc.wait_idle(10)
            assert svc.get_job(queued["job_id"])["state"] == "succeeded" and [g["seed"] for g in REC.gens] == [21]
            assert svc.store.image_count(sid) == 6


# ---- selection: config.yaml's `store`, MULTIGEN_STORE -----------------------------------------------------
def test_the_store_is_sqlite_by_default_and_a_postgresql_url_when_configured(tmp_path, monkeypatch):
    from helpers_service import fake_config

    from multigen.service.stores import open_store

    monkeypatch.delenv("MULTIGEN_STORE", raising=False)
    default = fake_config(tmp_path)
    assert default.store is None
    store = open_store(default)
    assert isinstance(store, SQLiteStore) and store.path == default.data_dir / "multigen.sqlite3"
    store.close()
    url = "postgresql://multigen:secret@db.example:5432/multigen"
    assert fake_config(tmp_path, store=url).store == url
    assert fake_config(tmp_path, store="sqlite").store is None
    monkeypatch.setenv("MULTIGEN_STORE", "postgres://other@db.example/x")  # the environment wins
    assert fake_config(tmp_path, store=url).store == "postgres://other@db.example/x"
    monkeypatch.setenv("MULTIGEN_STORE", "sqlite")
    assert fake_config(tmp_path, store=url).store is None


@pytest.mark.parametrize("key,value", [("store", "mysql://u:secret@h/db"), ("store", 5),
                                       ("MULTIGEN_STORE", "sqlite:///x:secret@y")])
def test_a_store_that_is_not_a_postgresql_url_is_a_config_error_naming_the_key(tmp_path, monkeypatch, key, value):
    from helpers_service import fake_config

    from multigen.service.errors import ConfigError

    monkeypatch.delenv("MULTIGEN_STORE", raising=False)
    if key == "MULTIGEN_STORE":
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as e:
        fake_config(tmp_path, **({"store": value} if key == "store" else {}))
    assert key in str(e.value) and "secret" not in str(e.value) and "postgresql://" in str(e.value)


def test_an_unreachable_postgresql_is_a_clear_error_without_the_password():
    from multigen.service.pgstore import PostgresStore, StoreUnavailable

    with pytest.raises(StoreUnavailable) as e:
        PostgresStore("postgresql://multigen:secret@127.0.0.1:1/multigen")
    assert "postgresql://multigen@127.0.0.1:1/multigen" in str(e.value) and "secret" not in str(e.value)


@pytest.mark.slow
def test_the_cluster_script_starts_a_cluster_as_a_user_and_removes_it(postgres_url):  # noqa: F811
    """scripts/_postgres.sh (what scripts/test sources): a cluster on a free port, gone after ``stop``."""
    import psycopg

    out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    url, folder = out.stdout.split()
    try:
        with psycopg.connect(url) as conn:
            data = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
        assert data.startswith(folder) and os.stat(data).st_uid != 0  # postgres refuses to run as root
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=60)
    assert not Path(folder).exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
