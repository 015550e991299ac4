"""The tiny models of the newer families, one module each, built by ``multigen models init``.

Each module declares ``MODEL``, a :class:`~.common.TinyModel`: its folder and the function that
writes it (with its ControlNet and LoRA beside it). ``build_default_models`` builds them all;
``build_missing_models`` builds those a models folder does not hold yet.
"""
from __future__ import annotations

import importlib

from .common import TinyModel

#: the tiny model modules, in build order
_MODULES = ("flux", "flux_single", "z_image", "qwen_image")
TINY_MODELS: tuple[TinyModel, ...] = tuple(importlib.import_module(f".{m}", __name__).MODEL for m in _MODULES)
