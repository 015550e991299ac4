"""The SQLite store: schema versioning, WAL, rows, image reservations, threads."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from multigen.service.records import ImageRecord, JobRecord, NewImage, SessionRecord
from multigen.service.store import SCHEMA_VERSION, SQLiteStore


def _session(store: SQLiteStore, sid: str = "s1", user: str = "alice") -> None:
    store.create_session(SessionRecord(id=sid, user=user, project="p", pipe="prompt2image", model="m",
                                       loras=[{"name": "l", "weight": 0.5}], state="open", folder=f"/out/{sid}",
                                       created_at="2026-01-01T00:00:00Z"))


def _job(store: SQLiteStore, jid: str, sid: str = "s1", count: int = 2) -> JobRecord:
    return store.create_job(JobRecord(id=jid, session_id=sid, user="alice", model="m", state="queued", priority=0,
                                      count=count, seeds=list(range(count)), prompt=["a", ["b", "c"]],
                                      negative_prompt=None, params={"steps": 3}, created_at="2026-01-01T00:00:00Z"))


def _reserve(store: SQLiteStore, jid: str, pos: int, sid: str = "s1", iid: str | None = None) -> ImageRecord:
    return store.reserve_image(NewImage(id=iid or f"{jid}-{pos}", session_id=sid, job_id=jid, pos=pos, seed=pos,
                                        width=8, height=8, folder=f"/out/{sid}"))


def test_schema_is_versioned_and_reopening_keeps_data(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    assert store.schema_version == SCHEMA_VERSION
    _session(store)
    store.close()
    again = SQLiteStore(tmp_path / "db.sqlite3")
    assert again.schema_version == SCHEMA_VERSION
    assert again.get_session("s1").loras == [{"name": "l", "weight": 0.5}]
    mode = sqlite3.connect(tmp_path / "db.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    rows = sqlite3.connect(tmp_path / "db.sqlite3").execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_newer_schema_is_refused(tmp_path):
    SQLiteStore(tmp_path / "db.sqlite3").close()
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteStore(tmp_path / "db.sqlite3")


def test_jobs_keep_every_parameter_and_seed(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    _session(store)
    _job(store, "j1", count=3)
    job = store.get_job("j1")
    assert job.seeds == [0, 1, 2] and job.prompt == ["a", ["b", "c"]] and job.params == {"steps": 3}
    store.update_job("j1", state="failed", error={"type": "X", "message": "m"})
    assert store.get_job("j1").error == {"type": "X", "message": "m"}
    assert store.job_counts("s1") == {"failed": 1}
    assert [j.id for j in store.list_jobs(states=["failed"])] == ["j1"]
    assert store.list_jobs(states=["queued"]) == []


def test_image_reservations_are_idempotent_and_indices_grow(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    _session(store)
    _job(store, "j1")
    _job(store, "j2")
    a = _reserve(store, "j1", 0)
    b = _reserve(store, "j2", 0)
    again = _reserve(store, "j1", 0, iid="other-id")  # a resumed job asks again: same row, same index
    assert (a.idx, b.idx, again.idx) == (0, 1, 0)
    assert again.id == a.id and a.path == "/out/s1/00000.png"
    assert store.image_count("s1") == 0  # reserved, not written yet
    store.complete_image(a.id, "t")
    assert store.image_count("s1") == 1
    assert [i.idx for i in store.list_images(session_id="s1")] == [0]
    assert [i.idx for i in store.list_images(session_id="s1", state="writing")] == [1]
    assert store.image_by_index("s1", 0).id == a.id
    assert store.get_image(b.id) is None  # not done
    store.complete_image(b.id, "t")
    assert [i.idx for i in store.list_images(session_id="s1", after=0)] == [1]


def test_concurrent_reservations_from_threads_get_distinct_indices(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    _session(store)
    for t in range(4):
        _job(store, f"j{t}", count=10)
    errors = []

    def worker(t: int) -> None:
        try:
            for pos in range(10):
                _reserve(store, f"j{t}", pos)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    idx = sorted(i.idx for i in store.list_images(session_id="s1", state=None))
    assert idx == list(range(40))


def test_session_filters_and_counts(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    _session(store, "s1", "alice")
    _session(store, "s2", "bob")
    store.update_session("s2", state="closed")
    assert [s.id for s in store.list_sessions(user="alice")] == ["s1"]
    assert [s.id for s in store.list_sessions(state="closed")] == ["s2"]
    assert store.count_sessions("alice", "open") == 1 and store.count_sessions("bob", "open") == 0


def _open_db_fds(path) -> int:
    import os

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_connections_of_finished_threads_are_closed(tmp_path):
    # every thread gets its own connection; one per thread that ever touched the store would leak a
    # file handle per restarted worker or short-lived request thread
    path = tmp_path / "db.sqlite3"
    store = SQLiteStore(path)
    _session(store)
    for _ in range(10):
        t = threading.Thread(target=store.get_session, args=("s1",))
        t.start()
        t.join()
    assert store.get_session("s1") is not None
    # this thread's, the last finished one's, and one descriptor SQLite keeps back for reuse (it defers
    # closing a file's descriptor while other connections of the process hold locks on it); before the
    # fix: one per thread that ever ran (11)
    assert _open_db_fds(path) <= 3
    store.close()
    assert _open_db_fds(path) == 0


def test_service_stop_closes_its_store(tmp_path):
    from helpers_service import FakeService, fake_config

    svc = FakeService(fake_config(tmp_path))
    svc.start()
    path = svc.store.path
    svc.open_session("alice", "p", "prompt2image", "m1")
    svc.stop(timeout=10)
    assert _open_db_fds(path) == 0
    assert svc.list_sessions()  # still readable after stop: connections reopen on demand
    svc.store.close()


def test_negative_prompts_are_grammars_too_and_old_rows_migrate(tmp_path):
    import multigen.service.store as store_mod

    # a version-2 store with a plain-text negative prompt, as stored before migration 3
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, script in enumerate(store_mod.MIGRATIONS[:2], start=1):
        conn.executescript(script)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute("INSERT INTO sessions VALUES ('s1','alice','p','prompt2image','m','[]','open','/o','t',NULL)")
    conn.execute("INSERT INTO jobs (id, session_id, user, model, state, count, seeds, prompt, negative_prompt, "
                 "params, created_at) VALUES ('old','s1','alice','m','queued',1,'[1]','\"a\"','blurry','{}','t')")
    conn.commit()
    conn.close()
    store = SQLiteStore(tmp_path / "db.sqlite3")
    assert store.schema_version == SCHEMA_VERSION
    assert store.get_job("old").negative_prompt == "blurry"
    _job(store, "new")
    store.update_job("new", negative_prompt=["ugly", ["blurry", "dark"]])
    assert store.get_job("new").negative_prompt == ["ugly", ["blurry", "dark"]]


def test_records_are_typed_and_create_job_gives_the_arrival_order(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    _session(store)
    first, second = _job(store, "j1"), _job(store, "j2")
    assert isinstance(store.get_session("s1"), SessionRecord) and store.get_session("s1").is_open
    assert isinstance(store.get_job("j1"), JobRecord) and 0 < first.seq < second.seq
    assert store.get_job("j2").seq == second.seq
    image = _reserve(store, "j1", 0)
    assert isinstance(image, ImageRecord) and image.state == "writing" and image.seed == 0
    big = store.reserve_image(NewImage(id="big", session_id="s1", job_id="j1", pos=1, seed=2**64 - 1, width=8,
                                       height=8, folder="/out/s1"))
    assert big.seed == 2**64 - 1  # SQLite's signed integers hold it as its two's complement
