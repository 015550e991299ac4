"""Uploads: images sent as multipart files or inline ``data:`` URLs.

Every upload is checked before it is decoded in full (size in bytes, then the pixel count
from the header: decompression bombs never reach ``load()``), must be PNG, JPEG or WebP of one
frame (an animated PNG or WebP is a 400 ``animated_image``), has its EXIF orientation applied, and is stored normalised as PNG under
``<data_dir>/uploads/<id>.png`` with a JSON record of its owner. Jobs get file paths (and
``queue_gen`` copies the images into the job's own inputs), so a queued job that refers to an
upload survives a restart and the upload's deletion.

Uploads are kept ``limits.upload_keep_hours`` after they were last sent or used by a job
(a job's use renews them), then deleted: at start-up and at most hourly after that. Their
owner may delete them sooner (``DELETE /api/v1/uploads/<id>``). Each user may hold at most
``limits.upload_quota_mb_per_user`` MiB and ``limits.upload_quota_files_per_user`` uploads:
past either, an upload is a 413 ``quota_exceeded``.

Images a job carries inline as ``data:`` URLs are no uploads: :meth:`UploadStore.staging` keeps
them in temporary files for the one request that queues the job (``queue_gen`` copies them into
the job's inputs) and deletes them when it ends, whether the job was accepted or refused.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import secrets
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, g, request
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import Limits
from ..errors import InvalidInput, NotFound, TooLarge, UnsupportedMedia
from .auth import request_user

log = logging.getLogger(__name__)

bp = Blueprint("uploads", __name__, url_prefix="/api/v1")

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
UPLOAD_ID_RE = re.compile(r"^up_[A-Za-z0-9_-]{8,64}$")
DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)
MIB = 2**20
_DEFAULT_LIMITS = Limits()


@dataclass
class Usage:
    """What one user's uploads hold: PNG bytes and uploads."""

    bytes: int = 0
    files: int = 0


