"""Image prompts: reference images that steer a generation through an IP-Adapter.

The pipe classes take ``image_prompts`` (1 to ``spec.MAX_IMAGE_PROMPTS`` images),
``image_prompt_weights`` and ``image_prompt_stop_at`` (one value for all images, or one per image)
on the families that declare ``image_prompts`` (SD, SDXL). The adapter itself is given to the pipe's
constructor (``ip_adapter={"weights": file, "image_encoder": folder}``; the service passes the one
models.yaml configures for the model), as ControlNets are.

How it runs (diffusers' ``IPAdapterMixin``):

- Each image gets its own copy of the adapter, so each has its own weight (diffusers scales an
  adapter as a whole: several images of one adapter would share one weight). The copies are loaded
  into the UNet when a job needs that many, and unloaded when a job has no image prompt.
- The UNet is shared by every pipe class of the model (the model cache): the adapter is loaded into
  the shared UNet, so which adapter and how many copies it holds is kept here per UNet, and every
  ``gen`` puts the UNet in the state its own job needs. A job without image prompts runs on the
  UNet's own attention processors (``unload_ip_adapter``): exactly what it made before any image
  prompt job.
- ``image_prompt_stop_at``: the step-end callback sets an image's scale to 0 once the steps done
  reach its fraction; an adapter of scale 0 is skipped by the attention processor, so the rest of
  the steps run as without it.
- The CLIP image encoder and its image processor are loaded once per UNet (and device, dtype) and
  registered on each pipe object's pipeline as it uses them.
"""
from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import spec as specs
from .errors import InvalidValueError, MissingConditionModelError
from .images import load_image

logger = logging.getLogger(__name__)

#: the setup parameters of image prompts, in the spec's order
PARAMS = tuple(p.name for p in specs.IMAGE_PROMPTING)
IMAGES, WEIGHTS, STOP_AT = PARAMS


@dataclass(frozen=True)
class IPAdapterFiles:
    """An IP-Adapter and the image encoder it reads.

    Attributes:
        weights: the adapter's file (h94/IP-Adapter's single ``.safetensors``/``.bin`` layout).
        image_encoder: a ``CLIPVisionModelWithProjection`` folder; its image processor config
            (``preprocessor_config.json``) is read from it too when there is one.
    """

    weights: Path
    image_encoder: Path

    @classmethod
    def of(cls, value: Any) -> IPAdapterFiles | None:
        """The files of a constructor's ``ip_adapter=``: None, an :class:`IPAdapterFiles`, or a mapping with
        ``weights`` and ``image_encoder`` paths.

        Raises:
            InvalidValueError: anything else, naming ``ip_adapter``.
        """
        if value is None or isinstance(value, IPAdapterFiles):
            return value
        if isinstance(value, dict) and value.get("weights") and value.get("image_encoder"):
            return cls(Path(value["weights"]), Path(value["image_encoder"]))
        raise InvalidValueError(f"ip_adapter must be {{'weights': file, 'image_encoder': folder}}, not {value!r}",
                                "ip_adapter", "{'weights': file, 'image_encoder': folder}")


@dataclass
class _UNetState:
    """What image-prompt machinery one (shared) UNet holds."""

    loaded: tuple[str, int] | None = None  #: (adapter file, copies) loaded into its attention processors
    encoders: dict[tuple[str, str, str], tuple[Any, Any]] | None = None  #: (folder, device, dtype) -> encoder


#: per UNet (shared between the pipe classes of a model); weak, so an evicted model takes its state along
_STATES: weakref.WeakKeyDictionary[Any, _UNetState] = weakref.WeakKeyDictionary()


def _state(unet: Any) -> _UNetState:
    state = _STATES.get(unet)
    if state is None:
        state = _STATES[unet] = _UNetState(encoders={})
    return state


