"""Model families: the registry, :class:`ModelType`, and telling a model's family from its files.

Each family is one module of this package declaring one :class:`~.base.Family`: how a
diffusers folder, a single-file checkpoint, a loaded pipeline or a ControlNet is recognised as
its own; the diffusers class of each pipe role; its denoiser, native and trained sizes, size
multiple; its own parameters, schedulers and prompt encoding; LoRA support; the latent-to-RGB
preview factors; metafusion's default ControlNet folders and scales. The rest of the pipes ask
``family(model_type)`` instead of comparing model types, so a new family is one more module
and one more name in ``_MODULES``.

``ModelType`` is the user-facing name of a family (``"SD"``, ``"SDXL"``, ``"FLUX"``), derived
from the modules; ``ModelType.parse`` also takes ``"sdxl"`` or ``"qwen-image"``.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import InvalidValueError, PipeError
from .base import Family, Role, read_json

logger = logging.getLogger(__name__)

__all__ = ["Family", "Role", "ModelType", "FAMILIES", "family", "family_of_folder", "family_of_checkpoint",
           "family_of_pipeline", "family_of_controlnet", "native_size_of_folder", "tensor_names", "SD", "SDXL",
           "FLUX"]

#: the family modules, most specific first: detection takes the first that recognises a model (an
#: SDXL checkpoint also holds SD's tensor names, so SDXL is asked before SD; a Flux folder has a
#: text_encoder_2 as SDXL does, so Flux is asked before SDXL)
_MODULES = ("z_image", "qwen_image", "flux", "sdxl", "sd")
#: every supported family, in detection order
FAMILIES: tuple[Family, ...] = tuple(importlib.import_module(f".{m}", __name__).FAMILY for m in _MODULES)


class _ModelTypeBase(str, Enum):
    @classmethod
    def parse(cls, value: Any) -> Any:
        """Turn ``"SD"``/``"sdxl"``/``"qwen-image"``/a ``ModelType``/None into a ``ModelType`` or None.

        Raises:
            InvalidValueError: the name is not a known model type.
        """
        if value is None or isinstance(value, cls):
            return value
        name = str(value).upper().replace("MODELTYPE.", "").replace("-", "_")
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise InvalidValueError(f"model_type {value!r} is not known; allowed: {allowed}", "model_type",
                                    allowed) from None

    def __str__(self) -> str:
        return str(self.value)


#: the model family of a base checkpoint, one member per family (its ``name``)
ModelType = _ModelTypeBase("ModelType", [(f.name, f.name) for f in FAMILIES[::-1]], module=__name__)
_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
SD, SDXL, FLUX = _BY_NAME["SD"], _BY_NAME["SDXL"], _BY_NAME["FLUX"]
_SUPPORTED = ", ".join(f.name for f in FAMILIES[::-1])
#: what transformer-based models look like, to say "not a supported family" clearly
_TRANSFORMER_FOLDER = "transformer"
_TRANSFORMER_TENSORS = ("double_blocks.", "transformer_blocks.", "layers.", "single_blocks.")


def family(model_type: Any) -> Family:
    """The family of a model type (a ``ModelType`` or its name).

    Raises:
        InvalidValueError: an unknown model type.
    """
    if isinstance(model_type, Family):
        return model_type
    mt = ModelType.parse(model_type)
    if mt is None or mt.value not in _BY_NAME:
        raise InvalidValueError(f"model_type {model_type!r} is not supported; allowed: {_SUPPORTED}", "model_type",
                                _SUPPORTED)
    return _BY_NAME[mt.value]


def family_of_folder(folder: Path) -> Family:
    """The family of a diffusers folder, from its model_index.json, UNet or transformer config.

    Raises:
        InvalidValueError: a transformer model of no supported family.
        PipeError: not a diffusers folder with a UNet or a transformer.
    """
    unet = read_json(folder / "unet" / "config.json")
    for fam in FAMILIES:
        if fam.recognises_folder(folder, unet):
            return fam
    if (folder / _TRANSFORMER_FOLDER).is_dir():
        found = read_json(folder / _TRANSFORMER_FOLDER / "config.json").get("_class_name", "no config.json")
        raise InvalidValueError(f"{folder} holds a transformer model ({found}) of no supported family; "
                                f"allowed: {_SUPPORTED}", "model_type", _SUPPORTED)
    raise PipeError(f"model {folder} is not a diffusers folder with a unet/config.json or a transformer of a "
                    f"supported family ({_SUPPORTED})", "model_id")


def native_size_of_folder(folder: Path) -> int | None:
    """The native side in pixels of a diffusers folder's model, asked of its family, from its
    configs only (torch-free: the service's model list uses it); None when the folder is not one
    of a supported family or its configs are incomplete."""
    try:
        return int(family_of_folder(Path(folder)).folder_native_size(Path(folder)))
    except (PipeError, KeyError, TypeError, ValueError):
        return None


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint (``.safetensors`` without loading tensors).

    Raises:
        PipeError: the file cannot be read (truncated or corrupt).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        import torch

        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        return [str(k) for k in sd.keys()]
    except Exception as exc:  # a truncated or corrupt file: SafetensorError, UnpicklingError, EOFError, ...
        raise PipeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); allowed: an intact "
                        ".safetensors or .ckpt file", "model_id") from exc


def family_of_checkpoint(path: Path) -> Family:
    """The family of a single-file checkpoint, from its tensor names.

    Raises:
        InvalidValueError: a transformer checkpoint of a family that takes no single files.
        PipeError: unreadable, or no known tensor names.
    """
    names = tensor_names(path)
    for fam in FAMILIES:
        if fam.checkpoint_prefixes and any(k.startswith(fam.checkpoint_prefixes) for k in names):
            return fam
    singles = ", ".join(f.name for f in FAMILIES[::-1] if f.checkpoint_prefixes)
    if any(k.startswith(_TRANSFORMER_TENSORS) for k in names):
        raise InvalidValueError(f"{path} looks like a transformer checkpoint of a family that takes no single-file "
                                f"checkpoints (use a diffusers folder); allowed: {singles}", "model_type", singles)
    raise PipeError(f"cannot tell the model type of {path}: no {' or '.join(f.name for f in FAMILIES[::-1])} "
                    "tensor names found", "model_id")


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline (from its components, not its class name).

    Raises:
        InvalidValueError: a pipeline of no supported family.
    """
    for fam in FAMILIES:
        if fam.recognises_pipeline(pipe):
            return fam
    raise InvalidValueError(f"pipeline {type(pipe).__name__} is of no supported family; allowed: "
                            f"{_SUPPORTED} pipelines", "pipe", _SUPPORTED)


def family_of_controlnet(config: Mapping[str, Any]) -> Family | None:
    """The family a ControlNet (by its config) belongs to, or None."""
    return next((fam for fam in FAMILIES if fam.recognises_controlnet(config)), None)
