"""ControlNet pipes: ``Cond2ImPipe`` (given condition images) and ``CIm2ImPipe`` (conditions
computed from an input image), for every family that runs the ControlNet roles.

ControlNets are given to the constructor as paths or loaded ControlNet models; the base weights
stay shared (``from_pipe``). The model family says which diffusers class loads its ControlNets
(``controlnet_class``: ``ControlNetModel`` for SD/SDXL, ``FluxControlNetModel`` for Flux.1) and
which runs several at once (``multi_controlnet_class``, else the pipeline takes a list); a
ControlNet of another family, or of another shape than the base model, is refused. Several
ControlNets run at once, each with its own condition image and scale. Parameters the family's
ControlNet pipeline does not take (``guess_mode`` on Flux; ``true_cfg_scale`` on Flux's
ControlNet image-to-image) are refused by name. Given none, a pipe takes the ControlNet of each
condition type from metafusion's default folders (``./models-cn/<name>`` for SD,
``./models-cn-xl/<name>`` for SDXL; see ``controlnet_folders``); families without such folders
(Flux) need ``controlnets=``.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from . import spec as specs
from .base import BasePipe, quiet_diffusers
from .controlnet_folders import default_controlnet_path
from .errors import InvalidValueError, MissingImageError, ModelTypeMismatchError, PipeError
from .families import FAMILIES, Family, Role, family_of_controlnet
from .families.base import read_json
from .images import check_image_size, check_same_size, load_image, load_mask, pad_image
from .im2im import Im2ImPipe, source_name
from .loading import ModelType

logger = logging.getLogger(__name__)

#: the ControlNet parameters both pipes take (declared in spec.py)
CONTROL_PARAMS: tuple[str, ...] = tuple(p.name for p in specs.CONTROL)
#: config entries a ControlNet shares with the denoiser it feeds, where both configs have them: the text
#: embedding widths (``cross_attention_dim`` of UNets, ``joint_attention_dim``/``pooled_projection_dim`` of
#: transformers); a transformer's hidden width (heads x head size) is compared too
SHAPE_KEYS: tuple[str, ...] = ("cross_attention_dim", "joint_attention_dim", "pooled_projection_dim")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@functools.lru_cache(maxsize=None)
def call_arguments(pipeline_class: type) -> frozenset[str]:
    """The argument names of a diffusers pipeline class's ``__call__``."""
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


def _inner_width(config: Mapping[str, Any]) -> int | None:
    """heads x head size of a transformer-style config; None for UNets (no integer head count)."""
    heads, dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    return heads * dim if isinstance(heads, int) and isinstance(dim, int) else None


