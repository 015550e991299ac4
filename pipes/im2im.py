"""Image-to-image pipes: ``Im2ImPipe``, ``MaskedIm2ImPipe``, ``InpaintingPipe``.

Input images are converted to RGB (RGBA onto white), scaled (``scale``) or resized
(``width``/``height``), padded to the family's size multiple (8 for SD/SDXL, 16 for Flux) by
repeating edge pixels, and the output is cropped back to the requested size. The masked pipes
composite the result onto the original with the (blurred) mask, so pixels outside it are exactly
the original's. With ``full_res`` they generate only a box around the mask, at ``width``x``height``
(A1111's "inpaint at full resolution"), and paste it back at the original's size.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageChops

from . import spec as specs
from . import upscale
from .base import BasePipe
from .errors import Cancelled, InvalidValueError, MissingImageError
from .families import Role
from .imagelist import ImageList
from .images import (MAX_SIDE, MIN_SIDE, blur_mask, check_image_size, check_same_size, composite, crop, load_image,
                     load_mask, mask_from_difference, pad_image, padded, scale_image)
from .outpaint import Outpaint, inpaint_prompted

logger = logging.getLogger(__name__)

#: the spec's bound, for readers of the old name
MAX_BLUR = specs.BLUR.maximum


def source_name(value: Any) -> str | None:
    """What get_config records for an image parameter: the path, or None for an in-memory image."""
    return str(value) if isinstance(value, (str, os.PathLike)) else None


#: a box in pixels: left, top, right, bottom (right and bottom excluded, as PIL's ``crop`` takes it)
Box = tuple[int, int, int, int]


def mask_box(mask: Image.Image, padding: int) -> Box:
    """The box of the mask's non-zero pixels grown by ``padding`` on every side, kept inside the image.

    An empty mask gives the whole image (there is nothing to redraw; the compositing keeps every pixel).
    """
    found = mask.getbbox()
    if found is None:
        return 0, 0, mask.size[0], mask.size[1]
    left, top, right, bottom = found
    width, height = mask.size
    return max(0, left - padding), max(0, top - padding), min(width, right + padding), min(height, bottom + padding)


def _grow_span(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """``[start, end)`` grown to ``length`` (no shorter than it was) around its centre, then shifted inside
    ``[0, limit)``; cut at ``limit`` when even that does not hold it."""
    extra = max(0, length - (end - start))
    start, end = start - extra // 2, end + extra - extra // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def expand_to_aspect(box: Box, aspect: tuple[int, int], size: tuple[int, int]) -> Box:
    """``box`` grown (never shrunk) to the aspect ratio of ``aspect`` (width, height), inside an image of
    ``size``: the generation sees the crop undistorted. Where the image is too small for that aspect the
    box takes the image's whole side (the crop is then slightly stretched to the generation size)."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    gen_w, gen_h = aspect
    if width * gen_h > height * gen_w:  # wider than the generation: grow the height
        top, bottom = _grow_span(top, bottom, min(size[1], round(width * gen_h / gen_w)), size[1])
    else:
        left, right = _grow_span(left, right, min(size[0], round(height * gen_w / gen_h)), size[0])
    return left, top, right, bottom


def generation_size(crop_size: tuple[int, int], width: int | None, height: int | None, native: int,
                    multiple: int) -> tuple[int, int]:
    """The size a full-res crop is generated at: ``width``x``height`` where given; a side left out follows
    the crop's aspect; both left out: the model's native area (``native`` squared) at the crop's aspect.
    Computed sides are multiples of the family's ``multiple``, within the spec's side range."""
    crop_w, crop_h = crop_size
    lowest, highest = padded(MIN_SIDE, multiple), MAX_SIDE // multiple * multiple

    def side(value: float) -> int:
        return min(highest, max(lowest, round(value / multiple) * multiple))

    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, side(width * crop_h / crop_w)
    if height is not None:
        return side(height * crop_w / crop_h), height
    root = math.sqrt(crop_w / crop_h)
    return side(native * root), side(native / root)


