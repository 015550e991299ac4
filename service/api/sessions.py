"""Sessions: open, list, read, close (``/api/v1/sessions``)."""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, request

from ..errors import InvalidInput
from .auth import list_filter_user, owned_session, request_user
from .context import config, json_body, schemas, service, unwrap
from .schemas import SessionCreate, parse

log = logging.getLogger(__name__)

bp = Blueprint("sessions", __name__, url_prefix="/api/v1")

SESSION_STATES = ("open", "closed")


def _known(field: str, value: str, known: dict[str, Any], what: str) -> None:
    if value not in known:
        raise InvalidInput(f"unknown {what} {value!r}; known: {', '.join(sorted(known)) or 'none'}",
                           field=field, code=f"unknown_{what}")


def _has_controlnet(pipe: str, model_type: str | None) -> bool:
    """Whether models.yaml has a ControlNet a session of ``pipe`` on a model of this type can use."""
    models = config().models
    wanted = models.pipes[pipe].extra.get("controlnet")
    if wanted:
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        return any(n in models.controlnet for n in names)
    return any(e.type in (None, model_type) or model_type is None for e in models.controlnet.values())


def _check_session_body(body: SessionCreate) -> list[Any]:
    """Check pipe, model and LoRAs against models.yaml; returns the LoRAs for the service."""
    models = config().models
    _known("pipe", body.pipe, models.pipes, "pipe")
    _known("model", body.model, models.base, "model")
    base_type = models.base[body.model].type
    if models.pipes[body.pipe].needs_cnet and not _has_controlnet(body.pipe, base_type):
        usable = sorted(n for n, e in models.base.items() if _has_controlnet(body.pipe, e.type))
        raise InvalidInput(f"pipe {body.pipe!r} needs a ControlNet for {base_type} models and none is configured; "
                           f"models it can use: {', '.join(usable) or 'none'}", field="model",
                           code="no_controlnet")
    loras: list[Any] = []
    for i, ref in enumerate(body.loras):
        name = ref if isinstance(ref, str) else ref.name
        field = f"loras.{i}" if isinstance(ref, str) else f"loras.{i}.name"
        _known(field, name, models.lora, "lora")
        lora_type = models.lora[name].type
        if base_type and lora_type and base_type != lora_type:
            same = sorted(n for n, e in models.lora.items() if e.type in (None, base_type))
            raise InvalidInput(f"LoRA {name!r} is for {lora_type} models, {body.model!r} is {base_type}; "
                               f"usable: {', '.join(same) or 'none'}", field=field, code="lora_mismatch")
        loras.append(ref if isinstance(ref, str) else {"name": ref.name, "weight": ref.weight})
    return loras


@bp.post("/sessions")
def create_session():
    """Open a session: ``201 {"session": Session}``."""
    body = parse(SessionCreate, json_body())
    loras = _check_session_body(body)
    user = request_user(body.user)
    svc = service()
    if callable(getattr(svc, "create_session", None)):  # raises MultigenError with its own status
        session = svc.create_session(user, body.project, body.pipe, body.model, loras=loras)
    else:  # metafusion's call answers {"error": ...} instead
        result = unwrap(svc.open_session(user, body.project, body.pipe, body.model, loras=loras), "open_session")
        session = svc.get_session_info(result["session_id"])
    log.info("session=%s opened by %s: %s %s", session["id"], user, body.pipe, body.model)
    return {"session": session}, 201


@bp.get("/sessions")
def list_sessions():
    """The user's sessions, filtered by ``project`` and ``state``."""
    state = request.args.get("state") or None
    if state is not None and state not in SESSION_STATES:
        raise InvalidInput(f"unknown state {state!r}; allowed: {', '.join(SESSION_STATES)}", field="state")
    sessions = service().list_sessions(user=list_filter_user(), project=request.args.get("project") or None,
                                       state=state)
    return {"sessions": list(sessions)}


@bp.get("/sessions/<session_id>")
def get_session(session_id: str):
    return {"session": owned_session(session_id)}


@bp.delete("/sessions/<session_id>")
def close_session(session_id: str):
    """Close a session: its queued jobs are cancelled, the running one stops at the next step."""
    session = owned_session(session_id)
    if session.get("state") != "closed":
        result = service().close_session(session_id)
        if isinstance(result, dict):
            unwrap(result, "close_session")
        log.info("session=%s closed", session_id)
    return {"session": service().get_session_info(session_id)}


def job_schema_for(session: dict[str, Any]):
    """The ``JobCreate`` model of a session's pipe."""
    pipe = session.get("pipe")
    model = schemas().jobs.get(pipe)
    if model is None:
        raise InvalidInput(f"the session's pipe {pipe!r} is no longer configured; known: "
                           f"{', '.join(sorted(schemas().jobs))}", field="pipe")
    return model
