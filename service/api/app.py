"""``create_app(config, service)``: builds the Flask app, registers blueprints and the JSON error handlers."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from multigen.pipes import list_schedulers
from multigen.pipes.errors import PipeError
from multigen.pipes.registry import pipe_role

from .. import __version__
from ..catalog import ModelCatalog, describe_family, family_support
from ..config import Config
from ..errors import MultigenError
from ..protocol import GenerationService, missing_methods
from ..users import UserTable
from ..webhooks import SIGNATURE_HEADER, WebhookSecrets
from . import auth, context, events, guards, images, jobs, metrics, sessions, uploads
from .docs_page import DOCS_HTML
from .openapi import build_document
from .schemas import Schemas

log = logging.getLogger(__name__)

bp = Blueprint("service", __name__, url_prefix="/api/v1")

#: werkzeug's error names, as the API's error codes
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
              429: "too_many_requests", 503: "service_unavailable"}


@bp.get("/health")
def health() -> dict[str, Any]:
    svc = context.service()
    queue = svc.queue_info()
    if auth.auth_enabled():  # a public route: no job ids of anyone
        queue["workers"] = [{k: v for k, v in w.items() if k != "job_id"} for w in queue["workers"]]
    return {"status": "ok", "version": __version__, "devices": svc.devices(), "queue": queue,
            "auth": auth.auth_enabled()}


@bp.get("/models")
def models() -> dict[str, Any]:
    """What a session can be opened with: models (each with its family), LoRAs, pipes (with their
    parameters), the model families, schedulers.

    Each pipe's ``params`` describe its setup parameters (name, type, min, max, default, unit,
    description, image) from the parameter spec with the config's limits on top; a parameter only
    some model families take (or some refuse) says which in ``families``/``refused_by``; ``images``
    says how ``images=[...]`` map onto them; ``job_params`` and ``lora_weight`` describe the
    job-level fields. Each model names its ``family`` (declared or detected) and the ``pipes`` it
    runs; ``families`` lists every model family once (``catalog.describe_family``: the tasks it runs
    and the pipe classes that run them, its own and refused parameters, its schedulers, sizes,
    negative prompt, prompt weighting and LoRA support). ``schedulers`` is the SD-style list (each
    family lists its own). The web page's form reads its ranges, help texts and per-family fields
    from here.
    """
    from multigen.pipes import spec as specs
    from multigen.pipes.families import FAMILIES
    from multigen.pipes.registry import pipe_spec

    cfg: Config = current_app.extensions["multigen.config"]
    catalog: ModelCatalog = current_app.extensions["multigen.catalog"]
    pipes = []
    for p in cfg.models.pipes.values():
        spec = specs.apply_limits(pipe_spec(p.classname), cfg.limits)
        pipes.append({"name": p.name, "title": p.title, "classname": p.classname, "need_imgs": p.need_imgs,
                      "needs_cnet": p.needs_cnet, "schema": f"#/components/schemas/JobCreate_{p.name}",
                      "role": pipe_role(p.classname).value, "params": [_with_families(d) for d in spec.describe()],
                      "images": spec.describe_images()})
    return {
        "models": [catalog.describe_model(name) for name in cfg.models.base],
        "loras": [{"name": e.name, "type": e.type} for e in cfg.models.lora.values()],
        "pipes": pipes,
        "controlnets": [{"name": e.name, "type": e.type} for e in cfg.models.controlnet.values()],
        "upscalers": [{"name": e.name} for e in cfg.models.upscaler.values()],  # uov's (models.yaml `upscaler:`)
        "families": [describe_family(f) for f in FAMILIES[::-1]],
        "schedulers": list_schedulers(),
        "job_params": specs.apply_limits(specs.JOB, cfg.limits).describe(),
        "lora_weight": specs.LORA_WEIGHT.describe(),
    }


@bp.get("/styles")
def styles() -> dict[str, Any]:
    """The prompt styles a job's ``styles`` may name: the built-in ones and the users' (``styles_dir``), each
    with its ``source``; ``random`` (one drawn from each image's seed) is not listed."""
    cfg: Config = current_app.extensions["multigen.config"]
    return {"styles": cfg.styles.describe()}


@bp.get("/users/me/webhook-secret")
def webhook_secret() -> dict[str, Any]:
    """The secret the user's webhooks are signed with (webhooks.py; the server's one without users)."""
    return _webhook_secret(rotate=False)


@bp.post("/users/me/webhook-secret/rotate")
def rotate_webhook_secret() -> dict[str, Any]:
    """A new secret for the user's webhooks; deliveries from now on are signed with it."""
    return _webhook_secret(rotate=True)


def _webhook_secret(rotate: bool) -> dict[str, Any]:
    cfg: Config = current_app.extensions["multigen.config"]
    user = g.get("user") or auth.ANONYMOUS_USER
    secrets_ = WebhookSecrets(cfg.data_dir, per_user=bool(cfg.users))
    secret = secrets_.rotate(user) if rotate else secrets_.get(user)
    return {"user": user, "secret": secret, "per_user": secrets_.per_user, "header": SIGNATURE_HEADER,
            "scheme": 'HMAC-SHA256 of "<t>.<body>", sent as t=<unix time>,v1=<hex>'}


@bp.get("/presets")
def presets() -> dict[str, Any]:
    """The performance presets a job's ``performance`` may name, per model family: what each sets, its speed
    LoRA (``configured``: whether models.yaml has it for the family) and its ``source``."""
    cfg: Config = current_app.extensions["multigen.config"]
    return {"presets": cfg.presets.describe(cfg.models.lora)}


@bp.get("/wildcards")
def wildcards() -> dict[str, Any]:
    """The wildcards a prompt may name as ``__name__``: the built-in files and the users' (``wildcards_dir``,
    replacing built-in ones of their name), each with its line count and ``source``."""
    cfg: Config = current_app.extensions["multigen.config"]
    return {"wildcards": cfg.wildcards.describe()}


def _with_families(param: dict[str, Any]) -> dict[str, Any]:
    """A parameter's description, with the model types that alone take it (``families``) or refuse it
    (``refused_by``) when not every family takes it (``catalog.family_support``)."""
    return {**param, **family_support(param["name"])}


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return current_app.extensions["multigen.openapi"]


@bp.get("/docs")
def docs() -> Response:
    return Response(DOCS_HTML, mimetype="text/html")


def error_response(code: str, message: str, status: int, field: str | None = None) -> tuple[Response, int]:
    """The one JSON error shape of API.md."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return jsonify({"error": err}), status


def _register_errors(app: Flask) -> None:
    @app.errorhandler(MultigenError)
    def _multigen_error(e: MultigenError):
        if e.http_status >= 500:
            log.warning("%s: %s", e.code, e.message)
        response = jsonify(e.to_dict())
        response.headers.update(e.headers())  # Retry-After of a limit that passes with time
        if e.http_status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="multigen"'
        return response, e.http_status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        status = e.code or 500
        code = HTTP_CODES.get(status) or (e.name or "error").lower().replace(" ", "_")
        response, status = error_response(code, e.description or e.name, status)
        if status == 405 and getattr(e, "valid_methods", None):
            response.headers["Allow"] = ", ".join(e.valid_methods)
        return response, status

    @app.errorhandler(PipeError)
    def _pipe_error(e: PipeError):  # bad input found by a pipe's own checks
        allowed = f"; allowed: {e.allowed}" if e.allowed else ""
        return error_response("invalid", f"{e}{allowed}", 400, e.param)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        # the path only, never the query string: it may carry an ?access_token=
        # %r: a path is the client's text, and quoted it cannot forge log lines
        log.exception("unexpected error in %s %r", request.method, request.path)
        from ..failures import storage_error

        busy = storage_error(e)  # a locked or read-only store, a full disk: the admin's to fix, try later
        if busy:
            response, status = error_response("service_unavailable", busy.replace("queue the job again", "try again"), 503)
            response.headers["Retry-After"] = "5"
            return response, status
        return error_response("internal_error", "internal server error (logged)", 500)


def _stream_limiter(config: Config) -> events.StreamLimiter:
    """Event streams allowed at once: each holds a waitress thread, so two always stay for the rest."""
    cap = min(config.server.max_event_streams, max(1, config.server.threads - 2))
    if cap < config.server.max_event_streams:
        log.warning("server.max_event_streams %d lowered to %d: %d waitress threads must leave room for "
                    "other requests", config.server.max_event_streams, cap, config.server.threads)
    return events.StreamLimiter(cap, config.server.max_event_streams_per_user)


def create_app(config: Config, service: GenerationService) -> Flask:
    """Build the application.

    Args:
        config: the loaded configuration.
        service: the generation service, usually a started ServiceThread (kept in
            ``app.extensions["multigen.service"]``).

    Returns:
        the Flask app; ``app.extensions["multigen.stopping"]`` is set to end event streams on shutdown.

    Raises:
        TypeError: ``service`` lacks a method of :class:`GenerationService`.
    """
    missing = missing_methods(service)
    if missing:
        raise TypeError(f"create_app needs a GenerationService; {type(service).__name__} lacks {', '.join(missing)}")
    here = Path(__file__).resolve().parent
    # explicit paths: Flask cannot search for the package path of `multigen`, which has no folder of its own
    app = Flask(__name__, root_path=str(here), instance_path=str(config.data_dir / "instance"),
                static_folder=None)
    # the largest body of any route (uploads, jobs); guards.RequestGuard.limit_body lowers it for the others
    app.config["MAX_CONTENT_LENGTH"] = guards.upload_body_limit(config.limits)
    app.json.sort_keys = False
    app.config["MULTIGEN_HEARTBEAT_SECONDS"] = float(os.environ.get("MULTIGEN_HEARTBEAT_SECONDS",
                                                                    events.HEARTBEAT_SECONDS))
    app.extensions["multigen.config"] = config
    app.extensions["multigen.service"] = service
    # the model list's own view of models.yaml: each model's family is detected from its files once
    app.extensions["multigen.catalog"] = ModelCatalog(config.models, config.model_dir)
    app.extensions["multigen.users"] = users = UserTable(config.file, config.users)
    app.extensions["multigen.schemas"] = schemas = Schemas(config)
    app.extensions["multigen.uploads"] = store = uploads.UploadStore.from_limits(config.data_dir / "uploads",
                                                                                config.limits)
    store.prune()
    app.extensions["multigen.event_streams"] = _stream_limiter(config)
    app.extensions["multigen.stopping"] = threading.Event()
    app.extensions["multigen.openapi"] = build_document(schemas, auth=bool(config.users),
                                                        metrics_token=bool(config.server.metrics_token),
                                                        models=tuple(config.models.base),
                                                        loras=tuple(config.models.lora),
                                                        upload_max_bytes=config.limits.upload_max_bytes)
    # metrics first: its before_request times the whole request, auth failures included; then Host and
    # Origin (and preflights, which carry no token), the token, and last the route's body limit
    app.extensions["multigen.metrics"] = metrics.HttpMetrics(app)
    app.extensions["multigen.guard"] = guard = guards.RequestGuard(config, app.url_map,
                                                                   users if config.users else None)
    app.before_request(guard.before_request)
    app.before_request(auth.authenticate)
    app.before_request(guard.limit_body)
    app.after_request(guard.after_request)
    for blueprint in (bp, sessions.bp, jobs.bp, images.bp, uploads.bp, events.bp, metrics.bp):
        app.register_blueprint(blueprint)
    from .a1111 import bp as a1111_bp
    from .a1111.errors import as_a1111_error
    from .web import bp as web_bp

    app.register_blueprint(web_bp)
    app.register_blueprint(a1111_bp)
    from .openai_images import as_openai_error, bp as openai_bp

    app.register_blueprint(openai_bp)
    # refusals made before the body is read (token, size), in each dialect's own shape
    guard.dialect_errors["/v1/"] = as_openai_error
    guard.dialect_errors["/sdapi/"] = as_a1111_error
    _register_errors(app)
    return app
