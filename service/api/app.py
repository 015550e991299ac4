"""``create_app(config)``: builds the Flask app, registers blueprints and the JSON error handler."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, jsonify
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..config import Config
from ..errors import MultigenError

log = logging.getLogger(__name__)

bp = Blueprint("service", __name__, url_prefix="/api/v1")


@bp.get("/health")
def health() -> dict[str, Any]:
    from flask import current_app

    service = current_app.extensions.get("multigen.service")
    info: dict[str, Any] = {"status": "ok", "version": __version__, "devices": [], "queue": {}}
    if service is not None:
        info["devices"] = service.devices()
        info["queue"] = service.queue_info()
    return info


def _error_response(code: str, message: str, status: int, field: str | None = None):
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return jsonify({"error": err}), status


def create_app(config: Config, service: Any = None) -> Flask:
    """Build the application.

    Args:
        config: the loaded configuration.
        service: a started ServiceThread (kept in ``app.extensions["multigen.service"]``).
    """
    here = Path(__file__).resolve().parent
    # explicit paths: Flask cannot search for the package path of `multigen`, which has no folder of its own
    app = Flask(__name__, root_path=str(here), instance_path=str(config.data_dir / "instance"),
                static_folder=None)
    app.extensions["multigen.config"] = config
    app.extensions["multigen.service"] = service
    app.register_blueprint(bp)
    from .web import bp as web_bp

    app.register_blueprint(web_bp)

    @app.errorhandler(MultigenError)
    def _multigen_error(e: MultigenError):
        return jsonify(e.to_dict()), e.http_status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = (e.name or "error").lower().replace(" ", "_")
        return _error_response(code, e.description or e.name, e.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unexpected error")
        return _error_response("internal_error", "internal server error (logged)", 500)

    return app
