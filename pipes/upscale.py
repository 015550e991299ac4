"""Upscale or vary, Fooocus' ``uov``: the resizing, the upscaler models, the tiling and its blending.

``Im2ImPipe`` takes ``uov`` (``vary_subtle``, ``vary_strong``, ``upscale``, ``upscale_fast``; left out: plain
image-to-image), ``upscale_factor`` and ``upscaler``; this module holds what those modes do that is not the
pipe's own state:

- **vary**: image-to-image at Fooocus' denoise, 0.5 (subtle) or 0.85 (strong), unless the job gives a
  ``strength`` (:func:`apply_uov_strength`); the output has the (sized) input's size.
- **upscale**: the input is enlarged ``upscale_factor`` times (:func:`output_size`) by an upscaler model
  (ESRGAN family, loaded through ``spandrel``) when one is chosen, else by Lanczos (:func:`upscale_image`),
  then redrawn at Fooocus' 0.382 (unless the job gives a ``strength``). Beyond :data:`COMFORTABLE_AREA`
  times the model's native area, the redraw runs in overlapping tiles of the native size
  (:func:`tile_plan`), each with the job's seed (deterministic), blended with feathered edges
  (:class:`Blender`); the step callback counts the steps of every tile (:class:`TileProgress`).
- **upscale_fast**: the enlargement alone, no diffusion (no step callback, no prompt).

``spandrel`` 0.4 imports ``torchvision`` for two architectures (LaMa, RestoreFormer) only; where torchvision
is not installed (a CPU machine: its wheels pull the CUDA build), :func:`load_upscaler` imports spandrel
with a stand-in for those two imports (:func:`_torchvision_stand_in`), so ESRGAN-family models load
without it. Torch-free at import: the service's queue-time checks (:func:`check_uov`) use this module.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import importlib.util
import logging
import math
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import spec as specs
from .errors import InvalidValueError, PipeError, SizeError

logger = logging.getLogger(__name__)

#: Fooocus' denoise of the vary modes (modules/flags.py: ``Vary (Subtle)`` 0.5, ``Vary (Strong)`` 0.85)
VARY_STRENGTH: Mapping[str, float] = types.MappingProxyType({"vary_subtle": 0.5, "vary_strong": 0.85})
#: Fooocus' denoise of the upscale redraw (modules/async_worker.py: ``denoising_strength = 0.382``)
UPSCALE_STRENGTH = 0.382
#: the modes that enlarge the input
UPSCALE_MODES: tuple[str, ...] = ("upscale", "upscale_fast")
#: the ``upscaler`` that names no model: plain Lanczos resampling
LANCZOS = "lanczos"
#: an upscale is redrawn whole up to this many times the model's native area (2 x its side both ways, as
#: Fooocus redraws a 2x SDXL upscale whole); beyond, in overlapping tiles of the native size (a model drifts
#: into repeats far above its size; tiles cost seams and each tile sees only its part of the picture)
COMFORTABLE_AREA = 4.0
#: the overlap of neighbouring tiles, as a fraction of the tile's side (the feathered band)
TILE_OVERLAP = 0.25
#: an upscaler model runs on pieces of at most this many input pixels a side (its activations are
#: ``num_filters`` x the output size: a whole 2048 px image would need GBs), overlapping by ...
MODEL_TILE = 512
#: ... this many input pixels, blended
MODEL_TILE_OVERLAP = 16
#: most passes of an upscaler model (a x2 model reaches x4 in two); the rest is Lanczos
MAX_MODEL_PASSES = 3
#: the parameters that size the input of plain image-to-image; the upscale modes size their output from the
#: input and ``upscale_factor`` instead, so a job giving one of them is refused
SIZING_PARAMS: tuple[str, ...] = ("width", "height", "scale")
#: a box in pixels: left, top, right, bottom (right and bottom excluded)
Box = tuple[int, int, int, int]


# ---- the parameters ----------------------------------------------------------------------------------
def check_uov(params: Mapping[str, Any], sizing: Sequence[str] = SIZING_PARAMS,
              upscalers: Mapping[str, Any] | None = None) -> None:
    """Refuse what the ``uov`` modes cannot honour: a sizing parameter with an upscale mode (the output is
    the input x ``upscale_factor``), and, when ``upscalers`` is given, an ``upscaler`` it does not name.

    The service checks a job's own parameters with every sizing parameter; the pipe checks ``scale`` only
    (it cannot tell a job's ``width`` from a model's ``defaults:``, which it then does not use).

    Raises:
        InvalidValueError: naming the parameter and what is allowed.
    """
    mode = params.get("uov")
    if mode in UPSCALE_MODES:
        for name in sizing:
            if params.get(name) is not None:
                raise InvalidValueError(
                    f"{name} does not apply with uov {mode}: the output is the input's size x upscale_factor; "
                    f"leave {name} out (give upscale_factor = the size you want / the input's size), or use "
                    "plain image-to-image (no uov) to resize", name, f"no {name} with uov {mode}")
    name = params.get("upscaler")
    if upscalers is not None and name is not None and name != LANCZOS and name not in upscalers:
        allowed = ", ".join([*upscalers, LANCZOS])
        raise InvalidValueError(f"upscaler {name!r} is not known; allowed: {allowed} (models.yaml `upscaler:`)",
                                "upscaler", allowed)


def apply_uov_strength(merged: dict[str, Any], given: Mapping[str, Any]) -> None:
    """Set ``merged["strength"]`` to the ``uov`` mode's denoise unless the job gave a ``strength``."""
    mode = merged.get("uov")
    preset = VARY_STRENGTH.get(mode) if mode else None
    if mode == "upscale":
        preset = UPSCALE_STRENGTH
    if preset is not None and given.get("strength") is None:
        merged["strength"] = preset