class Im2ImPipe(BasePipe):
    """Generate an image from another image (``StableDiffusion(XL)Img2ImgPipeline``).

    Setup parameters (besides the common ones): ``image`` (PIL image or path; ``fimage`` is
    metafusion's alias), ``strength`` (0-1, default 0.75: how much is redrawn), ``scale``
    (factor or ``[width, height]``). ``width``/``height``, when given, resize the input;
    otherwise the output has the (scaled) input's size.

    ``uov`` (upscale or vary, pipes/upscale.py): ``vary_subtle``/``vary_strong`` redraw at strength 0.5/0.85;
    ``upscale`` enlarges the input ``upscale_factor`` times (the ``upscaler`` model, else Lanczos; ``width``
    and ``height`` are not used, ``scale`` is refused) and redraws it at 0.382, in tiles beyond
    ``upscale.COMFORTABLE_AREA`` x the native area (the step callback then counts tiles x steps);
    ``upscale_fast`` enlarges only (``gen`` runs no diffusion and never calls the step callback). A given
    ``strength`` wins. ``upscalers`` (constructor): ``{name: model file}`` that ``upscaler`` names.
    """

    SPEC = specs.IM2IM
    ROLE = Role.IMAGE2IMAGE
    #: the boxes of an upscale redrawn one at a time (pipes/upscale.py ``tile_plan``); None: the whole image
    _tiles: list[Box] | None = None

    def __init__(self, *args: Any, upscalers: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.upscalers = dict(upscalers or {})  # the upscaler models a job's ``upscaler`` names
        super().__init__(*args, **kwargs)

    def _sized(self, image: Image.Image, merged: dict[str, Any], given: dict[str, Any], param: str) -> Image.Image:
        image = scale_image(image, merged.get("scale"))
        if given.get("width") is not None or given.get("height") is not None:
            w = merged["width"] if given.get("width") is not None else image.size[0]
            h = merged["height"] if given.get("height") is not None else image.size[1]
            if (w, h) != image.size:
                image = image.resize((w, h), Image.LANCZOS)
        check_image_size(image, param)
        return image

    def _check_strength(self, merged: dict[str, Any]) -> None:
        # its range is checked with the others (_validate_common); here what it does with steps
        if int(merged["steps"] * merged["strength"]) < 1:
            low = 1.0 / merged["steps"]
            mode = f" (uov {merged['uov']}'s)" if merged.get("uov") else ""
            raise InvalidValueError(f"strength {merged['strength']}{mode} with steps {merged['steps']} runs no step; "
                                    f"allowed: strength from {low:.3g} to 1 (or more steps)", "strength",
                                    f"{low:.3g} to 1")

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        mode = merged.get("uov")
        upscale.apply_uov_strength(merged, given)  # the mode's strength unless the job gives one
        if mode != "upscale_fast":  # which runs no step
            self._check_strength(merged)
        source = given.get("image")
        if mode in upscale.UPSCALE_MODES:
            image = self._upscaled(load_image(source, "image"), merged, given)
        else:
            image = self._sized(load_image(source, "image"), merged, given, "image")
        merged["width"], merged["height"] = image.size
        self._input_image = image
        self._padded_input = pad_image(image, self.family.size_multiple)
        self._sources = {"image": source_name(source)}
        self._tiles = None
        if mode == "upscale":
            self._tiles = upscale.tile_plan(self._padded_input.size, self.family.native_size(self.base),
                                            self.family.size_multiple)

    def _upscaled(self, image: Image.Image, merged: dict[str, Any], given: dict[str, Any]) -> Image.Image:
        """The input enlarged ``upscale_factor`` times by the chosen upscaler (recorded by name in ``merged``)."""
        upscale.check_uov(given, sizing=("scale",))  # width/height may be a model's defaults: not used here
        size = upscale.output_size(image.size, merged["upscale_factor"])
        merged["upscaler"], model = upscale.upscaler_path(merged.get("upscaler"), self.upscalers)
        image = upscale.upscale_image(image, size, model, self.device)
        check_image_size(image, "image")
        return image

    def gen(self, inputs: dict[str, Any]) -> Any:
        """``BasePipe.gen``; ``uov`` upscale_fast returns the enlarged input (no diffusion, no step callback);
        an upscale in tiles reports the steps of all its tiles to the step callback."""
        if self._is_setup and self.params.get("uov") == "upscale_fast":
            return self._gen_fast(inputs)
        if self._tiles and inputs.get("callback") is not None:
            inputs = {**inputs, "callback": upscale.TileProgress(inputs["callback"], len(self._tiles))}
        return super().gen(inputs)

    def _gen_fast(self, inputs: dict[str, Any]) -> Any:
        cancel = inputs.get("cancel")
        if cancel is not None and cancel():
            raise Cancelled("cancelled before the upscale")
        generator, seeds = self._generators(inputs)  # recorded as a diffusion's would be
        batch = len(generator) if isinstance(generator, list) else 1
        self._warnings = []
        seed = seeds if seeds is None or isinstance(inputs.get("seed"), (list, tuple)) else seeds[0]
        self._last_inputs = {"prompt": inputs.get("prompt") or "", "batch_size": batch, "seed": seed,
                             "negative_prompt": inputs.get("negative_prompt") or ""}
        return ImageList([self._input_image.copy() for _ in range(batch)])

    def _denoise(self, kwargs: dict[str, Any], callback: Any, cancel: Any) -> list[Any]:
        if not self._tiles:
            return super()._denoise(kwargs, callback, cancel)
        return upscale.denoise_tiles(lambda call: super(Im2ImPipe, self)._denoise(call, callback, cancel), kwargs,
                                     self._tiles)

    def _latents_view(self, call_kwargs: dict[str, Any]) -> Any:
        if self._tiles:  # the step latents are a tile's
            left, top, right, bottom = self._tiles[0]
            call_kwargs = {**call_kwargs, "width": right - left, "height": bottom - top}
        return super()._latents_view(call_kwargs)

    def _size_kwargs(self) -> dict[str, Any]:
        """``width``/``height`` of the padded input, for the diffusers classes that take them (Flux's
        would otherwise resize the input to its native 1024x1024; SD's img2img takes no size). The
        ControlNet pipes built on this class call their diffusers classes as before, without them."""
        if self.ROLE is not Role.IMAGE2IMAGE:
            return {}
        params = inspect.signature(self._pipeline_class().__call__).parameters
        if "width" not in params or "height" not in params:
            return {}
        w, h = self._padded_input.size
        return {"width": w, "height": h}

    def _call_kwargs(self) -> dict[str, Any]:
        return {"image": self._padded_input, "strength": self.params["strength"], **self._size_kwargs()}

    def _postprocess(self, images: list[Image.Image]) -> list[Image.Image]:
        return [crop(im, self.output_size()) for im in images]

    def _extra_config(self) -> dict[str, Any]:
        out = {k: v for k, v in self._sources.items()} if self._is_setup else {}
        out["source_image"] = out.get("image")
        return out


class MaskedIm2ImPipe(Im2ImPipe):
    """Redraw only a masked part of an image, with any (non-inpainting) checkpoint.

    The mask is the difference between ``original_image`` (= ``image``) and ``image_painted``
    (the original with the mask painted over it; its colours steer the result), or an
    explicit ``mask`` (white = redraw). ``blur`` softens the mask used while denoising,
    ``blur_compose`` the mask used to composite the result onto the original: pixels outside
    it are exactly the original's.

    ``full_res`` (inpaint at full resolution) generates only the box of the (blurred) mask grown by
    ``full_res_padding`` and then to the generation's aspect, at ``width``x``height`` (default: the
    model's native area at the box's aspect), scales the result back to the box and pastes it
    through the mask: a small mask in a large image gets the model's whole resolution. ``width`` and
    ``height`` are then the generation's size (as ``params`` and ``get_config`` record them), not
    the output's: the output has the (scaled) input's size, and ``get_config()["full_res_box"]``
    records the box (left, top, right, bottom).
    """

    SPEC = specs.MASKED_IM2IM
    ROLE = Role.INPAINT
    #: the box generated at full resolution (``full_res``), None: the whole image
    _full_res_box: Box | None = None
    #: the outpaint of the input (pipes/outpaint.py), None: none asked for
    _outpaint: Outpaint | None = None

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        self._check_strength(merged)
        source = given.get("image")
        original = load_image(source, "image")
        painted_src, mask_src = given.get("image_painted"), given.get("mask")
        painted = load_image(painted_src, "image_painted", required=False)
        if painted is not None:
            check_same_size(original, painted, "image_painted", "image")
            mask = mask_from_difference(original, painted)
        elif mask_src is not None:
            mask = load_mask(mask_src, "mask")
            check_same_size(original, mask, "mask", "image")
        elif self.SPEC.missing_images(given):  # no outpaint either (its new area is a mask)
            raise MissingImageError(f"{type(self).__name__} needs image_painted or mask to know what to redraw "
                                    "(or an outpaint)", "mask", "image_painted (the image with the mask painted), "
                                    "mask, or outpaint/outpaint_<side>")
        else:
            mask = None
        full_res = bool(merged.get("full_res"))
        # with full_res, width and height size the generation of the crop, not the input
        resize = {k: v for k, v in given.items() if k not in ("width", "height")} if full_res else given
        original = self._sized(original, merged, resize, "image")
        size = original.size
        painted = painted.resize(size, Image.LANCZOS) if painted is not None and painted.size != size else painted
        if mask is not None and mask.size != size:
            mask = mask.resize(size, Image.BILINEAR)
        extension = self._outpaint = Outpaint.from_params(merged, size)
        if extension is not None:  # the extended canvas, filled from the edges; the mask placed on it
            original, mask = extension.extend(original), extension.place(mask)
            painted = None if painted is None else extension.extend(painted)
            size = original.size
        self._input_image = original
        denoise = blur_mask(mask, merged.get("blur", 0))
        self._compose_mask = blur_mask(mask, merged.get("blur_compose", merged.get("blur", 0)))
        if extension is not None:  # the new area and its seam band join the (blurred) masks unblurred
            mask, denoise, self._compose_mask = map(extension.join, (mask, denoise, self._compose_mask))
        self._mask = mask
        start = painted if painted is not None else original
        self._full_res_box = None
        if full_res:
            box, gen_size = self._full_res_crop(ImageChops.lighter(denoise, self._compose_mask), merged, given)
            self._full_res_box = box
            denoise = denoise.crop(box).resize(gen_size, Image.BILINEAR)
            start = start.crop(box).resize(gen_size, Image.LANCZOS)
            size = gen_size
        merged["width"], merged["height"] = size
        multiple = self.family.size_multiple
        self._denoise_mask = pad_image(denoise, multiple)
        self._padded_input = pad_image(start, multiple)
        self._sources = {"image": source_name(source), "image_painted": source_name(painted_src),
                         "mask": source_name(mask_src)}

    def _full_res_crop(self, mask: Image.Image, merged: dict[str, Any], given: dict[str, Any]
                       ) -> tuple[Box, tuple[int, int]]:
        """The box to generate at full resolution and the size to generate it at.

        ``mask`` is the union of the blurred masks, so that the compositing's soft edge lies inside the
        box; the box is grown by the padding, then to the generation's aspect, inside the image.
        """
        padding = merged.get("full_res_padding", specs.FULL_RES_PADDING.default)
        box = mask_box(mask, padding)
        width = merged["width"] if given.get("width") is not None else None
        height = merged["height"] if given.get("height") is not None else None
        gen_size = generation_size((box[2] - box[0], box[3] - box[1]), width, height,
                                   self.family.native_size(self.base), self.family.size_multiple)
        return expand_to_aspect(box, gen_size, mask.size), gen_size

    def _call_kwargs(self) -> dict[str, Any]:
        w, h = self._padded_input.size
        return {"image": self._padded_input, "mask_image": self._denoise_mask, "strength": self.params["strength"],
                "width": w, "height": h}

    def _postprocess(self, images: list[Image.Image]) -> list[Image.Image]:
        box = self._full_res_box
        if box is None:
            size = self.output_size()
            return [composite(crop(im, size), self._input_image, self._compose_mask) for im in images]
        gen_size = (self.params["width"], self.params["height"])
        out = []
        for im in images:
            # the crop's result at the crop's size, in place in the original; the mask then keeps the rest
            pasted = self._input_image.copy()
            pasted.paste(crop(im, gen_size).resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
            out.append(composite(pasted, self._input_image, self._compose_mask))
        return out

    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images ``gen`` returns: with ``full_res`` the input's, not the generation's."""
        return self._input_image.size if self._full_res_box is not None else super().output_size()

    def _vae_tiling(self) -> bool:
        # with full_res the VAE decodes the generation's size, not the output's
        if self._full_res_box is None or self.params.get("vae_tiling") is not None:
            return super()._vae_tiling()
        return self.padded(self.params["width"]) * self.padded(self.params["height"]) > specs.VAE_TILING_PIXELS

    def _extra_config(self) -> dict[str, Any]:
        out = super()._extra_config()
        if self._is_setup and self._full_res_box is not None:
            out["full_res_box"] = list(self._full_res_box)
        if self._is_setup and self._outpaint is not None:
            out.update(self._outpaint.describe())
        return out

    def _prompt_kwargs(self, prompt: str, negative_prompt: str | None) -> dict[str, Any]:
        # inpaint_prompt goes before the prompt (pipes/outpaint.py); the recorded prompt stays the job's
        return super()._prompt_kwargs(inpaint_prompted(prompt, self.params.get("inpaint_prompt")), negative_prompt)

    @property
    def mask(self) -> Image.Image:
        """The mask (mode L, 255 = redraw) before blurring."""
        return self._mask

    @property
    def denoise_mask(self) -> Image.Image:
        """The mask the diffusers pipeline denoises with: blurred by ``blur`` (with ``full_res``: cropped to the
        box and resized to the generation's size), padded to the size multiple."""
        return self._denoise_mask

    @property
    def full_res_box(self) -> Box | None:
        """The box (left, top, right, bottom) of the input generated at full resolution; None without ``full_res``."""
        return self._full_res_box


class InpaintingPipe(MaskedIm2ImPipe):
    """Inpaint the masked part of ``image`` (white in ``mask`` = redraw).

    Works with inpainting checkpoints and with ordinary ones (4-channel UNet: the unmasked
    latents are re-noised from the original every step). ``strength`` defaults to 1 (the
    masked part is drawn from noise); ``blur`` softens the mask edge; the result is
    composited onto the original, so unmasked pixels are unchanged. ``full_res`` and
    ``full_res_padding`` as in :class:`MaskedIm2ImPipe`.
    """

    SPEC = specs.INPAINTING

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        if given.get("mask") is None and self.SPEC.missing_images(given):
            raise MissingImageError("InpaintingPipe needs mask (white = redraw), the size of image, or an outpaint",
                                    "mask", "a PIL image, array or path the size of image, or outpaint/outpaint_<side>")
        super()._setup_inputs(merged, given)
