"""Model families: how each is recognised, which diffusers classes run it, and its per-family data.

A :class:`Family` holds everything that differs between SD 1.x, SDXL and Flux.1 (and later
Qwen-Image, Z-Image): how a diffusers folder, a single-file checkpoint, a loaded pipeline or
a ControlNet is recognised as one of its own; the diffusers class of each pipe role; which
component denoises (a UNet or a transformer), the native image size and the size multiple;
how prompts are encoded; the latent-to-RGB preview factors; and metafusion's default
ControlNet folders and scales.
The rest of the pipes ask ``family(model_type)`` instead of comparing model types, so a
new family is one more entry in ``FAMILIES``.

``ModelType`` stays the user-facing name of a family (``"SD"``, ``"SDXL"``, ``"FLUX"``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import InvalidValueError, PipeError

logger = logging.getLogger(__name__)


class ModelType(str, Enum):
    """Model family of a base checkpoint."""

    SD = "SD"
    SDXL = "SDXL"
    FLUX = "FLUX"

    @classmethod
    def parse(cls, value: "ModelType | str | None") -> "ModelType | None":
        """Turn ``"SD"``/``"sdxl"``/a ``ModelType``/None into a ``ModelType`` or None.

        Raises:
            InvalidValueError: the name is not a known model type.
        """
        if value is None or isinstance(value, ModelType):
            return value
        name = str(value).upper().replace("MODELTYPE.", "")
        try:
            return cls(name)
        except ValueError:
            raise InvalidValueError(f"model_type {value!r} is not known; allowed: "
                                    f"{', '.join(m.value for m in cls)}", "model_type",
                                    ", ".join(m.value for m in cls)) from None


class Role(str, Enum):
    """What a pipe class does; each family names the diffusers class that does it."""

    TEXT2IMAGE = "text2image"
    IMAGE2IMAGE = "image2image"
    INPAINT = "inpaint"
    CONTROLNET = "controlnet"
    CONTROLNET_IMAGE2IMAGE = "controlnet_image2image"


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


def _unet_native_size(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def _same_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    return latents


def _vae_factor(folder: Path) -> int:
    """The VAE's down-sampling of a diffusers folder, from its config (as diffusers computes it)."""
    vae = _read_json(folder / "vae" / "config.json")
    return 2 ** (len(vae["block_out_channels"]) - 1)


