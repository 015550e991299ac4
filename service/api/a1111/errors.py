"""A1111's two error shapes.

- an invalid body: ``422 {"detail": [{"loc": ["body", field], "msg", "type"}]}`` (FastAPI's);
- anything else: ``{"error": <exception name>, "detail", "body", "errors"}`` with the error's
  status, as A1111's ``api.py`` ``handle_exception`` answers.

multigen's own errors (``InvalidInput`` naming ``guidance_scale``...) come back under A1111's field
names (``cfg_scale``), so a client sees the field it sent.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Response, jsonify
from pydantic import ValidationError

from ...errors import InvalidInput, MultigenError

log = logging.getLogger(__name__)

#: multigen's field names -> the A1111 field that set them
FIELDS = {"guidance_scale": "cfg_scale", "strength": "denoising_strength", "scheduler": "sampler_name",
          "count": "batch_size", "seeds": "seed", "images": "init_images", "image": "init_images",
          "images.0": "init_images", "model": "override_settings.sd_model_checkpoint", "clip_skip":
          "override_settings.CLIP_stop_at_last_layers", "blur": "mask_blur", "full_res": "inpaint_full_res",
          "full_res_padding": "inpaint_full_res_padding", "loras": "prompt",
          "Content-Type": "body", "refiner_switch": "refiner_switch_at"}


class A1111Invalid(MultigenError):
    """A field of an A1111 body is invalid: answered as FastAPI's 422 ``detail`` list."""

    code = "value_error"
    http_status = 422


def a1111_field(field: str | None) -> str:
    """The A1111 field a multigen field name came from (the name itself when it is A1111's)."""
    if not field:
        return "body"
    return FIELDS.get(field) or FIELDS.get(field.split(".")[0]) or field


def detail_response(loc: list[Any], msg: str, type_: str = "value_error", status: int = 422) -> tuple[Response, int]:
    return jsonify({"detail": [{"loc": loc, "msg": msg, "type": type_}]}), status


def validation_response(e: ValidationError) -> tuple[Response, int]:
    """FastAPI's 422 for a pydantic error: every problem, each with its path under ``body``."""
    detail = [{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in e.errors()]
    return jsonify({"detail": detail}), 422


def error_response(e: MultigenError) -> tuple[Response, int]:
    """An error of the service or the API in A1111's shapes (bad input: 422 naming the A1111 field)."""
    if isinstance(e, (A1111Invalid, InvalidInput)):
        # A1111Invalid already names A1111's field; the service's errors name multigen's
        field = (e.field or "body") if isinstance(e, A1111Invalid) else a1111_field(e.field)
        loc = ["body"] if field == "body" else ["body", *field.split(".")]
        return detail_response(loc, e.message, e.code if e.code != "invalid" else
                               "value_error")
    if e.http_status >= 500:
        log.warning("%s: %s", e.code, e.message)
    response = jsonify({"error": type(e).__name__, "detail": e.message, "body": "",
                        "errors": f"{e.http_status}: {e.message}"})
    response.headers.update(e.headers())
    return response, e.http_status


def exception_response(name: str, message: str, status: int) -> tuple[Response, int]:
    """A1111's ``handle_exception`` shape for a non-multigen error (an HTTP error, an unexpected one)."""
    return jsonify({"error": name, "detail": message, "body": "", "errors": f"{status}: {message}"}), status


class A1111Error(MultigenError):
    """Any error worded as A1111's ``handle_exception`` answers it, ``{"error", "detail", "body", "errors"}``:
    for the refusals made from a request's head, before the app sees it (a missing or wrong token, a body
    over its limit: ``RequestGuard.dialect_errors``)."""

    def __init__(self, error: MultigenError):
        super().__init__(error.message, field=error.field, code=error.code)
        self.original = error
        self.http_status = error.http_status

    def headers(self) -> dict[str, str]:
        return self.original.headers()

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self.original).__name__, "detail": self.message, "body": "",
                "errors": f"{self.http_status}: {self.message}"}


def as_a1111_error(error: MultigenError) -> A1111Error:
    """``error`` in A1111's words (for refusals made before the app sees a request: server.py)."""
    return error if isinstance(error, A1111Error) else A1111Error(error)
