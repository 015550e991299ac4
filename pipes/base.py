"""``BasePipe``: what every pipe class shares (loading or sharing a base, setup, gen, config).

A pipe object wraps one diffusers pipeline built with ``from_pipe`` from a base pipeline
(shared weights) and owns its scheduler. ``setup(**params)`` validates and stores the
parameters; ``gen(inputs)`` runs the diffusers pipeline and returns PIL images;
``get_config()`` records everything that changes pixels.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from typing import Any, Callable, ClassVar, Iterator

import torch
from PIL import Image

from . import ip_adapter as image_prompts
from . import lora as lora_mod
from . import quality
from . import spec as specs
from .errors import Cancelled, InvalidValueError, UnknownParameterError
from .families import Family, Role, family
from .imagelist import ImageList
from .loading import ModelType, check_declared_type, dtype_name, load_base, pipeline_type
from .memory import execution_device

logger = logging.getLogger(__name__)

#: images with more pixels than this are decoded with VAE tiling when ``vae_tiling`` is None
VAE_TILING_PIXELS = specs.VAE_TILING_PIXELS
#: the spec's bounds, for readers of the old names
MAX_STEPS = specs.STEPS.maximum
MAX_CLIP_SKIP = specs.CLIP_SKIP.maximum

StepCallback = Callable[[int, int, torch.Tensor], Any]


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning about casting modules "that should be kept in float32: []"
    (from_pipe and ``.to(dtype)`` emit it even when nothing is cast)."""
    from diffusers.utils import logging as dlog

    log = dlog.get_logger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _make_scheduler(name: str | None, config: dict[str, Any], spacing: str | None) -> Any:
    if name is None:  # the model's own scheduler class, fresh object
        from diffusers import schedulers as dsched

        cls = getattr(dsched, config["_class_name"])
        cfg = dict(config)
        if spacing:
            cfg["timestep_spacing"] = spacing
        return cls.from_config(cfg)
    from . import schedulers

    return schedulers.make_scheduler(name, config, timestep_spacing=spacing)