def shape_mismatch(net_config: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> str | None:
    """What differs between a ControlNet's config and its denoiser's (``"joint_attention_dim 64 != 32"``),
    or None when the ControlNet's outputs fit the denoiser."""
    for key in SHAPE_KEYS:
        if key in net_config and key in denoiser_config and net_config[key] != denoiser_config[key]:
            return f"{key} {net_config[key]} != {denoiser_config[key]}"
    ours, theirs = _inner_width(net_config), _inner_width(denoiser_config)
    if ours is not None and theirs is not None and ours != theirs:
        return f"hidden width {ours} != {theirs}"
    return None


class _ControlMixin:
    """ControlNet loading and the control parameters shared by both ControlNet pipes."""

    model_type: ModelType
    family: Family
    base: Any
    ROLE: Role
    #: ControlNets loaded from metafusion's default folders, by folder (soft and soft-sobel share one)
    _default_nets: dict[str, Any]

    def _default_controlnet(self, ctype: str) -> Any:
        """The ControlNet of ``ctype`` from metafusion's ``./models-cn/`` (SD) or ``./models-cn-xl/`` (SDXL).

        Raises:
            MissingConditionModelError: no such folder (or the family has none); the message names it
                and how to configure one.
        """
        path = default_controlnet_path(self.family, ctype, type(self).__name__)
        key = str(path.absolute())
        if key not in self._default_nets:
            self._default_nets[key] = self._load_controlnet(path)
        return self._default_nets[key]

    def _refuse_foreign(self, config: Mapping[str, Any], where: Any, param: str) -> None:
        """Refuse a ControlNet (by its config) of another family or of another shape than the base model.

        Raises:
            InvalidValueError: not a ControlNet of any supported family.
            ModelTypeMismatchError: a ControlNet of another family, or one whose widths differ.
        """
        fam, found = self.family, str(config.get("_class_name", "no _class_name"))
        net_family = family_of_controlnet(config)
        allowed = f"{fam.name} ControlNets ({fam.controlnet_class}) of this model"
        if net_family is None:
            kinds = ", ".join(sorted({f.controlnet_class for f in FAMILIES}))
            raise InvalidValueError(f"{param} entry {where} is not a ControlNet of a supported family ({found}); "
                                    f"allowed: {allowed} (ControlNet classes: {kinds})", param, allowed)
        if net_family is not fam:
            raise ModelTypeMismatchError(f"{param} entry {where} is a ControlNet for {net_family.name} models "
                                         f"({found}), the base model is {fam.name}; allowed: {allowed}", param, allowed)
        denoiser = getattr(self.base, fam.denoiser)
        differs = shape_mismatch(config, denoiser.config)
        if differs:
            raise ModelTypeMismatchError(f"{param} entry {where} is a {fam.name} ControlNet of another shape than "
                                         f"the base model's {fam.denoiser} ({differs}); allowed: {allowed}", param,
                                         allowed)

    def _load_controlnet(self, spec: Any, param: str = "controlnets") -> Any:
        """A ControlNet from a folder path or a loaded model, on the pipe's device and dtype, checked to fit.

        Raises:
            PipeError: a path that is not a ControlNet folder.
            InvalidValueError / ModelTypeMismatchError: see ``_refuse_foreign``.
        """
        import diffusers

        if isinstance(spec, (str, os.PathLike)):
            path = Path(spec).expanduser()
            if not (path / "config.json").is_file():
                raise PipeError(f"{param} entry {str(path)!r} is not a ControlNet folder (no config.json)", param,
                                "paths of diffusers ControlNet folders")
            self._refuse_foreign(read_json(path / "config.json"), str(path), param)  # before loading any weights
            cls = getattr(diffusers, self.family.controlnet_class)
            net = cls.from_pretrained(str(path), dtype=self.dtype, local_files_only=True)
            net._multigen_path = str(path)
        else:
            net = spec
            config = getattr(net, "config", None)
            if not isinstance(config, Mapping):
                raise InvalidValueError(f"{param} entry {spec!r} is not a ControlNet", param,
                                        f"ControlNet folder paths or {self.family.controlnet_class} objects")
            self._refuse_foreign({"_class_name": type(net).__name__, **config},
                                 getattr(net, "_multigen_path", type(net).__name__), param)
        if net.device != self.device or net.dtype != self.dtype:
            with quiet_diffusers():
                net = net.to(self.device, self.dtype)
        return net

    def _net_arg(self, nets: list[Any]) -> Any:
        """What the pipeline's ``controlnet`` takes: one ControlNet, the family's multi-ControlNet of
        several, or a list where the family has none (the SD pipelines wrap it themselves)."""
        if len(nets) == 1:
            return nets[0]
        if self.family.max_controlnets is not None and len(nets) > self.family.max_controlnets:
            raise InvalidValueError(f"{len(nets)} ControlNets given; {self.family.name} pipelines run at most "
                                    f"{self.family.max_controlnets} (a union ControlNet covers several condition "
                                    "types)", "controlnets", f"at most {self.family.max_controlnets}")
        if self.family.multi_controlnet_class:
            import diffusers

            return getattr(diffusers, self.family.multi_controlnet_class)(list(nets))
        return list(nets)

    def _takes(self, name: str) -> bool:
        """Whether the family's diffusers pipeline of this role takes the call argument ``name``."""
        return name in call_arguments(self.family.pipeline_class(self.ROLE))

    def _refuse_untaken(self, merged: dict[str, Any]) -> None:
        """Refuse parameters that the family's ControlNet pipeline has no argument for (rather than ignore
        them): ``guess_mode`` (SD-style ControlNets only), the family's own ones (``true_cfg_scale``), a
        ControlNet window other than all the steps."""
        cls = self.family.pipeline_class(self.ROLE).__name__
        asked = [name for name in sorted(self.family.params) if merged.get(name) is not None]
        if merged.get("guess_mode"):
            asked.insert(0, "guess_mode")
        # the ControlNet window: Z-Image's pipeline has none (its ControlNet acts on every step)
        asked += [name for name, default in (("control_guidance_start", 0.0), ("control_guidance_end", 1.0))
                  if any(float(v) != default for v in _as_list(merged.get(name, default)))]
        for name in asked:
            if not self._takes(name):
                raise InvalidValueError(f"{name} {merged[name]!r} is not supported by {type(self).__name__} on "
                                        f"{self.family.name} models ({cls} takes no {name}); allowed: leave it out",
                                        name, "leave it out")

    def _controlnet_kwargs(self, merged: dict[str, Any], count: int, defaults: list[float]) -> None:
        self._refuse_untaken(merged)
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

    def _condition_arg_name(self) -> str:
        """The pipeline's argument for the condition images: SD's text-to-image ControlNet pipelines take
        them as ``image``; Flux's, and every image-to-image one (whose ``image`` is the input), as
        ``control_image``."""
        return "control_image" if self._takes("control_image") else "image"

    def _call_kwargs(self) -> dict[str, Any]:
        kwargs = super()._call_kwargs()  # type: ignore[misc]
        conds = self._padded_conditions
        kwargs[self._condition_arg_name()] = conds[0] if len(conds) == 1 else conds
        if "width" not in kwargs and self._takes("width") and self._takes("height"):
            # without them Flux's pipelines resize to their native 1024 px; SD's take the images' size
            kwargs["width"], kwargs["height"] = (self.padded(v) for v in self.output_size())  # type: ignore[attr-defined]
        kwargs.update(self._control_call(len(conds)))
        return kwargs

    def _prompt_kwargs(self, prompt: str, negative_prompt: str | None) -> dict[str, Any]:
        """The family's prompt arguments, less the negative ones the ControlNet pipeline has no argument
        for (Flux's image-to-image ControlNet pipeline runs no real CFG); a warning says so."""
        kwargs = super()._prompt_kwargs(prompt, negative_prompt)  # type: ignore[misc]
        untaken = [k for k in kwargs if k.startswith("negative_") and not self._takes(k)]
        for key in untaken:
            kwargs.pop(key)
        if untaken and negative_prompt:
            cls = self.family.pipeline_class(self.ROLE).__name__
            self._warn(f"the negative prompt is not used by {type(self).__name__} on {self.family.name} models "
                       f"({cls} takes none)")  # type: ignore[attr-defined]
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
        kwargs = {"controlnet_conditioning_scale": p["cscales"][0] if one else p["cscales"]}
        for name in ("control_guidance_start", "control_guidance_end"):
            if self._takes(name):  # left at its default otherwise (_refuse_untaken)
                kwargs[name] = p[name][0] if one else p[name]
        if self._takes("guess_mode"):
            kwargs["guess_mode"] = p["guess_mode"]
        return kwargs


class Cond2ImPipe(_ControlMixin, BasePipe):
    """Generate from condition images through one or more ControlNets.

    Args (constructor, besides ``BasePipe``'s): ``controlnets``: a path or a ControlNet model of
    the base model's family (``ControlNetModel``, ``FluxControlNetModel``), a list of them, or a
    dict ``{ctype: path}`` chosen from by ``ctypes``; ``ctypes`` (optional): what each condition
    image is (sets the default ``cscales``, recorded in the config). With ``ctypes`` and no
    ``controlnets``, each type's ControlNet comes from metafusion's default folders
    (``./models-cn/``, ``./models-cn-xl/``; SD and SDXL only).

    Setup parameters: ``image`` (the condition image, or a list, one per ControlNet), ``cscales``
    (conditioning scale, one per ControlNet, default 1), ``guess_mode`` (SD-style ControlNets
    only), ``control_guidance_start``/``control_guidance_end`` (fractions of the steps), and the
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
                                        "./models-cn/, ./models-cn-xl/, SD and SDXL only)", "controlnets",
                                        f"{self.family.controlnet_class} folder paths or objects, or ctypes")
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

    def _build_pipeline(self, base: Any, scheduler: Any, **extra: Any) -> Any:
        return super()._build_pipeline(base, scheduler, controlnet=self._net_arg(self.controlnets), **extra)

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
        self._padded_conditions = [pad_image(c, self.family.size_multiple) for c in resized]
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
    ``condition_models``); ``controlnets``: one ControlNet per condition type (of the base
    model's family), as a list in the order of ``ctypes`` or a dict ``{ctype: path or model}``;
    without it, each type's ControlNet comes from metafusion's default folders
    (``./models-cn/<name>`` for SD, ``./models-cn-xl/<name>`` for SDXL; other families have
    none), loaded when ``ctypes`` are known (the constructor's, else at ``setup``);
    ``condition_models``: ``{ctype: path}`` of the models of model-based conditions.

    Setup parameters: ``image`` (input), ``ctypes`` (overrides the constructor's), ``strength``,
    ``scale``, ``cscales`` (default per type), ``guess_mode`` (SD-style ControlNets only),
    ``control_guidance_start``/``end`` and the common ones.
    """

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
        return BasePipe._build_pipeline(self, base, scheduler, controlnet=self._net_arg(nets), **extra)

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
        self._padded_conditions = [pad_image(c, self.family.size_multiple) for c in self._conditions]
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
