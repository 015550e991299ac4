"""metafusion's ``multigen.prompting``: ``Cfgen``, the prompt/seed iterator (``multigen.pipes``).

(Prompt encoding, which metafusion keeps elsewhere, is ``multigen.pipes.prompting``.)
"""
from __future__ import annotations

from multigen.pipes.cfgen import Cfgen

__all__ = ["Cfgen"]
