"""Reading YAML config files: each value checked for its type, each problem a :class:`ConfigError`
naming the file, the key and the fix (shared by config.yaml's and models.yaml's readers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping (``what`` names the file in errors)."""
    if not path.exists():
        raise ConfigError(str(path), None, f"{what} not found",
                          "create it (see config/ in the repository) or pass --config / MULTIGEN_CONFIG")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), None, f"not valid YAML ({e})".replace("\n", " "),
                          "correct the YAML syntax at the line shown") from e
    if not isinstance(data, dict):
        raise ConfigError(str(path), None, "the top level is not a mapping", "write `key: value` lines")
    return data


def typed(data: dict, key: str, kind: type | tuple, file: Path, default: Any, fix: str,
           where: str | None = None) -> Any:
    """``data[key]`` checked to be a ``kind`` (``where``: the key's full name in messages, e.g. ``server.port``)."""
    if key not in data or data[key] is None:
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ConfigError(str(file), where or key, f"expected {getattr(kind, '__name__', kind)}, got {value!r}", fix)
    return value


def mapping_at(data: dict, key: str, file: Path) -> dict:
    """``data[key]`` checked to be a mapping (``{}`` when missing)."""
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(str(file), key, f"expected a mapping, got {type(value).__name__}",
                          f"write `{key}:` followed by indented `name: value` entries")
    return value
