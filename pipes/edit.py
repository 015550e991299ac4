"""``Edit2ImPipe``: instruction editing ("make the sky red") with a model made for it.

The prompt is the instruction; the input image is what the model edits (it sees the whole image,
no mask, no strength). The model's family names the diffusers class (Qwen-Image-Edit's
``QwenImageEditPipeline``) and supplies whatever that class needs beyond the shared base pipeline
(``Family.role_components``); nothing here is specific to one family. Families without an edit
model refuse the pipe (``Family.check_role``).

Sizes work as in ``Im2ImPipe``: the output has the (scaled) input's size unless ``width``/``height``
are given (then the input is resized to them); the input is padded to the family's size multiple by
repeating edge pixels, generated at the padded size and cropped back.
"""
from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from . import spec as specs
from .base import BasePipe
from .families import Role
from .im2im import source_name
from .images import check_image_size, crop, load_image, pad_image, scale_image

logger = logging.getLogger(__name__)


class Edit2ImPipe(BasePipe):
    """Edit an image as an instruction says (``QwenImageEditPipeline``).

    Setup parameters (besides the common ones): ``image`` (the image to edit, a PIL image or a path;
    ``fimage`` is metafusion's alias), ``scale`` (factor or ``[width, height]``). ``width``/``height``,
    when given, resize the input; otherwise the output has the (scaled) input's size.

    Example::

        pipe = Edit2ImPipe("models/tiny-qwen-image-edit")
        pipe.setup(image="photo.png", steps=30)
        edited = pipe.gen({"prompt": "make the sky red", "seed": 42})
    """

    SPEC = specs.EDIT2IM
    ROLE = Role.EDIT

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        source = given.get("image")
        image = scale_image(load_image(source, "image"), merged.get("scale"))
        if given.get("width") is not None or given.get("height") is not None:
            size = (merged["width"] if given.get("width") is not None else image.size[0],
                    merged["height"] if given.get("height") is not None else image.size[1])
            if size != image.size:
                image = image.resize(size, Image.LANCZOS)
        check_image_size(image, "image")
        merged["width"], merged["height"] = image.size
        self._input_image = image
        self._padded_input = pad_image(image, self.family.size_multiple)
        self._source = source_name(source)

    def _call_kwargs(self) -> dict[str, Any]:
        w, h = self._padded_input.size
        return {"image": self._padded_input, "width": w, "height": h}

    def _postprocess(self, images: list[Image.Image]) -> list[Image.Image]:
        return [crop(im, self.output_size()) for im in images]

    @property
    def input_image(self) -> Image.Image:
        """The image being edited, at the output size (before padding)."""
        return self._input_image

    def _extra_config(self) -> dict[str, Any]:
        if not self._is_setup:
            return {}
        return {"image": self._source, "source_image": self._source}
