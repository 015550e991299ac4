"""multigen.pipes: diffusers-backed generation (SD 1.x and SDXL); knows nothing of multigen.service."""
from __future__ import annotations

from .cfgen import Cfgen
from .controlnet import CIm2ImPipe, Cond2ImPipe
from .errors import (Cancelled, InvalidValueError, MaskSizeError, MissingConditionModelError, MissingImageError,
                     ModelTypeMismatchError, PipeError, SizeError, UnknownParameterError, UnknownSchedulerError)
from .gensession import GenSession
from .im2im import Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe
from .loading import ModelType, default_dtype, load_base
from .preview import latents_to_rgb
from .prompt2im import Prompt2ImPipe
from .schedulers import list_schedulers

__all__ = [
    "ModelType", "Prompt2ImPipe", "Im2ImPipe", "MaskedIm2ImPipe", "InpaintingPipe", "Cond2ImPipe", "CIm2ImPipe",
    "Cfgen", "GenSession", "PipeError", "Cancelled", "list_schedulers", "latents_to_rgb", "load_base",
    "default_dtype", "UnknownSchedulerError", "SizeError", "MissingImageError", "MaskSizeError",
    "ModelTypeMismatchError", "MissingConditionModelError", "UnknownParameterError", "InvalidValueError",
]
