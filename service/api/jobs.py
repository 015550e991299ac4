"""Jobs: queue into a session, read, cancel, preview; and the queue (``/api/v1/jobs``, ``/queue``)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request, send_file

from multigen.pipes import spec as specs
from multigen.pipes.registry import pipe_spec

from ..errors import InvalidInput, NotFound
from ..grid import grid_file
from ..jobs import JobState
from .auth import owned_job, owned_session
from .context import config, json_body, service
from .schemas import parse, pipe_params
from .images import MAX_AGE, private_cache
from .sessions import job_schema_for
from .uploads import StagedImages, upload_store

bp = Blueprint("jobs", __name__, url_prefix="/api/v1")

JOB_STATES = tuple(state.value for state in JobState)
#: job fields that are arguments of queue_gen rather than setup parameters
QUEUE_ARGS = specs.JOB.names


def build_queue_args(session: dict[str, Any], body: dict[str, Any], staged: StagedImages) -> dict[str, Any]:
    """Turn a validated job body into ``queue_gen`` keyword arguments.

    Image references become file paths through ``staged`` (upload ids are checked against the user,
    ``data:`` URLs written to temporary files), ``control`` becomes ``ctypes``/``cscales``, and only
    parameters the request gave are passed, so the pipe's defaults apply to the rest. The service
    checks the values (count and seeds included).
    """
    classname = config().models.pipes[session["pipe"]].classname
    params = pipe_params(classname)
    args: dict[str, Any] = {k: body.pop(k) for k in QUEUE_ARGS if k in body}
    images = body.pop("images", None)
    if images:
        args["images"] = [staged.resolve(ref, f"images.{i}") for i, ref in enumerate(images)]
    spec = pipe_spec(classname)
    for param in spec.image_params:  # image_prompts: a list of references of its own, resolved as `images`
        refs = body.pop(param.name, None) if param.many and param.name not in spec.image_slots else None
        if refs:
            args[param.name] = [staged.resolve(ref, f"{param.name}.{i}") for i, ref in enumerate(refs)]
    mask = body.pop("mask", None)
    if mask:
        args["mask" if "mask" in params else "image_painted"] = staged.resolve(mask, "mask")
    control = body.pop("control", None)
    if control:
        types = [c.get("type") for c in control]  # the body is dumped exclude_unset: a `type` left out is absent
        if "ctypes" in params:
            if any(t is None for t in types):
                raise InvalidInput("control: every entry needs a `type` for this pipe", field="control")
            args["ctypes"] = types
        elif any(t is not None for t in types):
            raise InvalidInput("control: this pipe takes condition images, not condition types: give `scale` "
                               "only", field="control")
        args["cscales"] = [c["scale"] for c in control]
    args.update(body)
    return args


@bp.post("/sessions/<session_id>/jobs")
def create_job(session_id: str):
    """Queue a job of ``count`` images: ``202 {"job": Job}``.

    ``data:`` URL images live in temporary files for this request only: ``queue_gen`` copies the images of
    an accepted job into its inputs, and a refused one (any error, the service's included) leaves nothing.
    """
    session = owned_session(session_id)
    body = parse(job_schema_for(session), json_body()).model_dump(exclude_unset=True, exclude_none=True,
                                                                    mode="json")
    with upload_store().staging(g.get("user")) as staged:
        job = service().queue_gen(session_id, **build_queue_args(session, body, staged))["job"]
    return {"job": job}, 202


@bp.get("/sessions/<session_id>/jobs")
def list_jobs(session_id: str):
    """A session's jobs in queue order, optionally of one ``state``."""
    owned_session(session_id)
    state = request.args.get("state") or None
    if state is not None and state not in JOB_STATES:
        raise InvalidInput(f"unknown state {state!r}; allowed: {', '.join(JOB_STATES)}", field="state")
    return {"jobs": service().list_jobs(session_id, state=state)}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return {"job": owned_job(job_id)}


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel: queued -> cancelled now, running -> after the current step, finished -> 409."""
    owned_job(job_id)
    return {"job": service().cancel_job(job_id)}


@bp.post("/jobs/<job_id>/skip")
def skip_image(job_id: str):
    """Skip the image a running job is making: it stops at its next step, unwritten, and the job goes on with its
    next image (A1111's skip); not running -> 409."""
    owned_job(job_id)
    return {"job": service().cancel_job(job_id, image_only=True)}


@bp.get("/jobs/<job_id>/preview")
def job_preview(job_id: str):
    """The latest preview of a running job as JPEG; 404 when there is none."""
    owned_job(job_id)
    data = service().preview(job_id)
    if not data:
        raise NotFound(f"job {job_id} has no preview yet", field="job_id", code="no_preview")
    return private_cache(Response(data, mimetype="image/jpeg"), max_age=None)


@bp.get("/jobs/<job_id>/grid")
def job_grid(job_id: str):
    """The job's grid (``grid: true``, 2+ images; grid.py) as PNG; 404 when it has none (yet)."""
    job = owned_job(job_id)
    session = service().get_session(job["session_id"])
    path = grid_file(config().output_dir / session["user"] / session["project"] / session["id"], job_id)
    if not job.get("grid_url") or not path.is_file():
        raise NotFound(f"job {job_id} has no grid: only a succeeded job queued with grid: true and 2 or more "
                       "images has one", field="job_id", code="no_grid")
    return private_cache(send_file(path, mimetype="image/png", conditional=True, etag=True, max_age=MAX_AGE))


@bp.get("/queue")
def queue():
    """Queue depth and workers; with auth on, other users' job ids are hidden."""
    info = service().queue_info()
    if g.get("user"):
        workers = []
        for w in info["workers"]:
            w = dict(w)
            if w["job_id"]:
                try:
                    owned_job(w["job_id"])
                except NotFound:
                    w["job_id"] = None
            workers.append(w)
        info["workers"] = workers
    return info
