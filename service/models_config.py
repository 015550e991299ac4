"""Loading and checking ``models.yaml``: base models, LoRAs, ControlNets and pipes.

metafusion's keys (``base``, ``lora``, ``pipes``) are read as they are, plus ``controlnet``; a base
model may set ``type``, ``config`` (single files), ``defaults`` and its memory options (``dtype``,
``quantize``, ``offload``). Model ids are relative to config.yaml's ``model_dir``. Every problem is a
:class:`ConfigError` naming the file, the key and the fix, raised at start-up rather than at the
first job; what the model's family refuses in ``defaults`` is refused here too.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multigen.pipes.errors import PipeError  # torch-free
from multigen.pipes.families import ModelType, family, family_of_folder, native_size_of_folder  # torch-free
from multigen.pipes import spec  # torch-free
from multigen.pipes.registry import pipe_names  # torch-free

from .errors import ConfigError
from .yamlfields import mapping_at, read_yaml

#: the precisions a ``dtype`` may name (config.yaml's and a model's)
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
#: the model families a models.yaml ``type:`` may name
MODEL_TYPES = tuple(m.value for m in ModelType)


#: models that travel with the package: ``id: builtin:NAME`` in models.yaml
BUILTIN_MODELS = {"demo": ("demo", "model")}


#: what a model's ``defaults:`` may set: these parameters of the spec, checked by it (and by the model's family)
MODEL_DEFAULTS = ("width", "height", "steps", "guidance_scale", "clip_skip", "scheduler", "timestep_spacing",
                  "true_cfg_scale", "max_sequence_length",
                  # quality switches (pipes/quality.py); refiner_switch on a model with a `refiner:`
                  "freeu", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "sharpness", "guidance_rescale",
                  "refiner_switch")


#: a base model's memory options in models.yaml and the values each takes (``multigen.pipes.memory``)
MEMORY_OPTIONS = spec.MEMORY_OPTIONS


#: the pipe classes a models.yaml pipe may name (the pipes' registry, torch-free)
KNOWN_PIPE_CLASSES = pipe_names()


@dataclass
class ModelEntry:
    """One entry of ``base``, ``lora`` or ``controlnet`` in models.yaml."""

    name: str
    path: Path
    type: str | None = None
    config: Path | None = None  # local diffusers config folder for single-file checkpoints
    extra: dict[str, Any] = field(default_factory=dict)
    #: generation defaults of this model (base models only), under the job's own parameters
    defaults: dict[str, Any] = field(default_factory=dict)
    #: this model's precision (a ``DTYPE_NAMES`` name), over config.yaml's ``dtype``; None: the worker's
    dtype: str | None = None
    #: weight quantization (base models only): ``none``, ``int8`` or ``fp8``
    quantize: str = "none"
    #: CPU offload to a GPU (base models only): ``none``, ``model`` or ``sequential``
    offload: str = "none"
    #: the base model that refines this one (``refiner_switch``; base models of a family that can refine)
    refiner: str | None = None

    @property
    def config_folder(self) -> Path | None:
        """The diffusers folder holding the model's configs: its own folder, or a single file's ``config``."""
        return self.path if self.path.is_dir() else self.config

    def native_size(self) -> tuple[int, int] | None:
        """The size the model was trained at: ``defaults`` width/height, else read from its folder's configs.

        A diffusers folder tells it without loading weights: its family reads it from the configs
        (SD/SDXL: UNet ``sample_size`` times the VAE's down-sampling; Flux: 128 latent pixels times
        it); a single-file checkpoint does through its ``config`` folder. None when unknown.
        """
        if self.defaults.get("width") and self.defaults.get("height"):
            return int(self.defaults["width"]), int(self.defaults["height"])
        folder = self.config_folder
        if folder is None:
            return None
        side = native_size_of_folder(folder)
        return None if side is None else (side, side)


@dataclass
class PipeEntry:
    name: str
    classname: str
    title: str
    need_imgs: bool = False
    needs_cnet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelsConfig:
    file: Path
    base: dict[str, ModelEntry]
    lora: dict[str, ModelEntry]
    controlnet: dict[str, ModelEntry]
    pipes: dict[str, PipeEntry]
    #: IP-Adapters (image prompts): ``path`` the adapter file, ``extra["image_encoder"]`` its encoder's folder
    #: (resolved), ``extra["models"]`` the base models it is limited to (empty: every model of its type)
    ip_adapter: dict[str, ModelEntry] = field(default_factory=dict)
    #: upscaler models (``uov`` upscale, pipes/upscale.py): ``path`` an ESRGAN-family file spandrel loads
    upscaler: dict[str, ModelEntry] = field(default_factory=dict)

    @functools.cached_property
    def path_names(self) -> dict[str, str]:
        """Each listed model's resolved path -> its name (how image metadata names models)."""
        return {str(e.path.resolve()): name for section in (self.ip_adapter, self.controlnet, self.lora, self.base)
                for name, e in section.items()}


