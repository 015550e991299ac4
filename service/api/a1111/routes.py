"""``txt2img``, ``img2img``, ``progress``, ``interrupt`` and ``skip``.

A generation call becomes one job of ``batch_size * n_iter`` images (seeds ``seed, seed+1, ...`` as
A1111 gives them) in the caller's implicit session of project ``a1111`` for the call's pipe, model
and ``<lora:...>`` set, and waits for it (``api/waiting.py``). Pipes, by the models.yaml class:

- txt2img: ``Prompt2ImPipe``;
- img2img without a mask: ``Im2ImPipe``;
- img2img with a mask: ``MaskedIm2ImPipe`` (any model: the masked area is redrawn at
  ``denoising_strength``, the rest kept), or ``InpaintingPipe`` where ``inpainting_fill`` is 2 or 3
  (latent noise / nothing: the area is drawn afresh, what an inpainting model is for), each falling
  back to the other when models.yaml lacks it. ``inpaint_full_res`` (A1111's "only masked", on by
  default) becomes the pipes' ``full_res`` with ``inpaint_full_res_padding`` as ``full_res_padding``:
  only the mask's box is generated, at ``width``x``height``, and the image keeps its size.
"""
from __future__ import annotations

import base64
import io
import random
import time
from typing import Any

from flask import current_app, request
from PIL import Image, ImageOps

from ...errors import Conflict, MultigenError
from ..context import config, service
from ..waiting import current_job, implicit_session, job_images, wait_for_job
from ...loratags import split_lora_tags
from ...prompt_tools import escape_arrays
from .blueprint import PROJECT, bp
from .common import caller, decode_image, default_model, find_model, model_hash, options_store, parse_body
from .errors import A1111Invalid, a1111_field
from .infotext import info_json, infotext, settings_of
from .models import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from .names import UnknownName, canonical_sampler, to_scheduler

#: the largest seed (A1111 draws from 0..2^32-1)
MAX_SEED = 2**32 - 1


def _pipe_named(*classnames: str) -> str:
    """The first models.yaml pipe whose class is one of ``classnames`` (in that order of preference).

    Raises:
        A1111Invalid: models.yaml has none of them (naming ``init_images``).
    """
    pipes = config().models.pipes
    for classname in classnames:
        for name, entry in pipes.items():
            if entry.classname == classname:
                return name
    raise A1111Invalid(f"this server's models.yaml has no pipe of class {' or '.join(classnames)}",
                       field="init_images")


def _is_flow(model: str) -> bool:
    """The model runs flow-matching schedulers (Flux, Qwen-Image, Z-Image)."""
    family = current_app.extensions["multigen.catalog"].family(model)
    return bool(family is not None and family.schedulers and any(s.startswith("flow_") for s in family.schedulers))


def _check_limits(req: GenerationRequest) -> int:
    """The job's image count; sizes and counts past the config's limits are 422s naming the field."""
    limits = config().limits
    for field, value, most in (("width", req.width, limits.max_width), ("height", req.height, limits.max_height)):
        if value > most:
            raise A1111Invalid(f"{field} {value} is more than this server allows (limits.max_{field} = {most})",
                               field=field)
    count = req.batch_size * req.n_iter
    if count > limits.max_count:
        raise A1111Invalid(f"batch_size x n_iter = {count} images is more than this server allows per call "
                           f"(limits.max_count = {limits.max_count})", field="batch_size")
    return count


