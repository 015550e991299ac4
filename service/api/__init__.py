"""The HTTP API: Flask application factory (served by waitress)."""
from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
