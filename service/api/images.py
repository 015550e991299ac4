"""Images: the polling listing, the files (PNG, or converted to JPEG/WebP) and their metadata.

A file's path always comes from the store, never from the URL, and is served only when its
real path (symlinks resolved) lies inside ``output_dir``.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, request, send_file
from PIL import Image

from ..errors import InvalidInput, NotFound
from .auth import owned_image, owned_session
from .context import config, service

log = logging.getLogger(__name__)

bp = Blueprint("images", __name__, url_prefix="/api/v1")

MAX_INDEX = 2**62
CONVERSIONS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "jpg": ("JPEG", "image/jpeg"),
               "webp": ("WEBP", "image/webp")}


@bp.get("/sessions/<session_id>/images")
def list_images(session_id: str):
    """``?after=<index>``: the session's images with a greater index, in index order."""
    owned_session(session_id)
    after_arg = request.args.get("after")
    after = None
    if after_arg not in (None, ""):
        try:
            after = int(after_arg)
        except ValueError:
            raise InvalidInput(f"after must be an image index (a whole number), got {after_arg!r}",
                               field="after") from None
        after = max(-1, min(after, MAX_INDEX))  # the store's integers are 64-bit
    return {"images": service().list_images(session_id, after=after)}


def safe_image_path(image_id: str) -> Path:
    """The file of an image, checked to lie inside ``output_dir`` (symlinks resolved).

    Raises:
        NotFound: no file, or one whose real path leaves the output folder.
    """
    path = service().image_file(image_id)
    root = os.path.realpath(config().output_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
        log.warning("image %s: path %s is outside %s or missing: not served", image_id, path, root)
        raise NotFound(f"image {image_id} has no file", field="image_id")
    return Path(real)


@bp.get("/images/<image_id>")
def image_file(image_id: str):
    """The image file; ``?format=png|jpeg|webp`` converts it. ETag and Last-Modified allow caching."""
    owned_image(image_id)
    fmt = (request.args.get("format") or "png").lower()
    if fmt not in CONVERSIONS:
        raise InvalidInput(f"unknown format {fmt!r}; allowed: png, jpeg, webp", field="format")
    path = safe_image_path(image_id)
    if fmt == "png" and path.suffix.lower() == ".png":
        return send_file(path, mimetype="image/png", conditional=True, etag=True, max_age=3600)
    stat = path.stat()
    etag = f"{image_id}-{int(stat.st_mtime_ns)}-{stat.st_size}-{fmt}"
    pil_format, mimetype = CONVERSIONS[fmt]
    response = Response(mimetype=mimetype)
    response.set_etag(etag)
    response.last_modified = stat.st_mtime
    response.cache_control.max_age = 3600
    if request.if_none_match.contains(etag) or (
            not request.if_none_match and request.if_modified_since
            and int(stat.st_mtime) <= request.if_modified_since.timestamp()):
        response.status_code = 304
        return response
    with Image.open(path) as im:
        im.load()
        if pil_format == "JPEG" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format=pil_format, quality=92)
    response.set_data(buf.getvalue())
    return response


def read_metadata(path: Path) -> dict[str, Any]:
    """The parameters stored with an image: its JSON sidecar, else the PNG's JSON text chunk."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text())
        except (OSError, ValueError):
            log.warning("unreadable sidecar %s", sidecar)
    with Image.open(path) as im:
        chunks = dict(getattr(im, "text", {}) or {})
    for value in chunks.values():
        try:
            data = json.loads(value)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {"text": chunks}


@bp.get("/images/<image_id>/metadata")
def image_metadata(image_id: str):
    """The parameters that reproduce the image (and its record)."""
    image = owned_image(image_id)
    return {"image": image, "metadata": read_metadata(safe_image_path(image_id))}
