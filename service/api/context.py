"""What every view needs: the app's service, config and schemas, and the JSON body."""
from __future__ import annotations

from typing import Any

from flask import current_app, request

from multigen.pipes import spec as specs

from ..config import Config
from ..errors import InvalidInput, UnsupportedMedia
from ..protocol import GenerationService
from .schemas import Schemas

#: most ``[`` and ``{`` bytes a JSON body may hold, counted before it is decoded: two prompt grammars at
#: their item cap, two prompts of brackets at their character cap, and room for the other list fields
MAX_CONTAINERS = 2 * specs.MAX_GRAMMAR_ITEMS + 2 * specs.MAX_PROMPT_CHARS + 1000


def service() -> GenerationService:
    """The app's service (``app.extensions["multigen.service"]``, set by ``create_app``)."""
    return current_app.extensions["multigen.service"]


def config() -> Config:
    return current_app.extensions["multigen.config"]


def schemas() -> Schemas:
    return current_app.extensions["multigen.schemas"]


def json_body() -> Any:
    """The request's JSON body.

    Raises:
        UnsupportedMedia: the Content-Type is not ``application/json``.
        InvalidInput: the body is not valid JSON.
    """
    if not request.is_json:
        raise UnsupportedMedia(f"send `Content-Type: application/json` (got {request.mimetype or 'none'!r})",
                               field="Content-Type")
    raw = request.get_data(cache=True)
    if raw.count(b"[") + raw.count(b"{") > MAX_CONTAINERS:  # decoding millions of tiny lists costs seconds and GBs
        raise InvalidInput(f"the body holds more than {MAX_CONTAINERS} lists and objects; a prompt grammar may have "
                           f"at most {specs.MAX_GRAMMAR_ITEMS} items", code="too_many_items")
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # the decoder gives up on deep nesting with this, not a ValueError
        raise InvalidInput("the body is nested too deeply", code="malformed_json") from None
    if data is None:
        raise InvalidInput("the body is not valid JSON", code="malformed_json")
    return data
