"""Sessions: open, list, read, close (``/api/v1/sessions``).

The service checks pipe, model and LoRAs (and the per-user session limit) and raises with
the field and the known values; the API checks only the body's shape and who asks.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from ..errors import InvalidInput
from .auth import list_filter_user, owned_session, request_user
from .context import json_body, schemas, service
from .schemas import SessionCreate, parse

bp = Blueprint("sessions", __name__, url_prefix="/api/v1")

SESSION_STATES = ("open", "closed")


@bp.post("/sessions")
def create_session():
    """Open a session: ``201 {"session": Session}``."""
    body = parse(SessionCreate, json_body())
    user = request_user(body.user)
    loras = [ref if isinstance(ref, str) else {"name": ref.name, "weight": ref.weight} for ref in body.loras]
    return {"session": service().create_session(user, body.project, body.pipe, body.model, loras=loras)}, 201


@bp.get("/sessions")
def list_sessions():
    """The user's sessions, filtered by ``project`` and ``state``."""
    state = request.args.get("state") or None
    if state is not None and state not in SESSION_STATES:
        raise InvalidInput(f"unknown state {state!r}; allowed: {', '.join(SESSION_STATES)}", field="state")
    sessions = service().list_sessions(user=list_filter_user(), project=request.args.get("project") or None,
                                       state=state)
    return {"sessions": sessions}


@bp.get("/sessions/<session_id>")
def get_session(session_id: str):
    return {"session": owned_session(session_id)}


@bp.delete("/sessions/<session_id>")
def close_session(session_id: str):
    """Close a session: its queued jobs are cancelled, the running one stops at the next step."""
    owned_session(session_id)
    return {"session": service().close_session(session_id)}


def job_schema_for(session: dict[str, Any]):
    """The ``JobCreate`` model of a session's pipe.

    Raises:
        InvalidInput: the pipe was removed from models.yaml since the session was opened.
    """
    pipe = session["pipe"]
    model = schemas().jobs.get(pipe)
    if model is None:
        raise InvalidInput(f"the session's pipe {pipe!r} is no longer configured; known: "
                           f"{', '.join(sorted(schemas().jobs))}", field="pipe")
    return model
