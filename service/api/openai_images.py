"""OpenAI's Images API at ``/v1``: what Open WebUI and the official ``openai`` SDK call.

- ``POST /v1/images/generations`` (JSON) runs the models.yaml pipe of class ``Prompt2ImPipe``;
- ``POST /v1/images/edits`` (multipart: one ``image``, an optional ``mask``) runs the pipe of class
  ``InpaintingPipe`` with a mask (OpenAI's mask, transparent = edit, becomes ours, white = redraw)
  and ``Im2ImPipe`` without one (a whole-image edit, as OpenAI's GPT image models do);
- ``GET /v1/models`` and ``GET /v1/models/<id>`` list the base models in OpenAI's shape.

Each call is one job in the caller's implicit session of project ``openai`` (:mod:`.waiting`), so it
is queued fairly with all other work and shows in the session API; the call waits for it (at most
``server.sync_call_timeout``) and answers with its images. The request becomes a body of the session
API's own ``JobCreate`` model and goes through :func:`.jobs.build_queue_args`: one set of checks for
every dialect. Fields of the session API's jobs that OpenAI lacks (``steps``, ``seeds``,
``negative_prompt``, ``guidance_scale``, ``strength``...) may be sent beside OpenAI's (the SDK's
``extra_body``); OpenAI's fields that mean nothing here (``quality``, ``style``...) are accepted and
ignored (docs/clients.md lists them).

Every error under ``/v1``, those of auth, body limits and unknown routes included, is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with the status the SDK maps to its exception
classes (:class:`OpenAIError`).
"""
from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from PIL import Image
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from multigen.pipes.errors import PipeError

from ..catalog import ModelCatalog
from ..errors import QUEUE_FULL_RETRY_SECONDS, Conflict, InvalidInput, MultigenError, NotFound, UnsupportedMedia
from .auth import auth_enabled, request_user
from .context import config, json_body, service
from .jobs import build_queue_args
from .schemas import parse
from .sessions import job_schema_for
from .uploads import upload_store
from .waiting import implicit_session, job_images, wait_for_job

log = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/v1")

#: the project of the implicit sessions this dialect's jobs run in
PROJECT = "openai"
#: OpenAI's model names: each stands for this server's default model of the pipe the call runs
OPENAI_MODELS = frozenset({"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5",
                           "gpt-image-2", "chatgpt-image-latest"})
#: OpenAI fields accepted and ignored: they choose things this server does not have (docs/clients.md)
IGNORED = frozenset({"quality", "style", "background", "moderation", "output_compression", "partial_images",
                     "safety_identifier", "complexity", "frame_count", "frame_duration_ms", "svg",
                     "input_fidelity"})
#: OpenAI fields read by this module
OPENAI_FIELDS = frozenset({"model", "prompt", "n", "size", "response_format", "output_format", "user", "stream",
                           "image", "mask", "markup"}) | IGNORED
#: session API job fields OpenAI words otherwise (n, size, the image files): not taken as extensions
REPLACED = {"count": "n", "width": "size", "height": "size", "images": "image"}
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
RESPONSE_FORMATS = ("b64_json", "url")
#: the models whose calls answer URLs unless ``response_format`` says otherwise (as OpenAI's do)
URL_DEFAULT_MODELS = frozenset({"dall-e-2", "dall-e-3"})
#: an OpenAI ``type`` per HTTP status (anything else: invalid_request_error)
ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
#: the request parameter an error of the session API's checks names, as OpenAI's ``param``
PARAMS = {"count": "n", "width": "size", "height": "size", "images": "image", "pipe": "model",
          "Authorization": None, "body": None, "Content-Type": None, "Host": None, "Origin": None, "queue": None,
          "timeout": None}


