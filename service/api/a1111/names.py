"""A1111's sampler and scheduler names, mapped to multigen's scheduler names per model family.

A1111 splits what diffusers calls a scheduler into a *sampler* (``"DPM++ 2M"``) and a noise
*schedule* (``"Karras"``). SD and SDXL models run the k-diffusion style schedulers of
``pipes/schedulers.py`` (``dpmpp_2m``, ``dpmpp_2m_karras``...); Flux, Qwen-Image and Z-Image run
flow-matching ones (``flow_euler``, ``flow_euler_karras``...), so there every Euler-like sampler
maps to ``flow_euler`` with the schedule as its sigma variant. A combination with no scheduler here
is refused (422 naming ``sampler_name`` or ``scheduler``) rather than silently replaced.
"""
from __future__ import annotations

from multigen.pipes import list_schedulers
from multigen.pipes.schedulers import list_flow_schedulers

#: A1111 sampler name -> multigen's SD-style base name (before a schedule suffix)
SAMPLERS: dict[str, str] = {
    "DPM++ 2M": "dpmpp_2m", "DPM++ SDE": "dpmpp_sde", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "Euler a": "euler_a", "Euler": "euler", "LMS": "lms", "Heun": "heun", "DPM2": "dpm2",
    "DPM2 a": "dpm2_a", "DDIM": "ddim", "DDPM": "ddpm", "PLMS": "pndm", "UniPC": "unipc", "LCM": "lcm",
    "DEIS": "deis",
}
#: A1111's aliases of those names (its ``aliases`` lists, and the k-diffusion function names)
SAMPLER_ALIASES: dict[str, str] = {
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_euler_a": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun", "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a", "ddim": "DDIM", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
}
#: A1111 schedule name (its ``name`` and ``label``) -> the suffix of our name; "" = the sampler's own
SCHEDULES: dict[str, str] = {"automatic": "", "uniform": "", "karras": "_karras", "exponential": "_exponential",
                             "beta": "_beta"}
#: A1111's schedulers as ``GET /sdapi/v1/schedulers`` lists them: (name, label)
SCHEDULE_LABELS = (("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
                   ("exponential", "Exponential"), ("beta", "Beta"))
#: samplers that run on flow-matching models: Euler (and LCM for few-step models)
FLOW_SAMPLERS: dict[str, str] = {"Euler": "flow_euler", "Euler a": "flow_euler_stochastic", "LCM": "flow_lcm"}
#: A1111's default sampler
DEFAULT_SAMPLER = "Euler a"


class UnknownName(ValueError):
    """A sampler or schedule that has no scheduler here; ``field`` names the request field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def canonical_sampler(name: str | None) -> str:
    """A1111's own spelling of a sampler name (any case, aliases, a legacy ``" Karras"`` suffix kept).

    Raises:
        UnknownName: unknown (field ``sampler_name``).
    """
    raw = (name or DEFAULT_SAMPLER).strip()
    by_lower = {k.lower(): k for k in SAMPLERS} | {k.lower(): v for k, v in SAMPLER_ALIASES.items()}
    for suffix in ("", " karras", " exponential"):
        base = raw.lower()[: len(raw) - len(suffix)] if suffix and raw.lower().endswith(suffix) else raw.lower()
        if (not suffix or raw.lower().endswith(suffix)) and base in by_lower:
            return by_lower[base] + (suffix.title() if suffix else "")
    raise UnknownName(f"unknown sampler_name {raw!r}; known: {', '.join(SAMPLERS)}", "sampler_name")


def to_scheduler(sampler_name: str | None, scheduler: str | None, flow: bool) -> str:
    """multigen's scheduler name for an A1111 sampler and schedule.

    Args:
        sampler_name: A1111's (``"DPM++ 2M"``, ``"DPM++ 2M Karras"``; None: ``"Euler a"``).
        scheduler: A1111's schedule (``"Karras"``, ``"automatic"``; None: automatic).
        flow: the model runs flow-matching schedulers (Flux, Qwen-Image, Z-Image).

    Raises:
        UnknownName: an unknown sampler (``sampler_name``) or schedule (``scheduler``), or a pair
            with no scheduler for this model family.
    """
    sampler = canonical_sampler(sampler_name)
    schedule = (scheduler or "automatic").strip().lower()
    for legacy in (" Karras", " Exponential"):
        if sampler.endswith(legacy):
            sampler, schedule = sampler[: -len(legacy)], legacy.strip().lower()
    if schedule not in SCHEDULES:
        raise UnknownName(f"unknown scheduler {scheduler!r}; known: {', '.join(n for _, n in SCHEDULE_LABELS)}",
                           "scheduler")
    if flow:
        base = FLOW_SAMPLERS.get(sampler)
        if base is None:
            raise UnknownName(f"sampler_name {sampler!r} does not run on flow-matching models (Flux, Qwen-Image, "
                               f"Z-Image); use one of: {', '.join(FLOW_SAMPLERS)}", "sampler_name")
        name = base + SCHEDULES[schedule] if base == "flow_euler" else base
        if SCHEDULES[schedule] and name not in list_flow_schedulers():
            raise UnknownName(f"scheduler {scheduler!r} does not combine with {sampler!r} on this model",
                               "scheduler")
        return name
    name = SAMPLERS[sampler] + SCHEDULES[schedule]
    if name not in list_schedulers():
        field = "sampler_name" if SAMPLERS[sampler] not in list_schedulers() else "scheduler"
        raise UnknownName(f"{sampler!r} with scheduler {scheduler or 'automatic'!r} has no scheduler here "
                           f"(or its package is missing); try Automatic or Karras", field)
    return name


def from_scheduler(name: str | None) -> tuple[str, str]:
    """A1111's ``(sampler_name, scheduler label)`` for one of our scheduler names (for infotexts)."""
    if not name:  # the model's own scheduler ("Default" is read back as that)
        return "Default", "Automatic"
    labels = dict(SCHEDULE_LABELS)
    if name.startswith("flow_"):
        for sampler, base in FLOW_SAMPLERS.items():
            if name == base:
                return sampler, "Automatic"
        suffix = name.removeprefix("flow_euler_")
        return "Euler", labels.get(suffix, "Automatic")
    for suffix, label in (("_karras", "Karras"), ("", "Automatic")):
        base = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
        if (not suffix or name.endswith(suffix)) and base in SAMPLERS.values():
            return next(k for k, v in SAMPLERS.items() if v == base), label
    return name, "Automatic"


def listed_samplers() -> list[dict[str, object]]:
    """``GET /sdapi/v1/samplers``: those whose scheduler is installed, in A1111's shape."""
    installed = set(list_schedulers())
    aliases: dict[str, list[str]] = {}
    for alias, name in SAMPLER_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    return [{"name": name, "aliases": aliases.get(name, []), "options": {}}
            for name, ours in SAMPLERS.items() if ours in installed]


def listed_schedules() -> list[dict[str, object]]:
    """``GET /sdapi/v1/schedulers`` in A1111's shape."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1.0, "need_inner_model": False}
            for name, label in SCHEDULE_LABELS]
