"""API users: bearer tokens kept in config.yaml only as SHA-256 hashes."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from .config import PACKAGED_CONFIG, default_config_path, load_users
from .errors import ConfigError, InvalidInput

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def user_for_token(users: dict[str, dict], token: str) -> str | None:
    """The user whose stored hash matches ``token`` (compared in constant time), or None."""
    return user_for_digest(users, hash_token(token))


def user_for_digest(users: dict[str, dict], digest: str) -> str | None:
    """The user whose stored hash is ``digest`` (a token's SHA-256, compared in constant time), or None."""
    for name, entry in users.items():
        if hmac.compare_digest(str(entry.get("token_sha256", "")), digest):
            return name
    return None


class UserTable:
    """The users of a running server, re-read when their config file changes.

    ``multigen users add`` then takes effect within ``check_every`` seconds, no restart. A config
    edited into something unreadable keeps the users the server had, with a warning in the log.
    """

    def __init__(self, file: Path, users: dict[str, dict[str, Any]], check_every: float = 1.0):
        self.file = Path(file)
        self.check_every = check_every
        self._users = dict(users)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def user_for_token(self, token: str) -> str | None:
        return self.user_for_digest(hash_token(token))

    def user_for_digest(self, digest: str) -> str | None:
        """The user of a token's SHA-256 as the config says now: an open event stream asks again at each
        heartbeat, so a user removed (or given a new token) loses the stream too."""
        self.refresh()
        return user_for_digest(self._users, digest)

    def refresh(self, force: bool = False) -> None:
        """Re-read the users when the file changed; stats it at most every ``check_every`` seconds."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_every:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is None or stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                users = load_users(self.file)
            except ConfigError as e:
                log.warning("kept the %d users the server had: %s", len(self._users), e)
                return
            if users != self._users:
                log.info("users re-read from %s: %s", self.file, ", ".join(sorted(users)) or "none")
            self._users = users


def add_user(config_path: str | None, name: str) -> str:
    """Add ``name`` to the config's ``users`` with a fresh token and return the token.

    The config file is edited in place as text so its comments stay.
    """
    if not NAME_RE.match(name):
        raise InvalidInput(f"user name {name!r} must be 1-64 letters, digits, '_', '.' or '-'", field="name")
    path = Path(config_path or default_config_path())
    if path.resolve() == PACKAGED_CONFIG:
        raise ConfigError(str(path), "users", "the packaged default config is part of the installation",
                          f"copy {path.name} and models.yaml from {path.parent} to a folder of yours and pass --config")
    if not path.exists():
        raise ConfigError(str(path), None, "config file not found", "pass --config with an existing config.yaml")
    text = path.read_text()
    users = (yaml.safe_load(text) or {}).get("users") or {}
    if name in users:
        raise ConfigError(str(path), f"users.{name}", "user already exists", "choose another name or remove the entry")
    token = "mg_" + secrets.token_urlsafe(32)
    entry = f"  {name}:\n    token_sha256: {hash_token(token)}\n"
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if re.match(r"^users:\s*(\{\s*\})?\s*(#.*)?$", line):
            lines[i] = "users:\n"
            lines.insert(i + 1, entry)
            break
    else:
        lines.append(("" if text.endswith("\n") or not text else "\n") + "users:\n" + entry)
    # temp file + rename: a crash never leaves a half-written config (the server would not start)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text("".join(lines))
    shutil.copymode(path, tmp)
    os.replace(tmp, path)
    return token
