"""Cheap previews: latents to an RGB image by a per-family linear projection, no VAE.

Coefficients are the published latent-to-RGB factors (ComfyUI ``comfy/latent_formats.py``;
SD 1.x has no bias, SDXL has one). They apply to the scaled latents the diffusers
pipelines denoise. The result has the latent's resolution (1/8 of the image per side).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .errors import InvalidValueError
from .loading import ModelType

logger = logging.getLogger(__name__)

SD_FACTORS = ((0.3512, 0.2297, 0.3227),
              (0.3250, 0.4974, 0.2350),
              (-0.2829, 0.1762, 0.2721),
              (-0.2120, -0.2616, -0.7177))
SDXL_FACTORS = ((0.3651, 0.4232, 0.4341),
                (-0.2533, -0.0042, 0.1068),
                (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188))
SDXL_BIAS = (0.1084, -0.0175, -0.0011)

#: per type: (4x3 factors scaled to 0..255, 3 offsets), precomputed so a preview is one matmul
_COEFFS: dict[ModelType, tuple[np.ndarray, np.ndarray]] = {
    mt: (np.asarray(f, np.float32) * 127.5, (np.asarray(b, np.float32) + 1.0) * 127.5)
    for mt, f, b in ((ModelType.SD, SD_FACTORS, (0.0, 0.0, 0.0)), (ModelType.SDXL, SDXL_FACTORS, SDXL_BIAS))
}


def latents_to_rgb(latents: torch.Tensor, model_type: "ModelType | str") -> Image.Image:
    """An RGB preview of the first latent of a batch.

    Args:
        latents: ``[batch, 4, h, w]`` or ``[4, h, w]`` scaled latents (any dtype and device).
        model_type: ``ModelType.SD`` or ``ModelType.SDXL`` (or their names).

    Returns:
        A ``w x h`` RGB PIL image.

    Raises:
        InvalidValueError: an unknown model type or a latent without 4 channels.
    """
    mt = ModelType.parse(model_type)
    if mt not in _COEFFS:
        raise InvalidValueError(f"model_type {model_type!r} has no preview coefficients; allowed: SD, SDXL",
                                "model_type", "SD, SDXL")
    x = latents[0] if latents.dim() == 4 else latents
    if x.shape[0] != 4:
        raise InvalidValueError(f"latents have {x.shape[0]} channels; allowed: 4 (SD, SDXL)", "latents", "4")
    factors, offset = _COEFFS[mt]
    arr = x.detach().to("cpu", torch.float32).numpy()
    c, h, w = arr.shape
    rgb = arr.reshape(c, -1).T @ factors + offset  # (value + bias + 1) * 127.5
    np.clip(rgb, 0, 255, out=rgb)
    return Image.fromarray(rgb.astype(np.uint8).reshape(h, w, 3), mode="RGB")