class OpenAIError(MultigenError):
    """Any error of the API, worded as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

    Its status and headers are the original's (with ``Retry-After`` on a 429 that names none, and
    ``x-should-retry: false`` where the SDK's automatic retry would only repeat the same failure).
    """

    def __init__(self, error: MultigenError):
        super().__init__(error.message, field=error.field, code=error.code)
        self.original = error
        self.http_status = error.http_status

    @property
    def param(self) -> str | None:
        """The request parameter the error names, as the OpenAI request calls it (None: no parameter)."""
        if not self.field:
            return None
        head = self.field.split(".")[0]
        return PARAMS[head] if head in PARAMS else self.field

    def headers(self) -> dict[str, str]:
        headers = dict(self.original.headers())
        if self.http_status == 429:
            headers.setdefault("Retry-After", str(QUEUE_FULL_RETRY_SECONDS))
        if self.http_status == 409 or self.http_status >= 500:  # a cancelled or failed job, a timeout
            headers["x-should-retry"] = "false"
        if self.http_status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="multigen"'
        return headers

    def to_dict(self) -> dict[str, Any]:
        status = self.http_status
        kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        code = "invalid_api_key" if status == 401 else self.code
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def as_openai_error(error: MultigenError) -> OpenAIError:
    """``error`` in OpenAI's words (for refusals made before the app sees a request: server.py)."""
    return error if isinstance(error, OpenAIError) else OpenAIError(error)


def _respond(error: MultigenError) -> tuple[Response, int]:
    """The JSON answer of any error under ``/v1``."""
    shaped = as_openai_error(error)
    response = jsonify(shaped.to_dict())
    response.headers.update(shaped.headers())
    return response, shaped.http_status


@bp.errorhandler(MultigenError)
def _multigen_error(e: MultigenError):
    if e.http_status >= 500:
        log.warning("%s: %s", e.code, e.message)
    return _respond(e)


@bp.errorhandler(PipeError)
def _pipe_error(e: PipeError):  # bad input found by a pipe's own checks
    allowed = f"; allowed: {e.allowed}" if e.allowed else ""
    return _respond(InvalidInput(f"{e}{allowed}", field=e.param))


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException):
    error = MultigenError(e.description or e.name, code=(e.name or "error").lower().replace(" ", "_"))
    error.http_status = e.code or 500
    response, status = _respond(error)
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        response.headers["Allow"] = ", ".join(e.valid_methods)
    return response, status


@bp.errorhandler(Exception)
def _unexpected(e: Exception):
    log.exception("unexpected error in %s %r", request.method, request.path)  # the path: no ?access_token=
    error = MultigenError("internal server error (logged)", code="internal_error")
    return _respond(error)


# ---- the request ---------------------------------------------------------------------------------------
def catalog() -> ModelCatalog:
    return current_app.extensions["multigen.catalog"]


def pipe_of_class(classname: str) -> str:
    """The first models.yaml pipe of ``classname``.

    Raises:
        NotFound: the server's models.yaml has none (naming what to add).
    """
    for name, entry in config().models.pipes.items():
        if entry.classname == classname:
            return name
    raise NotFound(f"this server's models.yaml has no pipe of class {classname}, which this call needs: add one "
                   f"under `pipes:` (see docs/models.md)", field="model", code="model_not_found")


def base_model(name: Any, pipe: str) -> str:
    """The models.yaml base model a request's ``model`` names; OpenAI's own names (and none) stand for the
    first base model that runs ``pipe``.

    Raises:
        InvalidInput: an unknown name (400 ``model_not_found``, listing the known ones).
    """
    base = config().models.base
    if name is None or name == "" or name in OPENAI_MODELS:
        for model in base:
            if pipe in catalog().usable_pipes(model):
                return model
        raise InvalidInput(f"no model of this server runs the {pipe} pipe", field="model", code="model_not_found")
    if not isinstance(name, str) or name not in base:
        known = ", ".join([*base, *sorted(OPENAI_MODELS)])
        raise InvalidInput(f"model {str(name)[:100]!r} does not exist on this server; known: {known}",
                           field="model", code="model_not_found")
    return name


