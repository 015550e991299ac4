"""ControlNet condition images computed from an input image.

``make_condition(ctype, image, **opts)`` returns an RGB image of the input's size:

- ``canny``: OpenCV Canny edges (white on black) of the RGB image; opts ``low`` and
  ``high`` (hysteresis thresholds, default 100 and 200).
- ``soft-sobel``: Sobel gradient magnitude of the greyscale image, scaled so the strongest
  edge is 255; opt ``ksize`` (Sobel aperture, 1-31 odd, default 9 as in metafusion).
- ``soft``: soft edges: Scharr gradient magnitude of the image blurred with a Gaussian of
  ``sigma`` (default 2), blurred again with the same Gaussian and scaled to 0..255 - thick,
  smooth lines like an HED soft-edge map, with no model.
- ``ip2p``: the image itself (InstructPix2Pix ControlNet).
- ``inpaint``: the image with the pixels under ``mask`` (white = repaint) set to black. The
  inpaint ControlNet was trained with those pixels at -1, which an 8-bit image cannot hold:
  pass ``inpaint_control_tensor(image, mask)`` to diffusers instead where that matters.
  Without ``mask`` an RGBA image's transparent pixels are the mask.
- ``qr``: the image in greyscale with its contrast stretched to 0..255 (``cutoff`` percent of
  the darkest and lightest pixels clipped, default 0).
- ``depth`` and ``pose``: need a model. ``models={"depth": m}`` (or ``model=m``) where ``m``
  is a callable ``PIL.Image -> image`` (PIL, numpy or tensor), or, for depth, the path of a
  local transformers depth-estimation model (DPT, Depth Anything, ...). Without one,
  ``MissingConditionModelError`` says what to configure (``condition_models`` in models.yaml).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import (InvalidValueError, MaskSizeError, MissingConditionModelError, MissingImageError,
                     UnknownParameterError)

logger = logging.getLogger(__name__)

# The condition types are the table ``CONDITIONS`` at the end of this module (each type's
# function, the options it reads with their defaults, whether it needs a model);
# ``CONDITION_TYPES``, ``MODEL_FREE_TYPES``, ``MODEL_TYPES`` and ``OPTIONS`` are derived from it.
_OPTION_ALIASES = {"low_threshold": "low", "high_threshold": "high"}

_model_cache: dict[str, Callable[[Image.Image], Any]] = {}
_model_lock = threading.Lock()


def make_condition(ctype: str, image: Any, **opts: Any) -> Image.Image:
    """Compute the condition image of one type from an input image.

    Args:
        ctype: One of ``CONDITION_TYPES``.
        image: The input: a PIL image (any mode), a numpy array or a file path.
        **opts: ``low``/``high`` (canny; also ``low_threshold``/``high_threshold``), ``ksize``
            (soft-sobel), ``sigma`` (soft), ``mask`` (inpaint), ``cutoff`` (qr), ``models`` or
            ``model`` (depth, pose).

    Returns:
        An RGB image of the input's size.

    Raises:
        InvalidValueError: Unknown ``ctypes`` value or a bad option value.
        UnknownParameterError: An option that no condition type reads.
        MissingImageError: No input image (or no mask for inpaint).
        MaskSizeError: A mask of another size than the image.
        MissingConditionModelError: depth or pose without a model.
    """
    opts = _check_opts(opts)
    spec = CONDITIONS.get(ctype)
    if spec is None:
        allowed = ", ".join(CONDITION_TYPES)
        raise InvalidValueError(f"Unknown condition type {ctype!r} (parameter 'ctypes'). Allowed: {allowed}.",
                                param="ctypes", allowed=allowed)
    source = to_rgb(image) if spec.rgb_input else image
    return spec.make(source, **{name: opts.get(name, default) for name, default in spec.options.items()})


def _check_opts(opts: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in opts.items():
        name = _OPTION_ALIASES.get(key, key)
        if name not in OPTIONS:
            allowed = ", ".join(OPTIONS + tuple(_OPTION_ALIASES))
            raise UnknownParameterError(f"Unknown condition option {key!r}. Allowed: {allowed}.",
                                        param=key, allowed=allowed)
        out[name] = value
    return out


def to_rgb(image: Any, param: str = "image") -> Image.Image:
    """The input as an RGB PIL image (RGBA is composited on white, greyscale expanded).

    Raises:
        MissingImageError: If ``image`` is None or not an image.
    """
    if image is None:
        raise MissingImageError(f"Missing '{param}': a condition needs an input image "
                                "(PIL image, numpy array or file path).", param=param,
                                allowed="PIL image, numpy array or file path")
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
            image.load()
        except OSError as exc:
            raise MissingImageError(f"'{param}' {str(image)!r} cannot be read as an image: {exc}", param=param,
                                    allowed="PNG, JPEG or WebP file") from exc
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_to_uint8(image))
    if not isinstance(image, Image.Image):
        raise MissingImageError(f"'{param}' must be an image, not {type(image).__name__}.", param=param,
                                allowed="PIL image, numpy array or file path")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    a = array.astype(np.float32)
    if a.size and a.max() <= 1.0:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")


def _scaled(values: np.ndarray) -> np.ndarray:
    """Scale non-negative values so the largest is 255 (all zeros stay zeros)."""
    top = float(values.max()) if values.size else 0.0
    if top <= 1e-6:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidValueError(f"Invalid value for '{param}': {value!r}. Allowed: a number from {low} to {high}.",
                                param=param, allowed=f"{low} to {high}")
    return float(value)


def _canny(rgb: Image.Image, low: Any, high: Any) -> Image.Image:
    lo = _number(low, "low", 0, 10000)
    hi = _number(high, "high", 0, 10000)
    if lo > hi:
        raise InvalidValueError(f"Invalid canny thresholds: low {lo} is above high {hi}. Allowed: low <= high.",
                                param="low", allowed="low <= high")
    edges = cv2.Canny(np.asarray(rgb), lo, hi)
    return _grey_to_rgb(edges)


def _soft_sobel(rgb: Image.Image, ksize: Any) -> Image.Image:
    if isinstance(ksize, bool) or not isinstance(ksize, int) or ksize not in range(1, 32, 2):
        raise InvalidValueError(f"Invalid value for 'ksize': {ksize!r}. Allowed: an odd integer from 1 to 31.",
                                param="ksize", allowed="odd integers 1..31")
    grey = np.asarray(rgb.convert("L"), dtype=np.float32)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=ksize)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=ksize)
    return _grey_to_rgb(_scaled(np.hypot(gx, gy)))


def _soft(rgb: Image.Image, sigma: Any) -> Image.Image:
    s = _number(sigma, "sigma", 0.1, 50)
    grey = np.asarray(rgb.convert("L"), dtype=np.float32)
    blurred = cv2.GaussianBlur(grey, (0, 0), s)
    gx = cv2.Scharr(blurred, cv2.CV_32F, 1, 0)
    gy = cv2.Scharr(blurred, cv2.CV_32F, 0, 1)
    soft = cv2.GaussianBlur(np.hypot(gx, gy), (0, 0), s)
    return _grey_to_rgb(_scaled(soft))


def _qr(rgb: Image.Image, cutoff: Any) -> Image.Image:
    c = _number(cutoff, "cutoff", 0, 49)
    return ImageOps.autocontrast(rgb.convert("L"), cutoff=c).convert("RGB")


def load_mask(mask: Any, size: tuple[int, int], image: Any = None) -> np.ndarray:
    """A boolean mask (True = repaint) of ``size`` (width, height).

    Args:
        mask: PIL image (white = repaint), numpy array (bool, 0..255 or 0..1) or file path;
            None to use the transparent pixels of an RGBA ``image``.
        size: The image size the mask must have.
        image: The input image (for its alpha channel when ``mask`` is None).

    Raises:
        MissingImageError: No mask and no alpha channel.
        MaskSizeError: A mask of another size.
    """
    if mask is None:
        if isinstance(image, Image.Image) and image.mode in ("RGBA", "LA"):
            return np.asarray(image.getchannel("A")) < 128
        raise MissingImageError("Missing 'mask': the inpaint condition needs a mask (white = repaint) "
                                "or an RGBA image whose transparent pixels are to be repainted.",
                                param="mask", allowed="PIL image, numpy array or file path of the image's size")
    if isinstance(mask, (str, os.PathLike)):
        mask = Image.open(mask)
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            # strokes painted on a transparent layer: transparent counts as black (keep)
            rgba = mask.convert("RGBA")
            mask = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        array = np.asarray(mask.convert("L"))
    else:
        array = np.asarray(mask)
        if array.ndim == 3:
            array = array.max(axis=2)
        array = _to_uint8(array)
    if (array.shape[1], array.shape[0]) != tuple(size):
        raise MaskSizeError(f"'mask' is {array.shape[1]}x{array.shape[0]} but the image is {size[0]}x{size[1]}. "
                            "Allowed: a mask of the image's size.", param="mask",
                            allowed=f"{size[0]}x{size[1]}")
    return array > 127


def _inpaint(image: Any, mask: Any) -> Image.Image:
    original = image if isinstance(image, Image.Image) else None
    rgb = to_rgb(image)
    masked = load_mask(mask, rgb.size, original)
    out = np.array(rgb)
    out[masked] = 0
    return Image.fromarray(out)


def inpaint_control_tensor(image: Any, mask: Any) -> torch.Tensor:
    """The inpaint ControlNet's condition as diffusers documents it: ``[1, 3, H, W]``.

    Values are the image in 0..1 with the masked pixels at -1.0 (what
    ``control_v11p_sd15_inpaint`` was trained on); pass it as ``control_image``.
    """
    original = image if isinstance(image, Image.Image) else None
    rgb = to_rgb(image)
    masked = load_mask(mask, rgb.size, original)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array[masked] = -1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


def _from_model(ctype: str, rgb: Image.Image, model: Any = None, models: Any = None) -> Image.Image:
    """The condition of a model-based type: ``model``, else ``models[ctype]``, run on the image."""
    models = models or {}
    if model is None and isinstance(models, dict):
        model = models.get(ctype)
    if model is None:
        raise MissingConditionModelError(
            f"Condition type {ctype!r} (parameter 'ctypes') needs a model and none is configured: add "
            f"`condition_models: {{{ctype}: <path>}}` to models.yaml (for depth, a local transformers "
            f"depth-estimation model such as DPT or Depth Anything), or pass models={{{ctype!r}: callable}}. "
            f"Allowed without a model: {', '.join(MODEL_FREE_TYPES)}.",
            param="ctypes", allowed=", ".join(MODEL_FREE_TYPES))
    estimator = _resolve_model(ctype, model)
    result = estimator(rgb)
    if isinstance(result, dict) and ctype in result:
        result = result[ctype]  # a transformers pipeline's output: {"predicted_depth", "depth"}
    out = _result_to_image(result, ctype)
    return out if out.size == rgb.size else out.resize(rgb.size, Image.BICUBIC)


def _resolve_model(ctype: str, model: Any) -> Callable[[Image.Image], Any]:
    if callable(model):
        return model
    if isinstance(model, (str, os.PathLike)):
        load = CONDITIONS[ctype].load_model
        if load is None:
            loadable = ", ".join(n for n, s in CONDITIONS.items() if s.load_model is not None)
            raise InvalidValueError(
                f"condition_models entry for {ctype!r} is a path ({str(model)!r}); only {loadable} models can be "
                f"loaded from a path. For {ctype}, pass a callable (e.g. an OpenPose detector) in "
                f"models={{{ctype!r}: callable}}.",
                param="condition_models", allowed=f"a callable, or a model path for {loadable}")
        return load(Path(model))
    raise InvalidValueError(f"condition model for {ctype!r} must be a callable or a path, not "
                            f"{type(model).__name__}.", param="condition_models",
                            allowed="a callable or a local model path")


def _load_depth_model(path: Path) -> Callable[[Image.Image], Any]:
    """A transformers depth-estimation pipeline from a local folder (loaded once, cached)."""
    key = str(path.resolve())
    with _model_lock:
        if key not in _model_cache:
            if not path.is_dir():
                raise MissingConditionModelError(
                    f"depth model folder {str(path)!r} (condition_models.depth in models.yaml) does not exist.",
                    param="ctypes", allowed="an existing local model folder")
            from transformers import pipeline

            logger.info("loading depth model %s", path)
            _model_cache[key] = pipeline("depth-estimation", model=str(path), device="cpu")
        return _model_cache[key]


def _result_to_image(result: Any, ctype: str) -> Image.Image:
    if isinstance(result, Image.Image):
        return to_rgb(result)
    if isinstance(result, torch.Tensor):
        result = result.detach().float().cpu().numpy()
    if isinstance(result, np.ndarray):
        array = np.squeeze(result)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.dtype != np.uint8:
            array = _scaled(np.maximum(array.astype(np.float32) - float(array.min()), 0))
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise InvalidValueError(f"the {ctype} model returned {type(result).__name__}; allowed: a PIL image, "
                            "a numpy array or a tensor.", param="condition_models",
                            allowed="callable returning an image")


def _ip2p(rgb: Image.Image) -> Image.Image:
    return rgb.copy()


@dataclass(frozen=True)
class ConditionSpec:
    """One condition type.

    Attributes:
        name: the ``ctypes`` value.
        make: ``make(image, **options) -> RGB image``; ``image`` is RGB when ``rgb_input``, else
            the input as given (inpaint reads an RGBA input's alpha).
        options: the options it reads, with their defaults.
        needs_model: it runs a model given in ``condition_models`` / ``models=``.
        rgb_input: ``make`` gets the input converted to RGB.
        load_model: loads its model from a local path (None: only callables are accepted).
    """

    name: str
    make: Callable[..., Image.Image]
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_model: bool = False
    rgb_input: bool = True
    load_model: Callable[[Path], Callable[[Image.Image], Any]] | None = None


_MODEL_OPTIONS = {"model": None, "models": None}

#: every condition type, in the order the docs and error messages list them
CONDITIONS: Mapping[str, ConditionSpec] = MappingProxyType({spec.name: spec for spec in (
    ConditionSpec("canny", _canny, {"low": 100, "high": 200}),
    ConditionSpec("soft-sobel", _soft_sobel, {"ksize": 9}),
    ConditionSpec("soft", _soft, {"sigma": 2.0}),
    ConditionSpec("ip2p", _ip2p),
    ConditionSpec("inpaint", _inpaint, {"mask": None}, rgb_input=False),
    ConditionSpec("qr", _qr, {"cutoff": 0}),
    ConditionSpec("depth", partial(_from_model, "depth"), _MODEL_OPTIONS, needs_model=True,
                  load_model=_load_depth_model),
    ConditionSpec("pose", partial(_from_model, "pose"), _MODEL_OPTIONS, needs_model=True),
)})

CONDITION_TYPES: tuple[str, ...] = tuple(CONDITIONS)
#: Condition types computed with no model.
MODEL_FREE_TYPES: tuple[str, ...] = tuple(n for n, spec in CONDITIONS.items() if not spec.needs_model)
#: Condition types that need a model (``condition_models`` in models.yaml).
MODEL_TYPES: tuple[str, ...] = tuple(n for n, spec in CONDITIONS.items() if spec.needs_model)
#: Options make_condition accepts (each type reads its own and ignores the others', so one
#: set of options can serve several condition types).
OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for spec in CONDITIONS.values() for o in spec.options))


def reads_option(ctype: str, option: str) -> bool:
    """True when condition type ``ctype`` reads ``option`` (e.g. whether it needs a ``mask``)."""
    spec = CONDITIONS.get(ctype)
    return spec is not None and option in spec.options
