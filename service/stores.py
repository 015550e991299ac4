"""Which store a service opens: config.yaml's ``store`` (or ``$MULTIGEN_STORE``) picks PostgreSQL
(:mod:`.pgstore`); without one it is the embedded SQLite file in the data folder (:mod:`.store`)."""
from __future__ import annotations

from .config import Config
from .store import SQLiteStore, Store

#: the embedded store's file in ``data_dir``
STORE_FILE = "multigen.sqlite3"


def open_store(config: Config, sqlite_class: type = SQLiteStore) -> Store:
    """The store ``config`` names: a :class:`~multigen.service.pgstore.PostgresStore` for a ``postgresql://``
    URL (migrated on open), else ``sqlite_class`` on ``data_dir/multigen.sqlite3``."""
    if config.store:
        from .pgstore import PostgresStore  # psycopg is loaded only by services that use it

        return PostgresStore(config.store)
    return sqlite_class(config.data_dir / STORE_FILE)
