"""Uploads: images sent as multipart files or inline ``data:`` URLs.

Every upload is checked before it is decoded in full (size in bytes, then the pixel count
from the header: decompression bombs never reach ``load()``), must be PNG, JPEG or WebP,
has its EXIF orientation applied, and is stored normalised as PNG under
``<data_dir>/uploads/<id>.png`` with a JSON record of its owner. Jobs get file paths, so
a queued job that refers to an upload survives a restart.

Uploads are kept ``limits.upload_keep_hours`` after they were last sent or used by a job
(a job's use renews them), then deleted: at start-up and at most hourly after that.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, request
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidInput, NotFound, TooLarge, UnsupportedMedia
from .auth import request_user

log = logging.getLogger(__name__)

bp = Blueprint("uploads", __name__, url_prefix="/api/v1")

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
UPLOAD_ID_RE = re.compile(r"^up_[A-Za-z0-9_-]{8,64}$")
DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


class UploadStore:
    """Checks, normalises and keeps uploaded images.

    Args:
        folder: where uploads are kept.
        max_bytes: largest encoded image accepted.
        max_pixels: largest width x height accepted.
    """

    PRUNE_EVERY = 3600.0  # seconds between two clean-ups
    TMP_KEEP = 3600.0  # a half-written upload older than this is a crash's leftover

    def __init__(self, folder: Path, max_bytes: int, max_pixels: int, keep_hours: int = 0):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.keep_seconds = keep_hours * 3600.0
        self._pruned_at = float("-inf")

    def prune(self, now: float | None = None) -> int:
        """Delete the uploads not sent or used for ``keep_hours`` (0: none); returns how many."""
        now = time.time() if now is None else now
        self._pruned_at = time.monotonic()
        if not self.keep_seconds or not self.folder.is_dir():
            return 0
        removed = 0
        for meta in self.folder.glob("up_*.json"):
            try:
                if now - meta.stat().st_mtime < self.keep_seconds:
                    continue
                meta.with_suffix(".png").unlink(missing_ok=True)
                meta.unlink()
                removed += 1
            except OSError as e:  # a concurrent prune, or a permissions problem: try again next time
                log.warning("could not delete upload %s: %s", meta.stem, e)
        for tmp in self.folder.glob(".up_*.tmp"):
            try:
                if now - tmp.stat().st_mtime > self.TMP_KEEP:
                    tmp.unlink()
            except OSError:
                pass
        if removed:
            log.info("deleted %d uploads unused for %g hours (limits.upload_keep_hours)", removed,
                     self.keep_seconds / 3600)
        return removed

    def maybe_prune(self) -> None:
        if time.monotonic() - self._pruned_at >= self.PRUNE_EVERY:
            self.prune()

    def decode(self, data: bytes, field: str) -> tuple[Image.Image, str]:
        """Check and decode encoded image bytes into an upright PIL image and its format name.

        Raises:
            TooLarge: more bytes or pixels than allowed.
            UnsupportedMedia: not a PNG, JPEG or WebP image.
            InvalidInput: a truncated or corrupt image.
        """
        if len(data) > self.max_bytes:
            raise TooLarge(f"{field}: {len(data)} bytes, at most {self.max_bytes} allowed", field=field)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise TooLarge(f"{field}: too many pixels ({e}); at most {self.max_pixels} allowed", field=field) from None
        except UnidentifiedImageError:
            raise UnsupportedMedia(f"{field}: not a PNG, JPEG or WebP image", field=field) from None
        fmt = FORMATS.get(image.format or "")
        if fmt is None:
            raise UnsupportedMedia(f"{field}: {image.format} images are not accepted; allowed: PNG, JPEG, WebP",
                                   field=field)
        w, h = image.size
        if w * h > self.max_pixels:
            raise TooLarge(f"{field}: {w}x{h} = {w * h} pixels, at most {self.max_pixels} allowed", field=field)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as e:
            raise InvalidInput(f"{field}: the image cannot be decoded ({e})", field=field,
                               code="bad_image") from None
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        return image, fmt

    def save(self, image: Image.Image, fmt: str, owner: str) -> dict[str, Any]:
        """Store a decoded image; returns the upload record ``{id, width, height, format}``."""
        self.maybe_prune()
        self.folder.mkdir(parents=True, exist_ok=True)
        upload_id = "up_" + secrets.token_urlsafe(12)
        tmp = self.folder / f".{upload_id}.tmp"
        image.save(tmp, format="PNG")
        tmp.replace(self.folder / f"{upload_id}.png")
        record = {"id": upload_id, "width": image.width, "height": image.height, "format": fmt, "user": owner}
        (self.folder / f"{upload_id}.json").write_text(json.dumps(record))
        log.info("upload %s: %dx%d %s for user %s", upload_id, image.width, image.height, fmt, owner)
        return record

    def path_for(self, upload_id: str, user: str | None, field: str) -> Path:
        """The stored file of an upload the user owns (``user=None``: anyone's).

        Raises:
            NotFound: unknown id, or another user's upload.
        """
        if not UPLOAD_ID_RE.match(upload_id):
            raise NotFound(f"{field}: no upload {upload_id[:80]!r}", field=field)
        meta = self.folder / f"{upload_id}.json"
        path = self.folder / f"{upload_id}.png"
        if not meta.is_file() or not path.is_file():
            raise NotFound(f"{field}: no upload {upload_id!r}", field=field)
        if user is not None and json.loads(meta.read_text()).get("user") != user:
            raise NotFound(f"{field}: no upload {upload_id!r}", field=field)
        try:
            meta.touch()  # used by a job: kept another upload_keep_hours
        except OSError:
            pass
        return path

    def resolve(self, ref: str, user: str | None, owner: str, field: str) -> str:
        """An image reference of a job (upload id or ``data:`` URL) as a stored file path.

        Args:
            ref: an upload id or a ``data:`` URL.
            user: the authenticated user (uploads of others are not found), None in anonymous mode.
            owner: who a ``data:`` URL's image is stored for.
            field: the request field, for errors.
        """
        if not isinstance(ref, str):
            raise InvalidInput(f"{field}: expected an upload id or a data: URL", field=field)
        if ref.startswith("data:"):
            record = self.save(*self.decode(decode_data_url(ref, self.max_bytes, field), field), owner)
            return str(self.folder / f"{record['id']}.png")
        return str(self.path_for(ref, user, field))


def decode_data_url(url: str, max_bytes: int, field: str) -> bytes:
    """The bytes of a base64 ``data:`` URL.

    Raises:
        TooLarge: before decoding, when the payload would exceed ``max_bytes``.
        UnsupportedMedia: a declared media type that is not an image.
        InvalidInput: not a base64 data URL.
    """
    m = DATA_URL_RE.match(url)
    if not m:
        raise InvalidInput(f"{field}: expected `data:image/png;base64,...`", field=field, code="bad_data_url")
    mime = (m.group("mime") or "").lower()
    if mime and mime not in ("image/png", "image/jpeg", "image/jpg", "image/webp"):
        raise UnsupportedMedia(f"{field}: media type {mime} is not accepted; allowed: image/png, image/jpeg, "
                               "image/webp", field=field)
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise TooLarge(f"{field}: the data URL holds more than {max_bytes} bytes", field=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field}: the data URL is not valid base64", field=field, code="bad_data_url") from None


def upload_store() -> UploadStore:
    return current_app.extensions["multigen.uploads"]


@bp.post("/uploads")
def create_upload():
    """``POST /api/v1/uploads``: multipart ``file`` -> 201 ``{"upload": {id, width, height, format}}``."""
    if not request.mimetype.startswith("multipart/form-data"):
        raise UnsupportedMedia("send the image as multipart/form-data with a `file` part", field="file")
    file = request.files.get("file")
    if file is None:
        raise InvalidInput("the multipart body has no `file` part", field="file", code="missing")
    store = upload_store()
    data = file.stream.read(store.max_bytes + 1)
    image, fmt = store.decode(data, "file")
    owner = request_user(request.form.get("user") or None)
    record = store.save(image, fmt, owner)
    return {"upload": {k: record[k] for k in ("id", "width", "height", "format")}}, 201
