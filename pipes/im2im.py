"""Image-to-image pipes: ``Im2ImPipe``, ``MaskedIm2ImPipe``, ``InpaintingPipe``.

Input images are converted to RGB (RGBA onto white), scaled (``scale``) or resized
(``width``/``height``), padded to the family's size multiple (8 for SD/SDXL, 16 for Flux) by
repeating edge pixels, and the output is cropped back to the requested size. The masked pipes
composite the result onto the original with the (blurred) mask, so pixels outside it are exactly
the original's.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from PIL import Image

from . import spec as specs
from .base import BasePipe
from .errors import InvalidValueError, MissingImageError
from .families import Role
from .images import (blur_mask, check_image_size, check_same_size, composite, crop, load_image, load_mask,
                     mask_from_difference, pad_image, scale_image)

logger = logging.getLogger(__name__)

#: the spec's bound, for readers of the old name
MAX_BLUR = specs.BLUR.maximum


def source_name(value: Any) -> str | None:
    """What get_config records for an image parameter: the path, or None for an in-memory image."""
    return str(value) if isinstance(value, (str, os.PathLike)) else None


class Im2ImPipe(BasePipe):
    """Generate an image from another image (``StableDiffusion(XL)Img2ImgPipeline``).

    Setup parameters (besides the common ones): ``image`` (PIL image or path; ``fimage`` is
    metafusion's alias), ``strength`` (0-1, default 0.75: how much is redrawn), ``scale``
    (factor or ``[width, height]``). ``width``/``height``, when given, resize the input;
    otherwise the output has the (scaled) input's size.
    """

    SPEC = specs.IM2IM
    ROLE = Role.IMAGE2IMAGE

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
            raise InvalidValueError(f"strength {merged['strength']} with steps {merged['steps']} runs no step; "
                                    f"allowed: strength from {low:.3g} to 1 (or more steps)", "strength",
                                    f"{low:.3g} to 1")

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        self._check_strength(merged)
        source = given.get("image")
        image = self._sized(load_image(source, "image"), merged, given, "image")
        merged["width"], merged["height"] = image.size
        self._input_image = image
        self._padded_input = pad_image(image, self.family.size_multiple)
        self._sources = {"image": source_name(source)}

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
    """

    SPEC = specs.MASKED_IM2IM
    ROLE = Role.INPAINT

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
        else:
            raise MissingImageError(f"{type(self).__name__} needs image_painted or mask to know what to redraw",
                                    "mask", "image_painted (the image with the mask painted) or mask")
        original = self._sized(original, merged, given, "image")
        size = original.size
        painted = painted.resize(size, Image.LANCZOS) if painted is not None and painted.size != size else painted
        if mask.size != size:
            mask = mask.resize(size, Image.BILINEAR)
        merged["width"], merged["height"] = size
        self._input_image = original
        self._mask = mask
        multiple = self.family.size_multiple
        self._denoise_mask = pad_image(blur_mask(mask, merged.get("blur", 0)), multiple)
        self._compose_mask = blur_mask(mask, merged.get("blur_compose", merged.get("blur", 0)))
        self._padded_input = pad_image(painted if painted is not None else original, multiple)
        self._sources = {"image": source_name(source), "image_painted": source_name(painted_src),
                         "mask": source_name(mask_src)}

    def _call_kwargs(self) -> dict[str, Any]:
        w, h = self._padded_input.size
        return {"image": self._padded_input, "mask_image": self._denoise_mask, "strength": self.params["strength"],
                "width": w, "height": h}

    def _postprocess(self, images: list[Image.Image]) -> list[Image.Image]:
        size = self.output_size()
        return [composite(crop(im, size), self._input_image, self._compose_mask) for im in images]

    @property
    def mask(self) -> Image.Image:
        """The mask (mode L, 255 = redraw) before blurring."""
        return self._mask

    @property
    def denoise_mask(self) -> Image.Image:
        """The mask the diffusers pipeline denoises with: blurred by ``blur``, padded to the size multiple."""
        return self._denoise_mask


class InpaintingPipe(MaskedIm2ImPipe):
    """Inpaint the masked part of ``image`` (white in ``mask`` = redraw).

    Works with inpainting checkpoints and with ordinary ones (4-channel UNet: the unmasked
    latents are re-noised from the original every step). ``strength`` defaults to 1 (the
    masked part is drawn from noise); ``blur`` softens the mask edge; the result is
    composited onto the original, so unmasked pixels are unchanged.
    """

    SPEC = specs.INPAINTING

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        if given.get("mask") is None:
            raise MissingImageError("InpaintingPipe needs mask (white = redraw), the size of image", "mask",
                                    "a PIL image, array or path the size of image")
        super()._setup_inputs(merged, given)
