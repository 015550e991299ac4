"""The SQLite store's own behaviour: WAL, its migration history, connections per thread.

The Store contract both stores keep (sessions, jobs, images, seeds, deliveries, migrations) is
tests/test_store_contract.py, one suite over SQLite and PostgreSQL."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from multigen.service.records import JobRecord, SessionRecord
from multigen.service.store import SCHEMA_VERSION, SQLiteStore


def _session(store: SQLiteStore, sid: str = "s1", user: str = "alice") -> None:
    store.create_session(SessionRecord(id=sid, user=user, project="p", pipe="prompt2image", model="m",
                                       loras=[{"name": "l", "weight": 0.5}], state="open", folder=f"/out/{sid}",
                                       created_at="2026-01-01T00:00:00Z"))


def _job(store: SQLiteStore, jid: str, sid: str = "s1", count: int = 2) -> JobRecord:
    return store.create_job(JobRecord(id=jid, session_id=sid, user="alice", model="m", state="queued", priority=0,
                                      count=count, seeds=list(range(count)), prompt=["a", ["b", "c"]],
                                      negative_prompt=None, params={"steps": 3}, created_at="2026-01-01T00:00:00Z"))


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
