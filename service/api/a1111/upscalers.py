"""A1111's model upscalers: models.yaml's ``upscaler:`` entries, run as ``uov`` ``upscale_fast`` jobs.

``/sdapi/v1/extra-single-image`` with ``upscaler_1`` naming one queues a job of the caller's implicit session
(project ``a1111``, the ``Im2ImPipe`` pipe of models.yaml, the caller's model) and waits for it: the upscaler
runs on a worker's device like any job, never in the API's thread.
"""
from __future__ import annotations

import io
from typing import Any

from PIL import Image

from multigen.pipes.spec import UOV_PARAMS

from ..context import config, service
from ..waiting import implicit_session, job_images, wait_for_job
from .blueprint import PROJECT
from .common import caller, default_model
from .errors import A1111Invalid

#: the most an upscale job enlarges by (the spec's ``upscale_factor``)
MAX_FACTOR = next(p.maximum for p in UOV_PARAMS if p.name == "upscale_factor")


def model_upscalers() -> dict[str, Any]:
    """The upscaler models of models.yaml, by name."""
    return dict(config().models.upscaler)


def listed() -> list[dict[str, Any]]:
    """The model upscalers as ``/sdapi/v1/upscalers`` lists them."""
    return [{"name": name, "model_name": name, "model_path": entry.path.name, "model_url": None, "scale": 4.0}
            for name, entry in model_upscalers().items()]


def upscale_with_model(image: Image.Image, size: tuple[int, int], upscaler: str) -> Image.Image:
    """``image`` enlarged to ``size`` by the models.yaml upscaler ``upscaler`` (an ``upscale_fast`` job, then
    Lanczos to the exact size where the sides' factors differ).

    Raises:
        A1111Invalid: no image-to-image pipe in models.yaml, or a factor the upscale modes do not take
            (naming ``upscaling_resize``).
    """
    cfg = config()
    pipe = next((n for n, e in cfg.models.pipes.items() if e.classname == "Im2ImPipe"), None)
    if pipe is None:
        raise A1111Invalid("model upscalers run as image-to-image jobs, and models.yaml lists no pipe of class "
                           "Im2ImPipe; use upscaler_1 Lanczos", field="upscaler_1")
    factor = max(size[0] / image.width, size[1] / image.height)
    if not 1 < factor <= MAX_FACTOR:
        raise A1111Invalid(f"upscaler_1 {upscaler!r} enlarges by more than 1 and at most {MAX_FACTOR:g}x, not "
                           f"{factor:.3g}x; use upscaler_1 Lanczos to shrink", field="upscaling_resize")
    svc = service()
    user = caller()
    session = implicit_session(svc, user, PROJECT, pipe, default_model(user), [])
    job = svc.queue_gen(session["id"], prompt="", images=[image.convert("RGB")], uov="upscale_fast",
                        upscale_factor=factor, upscaler=upscaler)["job"]
    job = wait_for_job(svc, job["id"])
    made = job_images(svc, job)
    if job["state"] != "succeeded" or not made:
        error = job.get("error") or {}
        raise A1111Invalid(f"the upscale job {job['id']} {job['state']}: {error.get('message') or 'no image'}",
                           field="upscaler_1")
    out = Image.open(io.BytesIO(made[0][1])).convert("RGB")
    return out if out.size == tuple(size) else out.resize(size, Image.Resampling.LANCZOS)
