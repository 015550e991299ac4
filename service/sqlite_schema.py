"""The embedded store's schema: the SQLite migrations, in order (store.py applies the ones a file has not seen).

Each entry is one version; :data:`SCHEMA_VERSION` is the newest. pgstore.py keeps PostgreSQL's own list.
"""
from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: sessions, jobs, images
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, user TEXT NOT NULL, project TEXT NOT NULL, pipe TEXT NOT NULL,
        model TEXT NOT NULL, loras TEXT NOT NULL, state TEXT NOT NULL, folder TEXT NOT NULL,
        created_at TEXT NOT NULL, closed_at TEXT);
    CREATE INDEX sessions_user ON sessions(user, project);
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL REFERENCES sessions(id), user TEXT NOT NULL, model TEXT NOT NULL,
        state TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, count INTEGER NOT NULL,
        seeds TEXT NOT NULL, prompt TEXT NOT NULL, negative_prompt TEXT, params TEXT NOT NULL,
        error TEXT, device TEXT, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT);
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_session ON jobs(session_id);
    CREATE TABLE images (
        id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
        job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, pos INTEGER NOT NULL,
        seed INTEGER NOT NULL, width INTEGER, height INTEGER, path TEXT NOT NULL,
        state TEXT NOT NULL, created_at TEXT,
        UNIQUE (session_id, idx), UNIQUE (job_id, pos));
    """,
    # 2: where a job's time went (model load/setup vs generation)
    """
    ALTER TABLE jobs ADD COLUMN timings TEXT;
    """,
    # 3: negative prompts may be Cfgen grammars (lists, dicts) like prompts: stored as JSON
    """
    UPDATE jobs SET negative_prompt = json_quote(negative_prompt) WHERE negative_prompt IS NOT NULL;
    """,
    # 4: webhook deliveries of ended jobs (webhooks.py)
    """
    CREATE TABLE webhook_deliveries (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id), user TEXT NOT NULL, url TEXT NOT NULL,
        event TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL, next_try_at TEXT, last_error TEXT, delivered_at TEXT);
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_try_at);
    """,
    # 5: the places of a job's images skipped while it ran (A1111's skip; a resumed job does not make them)
    """
    ALTER TABLE jobs ADD COLUMN skipped TEXT;
    """,
    # 6: claiming jobs under a lease (claims.py): who runs a job and until when its lease holds, the
    # workers' heartbeats, and the fair queue's turn state (when each user was last served, how often
    # passed over for model affinity)
    """
    ALTER TABLE jobs ADD COLUMN worker TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until TEXT;
    ALTER TABLE jobs ADD COLUMN claimed_at TEXT;
    CREATE INDEX jobs_lease ON jobs(state, lease_until);
    CREATE INDEX jobs_queued ON jobs(user, priority DESC, seq) WHERE state = 'queued';
    CREATE TABLE workers (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, device TEXT NOT NULL, models TEXT NOT NULL,
        started_at TEXT NOT NULL, heartbeat_at TEXT NOT NULL);
    CREATE TABLE user_turns (
        user TEXT PRIMARY KEY, served INTEGER NOT NULL DEFAULT 0, skips INTEGER NOT NULL DEFAULT 0);
    """,
    # 7: processes sharing the store (cluster.py): a cancel or skip asked of a job another process runs, and
    # the latest preview of each running job, for the API processes to serve
    """
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN skip_requests INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE job_previews (job_id TEXT PRIMARY KEY REFERENCES jobs(id), data BLOB NOT NULL, at TEXT NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
