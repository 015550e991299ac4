"""The ``/sdapi/v1`` blueprint and its error handlers (A1111's error shapes)."""
from __future__ import annotations

import logging

from flask import Blueprint, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from multigen.pipes.errors import PipeError

from ...errors import MultigenError
from .errors import detail_response, error_response, exception_response, validation_response

log = logging.getLogger(__name__)

bp = Blueprint("a1111", __name__, url_prefix="/sdapi/v1")
#: the project of the implicit sessions this dialect's jobs run in
PROJECT = "a1111"


@bp.errorhandler(ValidationError)
def _invalid_body(e: ValidationError):
    return validation_response(e)


@bp.errorhandler(MultigenError)
def _multigen_error(e: MultigenError):
    return error_response(e)


@bp.errorhandler(PipeError)
def _pipe_error(e: PipeError):  # a pipe's own check of a parameter
    from .errors import a1111_field

    allowed = f"; allowed: {e.allowed}" if e.allowed else ""
    return detail_response(["body", *a1111_field(e.param).split(".")], f"{e}{allowed}")


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException):
    return exception_response("HTTPException", e.description or e.name, e.code or 500)


@bp.errorhandler(Exception)
def _unexpected(e: Exception):
    log.exception("unexpected error in %s %r", request.method, request.path)
    return exception_response(type(e).__name__, "internal server error (logged)", 500)

