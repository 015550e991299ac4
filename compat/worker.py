"""metafusion's ``multigen.worker``: ``ServiceThread``, the generation queue (``multigen.service``)."""
from __future__ import annotations

from multigen.service.serviceThread import ServiceThread

__all__ = ["ServiceThread"]