class UploadStore:
    """Checks, normalises and keeps uploaded images, within each user's quota.

    Args:
        folder: where uploads are kept.
        max_bytes: largest encoded image accepted.
        max_pixels: largest width x height accepted.
        keep_hours: uploads unused for this long are deleted (0: kept).
        quota_bytes: PNG bytes one user's uploads may hold (0: no quota).
        quota_files: uploads one user may hold (0: no quota).
    """

    PRUNE_EVERY = 3600.0  # seconds between two clean-ups
    TMP_KEEP = 3600.0  # a half-written upload older than this is a crash's leftover

    def __init__(self, folder: Path, max_bytes: int, max_pixels: int, keep_hours: int = 0, *,
                 quota_bytes: int = _DEFAULT_LIMITS.upload_quota_mb_per_user * MIB,
                 quota_files: int = _DEFAULT_LIMITS.upload_quota_files_per_user):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.keep_seconds = keep_hours * 3600.0
        self.quota_bytes = max(0, quota_bytes)
        self.quota_files = max(0, quota_files)
        self._pruned_at = float("-inf")
        self._lock = threading.Lock()  # guards _usage: waitress serves requests on several threads
        self._usage: dict[str, Usage] | None = None  # by user; counted from the folder when first needed

    @classmethod
    def from_limits(cls, folder: Path, limits: Limits) -> UploadStore:
        """The store of the config's ``limits`` (sizes, keep time, quotas)."""
        return cls(folder, limits.upload_max_bytes, limits.upload_max_pixels, limits.upload_keep_hours,
                   quota_bytes=limits.upload_quota_mb_per_user * MIB, quota_files=limits.upload_quota_files_per_user)

    # ---- quota ------------------------------------------------------------------------------------
    def _counted(self) -> dict[str, Usage]:
        """Every user's usage; the folder is read once (under ``_lock``), then kept up to date."""
        if self._usage is None:
            usage: dict[str, Usage] = {}
            for meta in self.folder.glob("up_*.json") if self.folder.is_dir() else ():
                owner = _owner(meta)
                try:
                    size = meta.with_suffix(".png").stat().st_size
                except OSError:
                    continue  # half-deleted: not an upload anyone can use
                if owner is None:
                    continue
                entry = usage.setdefault(owner, Usage())
                entry.bytes += size
                entry.files += 1
            self._usage = usage
        return self._usage

    def _change(self, user: str, nbytes: int, files: int) -> None:
        with self._lock:
            entry = self._counted().setdefault(user, Usage())
            entry.bytes = max(0, entry.bytes + nbytes)
            entry.files = max(0, entry.files + files)

    def _quota_error(self, user: str, what: str) -> TooLarge:
        keep = (f"wait until unused ones expire (limits.upload_keep_hours: {self.keep_seconds / 3600:g} hours "
                "after their last use)" if self.keep_seconds else "ask the operator to raise the quota")
        return TooLarge(f"upload quota exceeded for user {user}: {what}. Delete uploads you no longer need "
                        f"(DELETE /api/v1/uploads/<id>; queued jobs keep their own copies) or {keep}",
                        field="file", code="quota_exceeded")

    def _check_quota(self, user: str, entry: Usage, nbytes: int) -> None:
        """Raise when one more upload of ``nbytes`` would take ``entry`` past a quota (under ``_lock``).

        Raises:
            TooLarge: ``quota_exceeded``, naming the limit and what to do.
        """
        if self.quota_files and entry.files + 1 > self.quota_files:
            raise self._quota_error(user, f"{entry.files} uploads held, limits.upload_quota_files_per_user "
                                          f"allows {self.quota_files} uploads per user")
        if self.quota_bytes and entry.bytes + nbytes > self.quota_bytes:
            raise self._quota_error(user, f"{entry.bytes / MIB:.1f} MiB held and this one is {nbytes / MIB:.1f} "
                                          f"MiB, limits.upload_quota_mb_per_user allows {self.quota_bytes // MIB} "
                                          "MiB per user")

    def check_room(self, user: str) -> None:
        """Refuse an upload before decoding it when ``user``'s quota has no room left at all.

        Raises:
            TooLarge: ``quota_exceeded``.
        """
        with self._lock:
            self._check_quota(user, self._counted().get(user, Usage()), 1)

    def _reserve(self, user: str, nbytes: int) -> None:
        """Count an upload of ``nbytes`` against ``user``'s quota, if it fits (checked and counted at once:
        two uploads at the same moment cannot both take the last room).

        Raises:
            TooLarge: ``quota_exceeded``.
        """
        with self._lock:
            entry = self._counted().setdefault(user, Usage())
            self._check_quota(user, entry, nbytes)
            entry.bytes += nbytes
            entry.files += 1

    # ---- keeping ----------------------------------------------------------------------------------
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
                self._remove(meta)
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
        check_single_frame(image, field)
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
        """Store a decoded image for ``owner``; returns the upload record ``{id, width, height, format}``.

        Raises:
            TooLarge: ``quota_exceeded``: the owner's uploads would pass their quota (nothing is kept).
        """
        self.maybe_prune()
        self.check_room(owner)
        self.folder.mkdir(parents=True, exist_ok=True)
        upload_id = "up_" + secrets.token_urlsafe(12)
        tmp, path = self.folder / f".{upload_id}.tmp", self.folder / f"{upload_id}.png"
        try:
            image.save(tmp, format="PNG")
            size = tmp.stat().st_size  # the PNG's size is what the quota counts
            self._reserve(owner, size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        record = {"id": upload_id, "width": image.width, "height": image.height, "format": fmt, "user": owner}
        try:
            tmp.replace(path)
            (self.folder / f"{upload_id}.json").write_text(json.dumps(record))
        except BaseException:  # a full disk: nothing kept, nothing counted
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            self._change(owner, -size, -1)
            raise
        log.info("upload %s: %dx%d %s for user %s", upload_id, image.width, image.height, fmt, owner)
        return record

    def record_of(self, upload_id: str, user: str | None, field: str) -> dict[str, Any]:
        """The record of an upload the user owns (``user=None``: anyone's).

        Raises:
            NotFound: unknown id, or another user's upload.
        """
        if not isinstance(upload_id, str) or not UPLOAD_ID_RE.match(upload_id):
            raise NotFound(f"{field}: no upload {str(upload_id)[:80]!r}", field=field)
        meta = self.folder / f"{upload_id}.json"
        if not meta.is_file() or not meta.with_suffix(".png").is_file():
            raise NotFound(f"{field}: no upload {upload_id!r}", field=field)
        try:
            record = json.loads(meta.read_text())
        except (OSError, ValueError):
            raise NotFound(f"{field}: no upload {upload_id!r}", field=field) from None
        if user is not None and record.get("user") != user:
            raise NotFound(f"{field}: no upload {upload_id!r}", field=field)
        return record

    def path_for(self, upload_id: str, user: str | None, field: str) -> Path:
        """The stored file of an upload the user owns (``user=None``: anyone's); its use renews it.

        Raises:
            NotFound: unknown id, or another user's upload.
        """
        self.record_of(upload_id, user, field)
        meta = self.folder / f"{upload_id}.json"
        try:
            meta.touch()  # used by a job: kept another upload_keep_hours
        except OSError:
            pass
        return meta.with_suffix(".png")

    def delete(self, upload_id: str, user: str | None) -> dict[str, Any]:
        """Delete an upload the user owns; returns its record. Queued jobs keep their own copies.

        Raises:
            NotFound: unknown id, or another user's upload.
        """
        record = self.record_of(upload_id, user, "upload_id")
        try:
            self._remove(self.folder / f"{upload_id}.json")
        except FileNotFoundError:  # deleted at the same moment by a prune or another request
            raise NotFound(f"upload_id: no upload {upload_id!r}", field="upload_id") from None
        log.info("upload %s deleted by user %s", upload_id, record.get("user"))
        return record

    def _remove(self, meta: Path) -> None:
        """Delete an upload (its record last: a half-deleted one is found again by the next prune) and give
        its room back to its owner."""
        png = meta.with_suffix(".png")
        owner = _owner(meta)
        size = png.stat().st_size if png.exists() else 0
        png.unlink(missing_ok=True)
        meta.unlink()
        if owner is not None:
            self._change(owner, -size, -1)

    @contextmanager
    def staging(self, user: str | None) -> Iterator[StagedImages]:
        """The image references of one job request, resolved to files; temporary ones deleted at exit.

        Args:
            user: the authenticated user (uploads of others are not found), None in anonymous mode.
        """
        staged = StagedImages(self, user)
        try:
            yield staged
        finally:
            staged.discard()


def _owner(meta: Path) -> str | None:
    """Who an upload record says owns it (None: unreadable)."""
    try:
        owner = json.loads(meta.read_text()).get("user")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


class StagedImages:
    """Image references of one job request (see :meth:`UploadStore.staging`): upload ids become their files,
    ``data:`` URLs are checked, decoded and written to temporary files, deleted by :meth:`discard`."""

    def __init__(self, store: UploadStore, user: str | None):
        self.store = store
        self.user = user
        self.files: list[Path] = []

    def resolve(self, ref: Any, field: str) -> str:
        """An image reference (upload id or ``data:`` URL) as a file path.

        Raises:
            InvalidInput, NotFound, TooLarge, UnsupportedMedia: naming ``field``.
        """
        if not isinstance(ref, str):
            raise InvalidInput(f"{field}: expected an upload id or a data: URL", field=field)
        if not ref.startswith("data:"):
            return str(self.store.path_for(ref, self.user, field))
        image, _ = self.store.decode(decode_data_url(ref, self.store.max_bytes, field), field)
        self.store.folder.mkdir(parents=True, exist_ok=True)
        # named like a half-written upload: a crash's leftover is deleted by the next prune
        path = self.store.folder / f".up_inline_{secrets.token_urlsafe(12)}.tmp"
        self.files.append(path)
        image.save(path, format="PNG", compress_level=1)  # read once more by queue_gen: speed over size
        return str(path)

    def discard(self) -> None:
        """Delete the temporary files (``queue_gen`` has copied what an accepted job needs)."""
        for path in self.files:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not delete %s: %s", path.name, e)
        self.files.clear()


def check_single_frame(image: Image.Image, field: str) -> None:
    """Refuse an animated PNG or WebP (read from the header): only its first frame would be used, and
    each further frame is more decoding for nothing.

    Raises:
        InvalidInput: ``animated_image``, naming ``field``.
    """
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise InvalidInput(f"{field}: an animated image of {frames} frames; send one still image (PNG, JPEG or "
                           "WebP)", field=field, code="animated_image")


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
    owner = request_user(request.form.get("user") or None)
    store.check_room(owner)  # a full quota is refused before the image is decoded
    data = file.stream.read(store.max_bytes + 1)
    image, fmt = store.decode(data, "file")
    record = store.save(image, fmt, owner)
    return {"upload": public(record)}, 201


@bp.delete("/uploads/<upload_id>")
def delete_upload(upload_id: str):
    """``DELETE /api/v1/uploads/<id>``: the user's upload is deleted -> ``{"upload": {...}}``; its room in
    the quota is free again. Jobs already queued with it keep their own copy."""
    return {"upload": public(upload_store().delete(upload_id, g.get("user")))}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """An upload record as clients see it (API.md's ``upload``)."""
    return {k: record[k] for k in ("id", "width", "height", "format")}
