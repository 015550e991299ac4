"""The PostgreSQL store: the :class:`~multigen.service.store.Store` interface on a server database.

Selected by ``store: postgresql://...`` in config.yaml or the ``MULTIGEN_STORE`` environment
variable (:func:`multigen.service.stores.open_store`); several service processes, on several
hosts, may share one database (docs/deploy.md). The driver is psycopg 3 with a
``psycopg_pool.ConnectionPool``; each call takes a connection for one statement or one
transaction (autocommit otherwise).

The schema is versioned like the SQLite one's (``schema_version``) but with migrations of its own
(:data:`PG_MIGRATIONS`; version 1 is the SQLite schema's version 5). Opening a store applies the
missing ones in one transaction under an advisory lock, so processes that start together migrate
once; a database whose version is newer than this code's refuses to open.

Types: the JSON columns (:data:`~multigen.service.storerows.JSON_COLUMNS`) are ``json`` (the text
kept as written, so dicts keep their key order); times are ISO 8601 text as in SQLite (the ordering
of ``next_try_at`` is the text's); ``images.seed`` is ``NUMERIC(20)``, the unsigned seed itself (0 to
2**64-1; SQLite stores the two's complement). ``user`` is a reserved word in PostgreSQL: it is quoted.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any, Iterable

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool

from .errors import MultigenError
from .records import DeliveryRecord, ImageRecord, JobRecord, NewImage, SessionRecord
from .store import Store
from .storerows import R, decode_row, encode_fields, new_image_columns, record_columns

log = logging.getLogger(__name__)

PG_MIGRATIONS: list[str] = [
    # 1: the SQLite schema's version 5: sessions, jobs (the queue: a lease column and SKIP LOCKED claims come
    # with Step 11's workers), images, webhook deliveries
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, "user" TEXT NOT NULL, project TEXT NOT NULL, pipe TEXT NOT NULL,
        model TEXT NOT NULL, loras JSON NOT NULL, state TEXT NOT NULL, folder TEXT NOT NULL,
        created_at TEXT NOT NULL, closed_at TEXT,
        arrival BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE);
    CREATE INDEX sessions_user ON sessions("user", project);
    CREATE TABLE jobs (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL REFERENCES sessions(id), "user" TEXT NOT NULL, model TEXT NOT NULL,
        state TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, count INTEGER NOT NULL,
        seeds JSON NOT NULL, prompt JSON NOT NULL, negative_prompt JSON, params JSON NOT NULL,
        error JSON, device TEXT, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
        timings JSON, skipped JSON);
    CREATE INDEX jobs_state ON jobs(state, seq);
    CREATE INDEX jobs_session ON jobs(session_id, seq);
    CREATE TABLE images (
        id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
        job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, pos INTEGER NOT NULL,
        seed NUMERIC(20, 0) NOT NULL CHECK (seed >= 0 AND seed < 18446744073709551616),
        width INTEGER, height INTEGER, path TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT,
        UNIQUE (session_id, idx), UNIQUE (job_id, pos));
    CREATE TABLE webhook_deliveries (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id), "user" TEXT NOT NULL, url TEXT NOT NULL,
        event TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL, next_try_at TEXT, last_error TEXT, delivered_at TEXT);
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_try_at);
    """,
]
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
#: the advisory lock the migrations run under (one key for every multigen database of a server)
MIGRATION_LOCK = 0x6D756C7469676E  # "multign"
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


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
        self._sizes, self._timeout = (min_size, max_size), timeout
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._migrate()

    # -- connections ------------------------------------------------------------------
    def _connections(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:  # the first call, or the first after close(): reads after stop() still work
                self._pool = ConnectionPool(
                    self.dsn, min_size=self._sizes[0], max_size=self._sizes[1], timeout=self._timeout,
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

    def job_counts(self, session_id: str) -> dict[str, int]:
        with self._conn() as conn:
            rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs WHERE session_id = %s GROUP BY state",
                                (session_id,)).fetchall()
        return {r["state"]: int(r["n"]) for r in rows}

    # -- images -----------------------------------------------------------------------
    def reserve_image(self, image: NewImage) -> ImageRecord:
        """Reserve the next session index for a job's image ``pos``, or return the existing reservation.

        The file is ``image.folder/{index:05d}.png``. Idempotent per ``(job_id, pos)``. Reservations of
        one session take turns on its row's lock, in every process that shares the database.
        """
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT 1 FROM sessions WHERE id = %s FOR NO KEY UPDATE", (image.session_id,))
            row = conn.execute("SELECT * FROM images WHERE job_id = %s AND pos = %s",
                               (image.job_id, image.pos)).fetchone()
            if row is None:
                index = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) AS n FROM images WHERE session_id = %s",
                                     (image.session_id,)).fetchone()["n"]
                sql, args = self._insert("images", new_image_columns(image, index, int(image.seed)))
                row = conn.execute(sql + " RETURNING *", args).fetchone()
        return decode_row(row, ImageRecord)  # type: ignore[return-value]

    def complete_image(self, image_id: str, created_at: str) -> None:
        self._exec("UPDATE images SET state = 'done', created_at = %s WHERE id = %s", (created_at, image_id))

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

    def next_delivery_at(self) -> str | None:
        return self._value("SELECT MIN(next_try_at) FROM webhook_deliveries WHERE state = 'pending'")

    def jobs_awaiting_delivery(self) -> list[JobRecord]:
        """Ended jobs with a ``webhook_url`` and no delivery (their end was stored, the delivery not yet)."""
        return self._all_rows(JobRecord, "SELECT * FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
                              "AND params::text LIKE '%%\"webhook_url\"%%' AND id NOT IN "
                              "(SELECT job_id FROM webhook_deliveries) ORDER BY seq")

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

