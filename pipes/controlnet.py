"""ControlNet pipes: ``Cond2ImPipe`` (given condition images) and ``CIm2ImPipe`` (conditions
computed from an input image).

ControlNets are given to the constructor as paths or loaded ``ControlNetModel`` objects; the
base weights stay shared (``from_pipe``). Several ControlNets run at once
(``MultiControlNetModel``), each with its own condition image and scale. Given none, a pipe
takes the ControlNet of each condition type from metafusion's default folders
(``./models-cn/<name>`` for SD, ``./models-cn-xl/<name>`` for SDXL; see ``controlnet_folders``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from . import spec as specs
from .base import BasePipe, quiet_diffusers
from .controlnet_folders import default_controlnet_path
from .errors import InvalidValueError, MissingImageError, ModelTypeMismatchError, PipeError
from .families import Family, Role, family_of_controlnet
from .images import check_image_size, check_same_size, load_image, load_mask, pad_image
from .im2im import Im2ImPipe, source_name
from .loading import ModelType

logger = logging.getLogger(__name__)

#: the ControlNet parameters both pipes take (declared in spec.py)
CONTROL_PARAMS: tuple[str, ...] = tuple(p.name for p in specs.CONTROL)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _ControlMixin:
    """ControlNet loading and the control parameters shared by both ControlNet pipes."""

    model_type: ModelType
    family: Family
    base: Any
    #: ControlNets loaded from metafusion's default folders, by folder (soft and soft-sobel share one)
    _default_nets: dict[str, Any]

    def _default_controlnet(self, ctype: str) -> Any:
        """The ControlNet of ``ctype`` from metafusion's ``./models-cn/`` (SD) or ``./models-cn-xl/`` (SDXL).

        Raises:
            MissingConditionModelError: no such folder; the message names it and how to configure one.
        """
        path = default_controlnet_path(self.family, ctype, type(self).__name__)
        key = str(path.absolute())
        if key not in self._default_nets:
            self._default_nets[key] = self._load_controlnet(path)
        return self._default_nets[key]

    def _load_controlnet(self, spec: Any, param: str = "controlnets") -> Any:
        from diffusers import ControlNetModel

        if isinstance(spec, (str, os.PathLike)):
            path = Path(spec).expanduser()
            if not (path / "config.json").is_file():
                raise PipeError(f"{param} entry {str(path)!r} is not a ControlNet folder (no config.json)", param,
                                "paths of diffusers ControlNet folders")
            net = ControlNetModel.from_pretrained(str(path), dtype=self.dtype, local_files_only=True)
            net._multigen_path = str(path)
        else:
            net = spec
        if not hasattr(net, "config") or "conditioning_embedding_out_channels" not in net.config:
            raise InvalidValueError(f"{param} entry {spec!r} is not a ControlNet", param,
                                    "ControlNet folder paths or ControlNetModel objects")
        net_family = family_of_controlnet(net.config)
        if net_family is not self.family or \
                net.config.get("cross_attention_dim") != self.base.unet.config.cross_attention_dim:
            found = net_family.name if net_family is not None else "unknown"
            raise ModelTypeMismatchError(f"{param} entry {getattr(net, '_multigen_path', spec)} is a {found} "
                                         f"ControlNet of another shape than the {self.model_type.value} base "
                                         f"model; allowed: {self.model_type.value} ControlNets of this model",
                                         param, self.model_type.value)
        if net.device != self.device or net.dtype != self.dtype:
            with quiet_diffusers():
                net = net.to(self.device, self.dtype)
        return net

    def _controlnet_kwargs(self, merged: dict[str, Any], count: int, defaults: list[float]) -> None:
        scales = merged.get("cscales")
        scales = defaults if scales is None else _as_list(scales)
        if len(scales) != count:
            raise InvalidValueError(f"cscales has {len(scales)} values for {count} ControlNets; allowed: one "
                                    f"number per ControlNet", "cscales", f"{count} numbers")
        # given scales were checked with the other parameters (_validate_common); defaults are checked here
        merged["cscales"] = specs.CSCALES.check(list(scales))
        merged["guess_mode"] = bool(merged.get("guess_mode", False))
        for name, default in (("control_guidance_start", 0.0), ("control_guidance_end", 1.0)):
            values = _as_list(merged.get(name, default))
            if len(values) == 1:
                values = values * count
            if len(values) != count:
                raise InvalidValueError(f"{name} has {len(values)} values for {count} ControlNets; allowed: one "
                                        f"number, or one per ControlNet", name, f"1 or {count} numbers")
            merged[name] = [float(v) for v in values]  # checked with the other parameters
        for start, end in zip(merged["control_guidance_start"], merged["control_guidance_end"]):
            if start >= end:
                raise InvalidValueError(f"control_guidance_start {start} must be below control_guidance_end {end}",
                                        "control_guidance_start", "0 <= start < end <= 1")

    #: the diffusers argument that takes the condition images ("control_image" when "image" is the input)
    _condition_arg = "image"

    def _call_kwargs(self) -> dict[str, Any]:
        kwargs = super()._call_kwargs()  # type: ignore[misc]
        conds = self._padded_conditions
        kwargs[self._condition_arg] = conds[0] if len(conds) == 1 else conds
        kwargs.update(self._control_call(len(conds)))
        return kwargs

    @property
    def condition_images(self) -> list[Image.Image]:
        """The condition images as they go to the ControlNets (before padding)."""
        return list(self._conditions)

    def _controlnet_names(self) -> list[str]:
        return [getattr(c, "_multigen_path", None) or str(c.config.get("_name_or_path", "")) for c in self.controlnets]

    def _control_call(self, count: int) -> dict[str, Any]:
        p = self.params
        one = count == 1
        return {"controlnet_conditioning_scale": p["cscales"][0] if one else p["cscales"],
                "guess_mode": p["guess_mode"],
                "control_guidance_start": p["control_guidance_start"][0] if one else p["control_guidance_start"],
                "control_guidance_end": p["control_guidance_end"][0] if one else p["control_guidance_end"]}


class Cond2ImPipe(_ControlMixin, BasePipe):
    """Generate from condition images through one or more ControlNets.

    Args (constructor, besides ``BasePipe``'s): ``controlnets``: a path or ``ControlNetModel``,
    a list of them, or a dict ``{ctype: path}`` chosen from by ``ctypes``; ``ctypes``
    (optional): what each condition image is (sets the default ``cscales``, recorded in the
    config). With ``ctypes`` and no ``controlnets``, each type's ControlNet comes from
    metafusion's default folders (``./models-cn/``, ``./models-cn-xl/``).

    Setup parameters: ``image`` (the condition image, or a list, one per ControlNet), ``cscales``
    (conditioning scale, one per ControlNet, default 1), ``guess_mode``,
    ``control_guidance_start``/``control_guidance_end`` (fractions of the steps), and the
    common ones; ``width``/``height`` default to the first condition image's size.
    """

    SPEC = specs.COND2IM
    ROLE = Role.CONTROLNET

    def _init_extra(self, controlnets: Any = None, ctypes: Any = None, condition_models: Any = None) -> None:
        # condition_models is accepted for a uniform constructor and unused: the conditions are given
        self._default_nets = {}
        self.ctypes = CIm2ImPipe._check_ctypes(ctypes) if ctypes else None
        if not controlnets:
            if not self.ctypes:
                raise InvalidValueError(f"{type(self).__name__} needs controlnets (a ControlNet path, a list, or a "
                                        "dict {ctype: path}) or ctypes (to use metafusion's default folders "
                                        "./models-cn/, ./models-cn-xl/)", "controlnets",
                                        "ControlNet folder paths or ControlNetModel objects, or ctypes")
            self.controlnets = [self._default_controlnet(c) for c in self.ctypes]
            return
        if isinstance(controlnets, dict):
            if not self.ctypes:
                raise InvalidValueError("controlnets given as {ctype: path} need ctypes to choose from them",
                                        "ctypes", ", ".join(controlnets))
            missing = [c for c in self.ctypes if c not in controlnets]
            if missing:
                raise InvalidValueError(f"no ControlNet configured for ctypes {', '.join(missing)}; allowed: "
                                        f"{', '.join(controlnets)}", "ctypes", ", ".join(controlnets))
            controlnets = [controlnets[c] for c in self.ctypes]
        self.controlnets = [self._load_controlnet(c) for c in _as_list(controlnets)]
        if self.ctypes and len(self.ctypes) != len(self.controlnets):
            raise InvalidValueError(f"{len(self.ctypes)} ctypes for {len(self.controlnets)} ControlNets; allowed: "
                                    "one condition type per ControlNet", "ctypes", f"{len(self.controlnets)} types")

    def _net_arg(self) -> Any:
        return self.controlnets[0] if len(self.controlnets) == 1 else list(self.controlnets)

    def _build_pipeline(self, base: Any, scheduler: Any, **extra: Any) -> Any:
        return super()._build_pipeline(base, scheduler, controlnet=self._net_arg(), **extra)

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        n = len(self.controlnets)
        sources = _as_list(given.get("image")) if given.get("image") is not None else []
        if not sources:
            raise MissingImageError(f"image is required: {n} condition image(s), one per ControlNet", "image",
                                    f"{n} PIL images or paths")
        if len(sources) != n:
            raise InvalidValueError(f"image has {len(sources)} condition images for {n} ControlNets; allowed: "
                                    f"one per ControlNet", "image", f"{n} images")
        conds = [load_image(s, "image") for s in sources]
        w = merged["width"] if given.get("width") is not None else conds[0].size[0]
        h = merged["height"] if given.get("height") is not None else conds[0].size[1]
        merged["width"], merged["height"] = w, h
        resized = [c if c.size == (w, h) else c.resize((w, h), Image.LANCZOS) for c in conds]
        for c in resized:
            check_image_size(c, "image")
        self._conditions = resized
        self._padded_conditions = [pad_image(c) for c in resized]
        self._controlnet_kwargs(merged, n, [self.family.default_cscale(c) for c in self.ctypes] if self.ctypes
                                else [1.0] * n)
        self._sources = {"image": [source_name(s) for s in sources]}

    def _extra_config(self) -> dict[str, Any]:
        return {"controlnets": self._controlnet_names(),
                "control_type": list(self.ctypes) if self.ctypes else None,
                **(self._sources if self._is_setup else {})}


class CIm2ImPipe(_ControlMixin, Im2ImPipe):
    """Image to image through ControlNets whose condition images are computed from the input.

    Args (constructor, besides ``BasePipe``'s): ``ctypes``: condition types (canny,
    soft-sobel, soft, ip2p, inpaint, qr need no model; depth and pose need
    ``condition_models``); ``controlnets``: one ControlNet per condition type, as a list in
    the order of ``ctypes`` or a dict ``{ctype: path or model}``; without it, each type's
    ControlNet comes from metafusion's default folders (``./models-cn/<name>`` for SD,
    ``./models-cn-xl/<name>`` for SDXL), loaded when ``ctypes`` are known (the constructor's,
    else at ``setup``); ``condition_models``: ``{ctype: path}`` of the models of model-based
    conditions.

    Setup parameters: ``image`` (input), ``ctypes`` (overrides the constructor's), ``strength``,
    ``scale``, ``cscales`` (default per type), ``guess_mode``, ``control_guidance_start``/``end``
    and the common ones.
    """

    _condition_arg = "control_image"

    SPEC = specs.CIM2IM
    ROLE = Role.CONTROLNET_IMAGE2IMAGE

    def _init_extra(self, controlnets: Any = None, ctypes: Any = None, condition_models: Any = None) -> None:
        self.condition_models = dict(condition_models or {})
        self._default_nets = {}
        self._net_by_type: dict[str, Any] | None = None
        self._net_list: list[Any] | None = None
        if controlnets and isinstance(controlnets, dict):
            self._net_by_type = {k: self._load_controlnet(v) for k, v in controlnets.items()}
        elif controlnets:
            self._net_list = [self._load_controlnet(c) for c in _as_list(controlnets)]
        self.ctypes = self._check_ctypes(ctypes if ctypes is not None else self._default_ctypes())
        # no ctypes given and no ControlNet at hand for the default ones (metafusion's folders, or a dict
        # without them): setup's ctypes choose; until then the pipe holds the model's image-to-image pipeline
        deferred = ctypes is None and self._net_list is None and (
            self._net_by_type is None or any(c not in self._net_by_type for c in self.ctypes))
        self.controlnets = [] if deferred else self._nets_for(self.ctypes)

    def _default_ctypes(self) -> list[str]:
        """metafusion's default ``["soft"]``, or the only condition type of a one-entry ``{ctype: path}``."""
        if self._net_by_type is not None and len(self._net_by_type) == 1 and "soft" not in self._net_by_type:
            return list(self._net_by_type)
        return ["soft"]

    @staticmethod
    def _check_ctypes(ctypes: Any) -> list[str]:
        from .conditions import CONDITION_TYPES

        values = _as_list(ctypes)
        allowed = ", ".join(CONDITION_TYPES)
        if not values:
            raise InvalidValueError(f"ctypes is empty; allowed: a list of {allowed}", "ctypes", allowed)
        for c in values:
            if c not in CONDITION_TYPES:
                raise InvalidValueError(f"ctypes entry {c!r} is not known; allowed: {allowed}", "ctypes", allowed)
        return [str(c) for c in values]

    def _nets_for(self, ctypes: list[str]) -> list[Any]:
        if self._net_by_type is None and self._net_list is None:  # no controlnets given: metafusion's folders
            return [self._default_controlnet(c) for c in ctypes]
        if self._net_by_type is not None:
            missing = [c for c in ctypes if c not in self._net_by_type]
            if missing:
                raise InvalidValueError(f"no ControlNet configured for ctypes {', '.join(missing)}; allowed: "
                                        f"{', '.join(self._net_by_type)}", "ctypes", ", ".join(self._net_by_type))
            return [self._net_by_type[c] for c in ctypes]
        if len(self._net_list) != len(ctypes):
            raise InvalidValueError(f"{len(ctypes)} ctypes but {len(self._net_list)} ControlNets; give one "
                                    "ControlNet per condition type (or a {ctype: path} dict)", "ctypes",
                                    f"{len(self._net_list)} condition types")
        return list(self._net_list)

    def _build_pipeline(self, base: Any, scheduler: Any, **extra: Any) -> Any:
        nets = self.controlnets
        if not nets:  # ControlNets chosen by setup's ctypes: the same weights without one until then
            return BasePipe._build_pipeline(self, base, scheduler, role=Role.IMAGE2IMAGE, **extra)
        return BasePipe._build_pipeline(self, base, scheduler,
                                        controlnet=nets[0] if len(nets) == 1 else list(nets), **extra)

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        ctypes = self._check_ctypes(merged["ctypes"]) if merged.get("ctypes") is not None else list(self.ctypes)
        nets = self._nets_for(ctypes)
        if [id(n) for n in nets] != [id(n) for n in self.controlnets]:
            self.controlnets = nets
            scheduler = self.pipe.scheduler
            self.pipe = self._build_pipeline(self.base, scheduler)
            self.pipe.set_progress_bar_config(disable=True)
        self.ctypes = ctypes
        merged["ctypes"] = ctypes
        self._cond_mask = self._inpaint_mask(given, ctypes)
        super()._setup_inputs(merged, given)
        if self._cond_mask is not None and self._cond_mask.size != self._input_image.size:
            self._cond_mask = self._cond_mask.resize(self._input_image.size, Image.NEAREST)
        self._conditions = [self._condition(c, self._input_image) for c in ctypes]
        self._padded_conditions = [pad_image(c) for c in self._conditions]
        self._controlnet_kwargs(merged, len(ctypes), [self.family.default_cscale(c) for c in ctypes])

    @staticmethod
    def _inpaint_mask(given: dict[str, Any], ctypes: list[str]) -> Image.Image | None:
        """The mask of the inpaint condition: ``mask``, else the transparent pixels of an RGBA input."""
        from .conditions import reads_option

        if not any(reads_option(c, "mask") for c in ctypes):
            return None
        if given.get("mask") is not None:
            mask = load_mask(given["mask"], "mask")
            image = given.get("image")
            if isinstance(image, Image.Image) and image.size != mask.size:
                check_same_size(image, mask, "mask", "image")
            return mask
        image = given.get("image")
        if isinstance(image, Image.Image) and image.mode in ("RGBA", "LA"):
            return image.getchannel("A").point(lambda a: 255 if a < 128 else 0)
        raise MissingImageError("ctypes inpaint needs mask (white = repaint) or an RGBA image whose transparent "
                                "pixels are to be repainted", "mask", "a mask the size of image")

    def _condition(self, ctype: str, image: Image.Image) -> Image.Image:
        from .conditions import make_condition

        # each condition type reads its own options and ignores the others'
        cond = make_condition(ctype, image, models=self.condition_models, mask=self._cond_mask)
        cond = cond.convert("RGB") if cond.mode != "RGB" else cond
        return cond if cond.size == image.size else cond.resize(image.size, Image.LANCZOS)

    def _extra_config(self) -> dict[str, Any]:
        out = super()._extra_config()
        out["controlnets"] = self._controlnet_names()
        out["control_type"] = list(self.ctypes)
        return out
