"""What every model family declares: :class:`Family`, the pipe roles, and helpers the family modules share.

One module per family (``sd.py``, ``sdxl.py``, ``flux.py``, ...) builds one :class:`Family`;
``families/__init__.py`` lists them in detection order and derives :class:`ModelType` from
their names. Torch-free: diffusers is imported only when a pipeline class is asked for.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import InvalidValueError


class Role(str, Enum):
    """What a pipe class does; each family names the diffusers class that does it."""

    TEXT2IMAGE = "text2image"
    IMAGE2IMAGE = "image2image"
    INPAINT = "inpaint"
    CONTROLNET = "controlnet"
    CONTROLNET_IMAGE2IMAGE = "controlnet_image2image"
    #: instruction editing ("make the sky red"), a model made for it (Qwen-Image-Edit)
    EDIT = "edit"


def frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A read-only copy of ``mapping``."""
    return MappingProxyType(dict(mapping))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or ``{}`` when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def vae_factor(folder: Path) -> int:
    """The VAE's down-sampling of a diffusers folder, from its config (as diffusers computes it)."""
    vae = read_json(folder / "vae" / "config.json")
    if "temperal_downsample" in vae:  # Qwen-Image's video-shaped VAE: 2 ** len(temperal_downsample)
        return 2 ** len(vae["temperal_downsample"])
    return 2 ** (len(vae["block_out_channels"]) - 1)


def folder_classes(folder: Path, component: str) -> tuple[str, str]:
    """``(pipeline class, component class)`` a diffusers folder names in model_index.json and the
    component's config.json (``""`` where missing)."""
    index = read_json(folder / "model_index.json")
    comp = read_json(folder / component / "config.json")
    return str(index.get("_class_name", "")), str(comp.get("_class_name", ""))


def transformer_folder(pipelines: Iterable[str], transformer: str) -> Callable[[Path, dict[str, Any]], bool]:
    """``Family.recognises_folder`` of a transformer family: a diffusers folder without a UNet whose
    model_index.json names one of ``pipelines`` or whose transformer/config.json names ``transformer``."""
    names = frozenset(pipelines)

    def recognises(folder: Path, unet: dict[str, Any]) -> bool:
        if unet:
            return False
        index, found = folder_classes(folder, "transformer")
        return index in names or found == transformer

    return recognises


def transformer_pipeline(transformer: str) -> Callable[[Any], bool]:
    """``Family.recognises_pipeline`` of a transformer family: a loaded pipeline (of any class) whose
    ``transformer`` is a ``transformer`` model."""
    def recognises(pipe: Any) -> bool:
        found = getattr(pipe, "transformer", None)
        return found is not None and type(found).__name__ == transformer

    return recognises


def folder_pipeline(base: Any) -> str:
    """The pipeline class the model folder of a loaded base names in its model_index.json (``""`` when
    it was not loaded from a folder): a base loads as its family's text-to-image pipeline whatever the
    folder names, so this tells a Kontext or an edit model from a plain one."""
    folder = str(base.config.get("_name_or_path") or "")
    return str(read_json(Path(folder) / "model_index.json").get("_class_name", "")) if folder else ""


