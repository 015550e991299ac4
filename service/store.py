"""Persistent state: sessions, jobs (every parameter and seed) and images.

:class:`Store` is the small interface the service uses, in typed records
(:mod:`multigen.service.records`); :class:`SQLiteStore` is the embedded implementation (one file in the data folder, WAL mode, one connection per
thread), so a server database can replace it when a lab outgrows one machine. The
schema is versioned (``schema_version``); :data:`MIGRATIONS` lists the steps, and opening
a store applies the ones it has not seen yet.

Image rows are *reserved* (state ``writing``) before their files are written and marked
``done`` after: the reservation fixes the session index of a job's n-th image, so a job
resumed after a crash writes that image under the same index again, never a second one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Protocol

from .claims import HEADS_SQL, Head, LeaseLost, WorkerRecord, choose, iso, utc_now, worker_record
from .records import DeliveryRecord, ImageRecord, JobRecord, NewImage, SessionRecord
from .scheduling import DEFAULT_MAX_AFFINITY_SKIPS, QueuedJob
from .sqlite_schema import MIGRATIONS, SCHEMA_VERSION  # noqa: F401 (importable from here too)
from .storerows import R, decode_row, encode_fields, new_image_columns, record_columns, signed_seed

log = logging.getLogger(__name__)

# the JSON columns, seeds as two's complement, rows <-> records: storerows.py (shared with pgstore.py)


def _close_all(conns: Iterable[sqlite3.Connection]) -> None:
    for c in conns:
        try:
            c.close()
        except sqlite3.Error:  # pragma: no cover
            pass


class Store(Protocol):
    """What the service needs from persistent storage (see :class:`SQLiteStore`).

    Reads return typed records (:mod:`multigen.service.records`); ``update_*`` take column
    names of :data:`MIGRATIONS` as keywords (JSON columns as Python values).
    """

    def create_session(self, session: SessionRecord) -> None: ...
    def get_session(self, session_id: str) -> SessionRecord | None: ...
    def list_sessions(self, user: str | None = None, project: str | None = None,
                      state: str | None = None) -> list[SessionRecord]: ...
    def update_session(self, session_id: str, **fields: Any) -> None: ...
    def count_sessions(self, user: str, state: str) -> int: ...
    def create_job(self, job: JobRecord) -> JobRecord: ...
    def get_job(self, job_id: str) -> JobRecord | None: ...
    def update_job(self, job_id: str, **fields: Any) -> None: ...
    def list_jobs(self, session_id: str | None = None, states: Iterable[str] | None = None) -> list[JobRecord]: ...
    def job_counts(self, session_id: str | None = None) -> dict[str, int]: ...
    def update_job_if(self, job_id: str, expect: str, **fields: Any) -> bool: ...
    def request_stop(self, job_id: str, skip: bool = False) -> bool: ...
    def set_preview(self, job_id: str, data: bytes | None) -> None: ...
    def get_preview(self, job_id: str) -> bytes | None: ...
    def queue_snapshot(self) -> tuple[list[QueuedJob], dict[str, int]]: ...
    def reserve_image(self, image: NewImage, worker: str | None = None) -> ImageRecord: ...
    def complete_image(self, image_id: str, created_at: str, worker: str | None = None,
                       publish: Callable[[], Any] | None = None) -> None: ...
    def get_image(self, image_id: str) -> ImageRecord | None: ...
    def list_images(self, session_id: str | None = None, job_id: str | None = None,
                    after: int | None = None, state: str | None = "done") -> list[ImageRecord]: ...
    def image_count(self, session_id: str) -> int: ...
    def image_by_index(self, session_id: str, index: int) -> ImageRecord | None: ...
    def add_delivery(self, delivery: DeliveryRecord) -> bool: ...
    def get_delivery(self, job_id: str) -> DeliveryRecord | None: ...
    def update_delivery(self, job_id: str, **fields: Any) -> None: ...
    def due_deliveries(self, now: str, limit: int = 20) -> list[DeliveryRecord]: ...
    def claim_delivery(self, job_id: str, seen: str | None, until: str) -> bool: ...
    def next_delivery_at(self) -> str | None: ...
    def jobs_awaiting_delivery(self) -> list[JobRecord]: ...
    # claiming jobs under a lease, across processes and hosts (claims.py)
    def claim_job(self, worker: str, held_models: Collection[str], lease_seconds: float,
                  max_affinity_skips: int = DEFAULT_MAX_AFFINITY_SKIPS) -> JobRecord | None: ...
    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool: ...
    def release_job(self, job_id: str, worker: str, state: str = "queued", **fields: Any) -> bool: ...
    def expire_leases(self, now: dt.datetime | None = None) -> list[str]: ...
    def heartbeat(self, worker: str, host: str, device: str, models: Collection[str]) -> None: ...
    def list_workers(self) -> list[WorkerRecord]: ...
    def close(self) -> None: ...


class SQLiteStore(Store):
    """The embedded store: SQLite in WAL mode, one connection per thread.

    Args:
        path: the database file (its folder is created).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []  # every connection and its thread
        self._lock = threading.Lock()
        self._migrate()

    # -- connections ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL: safe against a killed process
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                # a finished thread's connection would stay open (a file handle and WAL locks) until
                # close(): close those now, as every new thread (a restarted worker, a request) comes
                dead = [c for t, c in self._all if not t.is_alive()]
                self._all = [(t, c) for t, c in self._all if t.is_alive()]
                self._all.append((threading.current_thread(), conn))
            _close_all(dead)
        return conn

    def _write(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self._conn().execute(sql, tuple(args))

    def _one(self, record: type[R], sql: str, args: Iterable[Any] = ()) -> R | None:
        return decode_row(self._conn().execute(sql, tuple(args)).fetchone(), record)

    def _all_rows(self, record: type[R], sql: str, args: Iterable[Any] = ()) -> list[R]:
        return [decode_row(r, record) for r in self._conn().execute(sql, tuple(args)).fetchall()]  # type: ignore[misc]

    def _migrate(self) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {current} is newer than this "
                                   f"multigen knows ({SCHEMA_VERSION}); upgrade multigen")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[version - 1].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                log.info("store %s: schema migrated to version %d", self.path, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        return int(self._conn().execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            conns, self._all = [c for _, c in self._all], []
        _close_all(conns)
        self._local = threading.local()

    # -- sessions ---------------------------------------------------------------------
    def create_session(self, session: SessionRecord) -> None:
        f = record_columns(session)
        self._write(f"INSERT INTO sessions ({', '.join(f)}) VALUES ({', '.join('?' * len(f))})", f.values())

    def get_session(self, session_id: str) -> SessionRecord | None:
        return self._one(SessionRecord, "SELECT * FROM sessions WHERE id = ?", (session_id,))

    def list_sessions(self, user: str | None = None, project: str | None = None,
                      state: str | None = None) -> list[SessionRecord]:
        where, args = self._where(user=user, project=project, state=state)
        return self._all_rows(SessionRecord, f"SELECT * FROM sessions{where} ORDER BY created_at, rowid", args)

    def update_session(self, session_id: str, **fields: Any) -> None:
        self._update("sessions", session_id, fields)

    def count_sessions(self, user: str, state: str) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM sessions WHERE user = ? AND state = ?",
                                        (user, state)).fetchone()[0])

    # -- jobs -------------------------------------------------------------------------
    def create_job(self, job: JobRecord) -> JobRecord:
        """Store a new job; returns it with its arrival order (``seq``)."""
        f = record_columns(job)
        cur = self._write(f"INSERT INTO jobs ({', '.join(f)}) VALUES ({', '.join('?' * len(f))})", f.values())
        return dataclasses.replace(job, seq=int(cur.lastrowid or 0))

    def get_job(self, job_id: str) -> JobRecord | None:
        return self._one(JobRecord, "SELECT * FROM jobs WHERE id = ?", (job_id,))

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update("jobs", job_id, fields)

    def list_jobs(self, session_id: str | None = None, states: Iterable[str] | None = None) -> list[JobRecord]:
        where, args = self._where(session_id=session_id)
        if states is not None:
            states = [str(s) for s in states]
            where += (" AND " if where else " WHERE ") + f"state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        return self._all_rows(JobRecord, f"SELECT * FROM jobs{where} ORDER BY seq", args)

    def job_counts(self, session_id: str | None = None) -> dict[str, int]:
        """Jobs by state, of one session or (None) of every session."""
        where, args = self._where(session_id=session_id)
        rows = self._conn().execute(f"SELECT state, COUNT(*) FROM jobs{where} GROUP BY state", args).fetchall()
        return {r[0]: r[1] for r in rows}

    def update_job_if(self, job_id: str, expect: str, **fields: Any) -> bool:
        """update_job, only while the job is in state ``expect`` (compare and set); False (nothing changed) if not."""
        f = encode_fields(fields)
        return self._write(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in f)} WHERE id = ? AND state = ?",
                           [*f.values(), job_id, str(expect)]).rowcount == 1

    def request_stop(self, job_id: str, skip: bool = False) -> bool:
        """Ask whoever runs the job to cancel it (or skip its image being made); False when it is not running."""
        change = "skip_requests = skip_requests + 1" if skip else "cancel_requested = 1"
        return self._write(f"UPDATE jobs SET {change} WHERE id = ? AND state = 'running'", (job_id,)).rowcount == 1

    def set_preview(self, job_id: str, data: bytes | None) -> None:
        """Keep the latest preview of a running job (JPEG bytes); None deletes it."""
        if data is None:
            self._write("DELETE FROM job_previews WHERE job_id = ?", (job_id,))
        else:
            self._write("INSERT INTO job_previews (job_id, data, at) VALUES (?, ?, ?) ON CONFLICT (job_id) DO "
                        "UPDATE SET data = excluded.data, at = excluded.at", (job_id, data, iso(utc_now())))

    def get_preview(self, job_id: str) -> bytes | None:
        row = self._conn().execute("SELECT data FROM job_previews WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row else None

    def queue_snapshot(self) -> tuple[list[QueuedJob], dict[str, int]]:
        """The queued jobs (in arrival order) and the users' turns (``user_turns.served``): what a FairQueue
        mirror of the shared queue is built from (scheduling.py)."""
        conn = self._conn()
        jobs = [QueuedJob(*r) for r in conn.execute("SELECT id, user, model, priority, seq FROM jobs WHERE "
                                                    "state = 'queued' ORDER BY seq")]
        return jobs, dict(conn.execute("SELECT user, served FROM user_turns").fetchall())

    # -- images -----------------------------------------------------------------------
    def reserve_image(self, image: NewImage, worker: str | None = None) -> ImageRecord:
        """Reserve the next session index for a job's image ``pos``, or return the existing reservation.

        The file is ``image.folder/{index:05d}.png``. Idempotent per ``(job_id, pos)``: a job
        resumed after a crash writes its n-th image under the same index again. With ``worker``, only
        while that worker holds the job's lease (else :class:`~multigen.service.claims.LeaseLost`).
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_lease(conn, image.job_id, worker)
            row = conn.execute("SELECT * FROM images WHERE job_id = ? AND pos = ?",
                               (image.job_id, image.pos)).fetchone()
            if row is None:
                index = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM images WHERE session_id = ?",
                                     (image.session_id,)).fetchone()[0]
                fields = new_image_columns(image, index, signed_seed(image.seed))
                conn.execute(f"INSERT INTO images ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                             tuple(fields.values()))
                row = conn.execute("SELECT * FROM images WHERE id = ?", (image.id,)).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return decode_row(row, ImageRecord)  # type: ignore[return-value]

    def complete_image(self, image_id: str, created_at: str, worker: str | None = None,
                       publish: Callable[[], Any] | None = None) -> None:
        """Mark a reserved image ``done``; with ``worker``, only while it holds the job's lease (else LeaseLost).
        ``publish()`` (the files' last rename) runs in the same transaction, after the lease check: a worker
        whose lease was lost never puts a file in place."""
        if worker is None and publish is None:
            self._write("UPDATE images SET state = 'done', created_at = ? WHERE id = ?", (created_at, image_id))
            return
        with self._immediate() as conn:
            row = conn.execute("SELECT job_id FROM images WHERE id = ?", (image_id,)).fetchone()
            self._check_lease(conn, row[0] if row else "", worker)
            if publish is not None:
                publish()
            conn.execute("UPDATE images SET state = 'done', created_at = ? WHERE id = ?", (created_at, image_id))

    def get_image(self, image_id: str) -> ImageRecord | None:
        return self._one(ImageRecord, "SELECT * FROM images WHERE id = ? AND state = 'done'", (image_id,))

    def list_images(self, session_id: str | None = None, job_id: str | None = None,
                    after: int | None = None, state: str | None = "done") -> list[ImageRecord]:
        where, args = self._where(session_id=session_id, job_id=job_id, state=state)
        if after is not None:
            where += (" AND " if where else " WHERE ") + "idx > ?"
            args.append(after)
        return self._all_rows(ImageRecord, f"SELECT * FROM images{where} ORDER BY session_id, idx", args)

    def image_count(self, session_id: str) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM images WHERE session_id = ? AND state = 'done'",
                                        (session_id,)).fetchone()[0])

    def image_by_index(self, session_id: str, index: int) -> ImageRecord | None:
        return self._one(ImageRecord, "SELECT * FROM images WHERE session_id = ? AND idx = ? AND state = 'done'",
                         (session_id, index))

    # -- webhook deliveries (webhooks.py) ----------------------------------------------
    def add_delivery(self, delivery: DeliveryRecord) -> bool:
        """Queue a job's delivery unless it has one; True when added now (idempotent per job)."""
        f = dataclasses.asdict(delivery)
        cur = self._write(f"INSERT INTO webhook_deliveries ({', '.join(f)}) VALUES ({', '.join('?' * len(f))}) "
                          "ON CONFLICT (job_id) DO NOTHING", f.values())
        return cur.rowcount == 1

    def get_delivery(self, job_id: str) -> DeliveryRecord | None:
        return self._one(DeliveryRecord, "SELECT * FROM webhook_deliveries WHERE job_id = ?", (job_id,))

    def update_delivery(self, job_id: str, **fields: Any) -> None:
        if fields:
            self._write(f"UPDATE webhook_deliveries SET {', '.join(f'{k} = ?' for k in fields)} WHERE job_id = ?",
                        [*fields.values(), job_id])

    def due_deliveries(self, now: str, limit: int = 20) -> list[DeliveryRecord]:
        """Pending deliveries whose next try is due at ``now`` (ISO text), the longest waiting first."""
        return self._all_rows(DeliveryRecord, "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND "
                              "next_try_at <= ? ORDER BY next_try_at LIMIT ?", (now, limit))

    def claim_delivery(self, job_id: str, seen: str | None, until: str) -> bool:
        """Take a due delivery for one attempt: its next try moves to ``until`` (when another process may try it,
        should this one die mid-attempt) only if it is still ``seen``; False: another process took it."""
        return self._write("UPDATE webhook_deliveries SET next_try_at = ? WHERE job_id = ? AND state = 'pending' "
                           "AND next_try_at = ?", (until, job_id, seen)).rowcount == 1

    def next_delivery_at(self) -> str | None:
        return self._conn().execute("SELECT MIN(next_try_at) FROM webhook_deliveries "
                                    "WHERE state = 'pending'").fetchone()[0]

    def jobs_awaiting_delivery(self) -> list[JobRecord]:
        """Ended jobs with a ``webhook_url`` and no delivery (their end was stored, the delivery not yet)."""
        return self._all_rows(JobRecord, "SELECT * FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
                              "AND params LIKE '%\"webhook_url\"%' AND id NOT IN "
                              "(SELECT job_id FROM webhook_deliveries) ORDER BY seq")

    # -- claiming jobs under a lease (claims.py) -----------------------------------------
    def claim_job(self, worker: str, held_models: Collection[str], lease_seconds: float,
                  max_affinity_skips: int = DEFAULT_MAX_AFFINITY_SKIPS) -> JobRecord | None:
        """The next queued job by the fair rule (claims.py), now ``running`` under ``worker``'s lease of
        ``lease_seconds``; None when nothing is queued. One ``BEGIN IMMEDIATE`` transaction (one host)."""
        with self._immediate() as conn:
            heads = [Head(*r) for r in conn.execute(HEADS_SQL.format(skip_q="", skip_k="")).fetchall()]
            picked = choose(heads, set(held_models), max_affinity_skips)
            if picked is None:
                return None
            head, passed = picked
            now = utc_now()
            conn.execute("UPDATE jobs SET state = 'running', worker = ?, lease_until = ?, claimed_at = ?, "
                         "started_at = ? WHERE id = ?", (worker, iso(now + dt.timedelta(seconds=lease_seconds)),
                                                         iso(now), now.strftime("%Y-%m-%dT%H:%M:%SZ"), head.id))
            tick = conn.execute("SELECT COALESCE(MAX(served), 0) + 1 FROM user_turns").fetchone()[0]
            conn.execute("INSERT INTO user_turns (user, served, skips) VALUES (?, ?, 0) ON CONFLICT (user) "
                         "DO UPDATE SET served = excluded.served, skips = 0", (head.user, tick))
            for user in passed:
                conn.execute("INSERT INTO user_turns (user, served, skips) VALUES (?, 0, 1) ON CONFLICT (user) "
                             "DO UPDATE SET skips = skips + 1", (user,))
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (head.id,)).fetchone()
        return decode_row(row, JobRecord)

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend ``worker``'s lease on a running job; False when it lost it (expired and requeued, released)."""
        until = iso(utc_now() + dt.timedelta(seconds=lease_seconds))
        return self._write("UPDATE jobs SET lease_until = ? WHERE id = ? AND worker = ? AND state = 'running'",
                           (until, job_id, worker)).rowcount == 1

    def release_job(self, job_id: str, worker: str, state: str = "queued", **fields: Any) -> bool:
        """End ``worker``'s lease: the job goes to ``state`` (with ``fields``, as for update_job); False, and
        nothing changed, when the worker no longer holds it."""
        f = encode_fields({**fields, "state": str(state), "worker": None, "lease_until": None})
        return self._write(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in f)} WHERE id = ? AND worker = ? AND "
                           "state = 'running'", [*f.values(), job_id, worker]).rowcount == 1

    def expire_leases(self, now: dt.datetime | None = None) -> list[str]:
        """Running jobs whose lease ended before ``now`` (default: this clock) back to ``queued`` (seq,
        seeds and reserved images kept); returns their ids. Jobs run without a lease are left alone."""
        with self._immediate() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'running' AND lease_until < ? "
                                              "ORDER BY seq", (iso(now or utc_now()),)).fetchall()]
            conn.executemany("UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL WHERE id = ?",
                             [(i,) for i in ids])
        return ids

    def heartbeat(self, worker: str, host: str, device: str, models: Collection[str]) -> None:
        """Record that ``worker`` (on ``host``'s ``device``, holding ``models``) is alive now."""
        now = iso(utc_now())
        self._write("INSERT INTO workers (id, host, device, models, started_at, heartbeat_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET host = excluded.host, device = excluded.device, "
                    "models = excluded.models, heartbeat_at = excluded.heartbeat_at",
                    (worker, host, device, json.dumps(sorted(models)), now, now))

    def list_workers(self) -> list[WorkerRecord]:
        """Every worker that sent a heartbeat, by host and device."""
        return [worker_record(r) for r in self._conn().execute("SELECT * FROM workers ORDER BY host, device, id")]

    @staticmethod
    def _check_lease(conn: sqlite3.Connection, job_id: str, worker: str | None) -> None:
        if worker is not None and conn.execute("SELECT 1 FROM jobs WHERE id = ? AND worker = ? AND state = 'running'",
                                               (job_id, worker)).fetchone() is None:
            raise LeaseLost(f"worker {worker} no longer holds the lease on job {job_id}")

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """``with self._immediate() as conn``: one ``BEGIN IMMEDIATE`` transaction (rolled back on an error)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _where(**filters: Any) -> tuple[str, list[Any]]:
        parts = [(k, v) for k, v in filters.items() if v is not None]
        if not parts:
            return "", []
        return " WHERE " + " AND ".join(f"{k} = ?" for k, _ in parts), [str(v) for _, v in parts]

    def _update(self, table: str, row_id: str, fields: dict[str, Any]) -> None:
        if not fields:
            return
        f = encode_fields(fields)
        self._write(f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in f)} WHERE id = ?", [*f.values(), row_id])
