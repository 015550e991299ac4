"""Cheap previews: latents to an RGB image by a per-family linear projection, no VAE.

The coefficients are each family's ``latent_rgb_factors``/``latent_rgb_bias`` (see
``families``; the published factors of ComfyUI ``comfy/latent_formats.py``: SD 1.5, SDXL,
Flux). They apply to the scaled latents the diffusers pipelines denoise (the pipes' step hook
unpacks Flux's 2x2-packed latents to ``[b, 16, h, w]`` first). The result has the latent's
resolution (1/8 of the image per side).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .errors import InvalidValueError
from .families import FAMILIES, SD, SDXL, ModelType, family

logger = logging.getLogger(__name__)

#: the families' factors under their former names (tests and scripts read them)
SD_FACTORS = SD.latent_rgb_factors
SDXL_FACTORS = SDXL.latent_rgb_factors
SDXL_BIAS = SDXL.latent_rgb_bias

#: per type: (channels x 3 factors scaled to 0..255, 3 offsets), precomputed so a preview is one matmul
_COEFFS: dict[ModelType, tuple[np.ndarray, np.ndarray]] = {
    f.model_type: (np.asarray(f.latent_rgb_factors, np.float32) * 127.5,
                   (np.asarray(f.latent_rgb_bias, np.float32) + 1.0) * 127.5)
    for f in FAMILIES
}


def latents_to_rgb(latents: torch.Tensor, model_type: "ModelType | str") -> Image.Image:
    """An RGB preview of the first latent of a batch.

    Args:
        latents: ``[batch, c, h, w]`` or ``[c, h, w]`` scaled latents (any dtype and device; ``c`` is
            the family's latent channel count, 4 for SD and SDXL, 16 for Flux).
        model_type: a ``ModelType`` (or its name).

    Returns:
        A ``w x h`` RGB PIL image.

    Raises:
        InvalidValueError: an unknown model type or a latent with another channel count.
    """
    fam = family(model_type)
    x = latents[0] if latents.dim() == 4 else latents
    if x.shape[0] != fam.latent_channels:
        raise InvalidValueError(f"latents have {x.shape[0]} channels; allowed: {fam.latent_channels} "
                                f"({fam.name})", "latents", str(fam.latent_channels))
    factors, offset = _COEFFS[fam.model_type]
    arr = x.detach().to("cpu", torch.float32).numpy()
    c, h, w = arr.shape
    rgb = arr.reshape(c, -1).T @ factors + offset  # (value + bias + 1) * 127.5
    np.clip(rgb, 0, 255, out=rgb)
    return Image.fromarray(rgb.astype(np.uint8).reshape(h, w, 3), mode="RGB")