class BasePipe:
    """Common machinery of the pipe classes (not used directly).

    Args:
        model_id: a diffusers folder or a single-file checkpoint; ignored when ``pipe`` is given
            (except as the recorded model name).
        pipe: a base diffusers pipeline from ``load_base`` (as the model cache holds it); its
            weights are shared, the scheduler is not.
        model_type: declared type; a disagreement with the weights raises ``ModelTypeMismatchError``.
        device: device to load onto (default: CUDA if available, else CPU); ignored with ``pipe``.
        dtype: precision (default ``loading.default_dtype``); ignored with ``pipe``.
        config_dir: local config folder for single-file checkpoints.
        controlnets: ControlNet paths or models (ControlNet pipes only).
        ctypes: condition types (``CIm2ImPipe`` only).
        condition_models: paths of the models of model-based conditions (``CIm2ImPipe`` only).
        ip_adapter: ``{"weights": file, "image_encoder": folder}``, the IP-Adapter of ``image_prompts``.
    """

    #: the parameters ``setup`` takes: names, types, ranges, defaults (spec.py); a subclass sets its own
    SPEC: ClassVar[specs.PipeSpec] = specs.PipeSpec(specs.COMMON, classname="BasePipe")
    #: names ``setup`` accepts (from ``SPEC``)
    PARAMS: ClassVar[tuple[str, ...]] = SPEC.names
    #: aliases accepted by ``setup``, metafusion's names (from ``SPEC``)
    ALIASES: ClassVar[dict[str, str]] = dict(SPEC.aliases)
    #: what this pipe class does; the model's family names the diffusers class for it
    ROLE: ClassVar[Role] = Role.TEXT2IMAGE

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # PARAMS and ALIASES follow the spec: tests, fakes and metafusion code read them
        cls.PARAMS = cls.SPEC.names
        cls.ALIASES = dict(cls.SPEC.aliases)

    def __init__(self, model_id: str | os.PathLike[str] | None = None, *, pipe: Any = None,
                 model_type: ModelType | str | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, config_dir: str | os.PathLike[str] | None = None,
                 controlnets: Any = None, ctypes: Any = None, condition_models: dict[str, Any] | None = None,
                 ip_adapter: Any = None) -> None:
        if pipe is None:
            if model_id is None:
                raise InvalidValueError("model_id or pipe is required", "model_id", "a model path or pipe=")
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            base, found = load_base(model_id, model_type, config_dir, device, dtype)
        else:
            base = pipe
            found = check_declared_type(pipeline_type(pipe), model_type, str(model_id or type(pipe).__name__))
        family(found).check_role(self.ROLE)
        self.base = base
        self.model_type: ModelType = found
        self.model_id = str(model_id) if model_id is not None else str(base.config.get("_name_or_path") or "")
        denoiser = getattr(base, self.family.denoiser)  # the UNet or the transformer
        self.device = execution_device(base, denoiser)  # the GPU an offloaded base computes on
        self.dtype = denoiser.dtype
        self.ip_adapter = image_prompts.IPAdapterFiles.of(ip_adapter)  # image prompts (ip_adapter.py)
        self._init_extra(controlnets=controlnets, ctypes=ctypes, condition_models=condition_models)
        self._scheduler_config = dict(base.scheduler.config)
        self.pipe = self._build_pipeline(base, _make_scheduler(None, self._scheduler_config, None))
        self.pipe.set_progress_bar_config(disable=True)
        self._loras: list[lora_mod.LoraSpec] = []
        self.params: dict[str, Any] = {}
        self._last_inputs: dict[str, Any] = {}
        self._warnings: list[str] = []
        self._is_setup = False

    # ---- construction hooks -------------------------------------------------------------
    def _init_extra(self, **kwargs: Any) -> None:
        """Subclass hook for constructor extras (ControlNets, condition types)."""
        for key, value in kwargs.items():
            if value:
                raise InvalidValueError(f"{key} is not accepted by {type(self).__name__}", key,
                                        "only ControlNet pipes take it")

    @property
    def family(self) -> Family:
        """The model family (classes, preview factors, ControlNet defaults) of this pipe's model."""
        return family(self.model_type)

    def _pipeline_class(self, role: Role | None = None) -> type:
        return self.family.pipeline_class(role or self.ROLE, self.base)  # the model's variant may have its own

    def _build_pipeline(self, base: Any, scheduler: Any, role: Role | None = None, **extra: Any) -> Any:
        cls = self._pipeline_class(role)
        extra = {**self.family.role_components(base, role or self.ROLE), **extra}  # e.g. Qwen-Image-Edit's processor
        # dtype must be given: from_pipe casts the (shared) modules to fp32 otherwise
        with quiet_diffusers():
            return cls.from_pipe(base, scheduler=scheduler, dtype=self.dtype, **extra)

    # ---- setup ------------------------------------------------------------------------------
    def default_params(self) -> dict[str, Any]:
        """Defaults of every parameter: the spec's, the family's own (its model variant's: Flux.1 Fill's), and
        the native size of the model."""
        native = self.family.native_size(self.base)
        own = {k: v for k, v in self.family.model_defaults(self.base).items() if k in self.PARAMS}
        return {**self.SPEC.defaults(), **own, "width": native, "height": native}

    def padded(self, side: int) -> int:
        """``side`` rounded up to the family's size multiple (8 for SD/SDXL, 16 for Flux)."""
        multiple = self.family.size_multiple
        return int(math.ceil(side / multiple) * multiple)

    def setup(self, *args: Any, **params: Any) -> None:
        """Validate and store generation parameters (replacing earlier ones).

        Args:
            *args: image pipes accept the input image (or its path) positionally, as metafusion.
            **params: names from ``PARAMS`` (and ``ALIASES``).

        Raises:
            UnknownParameterError: a name that this pipe does not accept.
            PipeError: a subclass naming the bad parameter and the allowed values.
        """
        if args:
            if len(args) > 1 or "image" not in self.PARAMS:
                raise InvalidValueError(f"{type(self).__name__}.setup takes keyword parameters only; allowed: "
                                        f"{', '.join(self.PARAMS)}", None, ", ".join(self.PARAMS))
            params.setdefault("image", args[0])
        for alias, name in self.ALIASES.items():
            if alias in params:
                value = params.pop(alias)
                if params.get(name) is None:
                    params[name] = value
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise UnknownParameterError(
                f"{type(self).__name__}.setup does not accept {', '.join(unknown)}; allowed: "
                f"{', '.join(self.PARAMS)}", unknown[0], ", ".join(self.PARAMS))
        merged = self.default_params()
        merged.update({k: v for k, v in params.items() if v is not None})
        # all or nothing: _setup_inputs stores preprocessed images (and ControlNet pipes may rebuild their
        # pipeline) before later checks can fail; a failed setup puts the previous one back
        saved = dict(self.__dict__)
        try:
            self._validate_common(merged)
            self._setup_inputs(merged, params)
            scheduler = _make_scheduler(merged["scheduler"], self._scheduler_config, merged["timestep_spacing"])
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        self.pipe.scheduler = scheduler
        self.params = merged
        self._is_setup = True

    def _validate_common(self, p: dict[str, Any]) -> None:
        """Type and range of every parameter that is not an image, as the spec declares them; what
        relates parameters to each other (strength and steps, one scale per ControlNet) is the
        subclasses' ``_setup_inputs``."""
        for param in self.SPEC:
            if not param.image and param.name in p:
                p[param.name] = param.check(p[param.name])
        self._check_family_params(p)
        image_prompts.check_params(self, p)

    def _check_family_params(self, p: dict[str, Any]) -> None:
        """Refuse parameters the model's family cannot honour (rather than ignore them silently); the
        service's queue-time checks ask the family the same (``Family.check_params``)."""
        self.family.check_params(p, self.base)

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        """Subclass hook: validate and preprocess pipe-specific parameters and images."""

    # ---- LoRAs --------------------------------------------------------------------------------
    def set_loras(self, loras: Any) -> None:
        """Activate exactly ``loras`` (``[(path, weight), ...]``) on the shared modules.

        Files not loaded yet are loaded; ``[]`` disables every adapter. Never fuses.

        Raises:
            InvalidValueError: LoRAs for a family that has no LoRA support yet (Flux).
        """
        if not self.family.supports_loras:
            if lora_mod.normalize(loras):
                raise InvalidValueError(f"LoRAs are not supported for {self.family.name} models yet; allowed: "
                                        "no loras", "loras", "no loras")
            self._loras = []
            return
        self._loras = lora_mod.set_loras(self.pipe, loras)

    def unload_loras(self, paths: Any = None) -> None:
        """Delete LoRA adapters (all when ``paths`` is None) from the shared modules."""
        if not self.family.supports_loras:
            return  # nothing can have been loaded
        lora_mod.unload_loras(self.pipe, paths)
        self._loras = list(lora_mod.active_state(self.pipe) or ())

    @property
    def loras(self) -> list[lora_mod.LoraSpec]:
        """The LoRAs this pipe object runs with."""
        return list(self._loras)

    # ---- gen ------------------------------------------------------------------------------------
    def _generators(self, inputs: dict[str, Any]) -> tuple[Any, list[int] | None]:
        gen = inputs.get("generator")
        if gen is not None:
            return gen, None
        seed = inputs.get("seed")
        if seed is None:
            seed = int(torch.randint(0, specs.DRAWN_SEED_MAX, (1,)).item())
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        for s in seeds:
            if not isinstance(s, numbers.Integral):  # 7.0 is no seed here, though the spec takes it as 7
                raise InvalidValueError(f"seed must be {specs.SEEDS.allowed()}, not {s!r}", "seed",
                                        specs.SEEDS.allowed())
        seeds = [specs.SEEDS.check(s, "seed") for s in seeds]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return (gens if isinstance(seed, (list, tuple)) else gens[0]), seeds

    def _prompt_kwargs(self, prompt: str, negative_prompt: str | None) -> dict[str, Any]:
        fam = self.family
        unused = fam.negative_unused(self.params) if negative_prompt and fam.negative_prompts else None
        if unused:  # settings under which the pipeline would drop it silently (guidance off)
            self._warn(f"the negative prompt is not used by {fam.name} models {unused}")
            negative_prompt = None
        if not fam.negative_prompts and negative_prompt:
            self._warn(f"the negative prompt is not used by {fam.name} models")
            negative_prompt = None
        if fam.encode_prompt is not None:
            return fam.encode_prompt(self, prompt, negative_prompt)
        if not fam.weighted_prompts:
            # diffusers encodes the plain text; with lpw on, the weighting syntax is stripped so that
            # "(red:1.3)" reads as "red", not as brackets and digits, and the job says so
            kwargs: dict[str, Any] = {"prompt": self._stripped(prompt)}
            if negative_prompt:
                kwargs["negative_prompt"] = self._stripped(negative_prompt)
            return kwargs
        clip_skip = self.params["clip_skip"]
        from .prompting import encode_prompts

        # lpw off: diffusers' own encoding (no weights, truncated at 77 tokens), through our encoder,
        # because diffusers 0.42's clip_skip path expects the text_model attribute transformers 5 dropped
        plain = {} if self.params["lpw"] else {"parse_weights": False, "max_chunks": 1}
        return encode_prompts(self.pipe, prompt, negative_prompt, self.model_type, clip_skip=clip_skip,
                              device=self.device, **plain)

    def _stripped(self, text: str) -> str:
        """``text`` without the weighting syntax (with ``lpw`` on), and a warning when there was some."""
        from .prompting import strip_weighting

        if not self.params["lpw"]:
            return text
        plain = strip_weighting(text)
        if plain != text:
            self._warn(f"prompt weighting is not applied on {self.family.name} models: the syntax was removed")
        return plain

    def _warn(self, message: str) -> None:
        """Record something the last ``gen`` could not honour (``get_config()["warnings"]``)."""
        if message not in self._warnings:
            logger.info("%s: %s", type(self).__name__, message)
            self._warnings.append(message)

    @property
    def warnings(self) -> list[str]:
        """What the last ``gen`` could not honour as asked (prompt weighting removed, ...)."""
        return list(self._warnings)

    def warn(self, message: str) -> None:
        """``_warn`` for the family prompt encoders (a prompt cut at ``max_sequence_length``, ...)."""
        self._warn(message)

    def _call_kwargs(self) -> dict[str, Any]:
        """Subclass hook: the size/image arguments of the diffusers call."""
        return {"width": self.padded(self.params["width"]), "height": self.padded(self.params["height"])}

    def _postprocess(self, images: list[Image.Image]) -> list[Image.Image]:
        """Subclass hook: crop padding, composite onto the original."""
        size = (self.params["width"], self.params["height"])
        return [im if im.size == size else im.crop((0, 0, *size)) for im in images]

    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images ``gen`` returns with the current setup."""
        return self.params["width"], self.params["height"]

    def _vae_tiling(self) -> bool:
        flag = self.params.get("vae_tiling")
        if flag is None:
            w, h = self.output_size()
            return self.padded(w) * self.padded(h) > VAE_TILING_PIXELS
        return bool(flag)

    def gen(self, inputs: dict[str, Any]) -> ImageList:
        """Generate images.

        Args:
            inputs: ``prompt``, ``negative_prompt``, ``seed`` (int, or a list for a batch) or
                ``generator``; optional ``callback(step, steps, latents)`` called after every
                step and ``cancel()`` checked before every step end (True raises ``Cancelled``).

        Returns:
            A list of PIL images (one per seed); a list of one image also stands for that image
            (``pipe.gen(...).save(path)`` works, as in metafusion).

        Raises:
            Cancelled: ``cancel()`` returned True; nothing is returned.
        """
        if not self._is_setup:
            self.setup()
        if self.family.supports_loras and tuple(self._loras) != lora_mod.active_state(self.pipe):
            lora_mod.set_loras(self.pipe, self._loras)  # another pipe object changed the shared set
        callback: StepCallback | None = inputs.get("callback")
        cancel: Callable[[], bool] | None = inputs.get("cancel")
        if cancel is not None and cancel():
            raise Cancelled("cancelled before the first step")
        prompt = inputs.get("prompt") or ""
        negative = inputs.get("negative_prompt") or ""
        generator, seeds = self._generators(inputs)
        batch = len(generator) if isinstance(generator, list) else 1
        self._warnings = []
        kwargs = self._call_kwargs()
        # the family's own parameters (true_cfg_scale, max_sequence_length) go to diffusers by name
        kwargs.update({name: self.params[name] for name in self.family.params if self.params.get(name) is not None})
        # an empty negative prompt is None to the encoder: SDXL models with force_zeros_for_empty_prompt
        # then use zero embeddings, as diffusers does
        kwargs.update(self._prompt_kwargs(prompt, negative or None))
        kwargs.update(num_inference_steps=self.params["steps"], guidance_scale=self.params["guidance_scale"],
                      generator=generator, num_images_per_prompt=batch, output_type="pil")
        kwargs = self.family.finish_call(self, kwargs)  # Qwen-Image: guidance_scale goes as true_cfg_scale
        if callback is not None or cancel is not None:
            kwargs["callback_on_step_end"] = self._step_hook(callback, cancel, self._latents_view(kwargs))
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        kwargs = image_prompts.prepare_call(self, kwargs)  # the shared UNet's IP-Adapter: loaded or not
        self.pipe.vae.use_tiling = self._vae_tiling()
        self._seed_noise_sampler(generator)
        self._last_inputs = {"prompt": prompt, "negative_prompt": negative, "batch_size": batch,
                             "seed": None if seeds is None else (seeds if batch > 1 or isinstance(
                                 inputs.get("seed"), (list, tuple)) else seeds[0])}
        with torch.inference_mode():
            images = self._denoise(kwargs, callback, cancel)
        return ImageList(self._postprocess(images))

    def _denoise(self, kwargs: dict[str, Any], callback: StepCallback | None, cancel: Any) -> list[Any]:
        """The diffusers call under the job's quality switches (quality.py); Prompt2ImPipe adds the refiner."""
        with quality.applied(self.pipe, quality.QualitySettings.of(self.params, self.family.quality_params),
                             kwargs) as call:
            return self.pipe(**call).images

    def _seed_noise_sampler(self, generator: Any) -> None:
        """SDE schedulers (DPM++ SDE) draw their Brownian noise from their own seed, by default a
        random one: seed it from the job's generators so that a seed gives the same image again."""
        if hasattr(self.pipe.scheduler, "noise_sampler_seed"):
            seeds = [g.initial_seed() for g in (generator if isinstance(generator, list) else [generator])]
            self.pipe.scheduler.noise_sampler_seed = seeds if isinstance(generator, list) else seeds[0]

    def _latents_view(self, call_kwargs: dict[str, Any]) -> Callable[[Any, Any], Any]:
        """``(pipeline, latents) -> [b, c, h, w]`` latents for the step callback (Flux unpacks its patches)."""
        fam = self.family
        height = call_kwargs.get("height") or self.padded(self.output_size()[1])
        width = call_kwargs.get("width") or self.padded(self.output_size()[0])
        return lambda pipe, latents: fam.step_latents(pipe, latents, height, width)

    @staticmethod
    def _step_hook(callback: StepCallback | None, cancel: Callable[[], bool] | None,
                   latents_view: Callable[[Any, Any], Any] = lambda pipe, latents: latents
                   ) -> Callable[..., dict]:
        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled after step {step + 1}")
            if callback is not None:
                callback(step + 1, int(getattr(pipe, "num_timesteps", 0) or 0),
                         latents_view(pipe, tensors.get("latents")))
            return {}

        return on_step_end

    # ---- config ----------------------------------------------------------------------------------
    def _param_for_config(self, name: str, value: Any) -> Any:
        if isinstance(value, Image.Image):
            return f"<image {value.size[0]}x{value.size[1]}>"
        if isinstance(value, (list, tuple)):
            return [self._param_for_config(name, v) for v in value]
        if isinstance(value, os.PathLike):
            return str(value)
        return value

    def get_config(self) -> dict[str, Any]:
        """Everything that changes pixels, JSON-serializable.

        Model, type, dtype, device type, torch thread count, batch size, scheduler, every
        setup parameter, LoRAs with weights, and the prompt and seed of the last ``gen``.
        """
        import diffusers

        params = self.params or self.default_params()
        cfg: dict[str, Any] = {
            "pipe": type(self).__name__,
            "model_id": self.model_id,
            "model_type": self.model_type.value,
            "dtype": dtype_name(self.dtype),
            "device_type": self.device.type,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "scheduler": type(self.pipe.scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(self.pipe.scheduler.config).items()
                                 if not k.startswith("_")},
            "loras": [[p, w] for p, w in self._loras],
            "batch_size": self._last_inputs.get("batch_size", 1),
        }
        for name, value in params.items():
            cfg[name] = self._param_for_config(name, value)
        cfg["scheduler"] = params.get("scheduler") or type(self.pipe.scheduler).__name__
        cfg["scheduler_class"] = type(self.pipe.scheduler).__name__
        cfg["vae_tiling"] = self._vae_tiling() if self.params else params.get("vae_tiling")
        for key in ("prompt", "negative_prompt", "seed"):
            if key in self._last_inputs:
                cfg[key] = self._last_inputs[key]
        if self._warnings:
            cfg["warnings"] = list(self._warnings)
        cfg.update(image_prompts.config_entries(self))
        cfg.update(self._extra_config())
        return cfg

    def _extra_config(self) -> dict[str, Any]:
        """Subclass hook: more config entries (source image paths, ControlNets)."""
        return {}