def unet_native_size(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def unet_folder_native_size(folder: Path) -> int:
    return int(read_json(folder / "unet" / "config.json")["sample_size"]) * vae_factor(folder)


def negative_always_used(params: Mapping[str, Any]) -> str | None:
    """``Family.negative_unused`` of the families whose every setting uses the negative prompt."""
    return None


def no_extra_checks(params: Mapping[str, Any]) -> None:
    """``Family.extra_checks`` of the families whose parameters need no check of their own."""


def same_call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Family.finish_call`` of the families whose diffusers call needs no change."""
    return kwargs


def no_components(base: Any, role: Role) -> dict[str, Any]:
    """``Family.role_components`` of the families whose base pipeline holds every component."""
    return {}


def same_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    return latents


def unpack_2x2(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """Latents packed as 2x2 patches ``[b, tokens, 4c]`` (Flux, Qwen-Image) unpacked to ``[b, c, h, w]``,
    as those pipelines unpack them before decoding (their own helpers are private)."""
    if latents is None or latents.dim() != 3:
        return latents
    batch, _, channels = latents.shape
    h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
    w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
    latents = latents.view(batch, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, h, w)


def model_name(base: Any) -> str:
    """What errors call a loaded base pipeline: the folder it was loaded from, else its class."""
    return str(base.config.get("_name_or_path") or type(base).__name__)


@dataclass(frozen=True)
class Variant:
    """A kind of model of a family that runs other diffusers classes than its plain models: Flux.1 Fill
    (inpainting only, ``FluxFillPipeline``), Flux.1 Kontext (instruction editing). Declared in the
    family's module (``Family.variants``) and told from the loaded base pipeline, so that the pipe
    classes stay the same and nothing outside the family's module asks which variant a model is.

    Attributes:
        name: how people write it (``"Flux.1 Fill"``).
        recognises: ``base pipeline -> bool``: the model is one of these.
        pipelines: the diffusers class of every role such a model runs; any other role is refused for it.
        looks_like: how a model of this variant is recognised, for the errors that ask for one.
        note: why it runs only those roles (and which pipe classes do), for the errors that refuse one.
        param_defaults: its setup defaults that differ from the family's (its own recommended settings).
        refused_params: family parameters (``Family.params``) its diffusers classes do not take, with why.
        recognises_folder: ``diffusers folder -> bool`` from its configs alone (torch-free: the service
            asks it when a session opens, before any weight is loaded).
    """

    name: str
    recognises: Callable[[Any], bool]
    pipelines: Mapping[Role, str]
    looks_like: str
    note: str = ""
    param_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    refused_params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    recognises_folder: Callable[[Path], bool] = lambda folder: False

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/v1/models`` says of the variant (within its family's ``describe()``)."""
        return {"name": self.name, "roles": [r.value for r in self.pipelines],
                "pipelines": {r.value: c for r, c in self.pipelines.items()}, "recognised_by": self.looks_like,
                "param_defaults": dict(self.param_defaults), "refused_params": sorted(self.refused_params)}


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: its user-facing name, the value of its :class:`ModelType` (``"SD"``, ``"FLUX"``).
        title: how people write it (``"Qwen-Image"``).
        pipelines: the diffusers class name of each role it runs.
        folder_load_kwargs: extra ``from_pretrained`` arguments for a diffusers folder.
        recognises_folder: ``(folder, unet_config) -> bool`` for a diffusers folder.
        checkpoint_prefixes: tensor-name prefixes that mark a single-file checkpoint as this family.
        recognises_pipeline: ``pipeline -> bool`` for a loaded diffusers pipeline.
        recognises_controlnet: ``controlnet_config -> bool``: the ControlNet fits this family.
        latent_rgb_factors: ``channels x 3`` latent-to-RGB projection of the previews.
        latent_rgb_bias: the 3 offsets added after it.
        controlnet_folder: metafusion's default ControlNet folder (relative to the working directory).
        controlnet_models: the folder name in it of each condition type's ControlNet (metafusion's).
        controlnet_scales: default ``cscales`` per condition type (metafusion's).
        controlnet_class: the diffusers class of this family's ControlNet models (loading them).
        multi_controlnet_class: the diffusers class that runs several of them together (None: a list).
        max_controlnets: most ControlNets one job may use (None: any number).
        denoiser: the pipeline component that denoises (``unet``, ``transformer``); its device and
            dtype are the pipe's.
        native_size: ``pipeline -> side in pixels`` of the images the model was trained on.
        folder_native_size: ``diffusers folder -> side in pixels`` from its configs, without torch
            (may raise ``KeyError``/``TypeError``/``ValueError`` on incomplete configs).
        aspect_sizes: ``(width, height)`` of the resolutions it was trained on, native side first.
        size_multiple: width and height are generated padded up to a multiple of this.
        weighted_prompts: whether ``(word:1.3)`` weighting is honoured for this family.
        encode_prompt: the family's own prompt encoder: ``(pipe_object, prompt, negative) ->
            diffusers call kwargs`` (embeddings); None: ``prompting.encode_prompts`` (CLIP, A1111
            weights, 77-token chunks) when ``weighted_prompts``, else diffusers encodes the plain
            prompt, the weighting syntax stripped and a warning recorded.
        negative_prompts: whether the family's pipelines use a negative prompt.
        negative_unused: ``setup params -> why they leave the negative prompt unused`` (None: it is used).
        params: the family-only parameters of the spec (``spec.FAMILY_PARAMS``) it takes; they are
            passed to the diffusers call under their own names.
        supports_loras: whether ``set_loras`` may load LoRA files into this family's models.
        schedulers: the scheduler names (``schedulers.py``) that may replace the model's own;
            ``None``: every SD-style scheduler.
        param_defaults: setup defaults that differ from the spec's for this family.
        step_latents: ``(pipeline, latents, height, width) -> [b, c, h, w]`` latents as the step
            callback and the preview expect them (Flux denoises packed 2x2 patches).
        working_roles: the roles the pipe classes run for this family so far (None: every role in
            ``pipelines``); a role declared but not working yet is refused with a clear error.
        single_file_class: the diffusers class that loads a single-file denoiser of this family
            into a config folder (None: the whole pipeline loads with ``from_single_file``).
        single_file_layout: ``checkpoint state dict -> diffusers-layout state dict`` of such a denoiser,
            given to ``from_single_file`` (None: diffusers converts the file itself).
        extra_checks: ``setup params -> None``, the family's own checks after :meth:`check_params`'
            (raises ``InvalidValueError``; Qwen-Image: guidance_scale and true_cfg_scale agree).
        finish_call: ``(pipe object, diffusers call kwargs) -> kwargs``, the family's last changes to
            the call (Qwen-Image: guidance_scale goes as its true_cfg_scale).
        role_components: ``(base pipeline, role) -> components`` the role's diffusers class needs that
            the base lacks, given to ``from_pipe`` (Qwen-Image-Edit: its processor, from the model's folder).
        variants: the kinds of model of this family that run other diffusers classes (:class:`Variant`),
            most specific first; a model none recognises is a plain one and runs ``pipelines``.
        variant_roles: roles of ``pipelines`` that only a variant runs (Flux's edit: a Kontext model);
            a plain model asked for one is refused, naming ``model_id``.
    """

    name: str
    title: str
    pipelines: Mapping[Role, str]
    folder_load_kwargs: Mapping[str, Any]
    recognises_folder: Callable[[Path, dict[str, Any]], bool]
    checkpoint_prefixes: tuple[str, ...]
    recognises_pipeline: Callable[[Any], bool]
    recognises_controlnet: Callable[[Mapping[str, Any]], bool]
    latent_rgb_factors: tuple[tuple[float, float, float], ...]
    latent_rgb_bias: tuple[float, float, float]
    controlnet_folder: str = ""
    controlnet_models: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    controlnet_scales: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    controlnet_class: str = "ControlNetModel"
    multi_controlnet_class: str | None = None
    max_controlnets: int | None = None
    denoiser: str = "unet"
    native_size: Callable[[Any], int] = unet_native_size
    folder_native_size: Callable[[Path], int] = unet_folder_native_size
    aspect_sizes: tuple[tuple[int, int], ...] = ()
    size_multiple: int = 8
    weighted_prompts: bool = True
    encode_prompt: Callable[[Any, str, str | None], dict[str, Any]] | None = None
    negative_prompts: bool = True
    negative_unused: Callable[[Mapping[str, Any]], str | None] = negative_always_used
    params: frozenset[str] = frozenset()
    supports_loras: bool = True
    schedulers: tuple[str, ...] | None = None
    param_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    step_latents: Callable[[Any, Any, int, int], Any] = same_latents
    working_roles: frozenset[Role] | None = None
    single_file_class: str | None = None
    single_file_layout: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    extra_checks: Callable[[Mapping[str, Any]], None] = no_extra_checks
    finish_call: Callable[[Any, dict[str, Any]], dict[str, Any]] = same_call
    role_components: Callable[[Any, Role], dict[str, Any]] = no_components
    variants: tuple[Variant, ...] = ()
    variant_roles: frozenset[Role] = frozenset()
    #: IP-Adapter image prompts (``spec.IMAGE_PROMPTING``, pipes/ip_adapter.py): its pipelines take them
    image_prompts: bool = False
    #: the quality switches its pipes apply (``spec.QUALITY_PARAMS``, ``refiner_switch``; pipes/quality.py), each
    #: with the family's recommended value (None: the spec's default); the others are refused
    quality_params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def model_type(self) -> Any:
        """This family's :class:`ModelType` member."""
        from . import ModelType

        return ModelType(self.name)

    @property
    def latent_channels(self) -> int:
        return len(self.latent_rgb_factors)

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles this family runs now, in declaration order."""
        return tuple(r for r in self.pipelines if self.working_roles is None or r in self.working_roles)

    @property
    def scheduler_choice(self) -> bool:
        """Whether a ``scheduler`` parameter may replace the model's own."""
        return self.schedulers is None or bool(self.schedulers)

    @property
    def refused_params(self) -> tuple[str, ...]:
        """The spec's parameters this family refuses unless left at their default (the web form hides
        them): ``clip_skip`` where prompts are not CLIP-encoded the A1111 way (``prompting.encode_prompts``),
        ``timestep_spacing`` where the family lists its own schedulers (flow matching: its pipelines set
        the sigmas themselves), and the family-only parameters (``spec.FAMILY_PARAMS``) it does not take."""
        from ..spec import FAMILY_PARAMS, IMAGE_PROMPTING, QUALITY_PARAMS

        out = ["clip_skip"] if self.encode_prompt is not None or not self.weighted_prompts else []
        out += ["timestep_spacing"] if self.schedulers is not None else []
        out += [] if self.image_prompts else [p.name for p in IMAGE_PROMPTING]
        out += [p.name for p in QUALITY_PARAMS if p.name not in self.quality_params]
        return tuple(out + [p.name for p in FAMILY_PARAMS if p.name not in self.params])

    def check_params(self, params: Mapping[str, Any], base: Any = None) -> None:
        """Refuse the setup parameters this family cannot honour, rather than ignore them silently:
        those of :attr:`refused_params` set to anything but their default, and a scheduler name it
        cannot take; with the loaded ``base`` pipeline (the pipes' ``setup``), also those its
        :class:`Variant` refuses. The pipes' ``setup`` and the service's queue-time checks both call it,
        so a job is refused before it is queued for what the pipe would refuse.

        Raises:
            InvalidValueError: naming the parameter, the bad value and what is allowed.
            UnknownSchedulerError: a scheduler name of no kind (listing the family's).
        """
        from ..schedulers import check_for_family
        from ..spec import FAMILY_PARAMS, IMAGE_PROMPTING, QUALITY_PARAMS

        quality_names = {p.name for p in QUALITY_PARAMS}

        refused = self.refused_params
        if "clip_skip" in refused and params.get("clip_skip"):
            raise InvalidValueError(f"clip_skip {params['clip_skip']} is not supported for {self.name} models; "
                                    "allowed: 0", "clip_skip", "0")
        for param in FAMILY_PARAMS:
            if params.get(param.name) is not None and param.name in refused:
                from . import FAMILIES

                takes = ", ".join(f.name for f in FAMILIES if param.name in f.params)
                raise InvalidValueError(f"{param.name} {params[param.name]!r} is not supported for {self.name} "
                                        f"models; allowed: leave it out (model types that take it: {takes})",
                                        param.name, "leave it out")
        if "timestep_spacing" in refused and params.get("timestep_spacing") is not None:
            raise InvalidValueError(f"timestep_spacing {params['timestep_spacing']!r} is not supported for "
                                    f"{self.name} models (flow-matching); allowed: leave it out", "timestep_spacing",
                                    "leave it out")
        # the pipes check their setup with the defaults filled in: weights and stop-at at 1 ask for nothing
        given = [p.name for p in IMAGE_PROMPTING if params.get(p.name) is not None and not (
            isinstance(params[p.name], (list, tuple, int, float)) and params[p.name] in ([], (), p.default))]
        if given and not self.image_prompts:
            from . import FAMILIES

            takes = ", ".join(f.name for f in FAMILIES if f.image_prompts)
            value = params[given[0]]  # the images as a count: their values are server paths or pixels
            count = len(value) if isinstance(value, (list, tuple)) else 1
            shown = f"({count} image{'s' if count != 1 else ''})" if given[0] == "image_prompts" else repr(value)
            raise InvalidValueError(f"{given[0]} {shown} is not supported for {self.name} models (no IP-Adapter "
                                    f"support yet); allowed: leave it out (model types that take image prompts: "
                                    f"{takes})", given[0], "leave it out")
        quality = [name for name in refused if name in quality_names and params.get(name) is not None]
        if quality:
            from . import FAMILIES

            takes = ", ".join(f.name for f in FAMILIES if quality[0] in f.quality_params)
            raise InvalidValueError(f"{quality[0]} {params[quality[0]]!r} is not supported for {self.name} models (it "
                                    f"acts on a UNet); allowed: leave it out (model types that take it: {takes})",
                                    quality[0], "leave it out")
        if params.get("scheduler") is not None:
            check_for_family(params["scheduler"], self.schedulers, self.name)
        variant = self.variant(base) if base is not None else None
        for name, why in (variant.refused_params if variant is not None else {}).items():
            if params.get(name) is not None:
                raise InvalidValueError(f"{name} {params[name]!r} is not supported for {variant.name} models "
                                        f"({why}); allowed: leave it out", name, "leave it out")
        self.extra_checks(params)

    def runs(self, role: Role | str) -> bool:
        return Role(role) in self.roles

    def folder_defaults(self, folder: Path | None) -> dict[str, Any]:
        """The setup defaults of a model of this family in ``folder``, from its configs alone: its variant's
        over the family's (``model_defaults`` for a loaded model)."""
        variant = self.folder_variant(folder) if folder else None
        return {**self.param_defaults, **(variant.param_defaults if variant is not None else {})}

    def folder_variant(self, folder: Path) -> Variant | None:
        """The :class:`Variant` the model in ``folder`` is, from its configs alone; None for a plain model."""
        return next((v for v in self.variants if v.recognises_folder(Path(folder))), None)

    def folder_roles(self, folder: Path) -> tuple[Role, ...]:
        """The roles a model of this family in ``folder`` runs, from its configs alone (torch-free): its
        variant's (a Fill model inpaints only), else the family's but those only a variant runs (a plain
        Flux.1 does not edit)."""
        variant = self.folder_variant(folder)
        if variant is not None:
            return tuple(r for r in variant.pipelines if r in self.pipelines)
        return tuple(r for r in self.roles if r not in self.variant_roles)

    def check_role(self, role: Role | str) -> None:
        """Refuse a role this family does not run.

        Raises:
            InvalidValueError: naming the families that run ``role``.
        """
        if self.runs(role):
            return
        from . import FAMILIES

        allowed = ", ".join(f.name for f in FAMILIES if f.runs(role))
        raise InvalidValueError(f"{self.name} models do not run {Role(role).value}; allowed model types: {allowed}",
                                "model_type", allowed)

    def variant(self, base: Any) -> Variant | None:
        """The :class:`Variant` a loaded base pipeline of this family is; None for a plain model."""
        return next((v for v in self.variants if v.recognises(base)), None)

    def model_defaults(self, base: Any) -> dict[str, Any]:
        """The setup defaults of this family for the model ``base``: its variant's over the family's."""
        variant = self.variant(base)
        return {**self.param_defaults, **(variant.param_defaults if variant is not None else {})}

    def model_pipeline(self, base: Any, role: Role | str) -> str:
        """The diffusers class name that runs ``role`` on the model ``base`` (its variant's, else the family's).

        Raises:
            InvalidValueError: naming ``model_id``: a variant asked for a role it does not run, or a plain
                model for a role only a variant runs.
        """
        role = Role(role)
        if role not in self.pipelines:
            self.check_role(role)
        variant = self.variant(base)
        if variant is not None and role in variant.pipelines:
            return variant.pipelines[role]
        if variant is not None:
            runs = ", ".join(r.value for r in variant.pipelines)
            raise InvalidValueError(f"model {model_name(base)} is a {variant.name} model, which runs {runs} only, not "
                                    f"{role.value} ({variant.note}); allowed: {runs} on this model, or another "
                                    f"{self.title} model", "model_id", f"{runs} (or another {self.title} model)")
        if role in self.variant_roles:
            those = [v for v in self.variants if role in v.pipelines]
            names = " or ".join(v.name for v in those)
            raise InvalidValueError(f"{role.value} on {self.title} needs a {names} model: model {model_name(base)} "
                                    f"is not one; allowed: {'; '.join(v.looks_like for v in those)}", "model_id",
                                    f"a {names} model")
        return self.pipelines[role]

    def pipeline_class(self, role: Role | str, base: Any = None) -> type:
        """The diffusers class that runs ``role`` for this family (also for a role declared but not run yet);
        with the loaded ``base`` pipeline, the one for that model (:meth:`model_pipeline`).

        Raises:
            InvalidValueError: the family has no pipeline for this role, or the model does not run it.
        """
        if Role(role) not in self.pipelines:
            self.check_role(role)
        import diffusers

        name = self.pipelines[Role(role)] if base is None else self.model_pipeline(base, role)
        return getattr(diffusers, name)

    def default_cscale(self, ctype: str) -> float:
        """The default conditioning scale of ``ctype`` (1.0 for types metafusion has none for)."""
        return float(self.controlnet_scales.get(ctype, 1.0))

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/v1/models`` says of the family: name, tasks (and the diffusers class of each),
        its own parameters and those it refuses, defaults, sizes, and its variants (Flux.1 Fill, Kontext)."""
        return {"name": self.name, "title": self.title, "roles": [r.value for r in self.roles],
                "pipelines": {r.value: self.pipelines[r] for r in self.roles},
                "params": sorted(self.params), "refused_params": list(self.refused_params),
                "param_defaults": dict(self.param_defaults), "loras": self.supports_loras,
                "negative_prompt": self.negative_prompts, "prompt_weighting": self.weighted_prompts,
                "schedulers": None if self.schedulers is None else list(self.schedulers),
                "aspect_sizes": [list(s) for s in self.aspect_sizes], "quality_params": dict(self.quality_params),
                "variants": [v.describe() for v in self.variants]}
