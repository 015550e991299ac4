"""multigen.service: the session-based image generation server."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["ServiceThread", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `import multigen.service` stays light (the CLI and config loading need no torch)
    if name == "ServiceThread":
        from .serviceThread import ServiceThread

        return ServiceThread
    raise AttributeError(f"module 'multigen.service' has no attribute {name!r}")
