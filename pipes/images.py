"""Input image handling shared by the image pipes: loading, mode conversion, sizes, masks.

Pure PIL/numpy helpers; no model here.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from . import spec as specs
from .errors import InvalidValueError, MaskSizeError, MissingImageError, SizeError

logger = logging.getLogger(__name__)

#: smallest and largest side in pixels a pipe accepts (after scaling): the spec's width range
MIN_SIDE = specs.WIDTH.minimum
MAX_SIDE = specs.WIDTH.maximum
#: sizes are padded up to a multiple of this (the VAE factor) and cropped back
MULTIPLE = 8


def load_image(value: Any, param: str = "image", required: bool = True) -> Image.Image | None:
    """An RGB PIL image from a PIL image, a numpy array or a file path.

    RGBA/LA/P-with-transparency images are composited onto white; greyscale and other modes
    are converted to RGB.

    Raises:
        MissingImageError: ``value`` is None (and ``required``) or the file does not exist.
        InvalidValueError: the value is not an image or the file cannot be decoded.
    """
    if value is None:
        if required:
            raise MissingImageError(f"{param} is required: a PIL image or the path of an image file",
                                    param, "a PIL image or an image file path")
        return None
    if isinstance(value, (str, os.PathLike)):
        value = _read_image_file(value, param)
    elif isinstance(value, np.ndarray):
        arr = _check_array(value, param)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        value = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if not isinstance(value, Image.Image):
        raise InvalidValueError(f"{param} must be a PIL image, a numpy array or a file path, not "
                                f"{type(value).__name__}", param, "a PIL image or an image file path")
    return to_rgb(value)


def _check_array(arr: np.ndarray, param: str) -> np.ndarray:
    """``arr`` if it can be an image: HxW or HxWxC (C 1, 3 or 4), not empty, of real numbers."""
    ok = (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))) and arr.size > 0 and (
        arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating))
    if not ok:
        raise InvalidValueError(f"{param} array of shape {arr.shape} and type {arr.dtype} is not an image; "
                                "allowed: HxW or HxWx3/4 arrays of numbers", param, "HxW or HxWx3/4 arrays")
    return arr


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_mask(value: Any, param: str = "mask") -> Image.Image:
    """A mode-"L" mask (255 = repaint) from an image, array or path; alpha counts as the mask
    where the image has one and no other content."""
    if value is None:
        raise MissingImageError(f"{param} is required", param, "a PIL image, array or path")
    if isinstance(value, np.ndarray):
        arr = _check_array(value, param)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.ndim == 3:
            arr = arr.max(axis=-1)
        return Image.fromarray(arr, mode="L")
    if isinstance(value, (str, os.PathLike)):
        value = _read_image_file(value, param)
    if not isinstance(value, Image.Image):
        raise InvalidValueError(f"{param} must be a PIL image, a numpy array or a file path, not "
                                f"{type(value).__name__}", param, "a PIL image, array or path")
    if value.mode == "L":
        return value
    return value.convert("L")


def check_side(value: Any, param: str) -> int:
    """An int side length within [MIN_SIDE, MAX_SIDE] (the spec's width range).

    Raises:
        InvalidValueError: not an integer.
        SizeError: out of range.
    """
    side = specs.WIDTH.check(value, param)
    if side is None:  # the spec's width may be left out (the model's size); a side may not
        raise InvalidValueError(f"{param} must be {specs.WIDTH.allowed()}, not None", param, specs.WIDTH.range_text())
    return side


def padded(side: int, multiple: int = MULTIPLE) -> int:
    """``side`` rounded up to a multiple of ``multiple`` (default ``MULTIPLE``; a family's
    ``size_multiple``: 16 for Flux)."""
    return int(math.ceil(side / multiple) * multiple)


def pad_image(image: Image.Image, multiple: int = MULTIPLE) -> Image.Image:
    """Pad right and bottom to multiples of ``multiple`` (default 8) by repeating the edge pixels
    (no-op if aligned)."""
    w, h = image.size
    pw, ph = padded(w, multiple), padded(h, multiple)
    if (pw, ph) == (w, h):
        return image
    arr = np.asarray(image)
    pad = ((0, ph - h), (0, pw - w)) + ((0, 0),) * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pad, mode="edge"), mode=image.mode)


def crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the top-left ``size`` (undoes ``pad_image``)."""
    return image if image.size == tuple(size) else image.crop((0, 0, size[0], size[1]))


def scale_image(image: Image.Image, scale: Any, param: str = "scale") -> Image.Image:
    """Resize by ``scale`` (a number, or ``[width, height]`` in pixels) with Lanczos.

    Raises:
        InvalidValueError: a scale that is not a positive number or a pair.
        SizeError: the result is too small or too large.
    """
    if scale is None:
        return image
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        size = (check_side(scale[0], "scale[0]"), check_side(scale[1], "scale[1]"))
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf:
        scale = specs.SCALE.check(scale)
        size = (round(image.size[0] * scale), round(image.size[1] * scale))
        for side, name in zip(size, ("width", "height")):
            if not MIN_SIDE <= side <= MAX_SIDE:
                raise SizeError(f"scale {scale} makes the image {name} {side} px; allowed: {MIN_SIDE} to "
                                f"{MAX_SIDE} px after scaling", param, f"{MIN_SIDE} to {MAX_SIDE} px")
    else:
        raise InvalidValueError(f"scale must be a positive number or [width, height], not {scale!r}", param,
                                "a positive number or [width, height]")
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def check_image_size(image: Image.Image, param: str) -> None:
    """Raise ``SizeError`` if an input image is out of the allowed range."""
    for side, name in zip(image.size, ("width", "height")):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise SizeError(f"{param} {name} is {side} px; allowed: {MIN_SIDE} to {MAX_SIDE} px (use scale)",
                            param, f"{MIN_SIDE} to {MAX_SIDE} px")


def check_same_size(image: Image.Image, other: Image.Image, param: str, ref: str) -> None:
    """Raise ``MaskSizeError`` unless ``other`` has the size of ``image``."""
    if other.size != image.size:
        raise MaskSizeError(f"{param} is {other.size[0]}x{other.size[1]} but {ref} is "
                            f"{image.size[0]}x{image.size[1]}; allowed: the size of {ref}", param,
                            f"{image.size[0]}x{image.size[1]}")


def mask_from_difference(original: Image.Image, painted: Image.Image) -> Image.Image:
    """Mode-"L" mask: 255 where ``painted`` differs from ``original`` in any channel."""
    neq = np.any(np.asarray(original) != np.asarray(painted), axis=-1)
    return Image.fromarray(neq.astype(np.uint8) * 255, mode="L")


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian-blurred mask; the blur only grows the mask (the original mask stays 255)."""
    if not radius:
        return mask
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius=radius)), dtype=np.float32)
    # stretch so the inside of the mask stays fully repainted and only the edge is soft
    top = blurred.max()
    if top > 0:
        blurred = np.maximum(blurred * (255.0 / top), np.asarray(mask, dtype=np.float32))
    return Image.fromarray(np.clip(blurred + 0.5, 0, 255).astype(np.uint8), mode="L")


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` where ``mask`` is 255, ``original`` where it is 0, blended between.

    Pixels where the mask is 0 are exactly the original's.
    """
    g = np.asarray(generated, dtype=np.uint32)
    o = np.asarray(original, dtype=np.uint32)
    m = np.asarray(mask, dtype=np.uint32)[..., None]
    out = (g * m + o * (255 - m) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def grow_mask(mask: Image.Image, pixels: int) -> Image.Image:
    """Dilate a mask by ``pixels`` (max filter)."""
    if pixels <= 0:
        return mask
    return mask.filter(ImageFilter.MaxFilter(2 * pixels + 1))


def invert(mask: Image.Image) -> Image.Image:
    """255 - mask."""
    return ImageOps.invert(mask)


def _read_image_file(value: str | os.PathLike, param: str) -> Image.Image:
    """Decode an image file fully (so the file is closed), naming ``param`` in any error."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise MissingImageError(f"{param} file {str(path)!r} does not exist", param, "an existing image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except OSError as exc:
        raise InvalidValueError(f"{param} file {str(path)!r} is not a readable image: {exc}", param,
                                "PNG, JPEG or WebP files") from exc
