"""Schedulers (samplers) by name: diffusers class names and A1111/Fooocus names, SD-style and flow matching.

``make_scheduler(name, base_config)`` builds a NEW scheduler from the model's scheduler
config (``pipe.scheduler.config``), so every pipe object owns its scheduler and nothing
mutated by one job (``set_timesteps``) leaks into another.

Two tables of names, case-insensitive; the model's own scheduler config says which one applies
(``FlowMatch*`` classes, ``use_flow_sigmas`` or ``prediction_type="flow_prediction"``: flow matching):

- **SD-style** (SD 1.x, SDXL: epsilon or v-prediction over discrete timesteps), :func:`list_schedulers`:
  diffusers class names (``EulerDiscreteScheduler``, ...), that class with the model's config as it
  is; A1111/Fooocus names (``euler``, ``euler_a``, ``dpmpp_2m_karras``, ...) and A1111's display
  names (``"DPM++ 2M Karras"``, ``"Euler a"``): that class with the options that define the sampler
  set explicitly (Karras sigmas on or off, the DPM-Solver algorithm), so a model config that turns
  Karras sigmas on does not change what ``dpmpp_2m`` means.
- **Flow matching** (Flux, Qwen-Image, Z-Image), :data:`FLOW_SCHEDULERS`: the samplers that run with
  every pipeline of those families in diffusers 0.42. Each is built from the model's own config, so
  its ``shift``, dynamic shifting and time-shift type are kept. Their pipelines call
  ``retrieve_timesteps(scheduler, steps, device, sigmas=..., mu=...)`` and, for image-to-image and
  inpainting, ``scheduler.scale_noise``: a scheduler whose ``set_timesteps`` takes no ``sigmas`` or
  ``mu`` or that has no ``scale_noise`` is not offered (checked on the tiny Flux model:
  ``FlowMatchHeunDiscreteScheduler`` takes no sigmas; DPM-Solver++, UniPC and DEIS with
  ``use_flow_sigmas`` run FluxPipeline's text-to-image only, since FluxImg2ImgPipeline passes sigmas
  they refuse and needs ``scale_noise`` they lack).

The two tables share no name, so an SD-style name on a flow-matching model and a flow name on an
SD model are both refused, naming the names that model takes.

Options that SD 1.x and SDXL checkpoints publish in their scheduler config
(``clip_sample=False``, ``set_alpha_to_one=False``, ``skip_prk_steps=True``) are used when the
base config does not set them: a model shipped with an Euler config would otherwise get
DDIM/DDPM defaults (``clip_sample=True``) meant for pixel-space models.

Some schedulers need an optional package: ``lms``/``lms_karras``/``LMSDiscreteScheduler`` and
``flow_euler_beta`` need ``scipy``, ``dpmpp_sde``/``dpmpp_sde_karras``/``DPMSolverSDEScheduler``
need ``torchsde``. They are listed only when the package is installed; asking for one without
it raises ``UnknownSchedulerError`` saying what to install.

Torch-free until a scheduler is built: the model families name :data:`FLOW_SCHEDULERS` without
importing diffusers.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidValueError, UnknownSchedulerError

logger = logging.getLogger(__name__)

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class SchedulerSpec:
    """How a scheduler name is built: a diffusers class, fixed options, needed packages."""

    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class SchedulerTable:
    """One kind of scheduler names (SD-style or flow matching) and how each is built.

    Attributes:
        kind: how messages name this kind (``"SD-style"``, ``"flow-matching"``).
        classes: diffusers class names usable as they are -> the packages each needs.
        named: short names -> their specs.
        aliases: other spellings accepted but not listed -> the name they stand for.
        defaults: options used when the model's config does not set them.
    """

    kind: str
    classes: Mapping[str, tuple[str, ...]]
    named: Mapping[str, SchedulerSpec]
    aliases: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def specs(self) -> dict[str, SchedulerSpec]:
        """Every listed name -> its spec, class names first."""
        out = {cls: SchedulerSpec(cls, {}, req) for cls, req in self.classes.items()}
        out.update(self.named)
        return out

    def listed(self) -> list[str]:
        """The names whose packages are installed."""
        return [name for name, spec in self.specs().items() if not _missing(spec.requires)]

    def find(self, name: Any) -> str | None:
        """The listed name ``name`` stands for (case-insensitive; aliases and display names), or None."""
        if not isinstance(name, str) or not name.strip():
            return None
        by_lower = {k.lower(): k for k in self.specs()}
        key = by_lower.get(name.strip().lower())
        if key is None:
            norm = normalize_name(name)
            norm = self.aliases.get(norm, norm)
            key = by_lower.get(norm) or by_lower.get(norm.replace("_", ""))
        return key


# diffusers classes that run with SD 1.x / SDXL (epsilon or v-prediction, discrete timesteps).
# EDMEulerScheduler is left out: it is for EDM-parameterised models only.
_CLASS_REQUIRES: dict[str, tuple[str, ...]] = {
    "DDIMScheduler": (),
    "DDPMScheduler": (),
    "PNDMScheduler": (),
    "EulerDiscreteScheduler": (),
    "EulerAncestralDiscreteScheduler": (),
    "HeunDiscreteScheduler": (),
    "DPMSolverMultistepScheduler": (),
    "DPMSolverSinglestepScheduler": (),
    "KDPM2DiscreteScheduler": (),
    "KDPM2AncestralDiscreteScheduler": (),
    "DEISMultistepScheduler": (),
    "UniPCMultistepScheduler": (),
    "LCMScheduler": (),
    "TCDScheduler": (),
    "SASolverScheduler": (),
    "LMSDiscreteScheduler": ("scipy",),
    "DPMSolverSDEScheduler": ("torchsde",),
}

_KARRAS_OFF = {"use_karras_sigmas": False}
_KARRAS_ON = {"use_karras_sigmas": True}
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

# A1111 / Fooocus (k-diffusion) sampler names -> diffusers, after the table in the diffusers
# scheduler docs ("A1111/k-diffusion" column).
_NAMED: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", _KARRAS_OFF),
    "euler_karras": SchedulerSpec("EulerDiscreteScheduler", _KARRAS_ON),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", _KARRAS_OFF),
    "heun_karras": SchedulerSpec("HeunDiscreteScheduler", _KARRAS_ON),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler", _KARRAS_OFF),
    "dpm2_karras": SchedulerSpec("KDPM2DiscreteScheduler", _KARRAS_ON),
    "dpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS_OFF),
    "dpm2_a_karras": SchedulerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS_ON),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS_OFF}),
    "dpmpp_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS_ON}),
    "dpmpp_2m_sde": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP_SDE, **_KARRAS_OFF}),
    "dpmpp_2m_sde_karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP_SDE, **_KARRAS_ON}),
    "dpmpp_sde": SchedulerSpec("DPMSolverSDEScheduler", _KARRAS_OFF, ("torchsde",)),
    "dpmpp_sde_karras": SchedulerSpec("DPMSolverSDEScheduler", _KARRAS_ON, ("torchsde",)),
    "lms": SchedulerSpec("LMSDiscreteScheduler", _KARRAS_OFF, ("scipy",)),
    "lms_karras": SchedulerSpec("LMSDiscreteScheduler", _KARRAS_ON, ("scipy",)),
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", _KARRAS_OFF),
    "deis": SchedulerSpec("DEISMultistepScheduler", _KARRAS_OFF),
    "lcm": SchedulerSpec("LCMScheduler"),
    "tcd": SchedulerSpec("TCDScheduler"),
}

# Other spellings accepted but not listed (they build the same scheduler as their target).
_ALIASES: dict[str, str] = {
    "plms": "pndm",  # A1111's name for PNDM without Runge-Kutta warm-up
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",  # Fooocus default (noise drawn on the GPU)
    "dpmpp_2m_sde_gpu_karras": "dpmpp_2m_sde_karras",
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "euler_ancestral": "euler_a",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2_a",
    "k_lms": "lms",
}

# Values SD 1.x / SDXL scheduler configs publish; used when the base config lacks them.
_SD_DEFAULTS: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}

# Flow matching: the classes that run with every Flux / Qwen-Image / Z-Image pipeline (sigmas, mu and
# scale_noise, see the module's docstring), with the model's config as it is ...
_FLOW_CLASSES: dict[str, tuple[str, ...]] = {
    "FlowMatchEulerDiscreteScheduler": (),
    "FlowMatchLCMScheduler": (),
}
# ... and named variants. The sigma conversions exclude each other in diffusers (one at most), so each
# name sets all three: a model config with Karras sigmas on does not change what ``flow_euler`` means.
_FLOW_SIGMAS_OFF = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_FLOW_EULER = {**_FLOW_SIGMAS_OFF, "stochastic_sampling": False}
_FLOW_NAMED: dict[str, SchedulerSpec] = {
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", _FLOW_EULER),
    "flow_euler_karras": SchedulerSpec("FlowMatchEulerDiscreteScheduler", {**_FLOW_EULER, "use_karras_sigmas": True}),
    "flow_euler_exponential": SchedulerSpec("FlowMatchEulerDiscreteScheduler",
                                            {**_FLOW_EULER, "use_exponential_sigmas": True}),
    "flow_euler_beta": SchedulerSpec("FlowMatchEulerDiscreteScheduler", {**_FLOW_EULER, "use_beta_sigmas": True},
                                     ("scipy",)),
    # fresh noise mixed in at every step (from the job's seed: see _JobSeededNoise)
    "flow_euler_stochastic": SchedulerSpec("FlowMatchEulerDiscreteScheduler",
                                           {**_FLOW_SIGMAS_OFF, "stochastic_sampling": True}),
    # latent consistency: predicts the clean image and re-noises it at every step; for few-step models
    "flow_lcm": SchedulerSpec("FlowMatchLCMScheduler", _FLOW_SIGMAS_OFF),
}

SD_TABLE = SchedulerTable("SD-style", _CLASS_REQUIRES, _NAMED, _ALIASES, _SD_DEFAULTS)
FLOW_TABLE = SchedulerTable("flow-matching", _FLOW_CLASSES, _FLOW_NAMED)
#: every flow-matching scheduler name, installed or not (a family's ``schedulers=``; the lists the API
#: shows leave out those whose package is missing)
FLOW_SCHEDULERS: tuple[str, ...] = tuple(FLOW_TABLE.specs())


def normalize_name(name: str) -> str:
    """Canonical spelling: lower case, ``++`` -> ``pp``, other separators -> ``_``.

    ``"DPM++ 2M Karras"`` -> ``"dpmpp_2m_karras"``; ``"Euler a"`` -> ``"euler_a"``.
    """
    text = name.strip().lower().replace("++", "pp")
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _missing(requires: tuple[str, ...]) -> list[str]:
    return [p for p in requires if not _installed(p)]


def list_schedulers() -> list[str]:
    """The SD-style names ``make_scheduler`` takes for SD 1.x/SDXL models, whose packages are installed.

    Returns:
        diffusers class names, then A1111/Fooocus names (display names such as
        ``"DPM++ 2M Karras"`` and the aliases ``plms``, ``dpmpp_2m_sde_gpu``, ``k_euler``...
        are accepted as well but not listed).
    """
    return SD_TABLE.listed()


def list_flow_schedulers() -> list[str]:
    """The flow-matching names (:data:`FLOW_SCHEDULERS`) whose packages are installed."""
    return FLOW_TABLE.listed()


def family_schedulers(allowed: tuple[str, ...] | None) -> list[str]:
    """The scheduler names a family takes, installed ones only.

    Args:
        allowed: the family's ``Family.schedulers`` (None: every SD-style scheduler).
    """
    if allowed is None:
        return list_schedulers()
    installed = set(list_schedulers()) | set(list_flow_schedulers())
    return [name for name in allowed if name in installed]


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a model's scheduler config is a flow-matching one (its flow-matching names apply)."""
    return (str(config.get("_class_name", "")).startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def table_for(config: Mapping[str, Any]) -> SchedulerTable:
    """The names that apply to a model, from its scheduler config."""
    return FLOW_TABLE if is_flow_config(config) else SD_TABLE


def resolve_name(name: Any, table: SchedulerTable = SD_TABLE) -> str:
    """The registry name ``name`` stands for in ``table`` (case-insensitive; aliases and A1111 display names work).

    Raises:
        UnknownSchedulerError: an unknown name, or one whose package is not installed (listing the allowed).
    """
    return _lookup(name, table)[0]


def check_for_family(name: Any, allowed: tuple[str, ...] | None, family: str) -> str:
    """The registry name of ``name`` when the family may use it.

    Args:
        name: the requested scheduler (any spelling ``make_scheduler`` takes).
        allowed: the family's ``Family.schedulers`` (None: every SD-style scheduler; ``()``: none).
        family: the family's name, for messages.

    Raises:
        UnknownSchedulerError: a name of no table, or one whose package is missing (listing the family's).
        InvalidValueError: a known name the family cannot take (an SD-style one on a flow-matching
            family, or the reverse), naming the ones it takes.
    """
    names = family_schedulers(allowed)
    shown = ", ".join(names) or "leave it out (the model's own scheduler)"
    key = SD_TABLE.find(name) or FLOW_TABLE.find(name)
    if key is None:
        raise UnknownSchedulerError(f"Unknown value for 'scheduler': {name!r}. Allowed for {family} models "
                                    f"(case-insensitive): {shown}.", param="scheduler", allowed=shown)
    takes = key in SD_TABLE.specs() if allowed is None else key in allowed
    if not takes:
        kind = (SD_TABLE if key in SD_TABLE.specs() else FLOW_TABLE).kind
        raise InvalidValueError(f"scheduler {name!r} ({kind}) is not supported for {family} models; allowed: "
                                f"{shown}", "scheduler", shown)
    _lookup(key, FLOW_TABLE if key in FLOW_TABLE.specs() else SD_TABLE)  # a package it needs is installed
    return key


def _lookup(name: Any, table: SchedulerTable) -> tuple[str, SchedulerSpec]:
    key = table.find(name)
    if key is None:
        raise _unknown(name, table)
    spec = table.specs()[key]
    missing = _missing(spec.requires)
    if missing:
        allowed = ", ".join(table.listed())
        raise UnknownSchedulerError(
            f"Scheduler {name!r} (parameter 'scheduler') needs the Python package "
            f"{', '.join(missing)}, which is not installed (pip install {' '.join(missing)}). "
            f"Allowed: {allowed}.",
            param="scheduler", allowed=allowed)
    return key, spec


def _unknown(name: Any, table: SchedulerTable) -> UnknownSchedulerError:
    allowed = ", ".join(table.listed())
    other = FLOW_TABLE if table is SD_TABLE else SD_TABLE
    hint = (f" {name!r} is one of the {other.kind} schedulers; this model's scheduler is {table.kind}."
            if other.find(name) else "")
    display = "; A1111 display names such as 'DPM++ 2M Karras' work too" if table is SD_TABLE else ""
    return UnknownSchedulerError(
        f"Unknown value for 'scheduler': {name!r}.{hint} Allowed (case-insensitive{display}): {allowed}.",
        param="scheduler", allowed=allowed)


class _JobSeededNoise:
    """Mixed into the flow-matching scheduler classes: the noise their ``step`` draws (stochastic
    sampling, LCM's re-noising) comes from the job's seed.

    Flux, Qwen-Image and Z-Image call ``scheduler.step`` without a generator, so that noise would come
    from torch's global generator and a seed would not give the same image again. The pipes set
    ``noise_sampler_seed`` (as for DPM++ SDE) before every call; setting it starts one generator per
    image, from the seed mixed with a constant so that it does not repeat the initial latent noise.
    """

    #: mixed into each seed: the step noise must not be the very noise the latents started from
    NOISE_SEED_MIX = 0x5EED_F10E
    # class-level until a seed is set: no __init__ of its own, since diffusers reads a scheduler's
    # config keys from the signature of its class's __init__
    _seed: int | list[int] | None = None
    _generators: tuple[Any, ...] = ()

    @property
    def noise_sampler_seed(self) -> int | list[int] | None:
        return self._seed

    @noise_sampler_seed.setter
    def noise_sampler_seed(self, seed: int | list[int] | None) -> None:
        import torch

        self._seed = seed
        seeds = [] if seed is None else list(seed) if isinstance(seed, (list, tuple)) else [seed]
        self._generators = tuple(torch.Generator("cpu").manual_seed(int(s) ^ self.NOISE_SEED_MIX) for s in seeds)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("generator") is None and self._generators:
            kwargs["generator"] = list(self._generators) if len(self._generators) > 1 else self._generators[0]
        return super().step(*args, **kwargs)  # type: ignore[misc]


@functools.lru_cache(maxsize=None)
def _job_seeded(cls: type) -> type:
    """``cls`` with :class:`_JobSeededNoise` mixed in, under the same name and module (configs, metadata
    and diffusers' component checks see the diffusers class)."""
    return type(cls.__name__, (_JobSeededNoise, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def make_scheduler(name: str, base_config: dict, timestep_spacing: str | None = None) -> Any:
    """Build a new scheduler by name from a model's scheduler config.

    Args:
        name: A name of the model's table (``list_schedulers()`` for SD-style configs, ``FLOW_SCHEDULERS``
            for flow-matching ones), an A1111 display name or an alias.
        base_config: The model's scheduler config (e.g. ``pipe.scheduler.config``).
        timestep_spacing: ``leading``, ``linspace`` or ``trailing``; None keeps the config's.

    Returns:
        A new diffusers scheduler instance.

    Raises:
        UnknownSchedulerError: For an unknown name, a name of the other table, or one whose package is missing.
        InvalidValueError: For a timestep_spacing that is not allowed.
    """
    import diffusers

    table = table_for(base_config)
    key, spec = _lookup(name, table)
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise InvalidValueError(
            f"Invalid value for 'timestep_spacing': {timestep_spacing!r}. "
            f"Allowed: {', '.join(TIMESTEP_SPACINGS)}.",
            param="timestep_spacing", allowed=", ".join(TIMESTEP_SPACINGS))
    cls = getattr(diffusers, spec.class_name)
    if table is FLOW_TABLE:
        cls = _job_seeded(cls)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = dict(base_config)
    options: dict[str, Any] = {k: v for k, v in table.defaults.items() if k in accepted and k not in config}
    options.update({k: v for k, v in spec.options.items() if k in accepted})
    if timestep_spacing is not None:
        if "timestep_spacing" in accepted:
            options["timestep_spacing"] = timestep_spacing
        else:
            logger.warning("scheduler %s has no timestep_spacing option; %r ignored", key, timestep_spacing)
    scheduler = cls.from_config(config, **options)
    logger.debug("scheduler %r -> %s %s", name, spec.class_name, options)
    return scheduler