def output_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """``size`` x ``factor``, rounded; within the spec's side range.

    Raises:
        SizeError: naming ``upscale_factor`` when a side would pass the largest size.
    """
    out = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
    top = int(specs.WIDTH.maximum)
    if max(out) > top:
        most = top / max(size)
        raise SizeError(f"upscale_factor {factor} makes the {size[0]}x{size[1]} input {out[0]}x{out[1]} px; "
                        f"allowed: at most {top} px a side, so upscale_factor up to {most:.3g} for this input",
                        "upscale_factor", f"at most {most:.3g} for this input")
    return out


def upscaler_path(name: str | None, upscalers: Mapping[str, Any]) -> tuple[str, str | None]:
    """The upscaler a job asks for: ``(name recorded, model file or None for Lanczos)``.

    ``None`` takes the first of ``upscalers`` (else Lanczos); :data:`LANCZOS` takes none; a name of
    ``upscalers`` takes its file; a path to an existing file (library use; the service allows names
    only) takes that file.

    Raises:
        InvalidValueError: a name that is none of these.
    """
    if name is None:
        if not upscalers:
            return LANCZOS, None
        name = next(iter(upscalers))
    if name == LANCZOS:
        return LANCZOS, None
    if name in upscalers:
        return name, str(upscalers[name])
    if os.path.isfile(name):
        return name, name
    allowed = ", ".join([*upscalers, LANCZOS])
    raise InvalidValueError(f"upscaler {name!r} is not known; allowed: {allowed}, or the path of an upscaler "
                            "model file", "upscaler", allowed)


# ---- the upscaler models --------------------------------------------------------------------------------
class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _normalize(tensor: Any, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> Any:
    """torchvision's ``normalize`` (RestoreFormer uses it): ``(x - mean) / std`` per channel."""
    import torch

    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def _rotate(*args: Any, **kwargs: Any) -> Any:
    raise PipeError("this upscaler model (LaMa) needs torchvision, which is not installed; use an ESRGAN-family "
                    "model", "upscaler", "an ESRGAN-family model")


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """``torchvision.transforms.functional`` with the three names spandrel imports (``normalize``,
    ``rotate``, ``InterpolationMode``), in ``sys.modules`` while spandrel is imported and removed after
    (libraries that look torchvision up must keep finding none)."""
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {n: types.ModuleType(n) for n in names}
    functional = modules["torchvision.transforms.functional"]
    functional.normalize = _normalize  # type: ignore[attr-defined]
    functional.rotate = _rotate  # type: ignore[attr-defined]
    functional.InterpolationMode = _InterpolationMode  # type: ignore[attr-defined]
    modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
    modules["torchvision.transforms"].functional = functional  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for n in names:
            if sys.modules.get(n) is modules[n]:
                del sys.modules[n]


def spandrel_module() -> Any:
    """``spandrel``, imported with the torchvision stand-in where torchvision is not installed.

    Raises:
        PipeError: spandrel (or einops) is not installed, with the command that installs it.
    """
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        if importlib.util.find_spec("torchvision") is None:
            with _torchvision_stand_in():
                import spandrel
        else:
            import spandrel
    except ModuleNotFoundError as e:
        raise PipeError(f"upscaler models need {e.name}, which is not installed: run `pip install --no-deps "
                        "spandrel==0.4.2 einops==0.8.2` (scripts/_env.sh does)", "upscaler", LANCZOS) from None
    return spandrel


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime: float, device: str) -> Any:
    import torch

    spandrel = spandrel_module()
    try:
        model = spandrel.ModelLoader().load_from_file(path)
    except (ValueError, KeyError, RuntimeError, spandrel.UnsupportedModelError) as e:
        raise PipeError(f"upscaler model {path} could not be loaded by spandrel: {e}", "upscaler",
                        "an ESRGAN-family .safetensors or .pth file") from None
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise PipeError(f"upscaler model {path} is a {model.architecture.name} model, not an image-to-image one",
                        "upscaler", "an ESRGAN-family model")
    model.to(torch.device(device)).eval()
    if torch.device(device).type == "cuda" and model.supports_half:
        model.half()
    logger.info("upscaler %s loaded: %s x%d on %s", path, model.architecture.name, model.scale, device)
    return model


