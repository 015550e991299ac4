"""The output size of a job that grows its input: an upscale (``uov: upscale|upscale_fast``: the input x
``upscale_factor``, pipes/upscale.py) and an outpaint (the sized input plus the ``outpaint_*`` distances,
pipes/outpaint.py).

Admission (admission.py) checks that size against ``limits.max_width``/``max_height`` (and the spec's largest
side) and charges the job's cost at it; the input's size is read from the image itself (a PIL image, an array,
or a file's header: cheap). An input it cannot read is left to the pipe, which checks the same when it runs.
"""
from __future__ import annotations

import os
from typing import Any

from PIL import Image

from multigen.pipes import spec as specs
from multigen.pipes.outpaint import distances
from multigen.pipes.upscale import UPSCALE_MODES

from .config import Limits
from .errors import InvalidInput

_SIDES = ("left", "top", "right", "bottom")


def grown_size(params: dict[str, Any], limits: Limits) -> tuple[int, int] | None:
    """(width, height) of an upscale's or an outpaint's output; None for any other job, or when the input's
    size cannot be read here.

    Raises:
        InvalidInput: the output is wider or taller than ``limits.max_width``/``max_height`` (or the spec's
            largest side), naming ``upscale_factor`` or the ``outpaint_*`` parameter that makes it so and the
            limit's key.
    """
    upscale = params.get("uov") in UPSCALE_MODES
    outpaint = bool(params.get("outpaint")) or any(params.get(f"outpaint_{side}") for side in _SIDES)
    if not (upscale or outpaint):
        return None
    size = image_size(params.get("image"))
    if size is None:
        return None
    if upscale:
        factor = float(params.get("upscale_factor") or specs.UPSCALE_FACTOR.default)
        out = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
        axis, key, most = _over(out, limits)
        if key is not None:
            fits = min(most[0] / size[0], most[1] / size[1])
            raise InvalidInput(f"upscale_factor {factor:g} makes the {size[0]}x{size[1]} input {out[0]}x{out[1]} px; "
                               f"allowed: at most {most[axis]} px {('wide', 'tall')[axis]} ({key}), so upscale_factor "
                               f"up to {fits:.3g} for this input", field="upscale_factor")
        return out
    sized = _sized(size, params)
    left, top, right, bottom = distances(params, sized)
    out = (sized[0] + left + right, sized[1] + top + bottom)
    axis, key, most = _over(out, limits)
    if key is not None:
        first, second = (("left", left), ("right", right)) if axis == 0 else (("top", top), ("bottom", bottom))
        given = [f"outpaint_{side}" for side, far in (first, second) if far and params.get(f"outpaint_{side}")]
        name = given[0] if given else "outpaint"  # else the default distances of the sides it lists
        raise InvalidInput(f"outpaint makes the image {out[axis]} px {('wide', 'tall')[axis]} (input {sized[axis]} "
                           f"+ {first[0]} {first[1]} + {second[0]} {second[1]}); allowed: at most {most[axis]} px "
                           f"({key}): outpaint less or scale the input down", field=name)
    return out


def image_size(value: Any) -> tuple[int, int] | None:
    """(width, height) of an input image: a PIL image, an array (HxW...), or a file (its header only); None for
    anything else or a file that does not open (the later checks name it)."""
    if isinstance(value, Image.Image):
        return value.size
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(shape[1]), int(shape[0])
    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as im:
                return im.size
        except (OSError, ValueError):
            return None
    return None


def _over(out: tuple[int, int], limits: Limits) -> tuple[int, str | None, tuple[int, int]]:
    """The first axis of ``out`` past its most, that most's name (None: within both), and the mosts."""
    mosts, keys = [], []
    for spec_param, key in ((specs.WIDTH, "max_width"), (specs.HEIGHT, "max_height")):
        top = int(spec_param.maximum)
        limit = getattr(limits, key, None)
        if limit is not None and limit < top:
            mosts.append(int(limit))
            keys.append(f"limits.{key}")
        else:
            mosts.append(top)
            keys.append(f"the largest {spec_param.name}, {top} px (limits.{key} cannot raise it)")
    for axis in (0, 1):
        if out[axis] > mosts[axis]:
            return axis, keys[axis], (mosts[0], mosts[1])
    return 0, None, (mosts[0], mosts[1])


def _sized(size: tuple[int, int], params: dict[str, Any]) -> tuple[int, int]:
    """The input's size after ``scale`` and ``width``/``height`` (which size the crop instead with ``full_res``),
    as the inpaint pipes size it before the outpaint extends it."""
    scale = params.get("scale")
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        size = (int(scale[0]), int(scale[1]))
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        size = (round(size[0] * scale), round(size[1] * scale))
    if not params.get("full_res"):
        size = (int(params.get("width") or size[0]), int(params.get("height") or size[1]))
    return size