def _model_entries(data: dict, section: str, file: Path, model_dir: Path,
                   require_type: bool) -> dict[str, ModelEntry]:
    out = {}
    for name, entry in mapping_at(data, section, file).items():
        key = f"{section}.{name}"
        if isinstance(entry, str):
            entry = {"id": entry}
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(str(file), key, "entry has no `id`",
                              "give `id:` a path relative to model_dir (a diffusers folder or a .safetensors file)")
        mtype = entry.get("type")
        try:
            mtype = ModelType.parse(mtype).value if mtype is not None else None  # "qwen-image" too
        except PipeError:
            raise ConfigError(str(file), f"{key}.type", f"unknown model type {mtype!r}",
                              f"use one of {', '.join(MODEL_TYPES)} or leave it out to detect it") from None
        path = _model_path(str(entry["id"]), model_dir, file, f"{key}.id")
        cfg = entry.get("config")
        defaults = _model_defaults(entry.get("defaults"), file, f"{key}.defaults") if section == "base" else {}
        _check_family_defaults(mtype, path, defaults, file, f"{key}.defaults")
        memory = _memory_options(entry, section, file, key)
        refiner = entry.get("refiner")
        if refiner is not None and (section != "base" or not isinstance(refiner, str)):
            raise ConfigError(str(file), f"{key}.refiner", f"bad refiner {refiner!r}",
                              "name another base model (base models only): `refiner: <model name>`")
        out[str(name)] = ModelEntry(
            name=str(name), path=path, type=str(mtype).upper() if mtype else None,
            config=(model_dir / str(cfg)).resolve() if cfg else None, defaults=defaults, **memory, refiner=refiner,
            extra={k: v for k, v in entry.items()
                   if k not in ("id", "type", "config", "defaults", "dtype", "refiner", *MEMORY_OPTIONS)})
    return out


def _memory_options(entry: dict, section: str, file: Path, key: str) -> dict[str, Any]:
    """A models.yaml entry's ``dtype``, ``quantize`` and ``offload``, checked (base models only).

    YAML reads ``off``, ``no`` and ``false`` as false: for ``quantize`` and ``offload`` that is ``none``.
    """
    given = [k for k in ("dtype", *MEMORY_OPTIONS) if entry.get(k) is not None]
    if section != "base":
        if given:
            raise ConfigError(str(file), f"{key}.{given[0]}", f"{given[0]} applies to base models only",
                              f"remove it: a {section} entry takes the precision and memory options of the base "
                              "model it is used with")
        return {}
    out: dict[str, Any] = {}
    dtype = entry.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower().replace("torch.", "") not in DTYPE_NAMES:
            raise ConfigError(str(file), f"{key}.dtype", f"unknown dtype {dtype!r}",
                              f"use one of {', '.join(DTYPE_NAMES)}, or leave it out for config.yaml's dtype")
        out["dtype"] = dtype.lower().replace("torch.", "")
    for option, allowed in MEMORY_OPTIONS.items():
        value = entry.get(option)
        if value is None or value is False:
            continue
        if not isinstance(value, str) or value.strip().lower() not in allowed:
            raise ConfigError(str(file), f"{key}.{option}", f"unknown {option} {value!r}",
                              f"use one of: {', '.join(allowed)}")
        out[option] = value.strip().lower()
    return out