def _seeds(seed: int, count: int) -> list[int]:
    """A1111's seeds: ``seed, seed+1, ...``; -1 draws the first."""
    first = random.randrange(MAX_SEED + 1) if seed is None or seed < 0 else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def _generate(req: GenerationRequest, pipe: str, images: list[Image.Image], extra: dict[str, Any],
              img2img: bool) -> dict[str, Any]:
    """Queue the call's job, wait for it and answer as A1111 does."""
    svc = service()
    user = caller()
    overrides = req.override_settings or {}
    model = (find_model(overrides["sd_model_checkpoint"], "override_settings.sd_model_checkpoint")
             if overrides.get("sd_model_checkpoint") else default_model(user))
    # the server's styles (GET /sdapi/v1/prompt-styles); an unknown one is a 422 naming styles.N before any
    # session opens (A1111 would skip it silently: a typo would go unnoticed)
    styles = config().styles.check(req.styles)
    prompt, loras = split_lora_tags(req.prompt, config().models.lora)
    prompt = escape_arrays(prompt)  # A1111's [[a, b]] weakens "a, b"; it is no multigen array (prompt_tools.py)
    negative, negative_loras = split_lora_tags(req.negative_prompt, config().models.lora, "negative_prompt")
    if negative_loras:
        raise A1111Invalid("<lora:...> tags belong in the prompt, not in negative_prompt", field="negative_prompt")
    try:  # no sampler named: the model's own scheduler (its models.yaml or diffusers default)
        named = req.sampler_name or req.sampler_index
        named = None if named in (None, "", "Default") else named
        sampler = canonical_sampler(named) if named else "Default"
        scheduler = to_scheduler(sampler, req.scheduler, _is_flow(model)) if named else None
    except UnknownName as e:
        raise A1111Invalid(str(e), field=e.field) from None
    count = _check_limits(req)
    if "refiner_switch" in extra:
        refiner = config().models.base[model].refiner
        if find_model(getattr(req, "refiner_checkpoint", None), "refiner_checkpoint") != refiner:
            raise A1111Invalid(f"refiner_checkpoint must be the refiner models.yaml configures for {model}: "
                               f"{refiner or 'none (add `refiner:` to its entry)'}", field="refiner_checkpoint")
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options_store().get(user).get("CLIP_stop_at_last_layers", 1))
    try:
        clip_skip = max(0, int(clip_skip) - 1)  # A1111 counts the last layer as 1; diffusers' clip_skip 0 = none
    except (TypeError, ValueError):
        raise A1111Invalid("CLIP_stop_at_last_layers must be a number", field="override_settings") from None
    params: dict[str, Any] = {"steps": req.steps, "guidance_scale": req.cfg_scale, "width": req.width,
                              "height": req.height, **extra}
    if scheduler is not None:
        params["scheduler"] = scheduler
    if clip_skip:
        params["clip_skip"] = clip_skip
    seeds = _seeds(req.seed, count)
    session = implicit_session(svc, user, PROJECT, pipe, model, loras)
    job = svc.queue_gen(session["id"], prompt=prompt, negative_prompt=negative or None, count=count, seeds=seeds,
                        images=images or None, styles=styles or None, **params)["job"]
    timestamp = time.strftime("%Y%m%d%H%M%S")
    job = wait_for_job(svc, job["id"])
    if job["state"] == "failed":
        error = job.get("error") or {}
        if error.get("field"):  # a value only the pipe could judge (a scheduler this model lacks...)
            raise A1111Invalid(error.get("message") or "invalid value", field=a1111_field(error["field"]))
        raise JobFailed(f"job {job['id']} failed: {error.get('message') or error.get('type') or 'unknown error'}")
    made = job_images(svc, job)  # cancelled (interrupt): the images made so far, as A1111 returns them
    done_seeds = [image["seed"] for image, _ in made] or seeds
    digest = model_hash(config(), model)[:10]
    # A1111's texts hold each image's prompt after its styles (the job applies them to the prompt without
    # its <lora:...> tags; the same styles, drawn with the same seed, wrap the prompt as sent)
    styled = [config().styles.apply(styles, req.prompt, req.negative_prompt, seed) for seed in done_seeds]
    infotexts = [infotext(s.prompt, s.negative_prompt,
                          settings_of(job["params"] | params, image["seed"], image["width"], image["height"],
                                      model, digest, loras, img2img)) for s, (image, _) in zip(styled, made)]
    echoed = req.model_dump()
    if img2img:  # A1111 leaves the images out of the echo
        echoed["init_images"], echoed["mask"] = None, None
    info = info_json(echoed, prompt=styled[0].prompt, negative_prompt=styled[0].negative_prompt, seeds=done_seeds,
                     infotexts=infotexts, sampler_name=sampler, scheduler=req.scheduler or "Automatic",
                     model=model, model_hash=digest, job_timestamp=timestamp, clip_skip=clip_skip + 1,
                     denoising_strength=extra.get("strength"), all_prompts=[s.prompt for s in styled],
                     all_negative_prompts=[s.negative_prompt for s in styled])
    encoded = [base64.b64encode(data).decode("ascii") for _, data in made] if req.send_images else []
    return {"images": encoded, "parameters": echoed, "info": info}


