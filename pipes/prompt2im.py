"""``Prompt2ImPipe``: text to image."""
from __future__ import annotations

import logging

from . import spec as specs
from .base import BasePipe
from .families import Role

logger = logging.getLogger(__name__)


class Prompt2ImPipe(BasePipe):
    """Generate images from a prompt (``StableDiffusion(XL)Pipeline``, ``FluxPipeline``).

    Setup parameters: ``width``, ``height`` (sizes that are not multiples of the family's
    ``size_multiple``, 8, or 16 for Flux, are generated padded and cropped back), ``steps``,
    ``guidance_scale`` (Flux: its distilled guidance, default 3.5), ``clip_skip``, ``scheduler``,
    ``timestep_spacing``, ``lpw``, ``vae_tiling``. Flux models take no ``clip_skip``,
    ``scheduler`` or ``timestep_spacing`` and no LoRAs yet; their prompts go to diffusers as
    plain text (weighting syntax stripped while ``lpw`` is on) and the negative prompt is unused.

    Example::

        pipe = Prompt2ImPipe("models/tiny-sd")
        pipe.setup(width=512, height=512, steps=20)
        images = pipe.gen({"prompt": "a lab with exotic flowers", "seed": 42})
    """

    SPEC = specs.PROMPT2IM
    ROLE = Role.TEXT2IMAGE