def count_of(value: Any, field: str = "n") -> int:
    """``n``: a whole number from 1 to ``limits.max_count`` (1 when left out)."""
    if value is None:
        return 1
    top = config().limits.max_count
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # a multipart field
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise InvalidInput(f"{field} must be a whole number from 1 to {top} (limits.max_count); got "
                           f"{str(value)[:40]!r}", field=field, code="invalid_value")
    return value


def size_of(value: Any) -> tuple[int, int] | None:
    """``size``: ``"WIDTHxHEIGHT"``, or ``"auto"`` / none (None: the model's or the input image's size).
    Its range is checked with the session API's (``limits.max_width``...), naming ``size``.

    Raises:
        InvalidInput: not of that form.
    """
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        w, sep, h = value.lower().partition("x")
        if sep and w.isdigit() and h.isdigit():
            return int(w), int(h)
    raise InvalidInput(f"size must be \"auto\" or \"WIDTHxHEIGHT\" (e.g. \"512x512\"); got {str(value)[:40]!r}",
                       field="size", code="invalid_value")


def choice(fields: dict[str, Any], name: str, allowed: tuple[str, ...] | Any, default: str) -> str:
    value = fields.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise InvalidInput(f"{name} must be one of {', '.join(allowed)}; got {str(value)[:40]!r}", field=name,
                           code="invalid_value")
    return value


class Call:
    """One generation or edit call: its OpenAI fields checked, the job body built from them."""

    def __init__(self, fields: dict[str, Any], classname: str):
        if fields.get("stream") not in (None, False, "false"):
            raise InvalidInput("streaming is not supported: leave `stream` out (the call answers when its images "
                               "are done)", field="stream", code="unsupported_value")
        if fields.get("markup") is not None:
            raise InvalidInput("markup images are not supported: send a mask (transparent = the area to edit)",
                               field="markup", code="unsupported_value")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("prompt is required: the text that describes the image", field="prompt",
                               code="missing_required_parameter")
        self.pipe = pipe_of_class(classname)
        self.model = base_model(fields.get("model"), self.pipe)
        self.count = count_of(fields.get("n"))
        self.size = size_of(fields.get("size"))
        # OpenAI's own default: URLs for the DALL-E models, base64 for the GPT image models (and here for ours)
        default_format = "url" if fields.get("model") in URL_DEFAULT_MODELS else "b64_json"
        self.response_format = choice(fields, "response_format", RESPONSE_FORMATS, default_format)
        self.output_format = choice(fields, "output_format", tuple(OUTPUT_FORMATS), "png")
        user = fields.get("user")
        # OpenAI's `user` names an end user of the caller's own service: with auth on the caller is the token's
        # user, whatever it says; without auth it names the session's owner, as the session API's `user` does
        self.user = request_user(user if isinstance(user, str) and user and not auth_enabled() else None)
        self.body: dict[str, Any] = {"prompt": prompt, "count": self.count}
        if self.size is not None:
            self.body["width"], self.body["height"] = self.size

    def extend(self, extra: dict[str, Any]) -> None:
        """Take the session API's job fields sent beside OpenAI's (``steps``, ``seeds``...).

        Raises:
            InvalidInput: a field OpenAI's own replaces (``count``: use ``n``...).
        """
        for name, value in extra.items():
            if name in REPLACED or name == "mask":
                raise InvalidInput(f"{name}: send {REPLACED.get(name, 'mask')} instead, as OpenAI's API names it",
                                   field=name, code="unknown_parameter")
            self.body[name] = value

    def run(self) -> dict[str, Any]:
        """Queue the job in the caller's implicit session, wait for it and answer OpenAI's ``ImagesResponse``.

        Raises:
            MultigenError: a refused job (400 naming the field, 429...), a timeout (504), a job that failed
            (400 for bad input found by the pipe, else 500) or was cancelled by someone else (409).
        """
        svc = service()
        session = implicit_session(svc, self.user, PROJECT, self.pipe, self.model)
        try:
            body = parse(job_schema_for(session), self.body).model_dump(exclude_unset=True, exclude_none=True,
                                                                       mode="json")
        except InvalidInput as e:
            if e.field not in ("width", "height") or self.size is None:
                raise
            raise InvalidInput(f"size {self.size[0]}x{self.size[1]} is refused: {e.message} (limits.max_width, "
                               "limits.max_height)", field="size", code="invalid_value") from None
        with upload_store().staging(None) as staged:  # data: URLs only: no upload of anyone is looked up
            job = svc.queue_gen(session["id"], **build_queue_args(session, body, staged))["job"]
        log.info("session=%s job=%s openai %s call of user %s", session["id"], job["id"], self.pipe, self.user)
        job = wait_for_job(svc, job["id"])
        if job["state"] == "cancelled":
            raise Conflict(f"job {job['id']} was cancelled before it finished (in the session API or the web page)",
                           code="cancelled")
        if job["state"] == "failed":
            error = job.get("error") or {}
            failure = InvalidInput if error.get("field") else MultigenError
            raise failure(error.get("message") or f"job {job['id']} failed", field=error.get("field"),
                          code="job_failed")
        data = [self.item(image, png) for image, png in job_images(svc, job)]
        first = (job.get("images") or [{}])[0]
        return {"created": int(time.time()), "data": data, "output_format": self.output_format,
                "size": f"{first.get('width')}x{first.get('height')}" if first else None}

    def item(self, image: dict[str, Any], png: bytes) -> dict[str, Any]:
        """One entry of ``data``: the image as base64, or the absolute URL of it on this server."""
        if self.response_format == "url":
            query = "" if self.output_format == "png" else f"?format={self.output_format}"
            return {"url": f"{request.host_url.rstrip('/')}/api/v1/images/{image['id']}{query}"}
        if self.output_format != "png":
            pil_format, _ = OUTPUT_FORMATS[self.output_format]
            out = io.BytesIO()
            with Image.open(io.BytesIO(png)) as im:
                im.convert("RGB").save(out, format=pil_format, quality=95)
            png = out.getvalue()
        return {"b64_json": base64.b64encode(png).decode("ascii")}


