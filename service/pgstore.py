"""The PostgreSQL store: the :class:`~multigen.service.store.Store` interface on a server database.

Selected by ``store: postgresql://...`` in config.yaml or the ``MULTIGEN_STORE`` environment
variable (:func:`multigen.service.stores.open_store`); several service processes, on several
hosts, may share one database (docs/deploy.md). The driver is psycopg 3 with a
``psycopg_pool.ConnectionPool``; each call takes a connection for one statement or one
transaction (autocommit otherwise).

The schema is versioned like the SQLite one's (``schema_version``) but with migrations of its own
(:data:`PG_MIGRATIONS`; version 1 is the SQLite schema's version 5, version 2 its version 6: claims, 3 its 7). Opening a store applies the
missing ones in one transaction under an advisory lock, so processes that start together migrate
once; a database whose version is newer than this code's refuses to open.

Types: the JSON columns (:data:`~multigen.service.storerows.JSON_COLUMNS`) are ``json`` (the text
kept as written, so dicts keep their key order); times are ISO 8601 text as in SQLite (the ordering
of ``next_try_at`` is the text's); ``images.seed`` is ``NUMERIC(20)``, the unsigned seed itself (0 to
2**64-1; SQLite stores the two's complement); the lease times (``jobs.lease_until``, ``claimed_at``, the
``workers`` table's) are ``TIMESTAMPTZ`` on the database's clock. ``user`` is a reserved word in PostgreSQL:
it is quoted.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import re
import threading
import time
from typing import Any, Callable, Collection, Iterable

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool

from .claims import HEADS_SQL, Head, LeaseLost, WorkerRecord, choose, worker_record
from .errors import MultigenError
from .pg_schema import PG_MIGRATIONS, PG_SCHEMA_VERSION  # noqa: F401 (importable from here too)
from .records import DeliveryRecord, ImageRecord, JobRecord, NewImage, SessionRecord
from .scheduling import DEFAULT_MAX_AFFINITY_SKIPS, QueuedJob
from .store import Store
from .storerows import R, decode_row, encode_fields, new_image_columns, record_columns

log = logging.getLogger(__name__)

#: the advisory lock the migrations run under (one key for every multigen database of a server)
MIGRATION_LOCK = 0x6D756C7469676E  # "multign"
#: the advisory lock around the fair queue's turn state: claims decide one at a time (claim_job)
CLAIM_LOCK = 0x6D67636C61696D  # "mgclaim"
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


#: take a chosen job (unless another transaction holds its row) and move the turns, in one statement: the
#: claimed user is served now (the next tick), the users passed over for model affinity skipped once more
CLAIM_SQL = """
WITH claimed AS (
    UPDATE jobs SET state = 'running', worker = %s, claimed_at = now(),
        lease_until = now() + make_interval(secs => %s),
        started_at = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
    WHERE id = (SELECT id FROM jobs WHERE id = %s AND state = 'queued' FOR UPDATE SKIP LOCKED)
    RETURNING *),
served AS (
    INSERT INTO user_turns ("user", served, skips)
    SELECT "user", (SELECT COALESCE(MAX(served), 0) + 1 FROM user_turns), 0 FROM claimed
    ON CONFLICT ("user") DO UPDATE SET served = excluded.served, skips = 0),
passed AS (
    INSERT INTO user_turns ("user", served, skips)
    SELECT p, 0, 1 FROM unnest(%s::text[]) AS p WHERE EXISTS (SELECT 1 FROM claimed)
    ON CONFLICT ("user") DO UPDATE SET skips = user_turns.skips + 1)
