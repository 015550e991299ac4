"""The tiny models of the newer families, one module each, built by ``multigen models init``.

Each module declares ``MODEL``, a :class:`~.common.TinyModel` (or ``MODELS``, several): its folder and
the function that writes it (with its ControlNet and LoRA beside it). ``build_default_models`` builds
them all; ``build_missing_models`` builds those a models folder does not hold yet.
"""
from __future__ import annotations

import importlib

from .common import TinyModel

#: the tiny model modules, in build order
_MODULES = ("flux", "flux_single", "flux_variants", "z_image", "qwen_image", "ip_adapter", "sdxl_refiner",
            "upscaler")


def _declared(name: str) -> tuple[TinyModel, ...]:
    """The models module ``name`` declares: its ``MODELS``, else its one ``MODEL``."""
    module = importlib.import_module(f".{name}", __name__)
    return tuple(getattr(module, "MODELS", None) or (module.MODEL,))


TINY_MODELS: tuple[TinyModel, ...] = tuple(model for name in _MODULES for model in _declared(name))
