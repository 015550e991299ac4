"""``Prompt2ImPipe``: text to image."""
from __future__ import annotations

import logging

from . import spec as specs
from .base import BasePipe
from .families import Role

logger = logging.getLogger(__name__)


class Prompt2ImPipe(BasePipe):
    """Generate images from a prompt (``StableDiffusion(XL)Pipeline``).

    Setup parameters: ``width``, ``height`` (sizes that are not multiples of 8 are generated
    padded and cropped back), ``steps``, ``guidance_scale``, ``clip_skip``, ``scheduler``,
    ``timestep_spacing``, ``lpw``, ``vae_tiling``.

    Example::

        pipe = Prompt2ImPipe("models/tiny-sd")
        pipe.setup(width=512, height=512, steps=20)
        images = pipe.gen({"prompt": "a lab with exotic flowers", "seed": 42})
    """

    SPEC = specs.PROMPT2IM
    ROLE = Role.TEXT2IMAGE