def check_memory_devices(models: ModelsConfig, devices: str | list[str], config_file: Path | None = None) -> None:
    """Fail when a base model's ``quantize`` or ``offload`` cannot run on one of the workers' devices.

    Every worker may run every model, so each option must suit every device: fp8 needs CUDA GPUs of
    compute capability 8.9 or more, offload needs GPUs, quantization needs torchao. Resolves
    ``devices`` (and imports torch) only when some model sets an option.

    Raises:
        ConfigError: naming models.yaml, the model's field, the bad value, the device and the fix.
    """
    chosen = [e for e in models.base.values() if e.quantize != "none" or e.offload != "none"]
    if not chosen:
        return
    from multigen.pipes.memory import check_memory_options

    from .devices import resolve_devices

    resolved = resolve_devices(devices, config_file)
    for entry in chosen:
        for device in resolved:
            try:
                check_memory_options(entry.quantize, entry.offload, device, entry.name)
            except PipeError as e:
                raise ConfigError(str(models.file), f"base.{entry.name}.{e.param}", e.message,
                                  f"set {e.param} to {' or '.join((e.allowed or 'none').split(', '))} for this model "
                                  f"(the server's devices: {', '.join(resolved)})") from None


def builtin_model_path(name: str) -> Path:
    """The folder of a model that travels with the package (``builtin:demo``)."""
    spec = importlib.util.find_spec("multigen.pipes")  # imports the namespace only, not torch
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("multigen.pipes is not installed")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*BUILTIN_MODELS[name]).resolve()


