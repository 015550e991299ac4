"""Schedulers (samplers) by name: diffusers class names and A1111/Fooocus names.

``make_scheduler(name, base_config)`` builds a NEW scheduler from the model's scheduler
config (``pipe.scheduler.config``), so every pipe object owns its scheduler and nothing
mutated by one job (``set_timesteps``) leaks into another.

Names, case-insensitive:

- diffusers class names (``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``, ...):
  that class with the model's config as it is;
- A1111/Fooocus names (``euler``, ``euler_a``, ``dpmpp_2m_karras``, ...) and A1111's display
  names (``"DPM++ 2M Karras"``, ``"Euler a"``): that class with the options that define
  the sampler set explicitly (Karras sigmas on or off, the DPM-Solver algorithm), so a
  model config that turns Karras sigmas on does not change what ``dpmpp_2m`` means.

Options that SD 1.x and SDXL checkpoints publish in their scheduler config
(``clip_sample=False``, ``set_alpha_to_one=False``, ``skip_prk_steps=True``) are used when the
base config does not set them: a model shipped with an Euler config would otherwise get
DDIM/DDPM defaults (``clip_sample=True``) meant for pixel-space models.

Some schedulers need an optional package: ``lms``/``lms_karras``/``LMSDiscreteScheduler``
need ``scipy``, ``dpmpp_sde``/``dpmpp_sde_karras``/``DPMSolverSDEScheduler`` need
``torchsde``. They are listed only when the package is installed; asking for one without
it raises ``UnknownSchedulerError`` saying what to install.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import diffusers

from .errors import InvalidValueError, UnknownSchedulerError

logger = logging.getLogger(__name__)

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class SchedulerSpec:
    """How a scheduler name is built: a diffusers class, fixed options, needed packages."""

    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()


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


def _all_specs() -> dict[str, SchedulerSpec]:
    """Every known name (listed ones) -> spec, class names first."""
    specs = {cls: SchedulerSpec(cls, {}, req) for cls, req in _CLASS_REQUIRES.items()}
    specs.update(_NAMED)
    return specs


def list_schedulers() -> list[str]:
    """Names accepted by ``make_scheduler`` whose packages are installed.

    Returns:
        diffusers class names, then A1111/Fooocus names (display names such as
        ``"DPM++ 2M Karras"`` and the aliases ``plms``, ``dpmpp_2m_sde_gpu``, ``k_euler``...
        are accepted as well but not listed).
    """
    return [name for name, spec in _all_specs().items() if not _missing(spec.requires)]


def resolve_name(name: Any) -> str:
    """The registry name ``name`` stands for (case-insensitive; aliases and A1111 display names work).

    Raises:
        UnknownSchedulerError: an unknown name, or one whose package is not installed (listing the allowed).
    """
    return _lookup(name)[0]


def _lookup(name: str) -> tuple[str, SchedulerSpec]:
    if not isinstance(name, str) or not name.strip():
        raise _unknown(name)
    specs = _all_specs()
    by_lower = {k.lower(): k for k in specs}
    key = by_lower.get(name.strip().lower())
    if key is None:
        norm = normalize_name(name)
        norm = _ALIASES.get(norm, norm)
        key = by_lower.get(norm) or by_lower.get(norm.replace("_", ""))
    if key is None:
        raise _unknown(name)
    spec = specs[key]
    missing = _missing(spec.requires)
    if missing:
        allowed = ", ".join(list_schedulers())
        raise UnknownSchedulerError(
            f"Scheduler {name!r} (parameter 'scheduler') needs the Python package "
            f"{', '.join(missing)}, which is not installed (pip install {' '.join(missing)}). "
            f"Allowed: {allowed}.",
            param="scheduler", allowed=allowed)
    return key, spec


def _unknown(name: Any) -> UnknownSchedulerError:
    allowed = ", ".join(list_schedulers())
    return UnknownSchedulerError(
        f"Unknown value for 'scheduler': {name!r}. Allowed (case-insensitive; A1111 display "
        f"names such as 'DPM++ 2M Karras' work too): {allowed}.",
        param="scheduler", allowed=allowed)


def make_scheduler(name: str, base_config: dict, timestep_spacing: str | None = None) -> Any:
    """Build a new scheduler by name from a model's scheduler config.

    Args:
        name: A name from ``list_schedulers()``, an A1111 display name or an alias.
        base_config: The model's scheduler config (e.g. ``pipe.scheduler.config``).
        timestep_spacing: ``leading``, ``linspace`` or ``trailing``; None keeps the config's.

    Returns:
        A new diffusers scheduler instance.

    Raises:
        UnknownSchedulerError: For an unknown name, or one whose package is missing.
        InvalidValueError: For a timestep_spacing that is not allowed.
    """
    key, spec = _lookup(name)
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise InvalidValueError(
            f"Invalid value for 'timestep_spacing': {timestep_spacing!r}. "
            f"Allowed: {', '.join(TIMESTEP_SPACINGS)}.",
            param="timestep_spacing", allowed=", ".join(TIMESTEP_SPACINGS))
    cls = getattr(diffusers, spec.class_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = dict(base_config)
    options: dict[str, Any] = {k: v for k, v in _SD_DEFAULTS.items() if k in accepted and k not in config}
    options.update({k: v for k, v in spec.options.items() if k in accepted})
    if timestep_spacing is not None:
        if "timestep_spacing" in accepted:
            options["timestep_spacing"] = timestep_spacing
        else:
            logger.warning("scheduler %s has no timestep_spacing option; %r ignored", key, timestep_spacing)
    scheduler = cls.from_config(config, **options)
    logger.debug("scheduler %r -> %s %s", name, spec.class_name, options)
    return scheduler

