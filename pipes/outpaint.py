"""Outpaint and the inpaint prompt of the inpaint pipes (``InpaintingPipe``, ``MaskedIm2ImPipe``).

**Outpaint** extends the (sized) input image by ``outpaint_left/right/top/bottom`` pixels, or by Fooocus'
default distance for the sides listed in ``outpaint`` (:data:`~.spec.OUTPAINT_RATIO` of the input's width for
left and right, of its height for top and bottom, rounded down, as Fooocus' ``int(W * 0.3)``), and inpaints the
new area. :class:`Outpaint` does the image work the pipes hook in:

- the new area starts as the input's edge pixels repeated outwards, then smoothed by blurs of halving radii with
  the input's own pixels held (Fooocus' ``fooocus_fill`` works alike): a smooth continuation of the edge
  colours, not streaks. Strength-1 inpainting (InpaintingPipe's default) draws the area from noise anyway; at a
  lower strength (MaskedIm2ImPipe's 0.75) this fill is what the model starts from, so it should look like a
  plausible out-of-focus continuation rather than noise (noise would survive a partial denoise as noise);
- the mask: the new area (255) plus a band of ``outpaint_seam`` pixels of the input along it that ramps from
  255 down to 0 (linear). The pipe denoises with it (the model redraws the band's outer part, so it draws
  across the seam rather than up to a hard edge) and composites through it: the generated pixels fade into the
  input's over the band, and every input pixel farther than ``outpaint_seam`` from the new area is kept exactly,
  at its offset (left, top) in the output. A ``mask`` (or ``image_painted``) given as well is placed on the
  extended canvas and joins it, with its own ``blur``/``blur_compose`` as before;
- the output is the extended size: input (after ``scale``/``width``/``height``) plus the distances, each side at
  most the spec's width/height maximum. It is not rounded: the pipes generate padded to the family's multiple
  and crop back, as for any size. The whole extended image is generated at that size, unless ``full_res`` is on:
  then only the box around the new area (and any mask), grown by ``full_res_padding``, is generated at
  ``width`` x ``height`` (default: the model's native area) and pasted back.

**The inpaint prompt** (``inpaint_prompt``, Fooocus' "inpaint additional prompt"): the pipe puts it before the
prompt it is given at ``gen`` (so after the job's styles were applied) as ``"<inpaint_prompt>, <prompt>"``, and
that one text is encoded: prompt weighting, long prompts and the family's own encoder treat it as any prompt.
Fooocus puts it before the prompt too (on its own line). The images' recorded prompt stays the job's own.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from . import spec as specs
from .errors import InvalidValueError, SizeError

#: the distances of one outpaint: left, top, right, bottom (PIL's box order)
Sides = tuple[int, int, int, int]
_BOX_ORDER = ("left", "top", "right", "bottom")


def inpaint_prompted(prompt: str, inpaint_prompt: str | None) -> str:
    """The text the inpaint pipes encode: ``inpaint_prompt`` put before ``prompt``, joined by ``", "``.

    An empty or missing part is left out (no stray comma).

    Raises:
        InvalidValueError: an inpaint prompt longer than the spec's most prompt characters.
    """
    extra = (inpaint_prompt or "").strip()
    if len(extra) > specs.MAX_PROMPT_CHARS:
        raise InvalidValueError(f"inpaint_prompt has {len(extra)} characters; allowed: at most "
                                f"{specs.MAX_PROMPT_CHARS}", "inpaint_prompt",
                                f"at most {specs.MAX_PROMPT_CHARS} characters")
    if not extra:
        return prompt
    return f"{extra}, {prompt}" if prompt and prompt.strip() else extra


def distances(params: Mapping[str, Any], size: tuple[int, int]) -> Sides:
    """How far each side of an input of ``size`` is extended: ``outpaint_<side>`` where above 0, else Fooocus'
    default distance for a side listed in ``outpaint``, else 0. Values must have passed the spec's checks."""
    listed = set(params.get("outpaint") or ())
    width, height = size
    out = []
    for side in _BOX_ORDER:
        given = params.get(f"outpaint_{side}") or 0
        if not given and side in listed:
            given = int((width if side in ("left", "right") else height) * specs.OUTPAINT_RATIO)
        out.append(int(given))
    return out[0], out[1], out[2], out[3]


