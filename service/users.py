"""API users: bearer tokens kept in config.yaml only as SHA-256 hashes."""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
from pathlib import Path

import yaml

from .config import PACKAGED_CONFIG, default_config_path
from .errors import ConfigError, InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def user_for_token(users: dict[str, dict], token: str) -> str | None:
    """The user whose stored hash matches ``token`` (compared in constant time), or None."""
    digest = hash_token(token)
    for name, entry in users.items():
        if hmac.compare_digest(str(entry.get("token_sha256", "")), digest):
            return name
    return None


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
