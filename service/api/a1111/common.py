"""What the A1111 routes share: the JSON body, base64 images, model titles and each user's options."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, TypeVar

from flask import current_app, request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from ...config import Config
from ..auth import request_user
from ..context import MAX_CONTAINERS, config
from ..uploads import FORMATS
from .errors import A1111Invalid

M = TypeVar("M", bound=BaseModel)
_DATA_PREFIX_RE = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[^;,]*)*;base64,", re.I)
_TITLE_RE = re.compile(r"^(?P<name>.*?)(\s*\[[0-9a-fA-F]{6,64}\])?$")
#: extensions a client may add to a checkpoint name (``tiny-sd.safetensors``)
_CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".bin")


def parse_body(model: type[M]) -> M:
    """The request's JSON body as ``model`` (a ValidationError becomes FastAPI's 422 in the blueprint).

    A1111 clients do not all send ``Content-Type: application/json``; the body is read as JSON
    whatever it says, as FastAPI does for a declared body.

    Raises:
        A1111Invalid: the body is not JSON, or not an object.
    """
    raw = request.get_data(cache=True)
    if raw.count(b"[") + raw.count(b"{") > MAX_CONTAINERS:  # decoding millions of tiny lists costs seconds and GBs
        raise A1111Invalid(f"the body holds more than {MAX_CONTAINERS} lists and objects", field="body")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise A1111Invalid("the body is not valid JSON", field="body", code="json_invalid") from None
    if not isinstance(data, dict):
        raise A1111Invalid("the body must be a JSON object", field="body", code="dict_type")
    return model.model_validate(data)


def decode_image(data: str, field: str) -> Image.Image:
    """A base64 image (with or without a ``data:`` prefix), checked against the upload limits.

    Raises:
        A1111Invalid: not base64, not an image, or past ``limits.upload_max_pixels`` (naming ``field``).
    """
    text = _DATA_PREFIX_RE.sub("", data.strip(), count=1)
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise A1111Invalid(f"{field}: not valid base64", field=field) from None
    limits = config().limits
    if len(raw) > limits.upload_max_bytes:
        raise A1111Invalid(f"{field}: the image is larger than {limits.upload_max_bytes} bytes", field=field)
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > limits.upload_max_pixels:
            raise A1111Invalid(f"{field}: {image.width}x{image.height} is more than limits.upload_max_pixels "
                               f"({limits.upload_max_pixels})", field=field)
        if image.format not in FORMATS:
            raise A1111Invalid(f"{field}: {image.format} images are not accepted; allowed: PNG, JPEG, WebP",
                               field=field)
        if getattr(image, "n_frames", 1) > 1:  # an animated PNG or WebP: one still image only
            raise A1111Invalid(f"{field}: an animated image of {image.n_frames} frames; send one still image",
                               field=field)
        image.load()
    except Image.DecompressionBombError:  # the header declares billions of pixels
        raise A1111Invalid(f"{field}: too many pixels, more than limits.upload_max_pixels "
                           f"({limits.upload_max_pixels})", field=field) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise A1111Invalid(f"{field}: not a PNG, JPEG or WebP image in base64", field=field) from None
    return image


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- models ---------------------------------------------------------------------------------------
def model_hash(cfg: Config, name: str) -> str:
    """A stable id in the place of A1111's file hash: SHA-256 of the name and the file or folder name.

    Hashing the weights (gigabytes) on every listing would cost seconds; clients only compare these.
    """
    return hashlib.sha256(f"{name}:{cfg.models.base[name].path.name}".encode()).hexdigest()


def model_title(cfg: Config, name: str) -> str:
    """A1111's ``title``: ``"name [hash10]"``."""
    return f"{name} [{model_hash(cfg, name)[:10]}]"


def find_model(value: Any, field: str) -> str:
    """The models.yaml base model a client named: its name, A1111 title, a file name or a hash.

    Raises:
        A1111Invalid: no such model (naming ``field`` and the known ones).
    """
    cfg = config()
    text = str(value or "").strip()
    name = _TITLE_RE.match(text).group("name").strip() if text else ""
    for ext in _CHECKPOINT_EXTS:
        name = name.removesuffix(ext)
    if name in cfg.models.base:
        return name
    for candidate in cfg.models.base:
        digest = model_hash(cfg, candidate)
        if text and (text == digest or text == digest[:10] or text == model_title(cfg, candidate)):
            return candidate
    raise A1111Invalid(f"unknown model {text!r}; known: {', '.join(cfg.models.base)}", field=field)


# ---- each user's options --------------------------------------------------------------------------
class OptionsStore:
    """What each user set with ``POST /sdapi/v1/options`` (their default model, clip skip), kept in
    ``<data_dir>/a1111-options.json`` so that it survives a restart (written atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._data = {}

    def get(self, user: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._data.get(user, {}))

    def update(self, user: str, values: dict[str, Any]) -> None:
        with self._lock:
            self._data.setdefault(user, {}).update(values)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._data, indent=1))
            os.replace(tmp, self.path)


def options_store() -> OptionsStore:
    """The app's store (made on first use)."""
    ext = current_app.extensions
    if "multigen.a1111.options" not in ext:
        ext["multigen.a1111.options"] = OptionsStore(config().data_dir / "a1111-options.json")
    return ext["multigen.a1111.options"]


def caller() -> str:
    """The calling user (the token's; ``local`` without users)."""
    return request_user()


def default_model(user: str) -> str:
    """The user's ``sd_model_checkpoint``, else the first model of models.yaml."""
    cfg = config()
    chosen = options_store().get(user).get("sd_model_checkpoint")
    return chosen if chosen in cfg.models.base else next(iter(cfg.models.base))
