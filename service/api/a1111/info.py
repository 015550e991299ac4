"""The A1111 routes clients read at start-up and the utilities: models, samplers, LoRAs, options,
``png-info``, ``extra-single-image``; and the no-op refreshes (models.yaml is read at start)."""
from __future__ import annotations

import os
from typing import Any

from flask import Response
from PIL import Image

from ..context import config, service
from ..guards import auth_mode
from .blueprint import bp
from .common import (caller, decode_image, default_model, encode_png, find_model, model_hash, model_title,
                     options_store, parse_body)
from .errors import A1111Invalid
from .infotext import parse_infotext
from .models import ExtraSingleImageRequest, OptionsRequest, PngInfoRequest
from .names import listed_samplers, listed_schedules
from .upscalers import listed as listed_model_upscalers, model_upscalers, upscale_with_model

#: upscalers this server has without a model (models.yaml's `upscaler:` models come after: upscalers.py)
UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


@bp.get("/sd-models")
def sd_models() -> list[dict[str, Any]]:
    cfg = config()
    out = []
    for name, entry in cfg.models.base.items():
        digest = model_hash(cfg, name)
        out.append({"title": model_title(cfg, name), "model_name": name, "hash": digest[:10], "sha256": digest,
                    "filename": entry.path.name, "config": None})
    return out


@bp.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return listed_samplers()


@bp.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return listed_schedules()


@bp.get("/upscalers")
def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0 if f else 1.0}
            for name, f in UPSCALERS.items()] + listed_model_upscalers()


@bp.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in ("Latent", "Latent (nearest)")]


@bp.get("/loras")
def loras() -> list[dict[str, Any]]:
    return [{"name": name, "alias": name, "path": entry.path.name, "metadata": {"ss_base_model_version": entry.type}}
            for name, entry in config().models.lora.items()]


@bp.get("/prompt-styles")
def prompt_styles() -> list[dict[str, Any]]:
    """The server's styles (built-in and the users' files), as A1111 lists its ``styles.csv``."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in config().styles]


@bp.get("/scripts")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@bp.get("/script-info")
def script_info() -> list[dict[str, Any]]:
    return []


@bp.get("/sd-vae")
def sd_vae() -> list[dict[str, Any]]:
    return []


@bp.get("/sd-modules")
def sd_modules() -> list[dict[str, Any]]:
    return []


@bp.get("/hypernetworks")
def hypernetworks() -> list[dict[str, Any]]:
    return []


@bp.get("/face-restorers")
def face_restorers() -> list[dict[str, Any]]:
    return []


@bp.get("/embeddings")
def embeddings() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}


@bp.get("/cmd-flags")
def cmd_flags() -> dict[str, Any]:
    """A1111's flags as they hold here: the API on, auth by the users table."""
    cfg = config()
    return {"api": True, "nowebui": False, "listen": cfg.server.host not in ("127.0.0.1", "localhost", "::1"),
            "port": cfg.server.port, "api_auth": "***" if auth_mode(cfg) == "tokens" else None,
            "ckpt_dir": str(cfg.model_dir), "lora_dir": str(cfg.model_dir), "data_dir": str(cfg.data_dir),
            "medvram": False, "lowvram": False, "no_half": False}