def _unet_folder_native_size(folder: Path) -> int:
    return int(_read_json(folder / "unet" / "config.json")["sample_size"]) * _vae_factor(folder)


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        model_type: its user-facing name.
        pipelines: the diffusers class name of each role.
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
        denoiser: the pipeline component that denoises (``unet``, ``transformer``); its device and
            dtype are the pipe's.
        native_size: ``pipeline -> side in pixels`` of the images the model was trained on.
        folder_native_size: ``diffusers folder -> side in pixels`` from its configs, without torch
            (may raise ``KeyError``/``TypeError``/``ValueError`` on incomplete configs).
        size_multiple: width and height are generated padded up to a multiple of this.
        weighted_prompts: True when ``prompting.encode_prompts`` (CLIP, A1111 weights, 77-token
            chunks) encodes this family's prompts; False: diffusers encodes the plain prompt, with
            the weighting syntax stripped (``prompting.strip_weighting``).
        negative_prompts: whether the family's text-to-image pipeline uses a negative prompt.
        supports_loras: whether ``set_loras`` may load LoRA files into this family's models.
        scheduler_choice: whether ``scheduler``/``timestep_spacing`` may replace the model's own
            scheduler (the SD schedulers do not run flow-matching models).
        param_defaults: setup defaults that differ from the spec's for this family.
        step_latents: ``(pipeline, latents, height, width) -> [b, c, h, w]`` latents as the step
            callback and the preview expect them (Flux denoises packed 2x2 patches).
        working_roles: the roles the pipe classes run for this family so far (None: every role in
            ``pipelines``); a role declared but not working yet is refused with a clear error.
    """

    model_type: ModelType
    pipelines: Mapping[Role, str]
    folder_load_kwargs: Mapping[str, Any]
    recognises_folder: Callable[[Path, dict[str, Any]], bool]
    checkpoint_prefixes: tuple[str, ...]
    recognises_pipeline: Callable[[Any], bool]
    recognises_controlnet: Callable[[Mapping[str, Any]], bool]
    latent_rgb_factors: tuple[tuple[float, float, float], ...]
    latent_rgb_bias: tuple[float, float, float]
    controlnet_folder: str
    controlnet_models: Mapping[str, str]
    controlnet_scales: Mapping[str, float]
    denoiser: str = "unet"
    native_size: Callable[[Any], int] = _unet_native_size
    folder_native_size: Callable[[Path], int] = _unet_folder_native_size
    size_multiple: int = 8
    weighted_prompts: bool = True
    negative_prompts: bool = True
    supports_loras: bool = True
    scheduler_choice: bool = True
    param_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    step_latents: Callable[[Any, Any, int, int], Any] = _same_latents
    working_roles: frozenset[Role] | None = None

    @property
    def name(self) -> str:
        return self.model_type.value

    @property
    def latent_channels(self) -> int:
        return len(self.latent_rgb_factors)

    def check_role(self, role: Role | str) -> None:
        """Refuse a role this family declares but cannot run yet.

        Raises:
            InvalidValueError: naming the families that run ``role``.
        """
        role = Role(role)
        if role in self.pipelines and (self.working_roles is None or role in self.working_roles):
            return
        allowed = ", ".join(f.name for f in FAMILIES if role in f.pipelines and
                            (f.working_roles is None or role in f.working_roles))
        raise InvalidValueError(f"{self.name} models do not run {role.value} yet; allowed model types: {allowed}",
                                "model_type", allowed)

    def pipeline_class(self, role: Role | str) -> type:
        """The diffusers class that runs ``role`` for this family.

        Raises:
            InvalidValueError: the family has no pipeline for this role.
        """
        name = self.pipelines.get(Role(role))
        if name is None:
            raise InvalidValueError(f"{self.name} models have no {Role(role).value} pipeline; allowed families: "
                                    f"{', '.join(f.name for f in FAMILIES if Role(role) in f.pipelines)}",
                                    "model_type", ", ".join(f.name for f in FAMILIES if Role(role) in f.pipelines))
        import diffusers

        return getattr(diffusers, name)

    def default_cscale(self, ctype: str) -> float:
        """The default conditioning scale of ``ctype`` (1.0 for types metafusion has none for)."""
        return float(self.controlnet_scales.get(ctype, 1.0))


def _has_text_time(config: Mapping[str, Any]) -> bool:
    return config.get("addition_embed_type") == "text_time"


def _sdxl_folder(folder: Path, unet: dict[str, Any]) -> bool:
    return bool(unet) and (_has_text_time(unet) or (folder / "text_encoder_2").is_dir())


def _sdxl_pipeline(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    return getattr(pipe, "text_encoder_2", None) is not None or (unet is not None and _has_text_time(unet.config))


def _sd_pipeline(pipe: Any) -> bool:
    return getattr(pipe, "unet", None) is not None and not _sdxl_pipeline(pipe)


#: metafusion's SD ControlNet scales (its ``cond_scales_defaults``)
_SD_CSCALES = {"canny": 0.75, "pose": 1.0, "ip2p": 0.5, "soft-sobel": 0.3, "soft": 0.95, "scribble": 0.95,
               "depth": 0.5, "inpaint": 1.0, "qr": 1.5}

SD = Family(
    model_type=ModelType.SD,
    pipelines=_frozen({
        Role.TEXT2IMAGE: "StableDiffusionPipeline",
        Role.IMAGE2IMAGE: "StableDiffusionImg2ImgPipeline",
        Role.INPAINT: "StableDiffusionInpaintPipeline",
        Role.CONTROLNET: "StableDiffusionControlNetPipeline",
        Role.CONTROLNET_IMAGE2IMAGE: "StableDiffusionControlNetImg2ImgPipeline",
    }),
    # the tiny and most community SD folders have no safety checker; do not ask for one
    folder_load_kwargs=_frozen({"safety_checker": None, "requires_safety_checker": False}),
    recognises_folder=lambda folder, unet: bool(unet) and not _sdxl_folder(folder, unet),
    checkpoint_prefixes=("cond_stage_model.", "model.diffusion_model."),
    recognises_pipeline=_sd_pipeline,
    recognises_controlnet=lambda config: not _has_text_time(config),
    # ComfyUI comfy/latent_formats.py (SD15): no bias
    latent_rgb_factors=((0.3512, 0.2297, 0.3227),
                        (0.3250, 0.4974, 0.2350),
                        (-0.2829, 0.1762, 0.2721),
                        (-0.2120, -0.2616, -0.7177)),
    latent_rgb_bias=(0.0, 0.0, 0.0),
    controlnet_folder="models-cn",
    controlnet_models=_frozen({
        "canny": "sd-controlnet-canny",
        "pose": "control_v11p_sd15_openpose",
        "ip2p": "control_v11e_sd15_ip2p",
        "soft-sobel": "control_v11p_sd15_softedge",
        "soft": "control_v11p_sd15_softedge",
        "scribble": "control_v11p_sd15_scribble",
        "depth": "control_v11f1p_sd15_depth",
        "inpaint": "control_v11p_sd15_inpaint",
        "qr": "controlnet_qrcode-control_v1p_sd15",
    }),
    controlnet_scales=_frozen(_SD_CSCALES),
)

SDXL = Family(
    model_type=ModelType.SDXL,
    pipelines=_frozen({
        Role.TEXT2IMAGE: "StableDiffusionXLPipeline",
        Role.IMAGE2IMAGE: "StableDiffusionXLImg2ImgPipeline",
        Role.INPAINT: "StableDiffusionXLInpaintPipeline",
        Role.CONTROLNET: "StableDiffusionXLControlNetPipeline",
        Role.CONTROLNET_IMAGE2IMAGE: "StableDiffusionXLControlNetImg2ImgPipeline",
    }),
    folder_load_kwargs=_frozen({}),
    recognises_folder=_sdxl_folder,
    # the second text encoder; SDXL files also hold SD's "model.diffusion_model." names
    checkpoint_prefixes=("conditioner.embedders.1.",),
    recognises_pipeline=_sdxl_pipeline,
    recognises_controlnet=_has_text_time,
    # ComfyUI comfy/latent_formats.py (SDXL)
    latent_rgb_factors=((0.3651, 0.4232, 0.4341),
                        (-0.2533, -0.0042, 0.1068),
                        (0.1076, 0.1111, -0.0362),
                        (-0.3165, -0.2492, -0.2188)),
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
    controlnet_folder="models-cn-xl",
    controlnet_models=_frozen({
        "soft": "controlnet-softedge-sdxl",
        "scribble": "controlnet-scribble-sdxl",
        "canny": "controlnet-canny-sdxl",
        "pose": "controlnet-openpose-sdxl",
        "depth": "controlnet-depth-sdxl",
        "inpaint": "controlnet-inpaint-sdxl",
        "qr": "controlnet-qr-pattern-sdxl",
    }),
    controlnet_scales=_frozen({**_SD_CSCALES, "qr": 0.5}),
)

#: the diffusers class of Flux.1's denoiser, as a folder's transformer/config.json names it
_FLUX_TRANSFORMER = "FluxTransformer2DModel"
_FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline",
                   "FluxControlNetImg2ImgPipeline")


def _flux_folder(folder: Path, unet: dict[str, Any]) -> bool:
    if unet:
        return False
    index = _read_json(folder / "model_index.json")
    transformer = _read_json(folder / "transformer" / "config.json")
    return index.get("_class_name") in _FLUX_PIPELINES or transformer.get("_class_name") == _FLUX_TRANSFORMER


def _flux_pipeline(pipe: Any) -> bool:
    transformer = getattr(pipe, "transformer", None)
    return transformer is not None and type(transformer).__name__ == _FLUX_TRANSFORMER


def _flux_native_size(pipe: Any) -> int:
    # FluxPipeline's own default: 128 latent pixels, 1024 px for Flux.1's VAE
    return int(getattr(pipe, "default_sample_size", 128)) * int(pipe.vae_scale_factor)


def _flux_folder_native_size(folder: Path) -> int:
    # FluxPipeline's default_sample_size (128) times its VAE's factor, as _flux_native_size
    return 128 * _vae_factor(folder)


def _flux_step_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """Flux denoises ``[b, tokens, 4c]`` (2x2 patches); unpack to ``[b, c, h, w]``."""
    if latents is None or latents.dim() != 3:
        return latents
    # as FluxPipeline unpacks them before decoding (its own helper is private): 2x2 patches back to pixels
    batch, _, channels = latents.shape
    h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
    w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
    latents = latents.view(batch, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, h, w)


FLUX = Family(
    model_type=ModelType.FLUX,
    pipelines=_frozen({
        Role.TEXT2IMAGE: "FluxPipeline",
        # text-to-image, image-to-image and inpainting (MaskedIm2ImPipe, InpaintingPipe) run; the
        # ControlNet roles are declared for a later slice
        Role.IMAGE2IMAGE: "FluxImg2ImgPipeline",
        Role.INPAINT: "FluxInpaintPipeline",
        Role.CONTROLNET: "FluxControlNetPipeline",
        Role.CONTROLNET_IMAGE2IMAGE: "FluxControlNetImg2ImgPipeline",
    }),
    folder_load_kwargs=_frozen({}),
    recognises_folder=_flux_folder,
    # single-file Flux checkpoints are recognised by family_of_checkpoint to say "not supported yet"
    checkpoint_prefixes=(),
    recognises_pipeline=_flux_pipeline,
    recognises_controlnet=lambda config: config.get("_class_name") == "FluxControlNetModel",
    # ComfyUI comfy/latent_formats.py (Flux), for latents normalised as (z - 0.1159) * 0.3611,
    # which is what diffusers' FluxPipeline denoises too
    latent_rgb_factors=((-0.0346, 0.0244, 0.0681),
                        (0.0034, 0.0210, 0.0687),
                        (0.0275, -0.0668, -0.0433),
                        (-0.0174, 0.0160, 0.0617),
                        (0.0859, 0.0721, 0.0329),
                        (0.0004, 0.0383, 0.0115),
                        (0.0405, 0.0861, 0.0915),
                        (-0.0236, -0.0185, -0.0259),
                        (-0.0245, 0.0250, 0.1180),
                        (0.1008, 0.0755, -0.0421),
                        (-0.0515, 0.0201, 0.0011),
                        (0.0428, -0.0012, -0.0036),
                        (0.0817, 0.0765, 0.0749),
                        (-0.1264, -0.0522, -0.1103),
                        (-0.0280, -0.0881, -0.0499),
                        (-0.1262, -0.0982, -0.0778)),
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
    controlnet_folder="",
    controlnet_models=_frozen({}),
    controlnet_scales=_frozen({}),
    denoiser="transformer",
    native_size=_flux_native_size,
    folder_native_size=_flux_folder_native_size,
    # the VAE's 8 times the 2x2 patches the transformer packs
    size_multiple=16,
    weighted_prompts=False,
    # FluxPipeline's guidance is distilled (an input of the transformer), not classifier-free:
    # a negative prompt would need true_cfg_scale, which this slice does not expose
    negative_prompts=False,
    supports_loras=False,
    scheduler_choice=False,
    # Flux.1-dev's recommended settings (diffusers' FluxPipeline documentation)
    param_defaults=_frozen({"guidance_scale": 3.5, "steps": 28}),
    step_latents=_flux_step_latents,
    working_roles=frozenset({Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT}),
)

#: every supported family, most specific first: detection takes the first that recognises a
#: model (an SDXL checkpoint also holds SD's tensor names, so SDXL is asked before SD; a Flux
#: folder has a text_encoder_2 as SDXL does, so Flux is asked before SDXL)
FAMILIES: tuple[Family, ...] = (FLUX, SDXL, SD)
_BY_TYPE: dict[ModelType, Family] = {f.model_type: f for f in FAMILIES}
#: what transformer-based models (Flux and later families) look like, to say "not supported yet"
_TRANSFORMER_FOLDER = "transformer"
_TRANSFORMER_TENSORS = ("double_blocks.", "transformer_blocks.")
_SUPPORTED = ", ".join(f.name for f in FAMILIES[::-1])


def family(model_type: ModelType | str) -> Family:
    """The family of a model type (a ``ModelType`` or its name).

    Raises:
        InvalidValueError: an unknown model type.
    """
    mt = ModelType.parse(model_type)
    if mt not in _BY_TYPE:
        raise InvalidValueError(f"model_type {model_type!r} is not supported; allowed: {_SUPPORTED}", "model_type",
                                _SUPPORTED)
    return _BY_TYPE[mt]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def family_of_folder(folder: Path) -> Family:
    """The family of a diffusers folder, from its model_index.json, UNet or transformer config.

    Raises:
        InvalidValueError: a transformer model of no supported family.
        PipeError: not a diffusers folder with a UNet or a Flux transformer.
    """
    unet = _read_json(folder / "unet" / "config.json")
    for fam in FAMILIES:
        if fam.recognises_folder(folder, unet):
            return fam
    if (folder / _TRANSFORMER_FOLDER).is_dir():
        found = _read_json(folder / _TRANSFORMER_FOLDER / "config.json").get("_class_name", "no config.json")
        raise InvalidValueError(f"{folder} holds a transformer model ({found}) of no supported family; "
                                f"allowed: {_SUPPORTED}", "model_type", _SUPPORTED)
    raise PipeError(f"model {folder} is not a diffusers folder with a unet/config.json or a Flux transformer",
                    "model_id")


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
        InvalidValueError: a Flux-like checkpoint, not supported yet.
        PipeError: unreadable, or no known tensor names.
    """
    names = tensor_names(path)
    for fam in FAMILIES:
        if any(k.startswith(fam.checkpoint_prefixes) for k in names):
            return fam
    if any(k.startswith(_TRANSFORMER_TENSORS) for k in names):
        raise InvalidValueError(f"{path} looks like a Flux checkpoint; single-file Flux checkpoints are not "
                                f"supported yet (use a diffusers folder); allowed: SD, SDXL", "model_type",
                                "SD, SDXL")
    raise PipeError(f"cannot tell the model type of {path}: no {' or '.join(f.name for f in FAMILIES[::-1])} "
                    "tensor names found", "model_id")


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline (from its components, not its class name).

    Raises:
        InvalidValueError: a pipeline of no supported family (no UNet, no Flux transformer).
    """
    for fam in FAMILIES:
        if fam.recognises_pipeline(pipe):
            return fam
    raise InvalidValueError(f"pipeline {type(pipe).__name__} has no UNet or Flux transformer; allowed: "
                            f"{_SUPPORTED} pipelines", "pipe", _SUPPORTED)


def family_of_controlnet(config: Mapping[str, Any]) -> Family | None:
    """The family a ControlNet (by its config) belongs to, or None."""
    return next((fam for fam in FAMILIES if fam.recognises_controlnet(config)), None)
