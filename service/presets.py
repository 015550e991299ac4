"""Performance presets and aspect ratios: two job parameters that fill in the others.

``performance`` names a preset of the model's family (``speed``, ``quality``, ``extreme_speed``,
``lightning``, ``hyper_sd``...; built-in ones in ``defaults/presets.yaml``, the users' in config.yaml's
``presets:``). A preset sets steps, scheduler, guidance (and what else it lists) where the job does not
give them, and may name a speed LoRA (a models.yaml ``lora``) that is added to the session's LoRAs for
this job only (the job's ``job_loras``). The order, first wins: the job's own values, the preset's, the
model's models.yaml ``defaults:``, its family's defaults.

``aspect_ratio`` (``"16:9"``) becomes width and height at admission, so the cost estimate is right: the
size of the family's trained list (``Family.aspect_sizes``) whose ratio is nearest (in log space; a tie
goes to the larger size, then the earlier one), scaled to the model's own size when its models.yaml
``defaults:`` declare one. A job's own width and height win; with only one of them, the other follows
the ratio, rounded to the family's size multiple.

Both are resolved by :func:`apply_job_presets` (admission.py); the runner takes ``performance``,
``performance_note``, ``aspect_ratio`` and ``job_loras`` out of the params before ``setup``.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multigen.pipes import spec as specs
from multigen.pipes.errors import PipeError
from multigen.pipes.families import FAMILIES, Family
from multigen.pipes.upscale import UPSCALE_MODES

from .errors import ConfigError, InvalidInput

#: the built-in presets, per family
BUILTIN_FILE = Path(__file__).resolve().parent / "defaults" / "presets.yaml"
#: the setup parameters a preset may set (each checked by its spec declaration and the family)
PRESET_PARAMS: tuple[specs.Param, ...] = tuple(
    next(p for p in specs.COMMON if p.name == n)
    for n in ("steps", "guidance_scale", "scheduler", "timestep_spacing", "true_cfg_scale"))
#: the keys of a preset beyond those parameters
PRESET_KEYS = ("description", "lora")
#: a preset's name: letters, digits and ``_`` (``Extreme Speed`` and ``extreme-speed`` are ``extreme_speed``)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}$")
#: ``16:9``, ``16x9``, ``16×9``, ``16*9``, ``1.85:1`` (declared with the parameter)
RATIO_RE = re.compile(specs.ASPECT_RATIO_PATTERN)
#: the widest and the tallest ratio a job may ask for (declared with the parameter)
MAX_RATIO = float(specs.MAX_ASPECT_RATIO)
#: the smallest side a scaled size may have (the spec's minimum width and height)
MIN_SIDE = next(p for p in specs.COMMON if p.name == "width").minimum


def preset_name(text: str) -> str:
    """The canonical spelling of a preset name: lower case, spaces and ``-`` as ``_``."""
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


@dataclass(frozen=True)
class Preset:
    """One preset of one family: the setup parameters it sets and its speed LoRA (``{name, weight}``)."""

    name: str
    family: str
    values: Mapping[str, Any]
    description: str = ""
    lora: Mapping[str, Any] | None = None
    source: str = "builtin"

    def lora_problem(self, loras: Mapping[str, Any], fam: Family) -> str | None:
        """Why the preset's LoRA cannot be used with ``loras`` (models.yaml's ``lora`` entries); None: it can."""
        if self.lora is None:
            return None
        name = self.lora["name"]
        if not fam.supports_loras:
            return f"{fam.name} models take no LoRAs"
        entry = loras.get(name)
        if entry is None:
            return f"LoRA {name!r} is not configured (add it under `lora:` in models.yaml)"
        if entry.type and entry.type != fam.name:
            return f"LoRA {name!r} is for {entry.type} models, not {fam.name}"
        return None

    def describe(self, loras: Mapping[str, Any]) -> dict[str, Any]:
        """The preset as ``GET /api/v1/presets`` lists it (``loras``: models.yaml's, to say if its LoRA is usable)."""
        out: dict[str, Any] = {"family": self.family, "name": self.name, "description": self.description,
                               "sets": dict(self.values), "lora": None, "source": self.source}
        if self.lora is not None:
            problem = self.lora_problem(loras, _family(self.family))
            out["lora"] = {**self.lora, "configured": problem is None, "note": problem}
        return out


@dataclass
class PresetLibrary:
    """The presets of every family: ``{family name: {preset name: Preset}}``, in declaration order."""

    by_family: dict[str, dict[str, Preset]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Preset]:
        for presets in self.by_family.values():
            yield from presets.values()

    def names(self, family: str) -> list[str]:
        return list(self.by_family.get(family, {}))

    def get(self, family: str, name: str) -> Preset | None:
        return self.by_family.get(family, {}).get(preset_name(name))

    def check(self, name: Any, fam: Family | None) -> Preset:
        """The preset ``name`` of family ``fam``.

        Raises:
            InvalidInput: naming ``performance`` and the presets of the family.
        """
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput(f"performance must be a preset name, got {name!r}; GET /api/v1/presets lists them",
                               field="performance")
        if fam is None:
            raise InvalidInput("performance: the model's family is not known before it loads, so no preset "
                               "applies; declare its `type:` in models.yaml or set steps and guidance_scale",
                               field="performance")
        preset = self.get(fam.name, name)
        if preset is None:
            known = ", ".join(self.names(fam.name)) or "none"
            raise InvalidInput(f"unknown performance preset {name!r} for {fam.name} models; known: {known} "
                               "(GET /api/v1/presets)", field="performance", code="unknown_preset")
        return preset

    def describe(self, loras: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [p.describe(loras) for p in self]


def _family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


# ---- reading -----------------------------------------------------------------------------------------------
def _builtin_data() -> dict[str, Any]:
    return yaml.safe_load(BUILTIN_FILE.read_text()) or {}


def _read_preset(fam: Family, name: str, data: Any, base: Preset | None, loras: Mapping[str, Any] | None,
                 file: str, where: str, source: str) -> Preset:
    """One preset, checked (``base``: the built-in it overrides, key by key)."""
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {data!r}",
                          "write the preset's keys: steps, guidance_scale, scheduler, lora...")
    allowed = [p.name for p in PRESET_PARAMS] + list(PRESET_KEYS)
    for key in data:
        if key not in allowed:
            raise ConfigError(file, f"{where}.{key}", "unknown key", f"use one of: {', '.join(allowed)}")
    values = dict(base.values) if base is not None else {}
    lora = base.lora if base is not None else None
    description = base.description if base is not None else ""
    for param in PRESET_PARAMS:
        if param.name not in data:
            continue
        if data[param.name] is None:  # a user's null drops the built-in's value
            values.pop(param.name, None)
            continue
        try:
            values[param.name] = param.check(data[param.name])
        except PipeError as e:
            raise ConfigError(file, f"{where}.{param.name}", e.message, f"use {param.allowed()}") from None
    try:
        fam.check_params(values)
    except PipeError as e:
        raise ConfigError(file, f"{where}.{e.param or 'scheduler'}", e.message,
                          f"use a value {fam.name} models take") from None
    if "description" in data:
        if not isinstance(data["description"], str):
            raise ConfigError(file, f"{where}.description", f"expected a string, got {data['description']!r}",
                              "write one line saying what the preset does")
        description = data["description"]
    if "lora" in data:
        lora = _read_lora(fam, data["lora"], loras, file, f"{where}.lora")
    return Preset(name, fam.name, values, description, lora, source)


def _read_lora(fam: Family, data: Any, loras: Mapping[str, Any] | None, file: str,
               where: str) -> Mapping[str, Any] | None:
    """A preset's ``lora``: ``{name, weight}`` or a name; the users' must be configured and of the family."""
    if data is None:
        return None
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or set(data) - {"name", "weight"}:
        raise ConfigError(file, where, f"expected {{name, weight}}, got {data!r}",
                          "write `lora: {name: <a models.yaml lora>, weight: 1.0}`")
    try:
        weight = specs.LORA_WEIGHT.check(data.get("weight", specs.LORA_WEIGHT.default))
    except PipeError as e:
        raise ConfigError(file, f"{where}.weight", e.message, f"use {specs.LORA_WEIGHT.allowed()}") from None
    out = {"name": data["name"], "weight": float(weight)}
    if loras is not None:  # the users' presets: their LoRA must exist and suit the family now, not at a job
        problem = Preset("x", fam.name, {}, lora=out).lora_problem(loras, fam)
        if problem is not None:
            known = ", ".join(sorted(n for n, e in loras.items() if e.type in (None, fam.name))) or "none"
            raise ConfigError(file, f"{where}.name", problem, f"name one of the {fam.name} LoRAs: {known}")
    return out


@functools.lru_cache(maxsize=1)
def builtin_presets() -> PresetLibrary:
    """The built-in presets alone (read once), for callers given no config's library."""
    return load_presets(None)


def load_presets(section: Any = None, loras: Mapping[str, Any] | None = None,
                 file: Path | str | None = None) -> PresetLibrary:
    """The built-in presets with config.yaml's ``presets:`` section on top.

    Args:
        section: ``{family: {preset name: {key: value}}}`` (None: the built-ins only); a user preset with
            a built-in's name overrides it key by key (``null`` drops a key), others are added.
        loras: models.yaml's ``lora`` entries (a user preset's LoRA is checked against them).
        file: config.yaml, named in errors.

    Raises:
        ConfigError: naming the file and the key (``presets.SDXL.turbo.steps``) and the fix.
    """
    families = {f.name: f for f in FAMILIES[::-1]}
    lib = PresetLibrary({name: {} for name in families})
    builtin = str(BUILTIN_FILE)
    for fam_name, presets in _builtin_data().items():
        fam = families[fam_name]
        for name, data in presets.items():
            lib.by_family[fam_name][name] = _read_preset(fam, name, data, None, None, builtin,
                                                         f"{fam_name}.{name}", "builtin")
    if section is None:
        return lib
    where_file = str(file or "config.yaml")
    if not isinstance(section, dict):
        raise ConfigError(where_file, "presets", f"expected a mapping, got {section!r}",
                          "write `presets:` then a model family (SDXL:) then `name: {steps: 8, ...}`")
    for fam_key, presets in section.items():
        fam = next((f for n, f in families.items() if n.lower() == str(fam_key).lower()), None)
        if fam is None:
            raise ConfigError(where_file, f"presets.{fam_key}", "unknown model family",
                              f"use one of: {', '.join(families)}")
        if not isinstance(presets, dict):
            raise ConfigError(where_file, f"presets.{fam_key}", f"expected a mapping, got {presets!r}",
                              "write `name: {steps: 8, guidance_scale: 1.0, ...}` entries")
        for raw_name, data in presets.items():
            name = preset_name(str(raw_name))
            where = f"presets.{fam_key}.{raw_name}"
            if not NAME_RE.match(name):
                raise ConfigError(where_file, where, "not a preset name",
                                  "use 1-40 letters, digits and _ (spaces and - count as _)")
            base = lib.by_family[fam.name].get(name)
            lib.by_family[fam.name][name] = _read_preset(fam, name, data, base, loras or {}, where_file, where,
                                                         "user")
    return lib


# ---- aspect ratios -----------------------------------------------------------------------------------------
def parse_ratio(text: Any) -> tuple[float, float]:
    """``"16:9"`` (also ``16x9``, ``16×9``, ``16*9``, ``1.85:1``) as ``(16.0, 9.0)``.

    Raises:
        InvalidInput: naming ``aspect_ratio`` and the form and range it takes.
    """
    m = RATIO_RE.match(text) if isinstance(text, str) else None
    w, h = (float(m.group(1)), float(m.group(2))) if m else (0.0, 0.0)
    if not m or w <= 0 or h <= 0 or not 1 / MAX_RATIO <= w / h <= MAX_RATIO:
        raise InvalidInput(f"aspect_ratio {text!r} is not allowed: write width:height like \"16:9\" (or 16x9), "
                           f"from 1:{MAX_RATIO:g} to {MAX_RATIO:g}:1", field="aspect_ratio")
    return w, h


def ratio_text(w: float, h: float) -> str:
    return f"{w:g}:{h:g}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def nearest_size(ratio: float, fam: Family, own_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The family's trained size nearest to ``ratio`` (width / height), compared in log space; a tie goes
    to the larger size, then the earlier one. ``own_size``: the model's declared size, to which the family's
    list is scaled (by area, each side rounded to the family's size multiple; the shorter side at least
    the spec's minimum, 64 px, the ratio kept)."""
    sizes = fam.aspect_sizes
    w, h = min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - math.log(ratio)), 9), -s[0] * s[1],
                                     sizes.index(s)))
    if own_size is None or tuple(own_size) == tuple(sizes[0]):
        return w, h
    scale = math.sqrt(own_size[0] * own_size[1] / (sizes[0][0] * sizes[0][1]))
    scale = max(scale, MIN_SIDE / min(w, h))
    return _round(w * scale, fam.size_multiple), _round(h * scale, fam.size_multiple)