def _per_image(value: Any, count: int, name: str) -> list[float]:
    """One value for all images, or one per image, as a list of ``count``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        return [float(values[0])] * count
    if len(values) != count:
        raise InvalidValueError(f"{name} has {len(values)} values for {count} image prompts; allowed: one value, "
                                f"or one per image ({count})", name, f"one value or {count} values")
    return [float(v) for v in values]


def image_count(params: dict[str, Any]) -> int:
    """How many image prompts ``params`` gives, its weights and stop-at fractions checked against that
    number (torch-free: the service's queue-time checks call it too).

    Raises:
        InvalidValueError: more than ``spec.MAX_IMAGE_PROMPTS`` images, or weights/stop-at lists of
            another length than one or the number of images.
    """
    images = params.get(IMAGES)
    if images is None:
        return 0
    count = len(images) if isinstance(images, (list, tuple)) else 1
    cap = specs.MAX_IMAGE_PROMPTS
    if count > cap:
        raise InvalidValueError(f"{IMAGES}: {count} images; allowed: 1 to {cap}", IMAGES, f"1 to {cap} images")
    for name in (WEIGHTS, STOP_AT):
        if params.get(name) is not None:
            _per_image(params[name], max(count, 1), name)
    return count


def check_params(pipe: Any, params: dict[str, Any]) -> None:
    """Check and normalise the image-prompt parameters of a setup (in place): the images as RGB PIL
    images, the weights and stop-at fractions as one per image.

    Raises:
        MissingConditionModelError: image prompts for a pipe that was given no IP-Adapter.
        InvalidValueError: too many images, or weights/stop-at lists of another length.
        PipeError: an image that does not load (naming ``image_prompts[i]``).
    """
    if IMAGES not in pipe.PARAMS:
        return
    count = image_count(params)
    if not count:
        params[IMAGES] = None
        return
    images = params[IMAGES] if isinstance(params[IMAGES], (list, tuple)) else [params[IMAGES]]
    if pipe.ip_adapter is None:
        raise MissingConditionModelError(
            f"{IMAGES} need an IP-Adapter for {pipe.family.name} models and this pipe was given none; allowed: "
            f"leave {IMAGES} out, or configure one (the service: an `ip_adapter:` entry of type {pipe.family.name} "
            "in models.yaml; the pipe classes: ip_adapter={'weights': file, 'image_encoder': folder})",
            IMAGES, f"leave {IMAGES} out")
    params[IMAGES] = [load_image(im, f"{IMAGES}[{i}]") for i, im in enumerate(images)]
    params[WEIGHTS] = _per_image(params.get(WEIGHTS, specs.IMAGE_PROMPTING[1].default), count, WEIGHTS)
    params[STOP_AT] = _per_image(params.get(STOP_AT, specs.IMAGE_PROMPTING[2].default), count, STOP_AT)


def prepare_call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Put the shared UNet in the state this job needs and add the image prompts to the diffusers call.

    Without image prompts, an adapter another job loaded is unloaded (the UNet's own processors back).
    With them: the encoder registered on the pipeline, one adapter copy per image loaded, each image's
    weight as its copy's scale, and a step-end callback that sets a scale to 0 at the image's stop-at.
    """
    if not pipe.family.image_prompts:
        return kwargs
    diffusers_pipe = pipe.pipe
    images = pipe.params.get(IMAGES)
    if not images:
        unload(diffusers_pipe)
        return kwargs
    files: IPAdapterFiles = pipe.ip_adapter
    encoder, processor = _encoder(diffusers_pipe.unet, files.image_encoder, pipe.device, pipe.dtype)
    _load(diffusers_pipe, files, len(images), (encoder, processor))
    diffusers_pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    weights, stops = list(pipe.params[WEIGHTS]), list(pipe.params[STOP_AT])
    diffusers_pipe.set_ip_adapter_scale(weights)
    kwargs["ip_adapter_image"] = list(images)  # one per adapter copy
    kwargs["callback_on_step_end"] = _stop_hook(weights, stops, kwargs.get("callback_on_step_end"))
    kwargs.setdefault("callback_on_step_end_tensor_inputs", ["latents"])
    return kwargs


def _stop_hook(weights: list[float], stops: list[float], then: Callable[..., dict] | None) -> Callable[..., dict]:
    """A step-end callback that switches each image off once the steps done reach its stop-at fraction:
    step ``i`` (from 0) of ``n`` uses an image while ``i < stop_at * n``, then ``then`` (the pipe's own)."""
    current = list(weights)

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
        total = int(getattr(pipeline, "num_timesteps", 0) or 0)
        if total:
            scales = [w if step + 1 < s * total else 0.0 for w, s in zip(weights, stops)]
            if scales != current:
                pipeline.set_ip_adapter_scale(scales)
                current[:] = scales
        return then(pipeline, step, timestep, tensors) if then is not None else {}

    return on_step_end


def _load(diffusers_pipe: Any, files: IPAdapterFiles, copies: int, encoder: tuple[Any, Any]) -> None:
    """``copies`` copies of the adapter in the shared UNet (replacing what another job loaded); ``encoder``:
    the image encoder and processor, registered before loading (else diffusers would look for its own)."""
    from diffusers.utils import logging as diffusers_logging

    unet = diffusers_pipe.unet
    state = _state(unet)
    want = (str(files.weights), copies)
    if state.loaded == want and getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":
        return
    unload(diffusers_pipe)
    _check_fits(unet, files.weights)
    diffusers_pipe.register_modules(image_encoder=encoder[0], feature_extractor=encoder[1])  # unload dropped them
    folder, name = str(files.weights.parent), files.weights.name
    # diffusers warns of casting modules "that should be kept in float32: []" as it moves the UNet: nothing is cast
    quiet = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        diffusers_pipe.load_ip_adapter([folder] * copies, subfolder=[""] * copies, weight_name=[name] * copies,
                                       image_encoder_folder=None, local_files_only=True)
    finally:
        quiet.setLevel(level)
    state.loaded = want
    logger.info("IP-Adapter %s loaded (%d cop%s)", files.weights.name, copies, "y" if copies == 1 else "ies")


def unload(diffusers_pipe: Any) -> None:
    """The UNet's own attention processors back, when an adapter is loaded into it (from any pipe object)."""
    unet = diffusers_pipe.unet
    state = _STATES.get(unet)
    if state is None or state.loaded is None:
        return
    diffusers_pipe.unload_ip_adapter()
    state.loaded = None


def _check_fits(unet: Any, weights: Path) -> None:
    """Refuse an adapter made for another cross-attention width than the UNet's (before diffusers fails
    deep inside with a shape error).

    Raises:
        MissingConditionModelError: the file is missing, or the widths differ.
    """
    if not weights.is_file():
        raise MissingConditionModelError(f"IP-Adapter file {weights} does not exist: run `multigen models init` for "
                                         "the tiny ones, or correct its models.yaml `ip_adapter:` entry", IMAGES,
                                         "an existing IP-Adapter file")
    width = _adapter_width(weights)
    expected = int(unet.config.cross_attention_dim if not isinstance(unet.config.cross_attention_dim, (list, tuple))
                   else unet.config.cross_attention_dim[0])
    if width is not None and width != expected:
        raise MissingConditionModelError(
            f"IP-Adapter {weights.name} was made for models of cross-attention width {width}, this model's is "
            f"{expected}: configure an IP-Adapter made for this model (models.yaml `ip_adapter:`, `models:`)",
            IMAGES, "an IP-Adapter made for this model")


def _adapter_width(weights: Path) -> int | None:
    """The cross-attention width an adapter file was made for (its first ``to_k_ip`` input), from the
    safetensors header alone; None when it cannot tell (a ``.bin`` file)."""
    if weights.suffix != ".safetensors":
        return None
    with weights.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    shapes = [v["shape"] for k, v in header.items() if k.endswith("to_k_ip.weight")]
    return int(shapes[0][1]) if shapes else None


def _encoder(unet: Any, folder: Path, device: Any, dtype: Any) -> tuple[Any, Any]:
    """The image encoder and its image processor, loaded once per UNet, device and dtype."""
    state = _state(unet)
    key = (str(folder), str(device), str(dtype))
    assert state.encoders is not None
    if key not in state.encoders:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        if not (folder / "config.json").is_file():
            raise MissingConditionModelError(f"IP-Adapter image encoder {folder} is not a model folder (no "
                                             "config.json): run `multigen models init` for the tiny one, or correct "
                                             "its models.yaml `ip_adapter:` entry", IMAGES, "an image encoder folder")
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        encoder = encoder.to(device).eval()
        side = int(encoder.config.image_size)
        if (folder / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        else:  # as diffusers makes one for an adapter whose folder has none
            processor = CLIPImageProcessor(size=side, crop_size=side)
        state.encoders[key] = (encoder, processor)
    return state.encoders[key]


def config_entries(pipe: Any) -> dict[str, Any]:
    """What ``get_config()`` records of the image prompts beyond the parameters: the adapter and encoder."""
    if not pipe.params.get(IMAGES) or pipe.ip_adapter is None:
        return {}
    return {"ip_adapter": str(pipe.ip_adapter.weights), "ip_adapter_image_encoder": str(pipe.ip_adapter.image_encoder)}
