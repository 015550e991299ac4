"""Images: the polling listing, the files (PNG, or converted to JPEG/WebP) and their metadata.

A file's path always comes from the store, never from the URL, and is served only when its
real path (symlinks resolved) lies inside ``output_dir``.

A PNG never changes once written, so a conversion is made once and kept in
``<data_dir>/converted/<id[:2]>/<image id>.<jpeg|webp>`` (written atomically, stamped with the
PNG's modification time, which it must match to be served); the copies go when the image's file
is found gone. Image responses are ``Cache-Control: private`` with ``Vary: Authorization``: they
belong to one user, so no shared cache may keep them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
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
#: ``?format=`` -> (PIL format, media type, file extension)
CONVERSIONS = {"png": ("PNG", "image/png", "png"), "jpeg": ("JPEG", "image/jpeg", "jpeg"),
               "jpg": ("JPEG", "image/jpeg", "jpeg"), "webp": ("WEBP", "image/webp", "webp")}
#: seconds a client may reuse an image file without asking again (it never changes once written)
MAX_AGE = 3600
#: image ids that may name a file of the conversion cache (the store's are hex)
CACHE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def private_cache(response: Response, max_age: int | None = MAX_AGE) -> Response:
    """``response`` made cacheable by its user only: ``private, max-age`` (``no-store`` for ``None``) and
    ``Vary: Authorization``, so that no shared cache hands one user's image to another."""
    response.cache_control.public = False
    if max_age is None:
        response.cache_control.no_store = True
    else:
        response.cache_control.private = True
        response.cache_control.max_age = max_age
    response.vary.add("Authorization")
    return response


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
        forget_conversions(image_id)
        raise NotFound(f"image {image_id} has no file", field="image_id")
    return Path(real)


def conversion_path(image_id: str, ext: str) -> Path:
    """Where the conversion of an image to ``ext`` is kept.

    Raises:
        NotFound: an id unfit for a file name (the store's ids never are).
    """
    if not CACHE_KEY_RE.match(image_id):
        raise NotFound(f"image {image_id[:80]!r} has no file", field="image_id")
    return config().data_dir / "converted" / image_id[:2] / f"{image_id}.{ext}"


def forget_conversions(image_id: str) -> None:
    """Delete the kept conversions of an image whose file is gone."""
    if CACHE_KEY_RE.match(image_id):
        for pil_format, _, ext in CONVERSIONS.values():
            if pil_format != "PNG":
                conversion_path(image_id, ext).unlink(missing_ok=True)


def converted(image_id: str, path: Path, fmt: str) -> Path:
    """The image at ``path`` as ``fmt`` (JPEG or WebP): the kept conversion when it was made from this very
    PNG (same modification time), else converted now and kept (temporary file, then rename)."""
    pil_format, _, ext = CONVERSIONS[fmt]
    png_mtime = path.stat().st_mtime_ns
    target = conversion_path(image_id, ext)
    if target.is_file() and target.stat().st_mtime_ns == png_mtime:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with Image.open(path) as im:
            im.load()
            if pil_format == "JPEG" and im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            im.save(tmp, format=pil_format, quality=92)
        os.utime(tmp, ns=(png_mtime, png_mtime))  # the stamp of the PNG it was made from
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@bp.get("/images/<image_id>")
def image_file(image_id: str):
    """The image file; ``?format=png|jpeg|webp`` converts it (once: the conversion is kept). ETag and
    Last-Modified allow caching; the response is private to the user (``Vary: Authorization``)."""
    owned_image(image_id)
    fmt = (request.args.get("format") or "png").lower()
    if fmt not in CONVERSIONS:
        raise InvalidInput(f"unknown format {fmt!r}; allowed: png, jpeg, webp", field="format")
    path = safe_image_path(image_id)
    pil_format, mimetype, ext = CONVERSIONS[fmt]
    if pil_format == "PNG" and path.suffix.lower() == ".png":
        return private_cache(send_file(path, mimetype=mimetype, conditional=True, etag=True, max_age=MAX_AGE))
    stat = path.stat()
    etag = f"{image_id}-{stat.st_mtime_ns}-{stat.st_size}-{ext}"
    if request.if_none_match.contains(etag):  # the client has it: no conversion needed
        response = Response(status=304)
        response.set_etag(etag)
        return private_cache(response)
    return private_cache(send_file(converted(image_id, path, fmt), mimetype=mimetype, conditional=True, etag=etag,
                                   last_modified=stat.st_mtime, max_age=MAX_AGE))


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