def data_url(image: Image.Image) -> str:
    """A PIL image as a PNG ``data:`` URL: the session API's way to carry an image in a job body (the
    converted mask)."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def decoded(data: bytes, field: str) -> tuple[Image.Image, str]:
    """An uploaded file checked and decoded as the upload API does; what is no image is a 400 naming ``field``
    (OpenAI's answer to a bad file; the SDK raises BadRequestError for it).

    Raises:
        InvalidInput: not a PNG, JPEG or WebP image, or a corrupt one. TooLarge: too many bytes or pixels.
    """
    try:
        return upload_store().decode(data, field)
    except UnsupportedMedia as e:
        raise InvalidInput(e.message, field=field, code="invalid_image_format") from None


def openai_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (fully transparent pixels = the area to edit) as ours (white = redraw, black = keep).

    Raises:
        InvalidInput: naming ``mask``: another size than the image, or no alpha channel.
    """
    if mask.size != size:
        raise InvalidInput(f"mask is {mask.width}x{mask.height} but image is {size[0]}x{size[1]}: they must be the "
                           "same size", field="mask", code="invalid_image_size")
    if mask.mode != "RGBA":
        raise InvalidInput("mask has no alpha channel: its fully transparent pixels mark the area to edit (send a "
                           "PNG with transparency)", field="mask", code="invalid_image_format")
    return mask.getchannel("A").point(lambda a: 255 if a == 0 else 0)


# ---- routes --------------------------------------------------------------------------------------------
@bp.post("/images/generations")
def create_generation():
    """OpenAI's ``images.generate``: ``{"created", "data": [{"b64_json"} | {"url"}], ...}``."""
    body = json_body()
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", code="invalid_body")
    call = Call(body, "Prompt2ImPipe")
    call.extend({k: v for k, v in body.items() if k not in OPENAI_FIELDS})
    return call.run()


def image_parts() -> list[Any]:
    """The multipart files of ``image`` (the SDK names one ``image``, a list ``image[]``; ``image[0]``...)."""
    return [f for name, f in request.files.items(multi=True)
            if name == "image" or (name.startswith("image[") and name.endswith("]"))]


@bp.post("/images/edits")
def create_edit():
    """OpenAI's ``images.edit``: one image, an optional mask (inpainting), else a whole-image edit."""
    if not request.mimetype.startswith("multipart/form-data"):
        raise UnsupportedMedia("send the edit as multipart/form-data with an `image` file (and `mask`, `prompt`...)",
                               field="image")
    files = image_parts()
    if not files:
        raise InvalidInput("image is required: a PNG, JPEG or WebP file part named `image`", field="image",
                           code="missing_required_parameter")
    if len(files) > 1:
        raise InvalidInput(f"this server edits one image per call; got {len(files)}", field="image",
                           code="too_many_images")
    fields = {k: v for k, v in request.form.items() if v != ""}
    mask_file = request.files.get("mask")
    call = Call(fields, "InpaintingPipe" if mask_file is not None else "Im2ImPipe")
    store = upload_store()
    data = files[0].stream.read(store.max_bytes + 1)
    image, fmt = decoded(data, "image")  # checked here, so that a bad one is named `image`
    call.body["images"] = [f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")]
    if mask_file is not None:
        mask, _ = decoded(mask_file.stream.read(store.max_bytes + 1), "mask")
        call.body["mask"] = data_url(openai_mask(mask, image.size))
    call.extend({k: v for k, v in fields.items() if k not in OPENAI_FIELDS})
    return call.run()


def model_object(name: str, root: str | None = None) -> dict[str, Any]:
    """A model as OpenAI lists it; ``created`` is when its files were last written (0 when unknown)."""
    entry = config().models.base[root or name]
    try:
        created = int(entry.path.stat().st_mtime)
    except (OSError, ValueError):
        created = 0
    out: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "multigen"}
    if root:
        out["root"] = root
    return out


@bp.get("/models")
def list_models():
    """The base models of models.yaml (OpenAI's names are accepted too but not listed)."""
    return {"object": "list", "data": [model_object(name) for name in config().models.base]}


@bp.get("/models/<path:model>")
def get_model(model: str):
    """One base model; an OpenAI name answers as the default text-to-image model it stands for (``root``)."""
    if model in config().models.base:
        return model_object(model)
    if model in OPENAI_MODELS:
        return model_object(model, root=base_model(None, pipe_of_class("Prompt2ImPipe")))
    raise NotFound(f"model {model[:100]!r} does not exist on this server", field="model", code="model_not_found")


ROUTE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@bp.route("/", defaults={"rest": ""}, methods=ROUTE_METHODS)
@bp.route("/<path:rest>", methods=ROUTE_METHODS)
def unknown_route(rest: str):
    """Any other path under ``/v1``: 404 (or 405 for a known path and another method) in OpenAI's shape."""
    adapter = current_app.url_map.bind("localhost")
    allowed = []
    for method in ROUTE_METHODS:
        try:
            endpoint, _ = adapter.match(request.path, method=method)
        except HTTPException:
            continue
        if endpoint != request.endpoint:
            allowed.append(method)
    if allowed:
        raise MethodNotAllowed(valid_methods=allowed, description=f"{request.method} is not allowed on "
                               f"{request.path}; allowed: {', '.join(allowed)}")
    raise NotFound(f"unknown route {request.method} {request.path[:200]}: this server speaks OpenAI's "
                   "/v1/images/generations, /v1/images/edits and /v1/models", code="unknown_url")