def load_upscaler(path: str | os.PathLike[str], device: Any = "cpu") -> Any:
    """The spandrel model descriptor of an upscaler file, on ``device`` (the last two are kept loaded)."""
    path = str(Path(path).resolve())
    return _load(path, os.path.getmtime(path), str(device))


def run_model(model: Any, image: Image.Image) -> Image.Image:
    """One pass of an upscaler model (``model.scale`` times larger), in overlapping pieces of
    :data:`MODEL_TILE` input pixels blended where they overlap."""
    import torch

    scale = int(model.scale)
    param = next(model.model.parameters())
    width, height = image.size
    boxes = tile_boxes(image.size, (min(MODEL_TILE, width), min(MODEL_TILE, height)), MODEL_TILE_OVERLAP)
    blender = Blender((width * scale, height * scale), MODEL_TILE_OVERLAP * scale)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    for left, top, right, bottom in boxes:
        piece = torch.from_numpy(rgb[top:bottom, left:right].transpose(2, 0, 1).copy())[None]
        with torch.inference_mode():
            out = model(piece.to(device=param.device, dtype=param.dtype))
        array = out[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        blender.add(array, (left * scale, top * scale, right * scale, bottom * scale))
    return blender.image()


def upscale_image(image: Image.Image, size: tuple[int, int], model_path: str | None = None,
                  device: Any = "cpu") -> Image.Image:
    """``image`` enlarged to ``size``: by the upscaler model at ``model_path`` (passes until it is at least
    that large, at most :data:`MAX_MODEL_PASSES`), then Lanczos to the exact size; Lanczos alone without a
    model."""
    image = image.convert("RGB")
    if model_path is not None:
        model = load_upscaler(model_path, device)
        for _ in range(MAX_MODEL_PASSES):
            if image.size[0] >= size[0] and image.size[1] >= size[1]:
                break
            image = run_model(model, image)
    return image if image.size == tuple(size) else image.resize(size, Image.LANCZOS)


# ---- tiles -------------------------------------------------------------------------------------------------
def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` of tiles of ``tile`` pixels covering ``length``, evenly spread, neighbours
    overlapping by at least ``overlap``; one span of ``length`` when it fits a tile."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)
    return [(round(i * step), round(i * step) + tile) for i in range(count)]


def tile_boxes(size: tuple[int, int], tile: tuple[int, int], overlap: int) -> list[Box]:
    """The boxes of tiles of ``tile`` (width, height) covering an image of ``size``, row by row."""
    xs = spans(size[0], tile[0], overlap)
    ys = spans(size[1], tile[1], overlap)
    return [(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs]


def tile_plan(size: tuple[int, int], native: int, multiple: int) -> list[Box] | None:
    """The tiles an upscale of ``size`` (padded to ``multiple``) is redrawn in, or None to redraw it whole
    (up to :data:`COMFORTABLE_AREA` x ``native`` squared pixels). Tiles are ``native`` pixels a side (the
    image's side where it is smaller), a multiple of ``multiple``, overlapping by :data:`TILE_OVERLAP`."""
    if size[0] * size[1] <= COMFORTABLE_AREA * native * native:
        return None
    side = max(multiple, native // multiple * multiple)
    tile = (min(side, size[0]), min(side, size[1]))
    overlap = max(multiple, round(side * TILE_OVERLAP / multiple) * multiple)
    return tile_boxes(size, tile, overlap)


def _ramp(length: int, band: int, start_open: bool, end_open: bool) -> np.ndarray:
    """Weights along one side of a tile: rising over ``band`` pixels from an edge shared with a
    neighbour (``*_open``), 1 elsewhere (never 0: every pixel counts)."""
    w = np.ones(length, dtype=np.float64)
    band = min(band, length // 2)
    if band > 0:
        rise = (np.arange(band, dtype=np.float64) + 0.5) / band
        if start_open:
            w[:band] = np.minimum(w[:band], rise)
        if end_open:
            w[length - band:] = np.minimum(w[length - band:], rise[::-1])
    return w


class Blender:
    """Tiles added into one image, each weighted by a feathered mask (:func:`_ramp`) on the sides it shares
    with a neighbour: overlaps fade from one tile to the other, with no hard edge.

    Args:
        size: (width, height) of the result.
        band: pixels over which a tile's weight rises from a shared edge.
    """

    def __init__(self, size: tuple[int, int], band: int) -> None:
        self.size = size
        self.band = band
        self._sum = np.zeros((size[1], size[0], 3), dtype=np.float64)
        self._weight = np.zeros((size[1], size[0], 1), dtype=np.float64)

    def add(self, tile: np.ndarray | Image.Image, box: Box) -> None:
        """``tile`` (an image, or an H x W x 3 array of 0-1 floats) at ``box``."""
        left, top, right, bottom = box
        if isinstance(tile, Image.Image):
            tile = np.asarray(tile.convert("RGB"), dtype=np.float64) / 255.0
        wx = _ramp(right - left, self.band, left > 0, right < self.size[0])
        wy = _ramp(bottom - top, self.band, top > 0, bottom < self.size[1])
        weight = (wy[:, None] * wx[None, :])[..., None]
        self._sum[top:bottom, left:right] += tile[: bottom - top, : right - left] * weight
        self._weight[top:bottom, left:right] += weight

    def image(self) -> Image.Image:
        """The blended result (RGB)."""
        out = self._sum / np.maximum(self._weight, 1e-12)
        return Image.fromarray(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), "RGB")


class TileProgress:
    """A step callback over tiles: ``callback(done + step, tiles x steps, latents)``, where ``done`` counts
    the steps of the tiles before (each tile runs the same steps), so progress rises once across all."""

    def __init__(self, callback: Callable[[int, int, Any], Any], tiles: int) -> None:
        self.callback = callback
        self.tiles = tiles
        self.done = 0

    def __call__(self, step: int, steps: int, latents: Any) -> Any:
        out = self.callback(self.done + step, steps * self.tiles, latents)
        if step >= steps:
            self.done += steps
        return out


def _fresh(generator: Any) -> Any:
    """A new generator (or list) with the same seeds: every tile draws the same noise as a whole image would."""
    import torch

    if isinstance(generator, list):
        return [_fresh(g) for g in generator]
    if generator is None:
        return None
    return torch.Generator(generator.device).manual_seed(generator.initial_seed())


def denoise_tiles(run: Callable[[dict[str, Any]], list[Image.Image]], kwargs: dict[str, Any],
                  boxes: Sequence[Box]) -> list[Image.Image]:
    """``run(call kwargs)`` (the pipe's diffusers image-to-image call) on each box of ``kwargs["image"]`` with the
    same seeds (deterministic), and the results (one per image of the batch) blended into the image's size.

    ``kwargs`` are the whole image's call arguments; ``width``/``height``, where the pipeline takes them,
    become the tile's. Cancel and progress come through ``kwargs``' step hook, called at every step of
    every tile."""
    image: Image.Image = kwargs["image"]
    first = boxes[0]
    blenders: list[Blender] = []
    for box in boxes:
        call = dict(kwargs, image=image.crop(box), generator=_fresh(kwargs.get("generator")))
        if "width" in call:
            call["width"], call["height"] = box[2] - box[0], box[3] - box[1]
        outs = run(call)
        if not blenders:
            blenders = [Blender(image.size, _overlap(boxes)) for _ in outs]
        for blender, out in zip(blenders, outs):
            blender.add(out, box)
    logger.debug("upscale: %d tiles of %dx%d blended", len(boxes), first[2] - first[0], first[3] - first[1])
    return [b.image() for b in blenders]


def _overlap(boxes: Sequence[Box]) -> int:
    """The smallest overlap of neighbouring boxes (the feathered band), 0 for one box."""
    xs = sorted({(b[0], b[2]) for b in boxes})
    ys = sorted({(b[1], b[3]) for b in boxes})
    gaps = [a[1] - b[0] for a, b in zip(xs, xs[1:])] + [a[1] - b[0] for a, b in zip(ys, ys[1:])]
    return min(gaps) if gaps else 0