class JobFailed(MultigenError):
    """The job failed on its device: A1111 answers a failed generation with a 500-class error."""

    code = "job_failed"
    http_status = 500


@bp.post("/txt2img")
def txt2img():
    req = parse_body(Txt2ImgRequest)
    # A1111's refiner: only the model's configured one (models.yaml `refiner:`), checked in _generate
    refine = req.refiner_checkpoint not in (None, "", "None") and req.refiner_switch_at is not None
    extra = {"refiner_switch": req.refiner_switch_at} if refine else {}
    return _generate(req, _pipe_named("Prompt2ImPipe"), [], extra, img2img=False)


@bp.post("/img2img")
def img2img():
    req = parse_body(Img2ImgRequest)
    if not req.init_images:
        raise A1111Invalid("init_images: give at least one image", field="init_images")
    image = decode_image(req.init_images[0], "init_images").convert("RGB")
    extra: dict[str, Any] = {"strength": req.denoising_strength if req.denoising_strength is not None else 0.75}
    if req.mask:
        mask = decode_image(req.mask, "mask").convert("L")
        if mask.size != image.size:
            raise A1111Invalid(f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
                               "they must be the same size", field="mask")
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        order = (("InpaintingPipe", "MaskedIm2ImPipe") if req.inpainting_fill in (2, 3)
                 else ("MaskedIm2ImPipe", "InpaintingPipe"))
        pipe = _pipe_named(*order)
        extra["mask"] = mask
        extra["blur"] = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
        # A1111 sends 0/1 or a boolean; the pipes' spec checks the padding's range (0-1024 px) at queue time
        extra["full_res"] = bool(req.inpaint_full_res)
        if extra["full_res"]:
            extra["full_res_padding"] = req.inpaint_full_res_padding
    else:
        pipe = _pipe_named("Im2ImPipe")
    return _generate(req, pipe, [image], extra, img2img=True)


# ---- progress, interrupt, skip ------------------------------------------------------------------
IDLE_STATE = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}


@bp.get("/progress")
def progress():
    """The caller's own running (else next) job: never another user's."""
    svc = service()
    job = current_job(svc, caller(), PROJECT)
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": IDLE_STATE, "current_image": None, "textinfo": None}
    prog = job.get("progress") or {}
    fraction = float(prog.get("fraction") or 0.0)
    state = {**IDLE_STATE, "job": f"job {job['id']}", "job_count": 1, "job_no": int(prog.get("image") or 0),
             "sampling_step": int(prog.get("step") or 0), "sampling_steps": int(prog.get("steps") or 0),
             "interrupted": bool(job.get("cancel_requested")), "skipped": bool(job.get("skip_requested")),
             "job_timestamp": "".join(c for c in str(job.get("created_at") or "") if c.isdigit())[:14] or "0"}
    current = None
    if request.args.get("skip_current_image", "false").lower() not in ("true", "1"):
        preview = svc.preview(job["id"]) if job["state"] == "running" else None
        if preview:
            buf = io.BytesIO()
            Image.open(io.BytesIO(preview)).save(buf, format="PNG")
            current = base64.b64encode(buf.getvalue()).decode("ascii")
    textinfo = "queued" if job["state"] == "queued" else f"image {state['job_no'] + 1} of {job['count']}"
    return {"progress": fraction, "eta_relative": float(job.get("eta_seconds") or 0.0), "state": state,
            "current_image": current, "textinfo": textinfo}


def _cancel_current(image_only: bool = False) -> None:
    svc = service()
    job = current_job(svc, caller(), PROJECT)
    if job is not None:
        try:
            svc.cancel_job(job["id"], image_only=image_only)
        except Conflict:  # it finished meanwhile (or, for a skip, is still queued: no image to skip)
            pass


@bp.post("/interrupt")
def interrupt():
    """Cancel the caller's running (else next) job; its waiting call answers the images made so far."""
    _cancel_current()
    return {}


@bp.post("/skip")
def skip():
    """Skip the image the caller's running job is making: it stops at its next step, unwritten, and the job goes on
    with the next image of the batch (as A1111 does); the waiting call answers the images made."""
    _cancel_current(image_only=True)
    return {}
