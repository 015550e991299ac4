"""Job parameters as stored: input images saved as files, everything else as JSON.

A job must survive a restart, so its input images (PIL images, numpy arrays or file paths
given to ``queue_gen``) are copied as lossless PNGs into the data folder when the job is
queued, and the stored parameters refer to them as ``{"$image": "<path>"}``. Copying also
checks them: a file that does not decode is an error at queue time, not at run time.

A job's inputs live in ``<data_dir>/inputs/<job id>/`` (:func:`job_inputs_dir`) while the job can
still run: queued or running, across restarts too. When it ends (succeeded, failed or cancelled)
they are removed (:func:`remove_job_inputs`); the images' metadata names input files by name only,
so nothing points at them afterwards.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from multigen.pipes.spec import IMAGE_PARAM_NAMES

from .errors import InvalidInput

#: setup parameters that hold images (or lists of images), aliases included: from the parameter spec
IMAGE_PARAMS = IMAGE_PARAM_NAMES
IMAGE_REF = "$image"
#: what a job id may look like to name a folder (the service's are 16 hex digits)
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

log = logging.getLogger(__name__)


def job_inputs_dir(data_dir: Path, job_id: str) -> Path:
    """The folder of a job's input images: ``<data_dir>/inputs/<job_id>``.

    Raises:
        ValueError: a job id that is not a plain name (it could leave the inputs folder).
    """
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r} cannot name an inputs folder")
    return Path(data_dir) / "inputs" / job_id


def remove_job_inputs(data_dir: Path, job_id: str) -> bool:
    """Delete a job's input images once the job has ended (succeeded, failed or cancelled).

    Never raises for the files themselves: a folder that cannot be deleted is logged (the job's end
    must not fail on it). Call it only for a job that cannot run again: a queued or running job, or
    one requeued by a restart, still reads its inputs.

    Returns:
        True when a folder was there and is gone.

    Raises:
        ValueError: a job id that is not a plain name.
    """
    folder = job_inputs_dir(data_dir, job_id)
    if not folder.exists():
        return False
    try:
        shutil.rmtree(folder)
    except OSError as e:
        log.warning("job=%s could not delete its inputs %s: %s", job_id, folder, e)
        return False
    return True


def to_pil(value: Any, field: str) -> Image.Image:
    """A PIL image from a PIL image, a numpy array or a file path.

    Raises:
        InvalidInput: naming ``field`` when the value is none of these or does not decode.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as im:
                im.load()
                return im.copy()
        except FileNotFoundError:
            raise InvalidInput(f"{field}: file {value} does not exist", field=field) from None
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidInput(f"{field}: {value} is not a readable image (PNG, JPEG, WebP...): {e}",
                               field=field) from None
    if hasattr(value, "__array_interface__"):
        try:
            return Image.fromarray(value)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"{field}: the array is not an image (HxW or HxWx3/4 of uint8): {e}",
                               field=field) from None
    raise InvalidInput(f"{field}: expected a PIL image, a numpy array or a file path, got {type(value).__name__}",
                       field=field)


def save_params(params: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The JSON form of ``params``, with images written as PNG files into ``folder``.

    Raises:
        InvalidInput: an image that does not decode, or a value JSON cannot hold (naming it).
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is not None and (key in IMAGE_PARAMS or _is_image(value)):
            if isinstance(value, (list, tuple)):
                out[key] = [_save_image(to_pil(v, f"{key}[{i}]"), folder, f"{key}_{i}") for i, v in enumerate(value)]
            else:
                out[key] = _save_image(to_pil(value, key), folder, key)
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"{key}: a value of type {type(value).__name__} cannot be stored; "
                               "use numbers, strings, lists or dicts", field=key) from None
        out[key] = value
    return out


def _is_image(value: Any) -> bool:
    """A PIL image or an array (or a non-empty list of them), under whatever parameter name."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_image(v) for v in value)
    return isinstance(value, Image.Image) or hasattr(value, "__array_interface__")


def _save_image(image: Image.Image, folder: Path, name: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
    return {IMAGE_REF: str(path)}


def load_params(stored: dict[str, Any]) -> dict[str, Any]:
    """The parameters for ``pipe.setup``: stored image references opened as PIL images."""
    def load(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {IMAGE_REF}:
            with Image.open(value[IMAGE_REF]) as im:
                im.load()
                return im.copy()
        if isinstance(value, list):
            return [load(v) for v in value]
        return value

    return {k: load(v) for k, v in stored.items()}


def public_params(stored: dict[str, Any]) -> dict[str, Any]:
    """Stored parameters as shown to clients: image files by name only (no server paths)."""
    def show(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {IMAGE_REF}:
            return f"<image {Path(value[IMAGE_REF]).name}>"
        if isinstance(value, list):
            return [show(v) for v in value]
        return value

    return {k: show(v) for k, v in stored.items()}


def public_pipe_config(config: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A pipe's ``get_config()`` as written next to an image, without the server's file layout.

    Image metadata is served to users, so absolute paths become what a user can name: a model,
    LoRA or ControlNet's name from models.yaml (``names``: resolved path -> name), else the file's
    name alone (input images).
    """
    def show(value: Any) -> Any:
        if isinstance(value, str) and os.path.isabs(value):
            return names.get(str(Path(value).resolve()), Path(value).name)
        if isinstance(value, list):
            return [show(v) for v in value]
        if isinstance(value, dict):
            return {k: show(v) for k, v in value.items()}
        return value

    return {k: show(v) for k, v in config.items()}
