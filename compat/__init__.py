"""multigen: session-based image generation (``multigen.pipes``, ``multigen.service``).

This folder is the top of the ``multigen`` package. Besides the two subpackages it holds the
module names metafusion programs import, so they run unchanged:

- ``multigen.worker``: ``ServiceThread`` (``multigen.service``);
- ``multigen.sessions``: ``GenSession`` (``multigen.pipes``);
- ``multigen.prompting``: ``Cfgen`` (``multigen.pipes``);
- ``from multigen import Prompt2ImPipe, ...``: metafusion's top-level names.

Importing ``multigen`` stays light (no torch): the top-level names load on first use.
"""
from __future__ import annotations

from typing import Any

#: metafusion's top-level names, all from ``multigen.pipes``
_METAFUSION_NAMES = ("Prompt2ImPipe", "Im2ImPipe", "MaskedIm2ImPipe", "Cond2ImPipe", "CIm2ImPipe", "GenSession",
                     "Cfgen")

__all__ = list(_METAFUSION_NAMES)


def __getattr__(name: str) -> Any:
    # lazy: `import multigen.service.config` imports this package first and must not pull in torch
    if name not in _METAFUSION_NAMES:
        raise AttributeError(f"module 'multigen' has no attribute {name!r}")
    import multigen.pipes

    return getattr(multigen.pipes, name)