def _model_path(model_id: str, model_dir: Path, file: Path, key: str) -> Path:
    if model_id.startswith("builtin:"):
        name = model_id.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ConfigError(str(file), key, f"unknown built-in model {name!r}",
                              f"use one of: {', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
        return builtin_model_path(name)
    return (model_dir / model_id).resolve()


def _check_family_defaults(mtype: str | None, path: Path, defaults: dict[str, Any], file: Path, key: str) -> None:
    """Refuse ``defaults:`` the model's family refuses (a scheduler it cannot run, ``clip_skip`` on Flux),
    as the pipes and the queue-time checks would, when the family is known without loading weights."""
    if not defaults:
        return
    try:
        fam = family(mtype) if mtype else family_of_folder(path) if path.is_dir() else None
    except PipeError:
        return  # not a folder of a known family: the pipe checks when it loads
    if fam is None:
        return
    try:
        fam.check_params(defaults)
    except PipeError as e:
        raise ConfigError(str(file), f"{key}.{e.param}", str(e), f"give {e.param} {e.allowed}") from None


def check_refiners(base: dict[str, ModelEntry], file: Path) -> None:
    """A base model's ``refiner:`` names another base model of its family, a family whose pipes take
    ``refiner_switch`` (``Family.quality_params``: SDXL), in a diffusers folder; ``defaults: {refiner_switch}``
    needs one.

    Raises:
        ConfigError: naming ``base.<model>.refiner`` (or the default) and the fix.
    """
    from multigen.pipes.families import FAMILIES

    takers = ", ".join(f.name for f in FAMILIES if "refiner_switch" in f.quality_params)
    for entry in base.values():
        key = f"base.{entry.name}.refiner"
        if entry.refiner is None:
            if entry.defaults.get("refiner_switch") is not None:
                raise ConfigError(str(file), f"base.{entry.name}.defaults.refiner_switch", "the model has no refiner",
                                  "add `refiner: <model name>` to the entry, or remove the default")
            continue
        other = base.get(entry.refiner)
        if other is None or other is entry:
            raise ConfigError(str(file), key, f"unknown refiner {entry.refiner!r}", "name another base model: "
                              + ", ".join(n for n in base if n != entry.name))
        fam, refiner_fam = _entry_family(entry), _entry_family(other)
        if fam is None or "refiner_switch" not in fam.quality_params:
            raise ConfigError(str(file), key, f"{entry.name} is a {fam.name if fam else 'model of unknown type'}"
                              " model, which takes no refiner", f"remove it (model types that take one: {takers}; "
                              "declare `type:` where it is not detected)")
        if refiner_fam is not fam:
            raise ConfigError(str(file), key, f"refiner {other.name} is a "
                              f"{refiner_fam.name if refiner_fam else 'model of unknown type'} model, not {fam.name}",
                              f"name a {fam.name} refiner (declare `type: {fam.name}` where it is not detected)")
        if other.path.is_file():
            raise ConfigError(str(file), key, f"refiner {other.name} is a single file",
                              "give the refiner as a diffusers folder (its model_index.json names its pipeline)")


def _entry_family(entry: ModelEntry) -> Any:
    """The family of a base entry, declared or detected from its folder (None when unknown)."""
    try:
        return family(entry.type) if entry.type else family_of_folder(entry.path) if entry.path.is_dir() else None
    except PipeError:
        return None


def _model_defaults(data: Any, file: Path, key: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(file), key, f"expected a mapping, got {data!r}",
                          "write e.g. `defaults: {width: 512, height: 512, steps: 30}`")
    out = {}
    from multigen.pipes.errors import PipeError
    from multigen.pipes.spec import COMMON, CONFIGURED_PARAMS, QUALITY_PARAMS

    params = {p.name: p for p in COMMON + QUALITY_PARAMS + CONFIGURED_PARAMS if p.name in MODEL_DEFAULTS}
    for name, value in data.items():
        param = params.get(str(name))
        if param is None:
            raise ConfigError(str(file), f"{key}.{name}", "unknown default",
                              f"use some of: {', '.join(MODEL_DEFAULTS)}")
        try:
            out[str(name)] = param.check(value)
        except PipeError as e:
            raise ConfigError(str(file), f"{key}.{name}", f"bad value {value!r}: {e}",
                              f"give {name} {e.allowed or 'a value the parameter spec allows'}") from None
    return out


def load_models(path: Path, model_dir: Path) -> ModelsConfig:
    """Read models.yaml; model ids are relative to ``model_dir``."""
    data = read_yaml(path, "models list")
    base = _model_entries(data, "base", path, model_dir, True)
    if not base:
        raise ConfigError(str(path), "base", "no base model is listed",
                          "add at least one entry under `base:` (run `multigen models init` for the defaults)")
    check_refiners(base, path)
    lora = _model_entries(data, "lora", path, model_dir, False)
    controlnet = _model_entries(data, "controlnet", path, model_dir, False)
    pipes = {}
    for name, entry in mapping_at(data, "pipes", path).items():
        key = f"pipes.{name}"
        if not isinstance(entry, dict) or "classname" not in entry:
            raise ConfigError(str(path), key, "entry has no `classname`",
                              f"set classname to one of {', '.join(KNOWN_PIPE_CLASSES)}")
        if entry["classname"] not in KNOWN_PIPE_CLASSES:
            raise ConfigError(str(path), f"{key}.classname", f"unknown pipe class {entry['classname']!r}",
                              f"use one of {', '.join(KNOWN_PIPE_CLASSES)}")
        pipes[str(name)] = PipeEntry(
            name=str(name), classname=entry["classname"], title=str(entry.get("name", name)),
            need_imgs=bool(entry.get("need_imgs", False)), needs_cnet=bool(entry.get("needs_cnet", False)),
            extra={k: v for k, v in entry.items() if k not in ("name", "classname", "need_imgs", "needs_cnet")})
    if not pipes:
        raise ConfigError(str(path), "pipes", "no pipe is listed",
                          "add an entry such as `prompt2image: {classname: Prompt2ImPipe}` under `pipes:`")
    ip_adapter = _ip_adapters(data, path, model_dir, base)
    upscaler = _model_entries(data, "upscaler", path, model_dir, False)
    return ModelsConfig(file=path, base=base, lora=lora, controlnet=controlnet, pipes=pipes, ip_adapter=ip_adapter,
                        upscaler=upscaler)


def _ip_adapters(data: dict, file: Path, model_dir: Path, base: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    """The ``ip_adapter`` section: ``{name: {id: adapter file, image_encoder: folder, type: SD, models: [...]}}``,
    each with its type (the family it fits), its image encoder and, optionally, the base models it is limited to."""
    entries = _model_entries(data, "ip_adapter", file, model_dir, True)
    for name, entry in entries.items():
        key = f"ip_adapter.{name}"
        if entry.type is None:
            raise ConfigError(str(file), f"{key}.type", "an IP-Adapter needs its model type",
                              f"set type to the family it was made for ({', '.join(MODEL_TYPES)})")
        encoder = entry.extra.get("image_encoder")
        if not isinstance(encoder, str) or not encoder:
            raise ConfigError(str(file), f"{key}.image_encoder", "an IP-Adapter needs its image encoder",
                              "set image_encoder to its CLIP image encoder's folder, relative to model_dir")
        models = entry.extra.get("models") or []
        if isinstance(models, str):
            models = [models]
        unknown = [m for m in models if m not in base]
        if not isinstance(models, list) or unknown:
            raise ConfigError(str(file), f"{key}.models", f"unknown base model {unknown[0] if unknown else models!r}",
                              f"list base models of type {entry.type} ({', '.join(base)}), or leave it out for all")
        entry.extra = {**entry.extra, "image_encoder": (model_dir / encoder).resolve(), "models": list(models)}
    return entries


def check_model_files(models: ModelsConfig) -> None:
    """Fail when a listed model's files are missing, naming the entry and how to get them."""
    for section, entries in (("base", models.base), ("lora", models.lora), ("controlnet", models.controlnet),
                             ("ip_adapter", models.ip_adapter), ("upscaler", models.upscaler)):
        for entry in entries.values():
            if not entry.path.exists():
                raise ConfigError(str(models.file), f"{section}.{entry.name}.id", f"{entry.path} does not exist",
                                  "run `multigen models init` for the default models, or correct the path")
            if entry.path.is_file() and section == "base" and entry.config is None:
                raise ConfigError(str(models.file), f"{section}.{entry.name}.config",
                                  "a single-file checkpoint needs a local config folder (nothing is fetched from a hub)",
                                  "set `config:` to a diffusers folder of the same architecture (JSON configs, tokenizer, scheduler)")
            if entry.config is not None and not entry.config.is_dir():
                raise ConfigError(str(models.file), f"{section}.{entry.name}.config",
                                  f"{entry.config} is not a folder", "point config at a diffusers config folder")
    if models.upscaler and importlib.util.find_spec("spandrel") is None:
        raise ConfigError(str(models.file), "upscaler", "upscaler models need spandrel, which is not installed",
                          "run `pip install --no-deps spandrel==0.4.2 einops==0.8.2` (scripts/_env.sh does), or "
                          "remove the `upscaler:` section")
    for entry in models.ip_adapter.values():
        if not (entry.extra["image_encoder"] / "config.json").is_file():
            raise ConfigError(str(models.file), f"ip_adapter.{entry.name}.image_encoder",
                              f"{entry.extra['image_encoder']} is not an image encoder folder (no config.json)",
                              "run `multigen models init` for the default models, or point it at a CLIP image encoder")
