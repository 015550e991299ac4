"""A real PostgreSQL for the store tests, and what happens when there is none.

scripts/test sources scripts/_postgres.sh, which installs Debian's ``postgresql`` when it is missing,
starts a throw-away cluster and exports its URL in ``MULTIGEN_TEST_PG`` (or why it could not in
``MULTIGEN_TEST_PG_ERROR``). A pytest run without it (``pytest tests/test_store_contract.py``) starts a
cluster of its own through the same script when PostgreSQL is installed. When there is none:

* under CI (``CI=true``, as for the browser tests: browser_check.py) the PostgreSQL tests fail, saying
  why: a CI run that skipped them would be green without having tested the store;
* elsewhere they are skipped with that message.

``postgres_url`` (a session fixture) applies the rule; ``fresh_schema_url(url)`` gives each test a
schema of its own (created in milliseconds, dropped after). ``own_cluster()`` starts a cluster that only
its caller uses (same rule), for tests that restart PostgreSQL without disturbing the others.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pytest
from browser_check import fail_in_ci_else_skip

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "_postgres.sh"
#: the start of every skip and failure message of the rule
CANNOT_RUN = "PostgreSQL tests cannot run"
INSTALL = "Install it as root with `apt-get install postgresql` (scripts/test does it through scripts/_postgres.sh)"


def _start_cluster() -> tuple[str | None, str]:
    """(url, folder) of a cluster started by scripts/_postgres.sh, or (None, why)."""
    try:
        out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"scripts/_postgres.sh start: {e}"
    words = out.stdout.strip().split()
    if out.returncode != 0 or len(words) != 2:
        return None, (out.stdout + out.stderr).strip() or f"scripts/_postgres.sh start exited {out.returncode}"
    return words[0], words[1]


def _refuse(why: str) -> None:
    fail_in_ci_else_skip(f"{CANNOT_RUN}: {why}. {INSTALL}", "a missing PostgreSQL", "its tests")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL server the tests may create schemas in (see the module's rule)."""
    url = os.environ.get("MULTIGEN_TEST_PG")
    if url:
        yield url
        return
    if os.environ.get("MULTIGEN_TEST_PG_ERROR"):  # scripts/test tried and said why
        _refuse(os.environ["MULTIGEN_TEST_PG_ERROR"])
    with own_cluster() as cluster:
        yield cluster.url


@contextlib.contextmanager
def fresh_schema_url(url: str) -> Iterator[str]:
    """``url`` with a new, empty schema first on its search path (dropped at exit)."""
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass(frozen=True)
class Cluster:
    """A PostgreSQL cluster of scripts/_postgres.sh: its URL and folder."""

    url: str
    folder: str

    def restart(self) -> None:
        """An immediate restart (``pg_ctl restart -m immediate``: every connection is cut, as in a crash),
        same port; returns once it accepts connections again."""
        out = subprocess.run(["bash", str(SCRIPT), "restart", self.folder], capture_output=True, text=True,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"scripts/_postgres.sh restart {self.folder}: {(out.stdout + out.stderr).strip()}")


@contextlib.contextmanager
def own_cluster(durable: bool = False) -> Iterator[Cluster]:
    """A cluster of the caller's own (stopped and removed at exit), whatever ``MULTIGEN_TEST_PG`` says;
    without PostgreSQL the module's rule applies (skip, or fail under CI).

    ``durable``: the URL's sessions commit synchronously, as on a production server. scripts/_postgres.sh
    turns ``synchronous_commit`` off for speed, and then a crash (``Cluster.restart``) loses the
    transactions of the last fraction of a second that had already answered COMMIT.
    """
    url, folder = _start_cluster()
    if url is None:
        _refuse(folder)
    if durable:
        url += ("&" if "?" in url else "?") + "options=" + quote("-csynchronous_commit=on")
    try:
        yield Cluster(url, folder)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=60)
