"""The OpenAPI 3.1 document (``/api/v1/openapi.json``) and the page that renders it (``/api/v1/docs``).

Request schemas are the very pydantic models that validate requests (schemas.py), so the
document cannot drift from the checks; response models below describe API.md's shapes.
The page is self-contained: no CDN, no external asset.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..jobs import JobState
from .schemas import Schemas, SessionCreate
from .sessions import SESSION_STATES



class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobCounts(_Open):
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class Session(_Open):
    id: str
    user: str
    project: str
    pipe: str
    model: str
    loras: list[Any]
    state: Literal["open", "closed"]
    created_at: str
    image_count: int
    job_counts: JobCounts


class Image(_Open):
    id: str
    session_id: str
    job_id: str
    index: int
    seed: int
    width: int
    height: int
    url: str
    created_at: str


class Progress(_Open):
    step: int
    steps: int
    image: int
    fraction: float = Field(ge=0, le=1)


class JobError(_Open):
    type: str
    message: str


class Webhook(_Open):
    """A job's webhook (service/webhooks.py): ``waiting`` until the job ends, then its delivery's state."""

    url: str
    state: Literal["waiting", "pending", "delivered", "failed"]
    attempts: int = Field(ge=0)
    last_error: str | None = None
    next_try_at: str | None = None
    delivered_at: str | None = None


class WebhookSecret(_Open):
    user: str
    secret: str = Field(description="the key of the X-Multigen-Signature HMAC (docs/features.md)")
    per_user: bool = Field(description="false without users: one server-wide secret signs every delivery")
    header: str
    scheme: str


class Job(_Open):
    id: str
    session_id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: int | None = None
    count: int
    done: int
    skipped: list[int] = Field([], description="the places in the job of the images skipped while it ran (POST "
                                               "/api/v1/jobs/{id}/skip): none is made for them")
    seeds: list[int]
    params: dict[str, Any]
    progress: Progress | None = None
    eta_seconds: float | None = None
    error: JobError | None = None
    images: list[Image]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    grid_url: str | None = Field(None, description="the grid of a succeeded `grid: true` job of 2+ images")
    webhook: Webhook | None = Field(None, description="null without a `webhook_url`")


class Upload(_Open):
    id: str
    width: int
    height: int
    format: Literal["png", "jpeg", "webp"]


class Style(BaseModel):
    name: str
    prompt: str = Field(description="the template: `{prompt}` is replaced by the prompt, else the prompt comes "
                                    "first and the template after it, joined by \", \"")
    negative_prompt: str
    source: Literal["builtin", "user"]


class Wildcard(BaseModel):
    name: str = Field(description="written `__name__` in a prompt (`a/b`: the file b.txt in subfolder a)")
    lines: int = Field(description="its choices (0: a file that cannot be used, see `error`)")
    source: Literal["builtin", "user"]
    error: str | None = None


class PresetLora(BaseModel):
    name: str = Field(description="the LoRA's models.yaml name")
    weight: float
    configured: bool = Field(description="whether models.yaml has it for the family (else the preset's other "
                                         "values apply alone)")
    note: str | None = Field(None, description="why it is not used")


class Preset(BaseModel):
    family: str = Field(description="the model family it applies to (GET /api/v1/models `families`)")
    name: str = Field(description="a job's `performance`")
    description: str
    sets: dict[str, Any] = Field(description="the setup parameters it fills in where a job gives none")
    lora: PresetLora | None = Field(None, description="the speed LoRA it adds to the job's LoRAs")
    source: Literal["builtin", "user"]


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class Error(BaseModel):
    error: ErrorBody


class Worker(_Open):
    device: str
    state: str = Field(description="idle, running, stopped, dead (its loop died), or lost (another process's "
                                   "worker whose heartbeat stopped: the lease of its job expires)")
    job_id: str | None = None
    model: str | None = None
    id: str | None = Field(None, description="<host>:<pid>:<device>")
    host: str | None = None
    models: list[str] | None = Field(None, description="the models it holds (model affinity)")
    heartbeat_at: str | None = Field(None, description="its last heartbeat (PostgreSQL store: every worker of "
                                                       "the cluster is listed)")
    heartbeat_age_seconds: float | None = None


class Queue(_Open):
    queued: int
    running: int
    workers: list[Worker]


def _wrap(name: str, key: str, model: type[BaseModel], many: bool = False) -> type[BaseModel]:
    from pydantic import create_model

    kind = list[model] if many else model  # type: ignore[valid-type]
    return create_model(name, __base__=_Open, **{key: (kind, ...)})


RESPONSES: dict[str, type[BaseModel]] = {
    "SessionResponse": _wrap("SessionResponse", "session", Session),
    "SessionList": _wrap("SessionList", "sessions", Session, many=True),
    "JobResponse": _wrap("JobResponse", "job", Job),
    "JobList": _wrap("JobList", "jobs", Job, many=True),
    "ImageList": _wrap("ImageList", "images", Image, many=True),
    "UploadResponse": _wrap("UploadResponse", "upload", Upload),
    "Queue": Queue,
    "StyleList": _wrap("StyleList", "styles", Style, many=True),
    "PresetList": _wrap("PresetList", "presets", Preset, many=True),
    "WildcardList": _wrap("WildcardList", "wildcards", Wildcard, many=True),
    "WebhookSecret": WebhookSecret,
    "Error": Error,
}

ERRORS = {"400": "malformed or invalid", "401": "no or bad token",
          "403": "not yours, or a foreign Host or Origin (see server.cors_origins)",
          "404": "unknown id (or not yours)", "409": "conflict", "413": "too large", "415": "wrong media type",
          "429": "queue full, a quota, too many event streams or auth failures (with Retry-After)", "503": "unavailable"}

#: (method, path, summary, request body schema or None, success status, response schema or media type,
#:  query parameters, error statuses)
ROUTES: list[tuple[str, str, str, str | None, str, str, list[str], list[str]]] = [
    ("get", "/api/v1/health", "Service status, version, devices and queue", None, "200", "object", [], []),
    ("get", "/api/v1/models", "Models (each with its family and the pipes it runs), LoRAs, pipes, model families "
     "(what each runs, takes and refuses; its schedulers) and the SD-style schedulers", None, "200", "object", [],
     ["401"]),
    ("get", "/api/v1/styles", "Prompt styles a job's `styles` may name (`random` too: one drawn from each "
     "image's seed)", None, "200", "StyleList", [], ["401"]),
    ("get", "/api/v1/presets", "Performance presets a job's `performance` may name, per model family, with what "
     "each sets", None, "200", "PresetList", [], ["401"]),
    ("get", "/api/v1/wildcards", "Wildcards a prompt may name as `__name__` (the built-in files and the users' "
     "`wildcards_dir`), with their line counts", None, "200", "WildcardList", [], ["401"]),
    ("post", "/api/v1/sessions", "Open a session", "SessionCreate", "201", "SessionResponse", [],
     ["400", "401", "403", "413", "415", "429"]),
    ("get", "/api/v1/sessions", "The user's sessions", None, "200", "SessionList", ["project", "state", "user"],
     ["400", "401"]),
    ("get", "/api/v1/sessions/{session_id}", "One session", None, "200", "SessionResponse", [], ["401", "404"]),
    ("delete", "/api/v1/sessions/{session_id}", "Close a session (queued jobs cancelled, images kept)", None,
     "200", "SessionResponse", [], ["401", "404"]),
    ("post", "/api/v1/sessions/{session_id}/jobs", "Queue a job; the body schema is the session pipe's "
     "JobCreate_<pipe>", "JobCreate", "202", "JobResponse", [], ["400", "401", "404", "409", "413", "415", "429"]),
    ("get", "/api/v1/sessions/{session_id}/jobs", "A session's jobs in queue order", None, "200", "JobList",
     ["state"], ["400", "401", "404"]),
    ("get", "/api/v1/jobs/{job_id}", "One job", None, "200", "JobResponse", [], ["401", "404"]),
    ("post", "/api/v1/jobs/{job_id}/cancel", "Cancel a job", None, "200", "JobResponse", [],
     ["401", "404", "409"]),
    ("post", "/api/v1/jobs/{job_id}/skip", "Skip the image a running job is making (unwritten; the job goes on with "
     "its next image, and succeeds with the others)", None, "200", "JobResponse", [], ["401", "404", "409"]),
    ("get", "/api/v1/jobs/{job_id}/preview", "Latest preview of a running job", None, "200", "image/jpeg",
     ["access_token"],
     ["401", "404"]),
    ("get", "/api/v1/jobs/{job_id}/grid", "The job's images side by side (`grid: true`, 2+ images, succeeded)",
     None, "200", "image/png", ["access_token"], ["401", "404"]),
    ("get", "/api/v1/users/me/webhook-secret", "The secret the user's webhooks are signed with (the server's "
     "without users): X-Multigen-Signature: t=<unix>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">", None, "200",
     "WebhookSecret", [], ["401"]),
    ("post", "/api/v1/users/me/webhook-secret/rotate", "A new webhook secret; deliveries from now on use it",
     None, "200", "WebhookSecret", [], ["401"]),
    ("get", "/api/v1/queue", "Queue depth and workers", None, "200", "Queue", [], ["401"]),
    ("get", "/api/v1/sessions/{session_id}/images", "Images with an index above `after`, in index order", None,
     "200", "ImageList", ["after"], ["400", "401", "404"]),
    ("get", "/api/v1/images/{image_id}", "The image file (`format` converts)", None, "200", "image/*",
     ["format", "access_token"], ["400", "401", "404"]),
    ("get", "/api/v1/images/{image_id}/metadata", "Parameters that reproduce the image", None, "200", "object",
     [], ["401", "404"]),
    ("post", "/api/v1/uploads", "Upload an image (multipart `file`; PNG, JPEG or WebP); 413 `quota_exceeded` past "
     "the user's upload quota", "multipart", "201", "UploadResponse", [], ["400", "401", "413", "415"]),
    ("delete", "/api/v1/uploads/{upload_id}", "Delete one of the user's uploads (queued jobs keep their copies)",
     None, "200", "UploadResponse", [], ["401", "404"]),
    ("get", "/api/v1/events", "Server-sent events (`Last-Event-ID` resumes where the service can)", None, "200",
     "text/event-stream", ["session_id", "last_event_id", "access_token"], ["400", "401", "404", "429"]),
    ("get", "/metrics", "Prometheus metrics (a token with users or server.metrics_token)", None, "200",
     "text/plain", [], ["401"]),
]

#: what the server takes as an event id (events._last_event_id): a whole number that fits the store's 64 bits
EVENT_ID = {"type": "string", "pattern": "^[0-9]{1,19}$"}
#: the `state` filter of each list (the server answers 400 ``field: state`` to another value)
STATE_FILTERS = {"/api/v1/sessions": SESSION_STATES,
                 "/api/v1/sessions/{session_id}/jobs": tuple(state.value for state in JobState)}
QUERY_PARAMS = {
    "project": {"schema": {"type": "string"}},
    "state": {"schema": {"type": "string"}, "description": "only the sessions or jobs in this state"},
    "after": {"schema": {"type": "integer"}, "description": "last index seen; -1 or absent for all"},
    "format": {"schema": {"type": "string", "enum": ["png", "jpeg", "webp"]}},
    "session_id": {"schema": {"type": "string"}},
    "user": {"schema": {"type": "string"}, "description": "only without auth: whose sessions (else the token's)"},
    "last_event_id": {"schema": EVENT_ID, "description": "resume after this event (as the `Last-Event-ID` header "
                                                         "does; the header wins)"},
    "access_token": {"schema": {"type": "string"}, "description": "the bearer token, for an `<img>` or "
                                                                  "`EventSource` that cannot send a header"},
}


def _components(schemas: Schemas, model_names: tuple[str, ...] = (), lora_names: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    models: list[type[BaseModel]] = [SessionCreate, *schemas.jobs.values(), *RESPONSES.values()]
    for model in models:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in doc.pop("$defs", {}).items():
            out.setdefault(name, sub)
        out[model.__name__ if model.__name__ in RESPONSES else doc.get("title", model.__name__)] = doc
    session = out["SessionCreate"]["properties"]
    session["pipe"] = {**session["pipe"], "enum": list(schemas.jobs)}  # else 400: the server knows no other
    if model_names:
        session["model"] = {**session["model"], "enum": list(model_names)}
    if lora_names:  # a name, or {name, weight}: models.yaml's LoRAs (of the model's family, else 400 too)
        session["loras"]["items"] = {"anyOf": [{"type": "string", "enum": list(lora_names)},
                                               {"$ref": "#/components/schemas/LoraRef"}]}
        out["LoraRef"]["properties"]["name"] = {"type": "string", "enum": list(lora_names)}
    # anyOf, not oneOf: a body most pipes take ({"prompt": "x"}) matches several; the session's pipe decides
    out["JobCreate"] = {"description": "one of the per-pipe job bodies: the session's pipe decides",
                        "anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in schemas.jobs.values()]}
    return out


#: one message of an event stream (OpenAPI 3.1: the schema of a `text/event-stream` describes each event)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the `Last-Event-ID` that resumes after it "
                                                                  "(none on `stream.ended`)"},
    "event": {"type": "string", "description": "job.queued, job.progress, image.created, job.succeeded... "
                                             "(docs/api.md), stream.ended"},
    "data": {"type": "string", "contentMediaType": "application/json"},
    "retry": {"type": "integer", "minimum": 0}}}
#: the image types an upload may be (its bytes decide, not the part's Content-Type: 415 otherwise)
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/webp")


def _media(kind: str) -> dict[str, Any]:
    if kind == "text/event-stream":
        return {kind: {"schema": SSE_EVENT}}
    if "/" in kind:
        return {kind: {"schema": {"type": "string", "format": "binary"}}}
    ref = {"type": "object"} if kind == "object" else {"$ref": f"#/components/schemas/{kind}"}
    return {"application/json": {"schema": ref}}


def operation_id(method: str, path: str) -> str:
    """``get /api/v1/sessions/{session_id}/jobs`` -> ``get_sessions_session_id_jobs`` (what links name)."""
    words = [w.strip("{}") for w in path.removeprefix("/api/v1").split("/") if w]
    return "_".join([method, *words]).replace("-", "_")


#: OpenAPI links: (method, path, the id's JSON pointer in its success response, [(method, path) that take it])
_ID_LINKS = [("post", "/api/v1/sessions", "/session/id",
              [("get", "/api/v1/sessions/{session_id}"), ("delete", "/api/v1/sessions/{session_id}"),
               ("post", "/api/v1/sessions/{session_id}/jobs"), ("get", "/api/v1/sessions/{session_id}/jobs"),
               ("get", "/api/v1/sessions/{session_id}/images"), ("get", "/api/v1/events")]),
             ("post", "/api/v1/sessions/{session_id}/jobs", "/job/id",
              [("get", "/api/v1/jobs/{job_id}"), ("post", "/api/v1/jobs/{job_id}/cancel"),
               ("post", "/api/v1/jobs/{job_id}/skip"), ("get", "/api/v1/jobs/{job_id}/preview"),
               ("get", "/api/v1/jobs/{job_id}/grid")]),
             ("get", "/api/v1/jobs/{job_id}", "/job/images/0/id",
              [("get", "/api/v1/images/{image_id}"), ("get", "/api/v1/images/{image_id}/metadata")]),
             ("get", "/api/v1/sessions/{session_id}/images", "/images/0/id",
              [("get", "/api/v1/images/{image_id}"), ("get", "/api/v1/images/{image_id}/metadata")]),
             ("post", "/api/v1/uploads", "/upload/id", [("delete", "/api/v1/uploads/{upload_id}")])]
#: the body a link sends (a job any prompt-only pipe takes: two images and their grid)
_LINK_BODIES = {("post", "/api/v1/sessions/{session_id}/jobs"): {"prompt": "a lighthouse at dusk", "count": 2,
                                                                  "grid": True}}


def _links(paths: dict[str, Any]) -> None:
    """Add the OpenAPI links that chain an id from the response that made it to the routes that take it."""
    for method, path, pointer, targets in _ID_LINKS:
        response = next(iter(paths[path][method]["responses"].values()))  # the success, first
        links = response.setdefault("links", {})
        for to_method, to_path in targets:
            name = "session_id" if to_path == "/api/v1/events" else to_path.rsplit("{", 1)[1].split("}")[0]
            link = links[operation_id(to_method, to_path)] = {"operationId": operation_id(to_method, to_path),
                                                              "parameters": {name: f"$response.body#{pointer}"}}
            if (to_method, to_path) in _LINK_BODIES:
                link["requestBody"] = _LINK_BODIES[to_method, to_path]
                link["x-schemathesis"] = {"merge_body": False}  # the whole body, not merged into a drawn one


def build_document(schemas: Schemas, auth: bool, metrics_token: bool = False, models: tuple[str, ...] = (),
                   loras: tuple[str, ...] = (), upload_max_bytes: int | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this app (its pipes decide the job schemas); ``/metrics`` needs a
    bearer token with ``auth`` (a user's) or ``metrics_token`` (``server.metrics_token``). ``models``,
    ``loras``: the names a session may open (models.yaml); ``upload_max_bytes``: the largest upload."""
    paths: dict[str, Any] = {}
    for method, path, summary, body, status, response, query, errors in ROUTES:
        op: dict[str, Any] = {"operationId": operation_id(method, path), "summary": summary,
                              "responses": {status: {"description": "success", "content": _media(response)}}}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in ("session_id", "job_id", "image_id", "upload_id") if "{" + p + "}" in path]
        params += [{"name": q, "in": "query", "required": False, **QUERY_PARAMS[q]} for q in query]
        for param in params:
            if param["name"] == "state":
                param["schema"] = {"type": "string", "enum": list(STATE_FILTERS[path])}
        if "last_event_id" in query:
            params.append({"name": "Last-Event-ID", "in": "header", "required": False, "schema": EVENT_ID})
        if params:
            op["parameters"] = params
        if body == "multipart":
            size = f"; at most {upload_max_bytes} bytes (413)" if upload_max_bytes else ""
            op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "properties": {"file": {
                    "type": "string", "format": "binary", "contentMediaType": UPLOAD_TYPES[0],
                    "description": f"a PNG, JPEG or WebP image (its bytes decide: 415 otherwise){size}"}},
                "required": ["file"]}, "encoding": {"file": {"contentType": ", ".join(UPLOAD_TYPES)}}}}}
        elif body:
            op["requestBody"] = {"required": True, "content": _media(body)}
        if "401" in errors and "429" not in errors:  # repeated auth failures from a client (api/ratelimit.py)
            errors = [*errors, "429"]
        for code in errors:
            op["responses"][code] = {"description": ERRORS[code], "content": _media("Error")}
        if "429" in errors:  # every limit that passes with time says when to come back
            op["responses"]["429"]["headers"] = {"Retry-After": {
                "required": True, "description": "seconds to wait", "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
        if path == "/api/v1/health" or (path == "/metrics" and not metrics_token and not auth):
            op["security"] = []
        elif path == "/metrics" and metrics_token:
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = op
    _links(paths)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "multigen", "version": __version__,
                 "description": "Session-based image generation server. Errors are "
                                "`{\"error\": {\"code\", \"message\", \"field\"?}}`."},
        "paths": paths,
        "components": {"schemas": _components(schemas, models, loras),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "x-multigen-job-schemas": {pipe: f"#/components/schemas/{m.__name__}" for pipe, m in schemas.jobs.items()},
    }
    if auth:
        doc["security"] = [{"bearer": []}]
    return doc
