"""AUTOMATIC1111's ``/sdapi/v1`` dialect: what Open WebUI, SillyTavern, openOutpaint, the Krita and
Photoshop plug-ins and the ``webuiapi`` client call.

Each generation call is a job in the caller's implicit session (``api/waiting.py``): fair-queued,
resumed after a restart, visible in the session API. Routes: ``routes.py`` (txt2img, img2img,
progress, interrupt, skip), ``info.py`` (listings, options, png-info, extras). Errors answer in
A1111's shapes (``errors.py``), never multigen's, under this prefix.
"""
from __future__ import annotations

from . import info, routes  # noqa: F401  (they add their routes to bp)
from .blueprint import PROJECT, bp

__all__ = ["PROJECT", "bp"]
