"""metafusion's ``multigen.sessions``: ``GenSession``, images of a pipe into a folder (``multigen.pipes``)."""
from __future__ import annotations

from multigen.pipes.gensession import GenSession

__all__ = ["GenSession"]
