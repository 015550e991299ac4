"""The PostgreSQL store's schema: its migrations, in order (pgstore.py applies the ones a database has not seen).

Version 1 is the SQLite schema's version 5 (sqlite_schema.py), version 2 its 6 (claims), 3 its 7 (cluster).
"""
from __future__ import annotations

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
    # 2: the SQLite schema's version 6: claiming jobs under a lease (claims.py): who runs a job and until
    # when (the database's clock: one clock for every host), the workers' heartbeats, the turn state
    """
    ALTER TABLE jobs ADD COLUMN worker TEXT, ADD COLUMN lease_until TIMESTAMPTZ, ADD COLUMN claimed_at TIMESTAMPTZ;
    CREATE INDEX jobs_lease ON jobs(lease_until) WHERE state = 'running';
    CREATE INDEX jobs_queued ON jobs("user", priority DESC, seq) WHERE state = 'queued';
    CREATE TABLE workers (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, device TEXT NOT NULL, models JSON NOT NULL,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(), heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE user_turns (
        "user" TEXT PRIMARY KEY, served BIGINT NOT NULL DEFAULT 0, skips INTEGER NOT NULL DEFAULT 0);
    """,
    # 3: the SQLite schema's version 7: cancels and skips asked of a job another process runs, previews
    """
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0,
        ADD COLUMN skip_requests INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE job_previews (job_id TEXT PRIMARY KEY REFERENCES jobs(id), data BYTEA NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now());
    """,
]
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