def resolve_size(text: Any, fam: Family | None, width: Any, height: Any,
                 own_size: tuple[int, int] | None = None) -> tuple[str, int | None, int | None]:
    """``aspect_ratio`` with the job's width and height: ``(canonical ratio, width, height)``.

    Both sides given: they win. One given: the other follows the ratio (rounded to the family's size
    multiple, 8 for a family unknown until the model loads). None: :func:`nearest_size`.

    Raises:
        InvalidInput: a bad ratio, or a model with no trained sizes to pick from.
    """
    rw, rh = parse_ratio(text)
    ratio = rw / rh
    multiple = fam.size_multiple if fam is not None else 8
    if (width is not None and height is not None) or not all(_number(x) for x in (width, height) if x is not None):
        return ratio_text(rw, rh), width, height  # both given, or a bad one (the setup checks name it)
    if width is not None:
        return ratio_text(rw, rh), width, _round(width / ratio, multiple)
    if height is not None:
        return ratio_text(rw, rh), _round(height * ratio, multiple), height
    if fam is None:
        raise InvalidInput("aspect_ratio: the model's family is not known before it loads, so it has no trained "
                           "sizes to pick from; give width or height with it, or declare the model's `type:` in "
                           "models.yaml", field="aspect_ratio")
    if not fam.aspect_sizes:
        raise InvalidInput(f"aspect_ratio: {fam.name} models list no trained sizes to pick from; give width or "
                           "height with it", field="aspect_ratio")
    w, h = nearest_size(ratio, fam, own_size)
    return ratio_text(rw, rh), w, h


