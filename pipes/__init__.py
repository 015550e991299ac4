"""multigen.pipes: diffusers-backed generation (SD 1.x and SDXL); knows nothing of multigen.service.

The pipe classes and everything that needs torch are imported on first use (``from
multigen.pipes import Prompt2ImPipe`` works as before): importing the package, its errors, its
parameter spec (``multigen.pipes.spec``) or its class registry (``multigen.pipes.registry``)
does not load torch, so the service and the API read the spec without it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

# torchao (quantize: int8/fp8) warns on import, on every CPU-only machine, that its CUDA kernels do not load,
# diffusers then that "torchao Tensor objects" cannot be imported, and torch that torchao registers enums the
# old way: harmless, noise in every log
for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .errors import (Cancelled, InvalidValueError, MaskSizeError, MissingConditionModelError, MissingImageError,
                     ModelTypeMismatchError, PipeError, SizeError, UnknownParameterError, UnknownSchedulerError)
from .registry import UnknownPipeClassError, pipe_class, pipe_names, pipe_spec
from .spec import Param, ParamSet, ParamType, PipeSpec, apply_limits

#: names imported on first use, and their modules (these import torch or diffusers)
_LAZY = {
    "Cfgen": ".cfgen", "GenSession": ".gensession", "latents_to_rgb": ".preview", "list_schedulers": ".schedulers",
    "ModelType": ".loading", "default_dtype": ".loading", "load_base": ".loading",
    "Prompt2ImPipe": ".prompt2im", "Im2ImPipe": ".im2im", "MaskedIm2ImPipe": ".im2im", "InpaintingPipe": ".im2im",
    "Cond2ImPipe": ".controlnet", "CIm2ImPipe": ".controlnet", "Edit2ImPipe": ".edit",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ModelType", "Prompt2ImPipe", "Im2ImPipe", "MaskedIm2ImPipe", "InpaintingPipe", "Cond2ImPipe", "CIm2ImPipe",
    "Cfgen", "GenSession", "PipeError", "Cancelled", "list_schedulers", "latents_to_rgb", "load_base",
    "default_dtype", "UnknownSchedulerError", "SizeError", "MissingImageError", "MaskSizeError",
    "ModelTypeMismatchError", "MissingConditionModelError", "UnknownParameterError", "InvalidValueError",
    "Param", "ParamSet", "ParamType", "PipeSpec", "apply_limits", "pipe_class", "pipe_spec", "pipe_names",
    "UnknownPipeClassError", "Edit2ImPipe",
]