SELECT * FROM claimed
"""


class StoreUnavailable(MultigenError):
    """The PostgreSQL store cannot be reached at start-up (the message names it, never its password)."""

    code = "store_unavailable"
    http_status = 503


class SchemaTooNew(MultigenError, RuntimeError):
    """The database was migrated by a newer multigen (the message names both schema versions)."""

    code = "store_schema_too_new"
    http_status = 503


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, for messages: never its password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an invalid postgresql:// URL)"
    host, port = parts.get("host") or "localhost", parts.get("port") or "5432"
    who = f"{parts['user']}@" if parts.get("user") else ""
    return f"postgresql://{who}{host}:{port}/{parts.get('dbname') or ''}"


def _q(name: str) -> str:
    """A column name, quoted (``user`` is a reserved word); only plain names get here."""
    if not _NAME.match(name):
        raise ValueError(f"not a column name: {name!r}")
    return f'"{name}"'


def _configure(conn: psycopg.Connection) -> None:
    # json columns come back as their text (storerows parses it, as for SQLite)
    conn.adapters.register_loader("json", TextLoader)


#: the Store methods retried while the database is away (a restart, a failover, a network cut): every one
#: but close(). A call in flight when the connection broke is tried again on a new one; a statement that
#: had committed unseen then meets its own result (a claim: the lease runs out; a job: a duplicate id error)
RETRIED = ("create_session", "get_session", "list_sessions", "update_session", "count_sessions", "create_job",
           "get_job", "update_job", "list_jobs", "job_counts", "update_job_if", "request_stop", "set_preview",
           "get_preview", "queue_snapshot", "reserve_image", "complete_image", "get_image", "list_images",
           "image_count", "image_by_index", "add_delivery", "get_delivery", "update_delivery", "due_deliveries",
           "claim_delivery", "next_delivery_at", "jobs_awaiting_delivery", "claim_job", "renew_lease", "release_job",
           "expire_leases", "heartbeat", "list_workers")


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` tried again (after 0.1 s, doubling to 1 s) while the connection fails, for at most the
    store's ``timeout`` seconds; then :class:`StoreUnavailable` (a 503), naming the database."""

    @functools.wraps(method)
    def call(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
        deadline, wait = time.monotonic() + self.timeout, 0.1
        while True:
            try:
                return method(self, *args, **kwargs)
            except psycopg.OperationalError as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if time.monotonic() + wait > deadline:
                    raise StoreUnavailable(f"the store {self.where} did not answer for {self.timeout:.0f} s ({why}): "
                                           "check that PostgreSQL is running and reachable, then retry") from e
                log.warning("store %s: %s failed (%s); retrying in %.1f s", self.where, method.__name__, why, wait)
                time.sleep(wait)
                wait = min(wait * 2, 1.0)

    return call


class PostgresStore(Store):
    """The server store: PostgreSQL through a psycopg connection pool.

    Args:
        dsn: a libpq URL, ``postgresql://user:password@host:port/dbname``.
        min_size, max_size: the pool's connections (the service's threads share them).
        timeout: seconds a call waits for a connection of the pool.

    Raises:
        SchemaTooNew: the database's schema is newer than this code knows (a RuntimeError, as SQLite's).
        StoreUnavailable: the database cannot be reached.
    """

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 16, timeout: float = 30.0) -> None:
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self._sizes, self.timeout = (min_size, max_size), timeout
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._migrate()

    # -- connections ------------------------------------------------------------------
    def _connections(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:  # the first call, or the first after close(): reads after stop() still work
                self._pool = ConnectionPool(
                    self.dsn, min_size=self._sizes[0], max_size=self._sizes[1], timeout=self.timeout,
                    kwargs={"autocommit": True, "row_factory": dict_row}, configure=_configure,
                    check=ConnectionPool.check_connection, name="multigen-store", open=True)
            return self._pool

    def _conn(self) -> Any:
        """``with self._conn() as conn``: a pooled connection (autocommit; ``conn.transaction()`` for more)."""
        return self._connections().connection()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> int:
        with self._conn() as conn:
            return conn.execute(sql, tuple(args)).rowcount

    def _one(self, record: type[R], sql: str, args: Iterable[Any] = ()) -> R | None:
        with self._conn() as conn:
            return decode_row(conn.execute(sql, tuple(args)).fetchone(), record)

    def _all_rows(self, record: type[R], sql: str, args: Iterable[Any] = ()) -> list[R]:
        with self._conn() as conn:
            return [decode_row(r, record) for r in conn.execute(sql, tuple(args)).fetchall()]  # type: ignore[misc]

    def _value(self, sql: str, args: Iterable[Any] = ()) -> Any:
        with self._conn() as conn:
            row = conn.execute(sql, tuple(args)).fetchone()
            return None if row is None else next(iter(row.values()))

    def _migrate(self) -> None:
        try:
            conn = psycopg.connect(self.dsn, row_factory=dict_row, connect_timeout=10)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"cannot reach the store {self.where}: {str(e).strip()}") from e
        with conn:  # one transaction: committed at the end, rolled back on an error
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                         "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            current = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version").fetchone()["v"]
            if current > PG_SCHEMA_VERSION:
                raise SchemaTooNew(f"{self.where}: schema version {current} is newer than this multigen knows "
                                   f"({PG_SCHEMA_VERSION}); upgrade multigen")
            for version in range(current + 1, PG_SCHEMA_VERSION + 1):
                conn.execute(PG_MIGRATIONS[version - 1])  # type: ignore[arg-type]
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                log.info("store %s: schema migrated to version %d", self.where, version)

    @property
    def schema_version(self) -> int:
        return int(self._value("SELECT MAX(version) FROM schema_version"))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # -- sessions ---------------------------------------------------------------------
    def create_session(self, session: SessionRecord) -> None:
        self._exec(*self._insert("sessions", record_columns(session)))

    def get_session(self, session_id: str) -> SessionRecord | None:
        return self._one(SessionRecord, "SELECT * FROM sessions WHERE id = %s", (session_id,))

    def list_sessions(self, user: str | None = None, project: str | None = None,
                      state: str | None = None) -> list[SessionRecord]:
        where, args = self._where(user=user, project=project, state=state)
        return self._all_rows(SessionRecord, f"SELECT * FROM sessions{where} ORDER BY created_at, arrival", args)

    def update_session(self, session_id: str, **fields: Any) -> None:
        self._update("sessions", "id", session_id, encode_fields(fields))

    def count_sessions(self, user: str, state: str) -> int:
        return int(self._value('SELECT COUNT(*) FROM sessions WHERE "user" = %s AND state = %s', (user, state)))

    # -- jobs -------------------------------------------------------------------------
    def create_job(self, job: JobRecord) -> JobRecord:
        """Store a new job; returns it with its arrival order (``seq``)."""
        sql, args = self._insert("jobs", record_columns(job))
        return dataclasses.replace(job, seq=int(self._value(sql + " RETURNING seq", args)))

    def get_job(self, job_id: str) -> JobRecord | None:
        return self._one(JobRecord, "SELECT * FROM jobs WHERE id = %s", (job_id,))

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update("jobs", "id", job_id, encode_fields(fields))

    def list_jobs(self, session_id: str | None = None, states: Iterable[str] | None = None) -> list[JobRecord]:
        where, args = self._where(session_id=session_id)
        if states is not None:
            where += (" AND " if where else " WHERE ") + "state = ANY(%s)"
            args.append([str(s) for s in states])
        return self._all_rows(JobRecord, f"SELECT * FROM jobs{where} ORDER BY seq", args)

    def job_counts(self, session_id: str | None = None) -> dict[str, int]:
        """Jobs by state, of one session or (None) of every session."""
        where, args = self._where(session_id=session_id)
        with self._conn() as conn:
            rows = conn.execute(f"SELECT state, COUNT(*) AS n FROM jobs{where} GROUP BY state", args).fetchall()
        return {r["state"]: int(r["n"]) for r in rows}

    def update_job_if(self, job_id: str, expect: str, **fields: Any) -> bool:
        """update_job, only while the job is in state ``expect`` (compare and set); False (nothing changed) if not."""
        f = encode_fields(fields)
        return self._exec(f"UPDATE jobs SET {', '.join(f'{_q(k)} = %s' for k in f)} WHERE id = %s AND state = %s",
                          [*f.values(), job_id, str(expect)]) == 1

    def request_stop(self, job_id: str, skip: bool = False) -> bool:
        """Ask whoever runs the job to cancel it (or skip its image being made); False when it is not running."""
        change = "skip_requests = skip_requests + 1" if skip else "cancel_requested = 1"
        return self._exec(f"UPDATE jobs SET {change} WHERE id = %s AND state = 'running'", (job_id,)) == 1

    def set_preview(self, job_id: str, data: bytes | None) -> None:
        """Keep the latest preview of a running job (JPEG bytes); None deletes it."""
        if data is None:
            self._exec("DELETE FROM job_previews WHERE job_id = %s", (job_id,))
        else:
            self._exec("INSERT INTO job_previews (job_id, data) VALUES (%s, %s) ON CONFLICT (job_id) DO UPDATE "
                       "SET data = excluded.data, at = now()", (job_id, data))

    def get_preview(self, job_id: str) -> bytes | None:
        row = self._value("SELECT data FROM job_previews WHERE job_id = %s", (job_id,))
        return bytes(row) if row is not None else None

    def queue_snapshot(self) -> tuple[list[QueuedJob], dict[str, int]]:
        """The queued jobs (in arrival order) and the users' turns: see SQLiteStore.queue_snapshot."""
        with self._conn() as conn:
            jobs = [QueuedJob(r["id"], r["user"], r["model"], int(r["priority"]), int(r["seq"])) for r in conn.execute(
                'SELECT id, "user", model, priority, seq FROM jobs WHERE state = \'queued\' ORDER BY seq')]
            turns = {r["user"]: int(r["served"]) for r in conn.execute('SELECT "user", served FROM user_turns')}
        return jobs, turns

    # -- images -----------------------------------------------------------------------
    def reserve_image(self, image: NewImage, worker: str | None = None) -> ImageRecord:
        """Reserve the next session index for a job's image ``pos``, or return the existing reservation.

        The file is ``image.folder/{index:05d}.png``. Idempotent per ``(job_id, pos)``. Reservations of
        one session take turns on its row's lock, in every process that shares the database. With
        ``worker``, only while that worker holds the job's lease (else :class:`~.claims.LeaseLost`).
        """
        with self._conn() as conn, conn.transaction():
            self._check_lease(conn, image.job_id, worker)
            conn.execute("SELECT 1 FROM sessions WHERE id = %s FOR NO KEY UPDATE", (image.session_id,))
            row = conn.execute("SELECT * FROM images WHERE job_id = %s AND pos = %s",
                               (image.job_id, image.pos)).fetchone()
            if row is None:
                index = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) AS n FROM images WHERE session_id = %s",
                                     (image.session_id,)).fetchone()["n"]
                sql, args = self._insert("images", new_image_columns(image, index, int(image.seed)))
                row = conn.execute(sql + " RETURNING *", args).fetchone()
        return decode_row(row, ImageRecord)  # type: ignore[return-value]

    def complete_image(self, image_id: str, created_at: str, worker: str | None = None,
                       publish: Callable[[], Any] | None = None) -> None:
        """Mark a reserved image ``done``; with ``worker``, only while it holds the job's lease (else LeaseLost).
        ``publish()`` (the files' last rename) runs inside the transaction, after the lease check, whose row lock
        holds an expiry off until the commit: a worker whose lease was lost never puts a file in place."""
        with self._conn() as conn, conn.transaction():
            if worker is not None:
                row = conn.execute("SELECT job_id FROM images WHERE id = %s", (image_id,)).fetchone()
                self._check_lease(conn, row["job_id"] if row else "", worker)
            if publish is not None:
                publish()
            conn.execute("UPDATE images SET state = 'done', created_at = %s WHERE id = %s", (created_at, image_id))

    def get_image(self, image_id: str) -> ImageRecord | None:
        return self._one(ImageRecord, "SELECT * FROM images WHERE id = %s AND state = 'done'", (image_id,))

    def list_images(self, session_id: str | None = None, job_id: str | None = None,
                    after: int | None = None, state: str | None = "done") -> list[ImageRecord]:
        where, args = self._where(session_id=session_id, job_id=job_id, state=state)
        if after is not None:
            where += (" AND " if where else " WHERE ") + "idx > %s"
            args.append(int(after))
        return self._all_rows(ImageRecord, f"SELECT * FROM images{where} ORDER BY session_id, idx", args)

    def image_count(self, session_id: str) -> int:
        return int(self._value("SELECT COUNT(*) FROM images WHERE session_id = %s AND state = 'done'", (session_id,)))

    def image_by_index(self, session_id: str, index: int) -> ImageRecord | None:
        return self._one(ImageRecord, "SELECT * FROM images WHERE session_id = %s AND idx = %s AND state = 'done'",
                         (session_id, int(index)))

    # -- webhook deliveries (webhooks.py) ----------------------------------------------
    def add_delivery(self, delivery: DeliveryRecord) -> bool:
        """Queue a job's delivery unless it has one; True when added now (idempotent per job)."""
        sql, args = self._insert("webhook_deliveries", dataclasses.asdict(delivery))
        return self._exec(sql + " ON CONFLICT (job_id) DO NOTHING", args) == 1

    def get_delivery(self, job_id: str) -> DeliveryRecord | None:
        return self._one(DeliveryRecord, "SELECT * FROM webhook_deliveries WHERE job_id = %s", (job_id,))

    def update_delivery(self, job_id: str, **fields: Any) -> None:
        self._update("webhook_deliveries", "job_id", job_id, fields)

    def due_deliveries(self, now: str, limit: int = 20) -> list[DeliveryRecord]:
        """Pending deliveries whose next try is due at ``now`` (ISO text), the longest waiting first."""
        return self._all_rows(DeliveryRecord, "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND "
                              "next_try_at <= %s ORDER BY next_try_at LIMIT %s", (now, int(limit)))

    def claim_delivery(self, job_id: str, seen: str | None, until: str) -> bool:
        """Take a due delivery for one attempt: its next try moves to ``until`` (when another process may try it,
        should this one die mid-attempt) only if it is still ``seen``; False: another process took it."""
        return self._exec("UPDATE webhook_deliveries SET next_try_at = %s WHERE job_id = %s AND state = 'pending' "
                          "AND next_try_at = %s", (until, job_id, seen)) == 1

    def next_delivery_at(self) -> str | None:
        return self._value("SELECT MIN(next_try_at) FROM webhook_deliveries WHERE state = 'pending'")

    def jobs_awaiting_delivery(self) -> list[JobRecord]:
        """Ended jobs with a ``webhook_url`` and no delivery (their end was stored, the delivery not yet)."""
        return self._all_rows(JobRecord, "SELECT * FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
                              "AND params::text LIKE '%%\"webhook_url\"%%' AND id NOT IN "
                              "(SELECT job_id FROM webhook_deliveries) ORDER BY seq")

    # -- claiming jobs under a lease (claims.py) -----------------------------------------
    def claim_job(self, worker: str, held_models: Collection[str], lease_seconds: float,
                  max_affinity_skips: int = DEFAULT_MAX_AFFINITY_SKIPS) -> JobRecord | None:
        """The next queued job by the fair rule (claims.py), now ``running`` under ``worker``'s lease of
        ``lease_seconds`` (the database's clock); None when nothing is queued.

        One transaction: the turn state is decided under an advisory lock (:data:`CLAIM_LOCK`: every claim
        moves the turns, so two claims deciding at once would both pick the same user's turn), and the job
        row is taken with ``FOR UPDATE SKIP LOCKED``: a job another transaction holds (a cancel being
        written) is passed over, never waited for, and no two claimers ever get the same job.
        """
        held, skipped = set(held_models), []
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
            while True:
                sql = HEADS_SQL.format(skip_q=" AND NOT (q.id = ANY(%s))", skip_k=" AND NOT (k.id = ANY(%s))")
                heads = [Head(r["id"], r["user"], r["model"], int(r["served"]), int(r["skips"])) for r in
                         conn.execute(sql, (skipped, skipped)).fetchall()]
                picked = choose(heads, held, max_affinity_skips)
                if picked is None:
                    return None
                head, passed = picked
                row = conn.execute(CLAIM_SQL, (worker, float(lease_seconds), head.id, passed)).fetchone()
                if row is not None:
                    break
                skipped.append(head.id)
        return decode_row(row, JobRecord)

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend ``worker``'s lease on a running job; False when it lost it (expired and requeued, released)."""
        return self._exec("UPDATE jobs SET lease_until = now() + make_interval(secs => %s) "
                          "WHERE id = %s AND worker = %s AND state = 'running'",
                          (float(lease_seconds), job_id, worker)) == 1

    def release_job(self, job_id: str, worker: str, state: str = "queued", **fields: Any) -> bool:
        """End ``worker``'s lease: the job goes to ``state`` (with ``fields``, as for update_job); False, and
        nothing changed, when the worker no longer holds it."""
        f = encode_fields({**fields, "state": str(state), "worker": None, "lease_until": None})
        return self._exec(f"UPDATE jobs SET {', '.join(f'{_q(k)} = %s' for k in f)} "
                          "WHERE id = %s AND worker = %s AND state = 'running'", [*f.values(), job_id, worker]) == 1

    def expire_leases(self, now: dt.datetime | None = None) -> list[str]:
        """Running jobs whose lease ended before ``now`` (default: the database's clock) back to ``queued``
        (seq, seeds and reserved images kept); returns their ids. Jobs run without a lease are left alone."""
        with self._conn() as conn:
            rows = conn.execute("UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL "
                                "WHERE state = 'running' AND lease_until < COALESCE(%s, now()) RETURNING id, seq",
                                (now,)).fetchall()
        return [r["id"] for r in sorted(rows, key=lambda r: r["seq"])]

    def heartbeat(self, worker: str, host: str, device: str, models: Collection[str]) -> None:
        """Record that ``worker`` (on ``host``'s ``device``, holding ``models``) is alive now."""
        self._exec("INSERT INTO workers (id, host, device, models) VALUES (%s, %s, %s, %s) "
                   "ON CONFLICT (id) DO UPDATE SET host = excluded.host, device = excluded.device, "
                   "models = excluded.models, heartbeat_at = now()",
                   (worker, host, device, json.dumps(sorted(models))))

    def list_workers(self) -> list[WorkerRecord]:
        """Every worker that sent a heartbeat, by host and device."""
        with self._conn() as conn:
            return [worker_record(r) for r in conn.execute("SELECT * FROM workers ORDER BY host, device, id")]

    @staticmethod
    def _check_lease(conn: Any, job_id: str, worker: str | None) -> None:
        # FOR SHARE: an expiry (or release) waits for this transaction, so the image is reserved under a live lease
        if worker is not None and conn.execute("SELECT 1 FROM jobs WHERE id = %s AND worker = %s AND "
                                               "state = 'running' FOR SHARE", (job_id, worker)).fetchone() is None:
            raise LeaseLost(f"worker {worker} no longer holds the lease on job {job_id}")

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _insert(table: str, fields: dict[str, Any]) -> tuple[str, list[Any]]:
        return (f"INSERT INTO {table} ({', '.join(_q(k) for k in fields)}) VALUES ({', '.join(['%s'] * len(fields))})",
                list(fields.values()))

    @staticmethod
    def _where(**filters: Any) -> tuple[str, list[Any]]:
        parts = [(k, v) for k, v in filters.items() if v is not None]
        if not parts:
            return "", []
        return " WHERE " + " AND ".join(f"{_q(k)} = %s" for k, _ in parts), [str(v) for _, v in parts]

    def _update(self, table: str, key: str, row_id: str, fields: dict[str, Any]) -> None:
        if fields:
            self._exec(f"UPDATE {table} SET {', '.join(f'{_q(k)} = %s' for k in fields)} WHERE {_q(key)} = %s",
                       [*fields.values(), row_id])


for _name in RETRIED:
    setattr(PostgresStore, _name, _retrying(getattr(PostgresStore, _name)))