# ---- a job -------------------------------------------------------------------------------------------------
def apply_job_presets(params: dict[str, Any], presets: PresetLibrary, fam: Family | None,
                      model_defaults: Mapping[str, Any], loras: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve a job's ``performance`` and ``aspect_ratio`` (taken out of ``params``) into ``params``.

    Args:
        params: the job's setup parameters, ``performance`` and ``aspect_ratio`` among them; the preset's
            values and the resolved width/height are filled in where the job left them out.
        presets: the config's library.
        fam: the model's family (None: unknown until it loads).
        model_defaults: the model's models.yaml ``defaults:`` (its declared width and height scale the sizes).
        loras: models.yaml's ``lora`` entries.

    Returns:
        the job-level entries to store with the job's params: ``performance`` (the preset's name),
        ``performance_note`` (why its LoRA was not used), ``aspect_ratio`` and ``job_loras`` (the preset's
        LoRA); empty when the job named neither.

    Raises:
        InvalidInput: naming ``performance`` or ``aspect_ratio``.
    """
    out: dict[str, Any] = {}
    name, ratio = params.pop("performance", None), params.pop("aspect_ratio", None)
    if name is not None:
        preset = presets.check(name, fam)
        assert fam is not None  # check() refuses a preset for an unknown family
        for key, value in preset.values.items():
            params.setdefault(key, value)
        out["performance"] = preset.name
        problem = preset.lora_problem(loras, fam)
        if preset.lora is not None and problem is None:
            out["job_loras"] = [dict(preset.lora)]
        elif problem is not None:
            out["performance_note"] = f"the preset's LoRA was not used: {problem}"
    if ratio is not None and params.get("uov") in UPSCALE_MODES:
        raise InvalidInput(f"aspect_ratio does not apply with uov {params['uov']}: an upscale's size is its input's x "
                           "upscale_factor (its aspect ratio is the input's); leave aspect_ratio out, or crop the "
                           "input to the ratio first", field="aspect_ratio")
    if ratio is not None:
        own = model_defaults.get("width"), model_defaults.get("height")
        text, width, height = resolve_size(ratio, fam, params.get("width"), params.get("height"),
                                           (int(own[0]), int(own[1])) if all(own) else None)
        params["width"], params["height"] = width, height
        out["aspect_ratio"] = text
    return out