@bp.get("/memory")
def memory() -> dict[str, Any]:
    """``ram`` from the OS; ``cuda`` says what the workers' devices are (A1111 gives torch's counters)."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free_pages = os.sysconf("SC_AVPHYS_PAGES")
        ram = {"free": free_pages * page, "used": (pages - free_pages) * page, "total": pages * page}
    except (ValueError, OSError):
        ram = {"error": "unknown"}
    return {"ram": ram, "cuda": {"devices": service().devices()}}


@bp.post("/refresh-checkpoints")
def refresh_checkpoints() -> dict[str, Any]:
    """models.yaml is read at start-up: nothing to refresh (a restart reads changes)."""
    return {}


@bp.post("/refresh-loras")
def refresh_loras() -> dict[str, Any]:
    return {}


@bp.post("/refresh-vae")
def refresh_vae() -> dict[str, Any]:
    return {}


# ---- options --------------------------------------------------------------------------------------
@bp.get("/options")
def get_options() -> dict[str, Any]:
    """The keys clients read; ``sd_model_checkpoint`` is the caller's own default model."""
    user = caller()
    cfg = config()
    mine = options_store().get(user)
    model = default_model(user)
    return {"sd_model_checkpoint": model_title(cfg, model), "sd_checkpoint_hash": model_hash(cfg, model),
            "CLIP_stop_at_last_layers": int(mine.get("CLIP_stop_at_last_layers", 1)), "sd_vae": "Automatic",
            "samples_format": "png", "samples_save": True, "save_images_add_number": True,
            "outdir_samples": "", "eta_noise_seed_delta": 0, "sd_lora": "None", "lora_functional": False,
            "live_previews_enable": True, "live_preview_content": "Prompt", "show_progressbar": True,
            "enable_pnginfo": True, "sd_checkpoint_cache": 0, "img2img_fix_steps": False,
            "upscaler_for_img2img": None, "s_churn": 0.0, "s_noise": 1.0, "eta_ancestral": 1.0}


@bp.post("/options")
def set_options() -> Response:
    """Set the caller's ``sd_model_checkpoint`` and ``CLIP_stop_at_last_layers`` (kept across restarts in
    ``<data_dir>/a1111-options.json``); other keys are accepted and have no effect here."""
    user = caller()
    body = parse_body(OptionsRequest).model_dump()
    values: dict[str, Any] = {}
    if body.get("sd_model_checkpoint") is not None:
        values["sd_model_checkpoint"] = find_model(body["sd_model_checkpoint"], "sd_model_checkpoint")
    if body.get("CLIP_stop_at_last_layers") is not None:
        try:
            clip = int(body["CLIP_stop_at_last_layers"])
        except (TypeError, ValueError):
            clip = 0
        if not 1 <= clip <= 12:
            raise A1111Invalid("CLIP_stop_at_last_layers must be a whole number from 1 to 12",
                               field="CLIP_stop_at_last_layers")
        values["CLIP_stop_at_last_layers"] = clip
    if values:
        options_store().update(user, values)
    return Response("null", mimetype="application/json")  # A1111 answers null


# ---- utilities ------------------------------------------------------------------------------------
@bp.post("/png-info")
def png_info() -> dict[str, Any]:
    """The ``parameters`` text of a PNG (A1111's ``info``), its other text chunks (``items``) and the text
    parsed (``parameters``)."""
    req = parse_body(PngInfoRequest)
    if not req.image.strip():
        return {"info": "", "items": {}, "parameters": {}}
    image = decode_image(req.image, "image")
    items = {k: v for k, v in (image.info or {}).items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


@bp.post("/extra-single-image")
def extra_single_image() -> dict[str, Any]:
    """Resize by ``upscaling_resize`` (or to ``upscaling_resize_w/h``) with Lanczos or Nearest, or with a
    models.yaml upscaler model (an ``uov`` upscale_fast job, upscalers.py); others: 422 naming ``upscaler_1``."""
    req = parse_body(ExtraSingleImageRequest)
    models = model_upscalers()
    if req.upscaler_1 not in UPSCALERS and req.upscaler_1 not in models:
        raise A1111Invalid(f"upscaler_1: {req.upscaler_1!r} is not on this server; it has: "
                           f"{', '.join([*UPSCALERS, *models])}", field="upscaler_1")
    image = decode_image(req.image, "image")
    if req.resize_mode == 1:
        size = (req.upscaling_resize_w, req.upscaling_resize_h)
    else:
        size = (round(image.width * req.upscaling_resize), round(image.height * req.upscaling_resize))
    limits = config().limits
    if size[0] > limits.max_width or size[1] > limits.max_height or min(size) < 1:
        raise A1111Invalid(f"the result would be {size[0]}x{size[1]}; this server makes at most "
                           f"{limits.max_width}x{limits.max_height}", field="upscaling_resize")
    if req.upscaler_1 in models:
        return {"html_info": "", "image": encode_png(upscale_with_model(image, size, req.upscaler_1))}
    method = UPSCALERS[req.upscaler_1] or Image.Resampling.LANCZOS
    out = image.resize(size, method) if size != image.size else image
    return {"html_info": "", "image": encode_png(out)}
