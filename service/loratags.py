"""``<lora:name:weight>`` tags: A1111's way of naming LoRAs inside a prompt.

A1111 (and every tool made for it: Open WebUI, SillyTavern, the Krita plug-in...) puts LoRAs in the
prompt text. multigen applies LoRAs per session, so :func:`split_lora_tags` takes the tags out of
the prompt and returns them as the session's LoRA list. The AUTOMATIC1111 dialect uses it, and the
session API may reuse it (Step 10).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidInput

#: ``<lora:name>``, ``<lora:name:0.8>``, ``<lyco:name:0.8>``; A1111 also allows ``name:te:unet``
#: weights (the text-encoder weight is taken, the rest ignored)
LORA_TAG_RE = re.compile(r"<(?:lora|lyco):([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)
DEFAULT_WEIGHT = 1.0


@dataclass(frozen=True)
class LoraTag:
    """One tag: the LoRA's name and weight."""

    name: str
    weight: float


def split_lora_tags(prompt: str, known: Iterable[str] | None = None,
                    field: str = "prompt") -> tuple[str, list[dict[str, float | str]]]:
    """The prompt without its LoRA tags, and the LoRAs they name (``[{"name", "weight"}]``, in order).

    A LoRA named twice keeps its last weight (A1111 would apply it twice; once is what was meant).
    Whitespace left behind by a removed tag is collapsed.

    Args:
        prompt: the prompt text.
        known: the configured LoRA names; when given, an unknown name is refused.
        field: the request field the prompt came from (named in errors).

    Raises:
        InvalidInput: a weight that is not a number, or a LoRA that is not configured (naming it and
            the known ones).
    """
    found: dict[str, float] = {}
    known_set = set(known) if known is not None else None
    for match in LORA_TAG_RE.finditer(prompt):
        name = match.group(1).strip()
        raw = (match.group(2) or "").strip()
        try:
            weight = float(raw) if raw else DEFAULT_WEIGHT
        except ValueError:
            raise InvalidInput(f"{field}: the weight of <lora:{name}:{raw}> is not a number", field=field) from None
        if known_set is not None and name not in known_set:
            allowed = ", ".join(sorted(known_set)) or "none configured"
            raise InvalidInput(f"{field}: unknown LoRA {name!r} in <lora:...>; known: {allowed}", field=field)
        found.pop(name, None)
        found[name] = weight
    text = LORA_TAG_RE.sub(" ", prompt)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+([,.;])", r"\1", text).strip(" \t,")
    return text, [{"name": name, "weight": weight} for name, weight in found.items()]