@dataclass(frozen=True)
class Outpaint:
    """One outpaint of an input of ``size``: the distances of each side and the seam band's width."""

    size: tuple[int, int]
    sides: Sides
    seam: int

    @classmethod
    def from_params(cls, params: Mapping[str, Any], size: tuple[int, int]) -> Outpaint | None:
        """The outpaint ``params`` ask for (None: none), for an input of ``size``.

        Raises:
            SizeError: the extended image would be wider or taller than the spec allows (naming a side's
                parameter).
        """
        sides = distances(params, size)
        if not any(sides):
            return None
        seam = params.get("outpaint_seam")
        out = cls(size, sides, specs.OUTPAINT_SEAM.default if seam is None else int(seam))
        out._check_size()
        return out

    def _check_size(self) -> None:
        by_side = dict(zip(_BOX_ORDER, self.sides))
        highest = specs.WIDTH.maximum, specs.HEIGHT.maximum
        for axis, (first, second), name in ((0, ("left", "right"), "wide"), (1, ("top", "bottom"), "tall")):
            extended = self.output_size[axis]
            if extended > highest[axis]:
                param = f"outpaint_{first if by_side[first] else second}"
                raise SizeError(f"outpaint makes the image {extended} px {name} (input {self.size[axis]} + {first} "
                                f"{by_side[first]} + {second} {by_side[second]}); allowed: at most {highest[axis]} "
                                "px: outpaint less or scale the input down", param,
                                f"at most {highest[axis]} px in all")

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the extended image."""
        left, top, right, bottom = self.sides
        return self.size[0] + left + right, self.size[1] + top + bottom

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Where the input lies in the extended image: (left, top, right, bottom), right and bottom excluded."""
        left, top = self.sides[0], self.sides[1]
        return left, top, left + self.size[0], top + self.size[1]

    def extend(self, image: Image.Image) -> Image.Image:
        """``image`` (the input's size) on the extended canvas, the new area filled from its edges (see module)."""
        left, top, right, bottom = self.sides
        arr = np.asarray(image)
        pad = ((top, bottom), (left, right)) + ((0, 0),) * (arr.ndim - 2)
        canvas = Image.fromarray(np.pad(arr, pad, mode="edge"))
        radius = max(self.sides)
        while radius >= 2:
            radius //= 2
            canvas = canvas.filter(ImageFilter.GaussianBlur(radius))
            canvas.paste(image, self.box[:2])  # the input's pixels stay; the blur spreads them outwards
        return canvas

    def place(self, mask: Image.Image | None) -> Image.Image:
        """A mask of the input's size (None: an empty one) on the extended canvas; black in the new area."""
        out = Image.new("L", self.output_size, 0)
        if mask is not None:
            out.paste(mask.convert("L"), self.box[:2])
        return out

    @cached_property
    def area_mask(self) -> Image.Image:
        """The new area (255) and the seam band (computed once): inside the input, ``255 * (seam - d) / (seam + 1)``
        at a distance ``d`` (0 at the edge) from the nearest extended side, 0 from ``seam`` on (those pixels stay
        exact)."""
        width, height = self.output_size
        left, top, right, bottom = self.box
        xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
        # distance inside the input from the nearest extended side of each axis (inf: neither is extended)
        dx, dy = np.full(width, np.inf, np.float32), np.full(height, np.inf, np.float32)
        for dist_axis, coords, first, last in ((dx, xs, 0, 2), (dy, ys, 1, 3)):
            if self.sides[first]:
                np.minimum(dist_axis, coords - self.box[first], out=dist_axis)
            if self.sides[last]:
                np.minimum(dist_axis, (self.box[last] - 1) - coords, out=dist_axis)
        dist = np.minimum(dx[None, :], dy[:, None])
        ramp = np.clip((self.seam - dist) / (self.seam + 1), 0.0, 1.0)
        inside = np.zeros((height, width), dtype=bool)
        inside[top:bottom, left:right] = True
        values = np.where(inside, ramp, 1.0)
        return Image.fromarray(np.rint(values * 255).astype(np.uint8))  # 2-D uint8: mode L

    def join(self, blurred: Image.Image) -> Image.Image:
        """A (blurred) mask on the extended canvas joined with the outpaint's own: the lighter of the two."""
        return ImageChops.lighter(blurred, self.area_mask)

    def describe(self) -> dict[str, Any]:
        """What ``get_config`` records: the distances and where the input lies in the output."""
        return {"outpaint_sides": dict(zip(_BOX_ORDER, self.sides)), "outpaint_box": list(self.box)}
