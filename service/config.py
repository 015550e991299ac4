"""Loading and checking ``config.yaml`` and ``models.yaml``.

metafusion's keys (``model_list``, ``model_dir``, ``logging_folder``; ``base``,
``lora``, ``pipes``) are read as they are; paths are relative to the file that
names them, and a folder a config leaves out is beside it (``FOLDER_DEFAULTS``): a
metafusion config with only its three keys keeps ``data/`` and ``outputs/`` in its own
folder. Every problem is a :class:`ConfigError` naming the file, the key and the fix,
raised at start-up rather than at the first job.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multigen.pipes.families import ModelType, native_size_of_folder  # torch-free
from multigen.pipes.registry import pipe_names  # torch-free

from .errors import ConfigError

#: where ``multigen`` looks when neither ``--config`` nor ``MULTIGEN_CONFIG`` is given
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"
#: ...and when that is not there (installed from a wheel): the demo model, data under ~/.multigen
PACKAGED_CONFIG = Path(__file__).resolve().parent / "defaults" / "config.yaml"
#: the model families a models.yaml ``type:`` may name
MODEL_TYPES = tuple(m.value for m in ModelType)
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
#: models that travel with the package: ``id: builtin:NAME`` in models.yaml
BUILTIN_MODELS = {"demo": ("demo", "model")}
#: what a base model's ``defaults:`` may set, with the type each takes
#: what a model's ``defaults:`` may set: these parameters of the spec, checked by it
MODEL_DEFAULTS = ("width", "height", "steps", "guidance_scale", "clip_skip", "scheduler", "timestep_spacing")
#: folders a config.yaml may leave out, relative to its own folder: everything a config does not
#: place stays beside it (the repository's config/config.yaml names its ../ folders explicitly)
FOLDER_DEFAULTS = {"model_dir": "models", "logging_folder": "logs", "data_dir": "data", "output_dir": "outputs"}
#: a base model's memory options in models.yaml and the values each takes (``multigen.pipes.memory``)
MEMORY_OPTIONS = {"quantize": ("none", "int8", "fp8"), "offload": ("none", "model", "sequential")}
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

    def native_size(self) -> tuple[int, int] | None:
        """The size the model was trained at: ``defaults`` width/height, else read from its folder's configs.

        A diffusers folder tells it without loading weights: its family reads it from the configs
        (SD/SDXL: UNet ``sample_size`` times the VAE's down-sampling; Flux: 128 latent pixels times
        it); a single-file checkpoint does through its ``config`` folder. None when unknown.
        """
        if self.defaults.get("width") and self.defaults.get("height"):
            return int(self.defaults["width"]), int(self.defaults["height"])
        folder = self.config if self.path.is_file() else self.path
        if folder is None:
            return None
        side = native_size_of_folder(Path(folder))
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

    @functools.cached_property
    def path_names(self) -> dict[str, str]:
        """Each listed model's resolved path -> its name (how image metadata names models)."""
        return {str(e.path.resolve()): name for section in (self.controlnet, self.lora, self.base)
                for name, e in section.items()}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 8
    max_event_streams: int = 4  # SSE streams hold a waitress thread each: cap them below `threads`
    #: streams one user (with auth on) may hold: half the default server-wide cap, so no one user takes every slot
    max_event_streams_per_user: int = 2
    allow_anonymous: bool = False
    #: browser origins (``http://host:port``) allowed to call the API (CORS); the server's own page needs none
    cors_origins: list[str] = field(default_factory=list)
    #: the bearer token ``/metrics`` asks for (a Prometheus ``authorization:``); "" = docs/security.md's default
    metrics_token: str = ""


@dataclass
class Limits:
    max_count: int = 100  # images per job
    max_queued_jobs: int = 1000  # whole queue; past it queue_gen fails with "queue full"
    max_queued_jobs_per_user: int = 200
    max_open_sessions_per_user: int = 100
    upload_max_bytes: int = 20 * 1024 * 1024
    upload_max_pixels: int = 4096 * 4096
    upload_keep_hours: int = 168  # uploads not used by a job for this long are deleted; 0 keeps them
    #: MiB of stored uploads one user may hold (uploads/<id>.png); past it POST /uploads is a 413
    #: quota_exceeded until some are deleted or expire; 0 = no quota
    upload_quota_mb_per_user: int = 1024
    #: uploads one user may hold (tiny ones cost files, not bytes); 0 = no quota
    upload_quota_files_per_user: int = 1000
    max_width: int = 4096
    max_height: int = 4096
    #: megapixel-steps (count x steps x width x height / 10**6) one job may cost; 0 = no ceiling (budget.py)
    max_megapixel_steps_per_job: int = 20000
    #: megapixel-steps one user may queue within an hour; 0 = no budget
    max_megapixel_steps_per_user_hour: int = 100000
    #: wall-clock seconds one image may take before its job fails (a stuck or far too slow device); 0 = none
    max_seconds_per_image: int = 3600


@dataclass
class Config:
    file: Path
    model_dir: Path
    logging_folder: Path
    data_dir: Path
    output_dir: Path
    models: ModelsConfig
    devices: str | list[str] = "auto"
    threads: int | None = None  # torch threads per worker; None = all cores for a lone CPU worker
    cache_budget_gb: float = 8.0
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: Limits = field(default_factory=Limits)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # model precision (float32, bfloat16, float16); None = best for the device
    drain_on_exit: bool = True  # a script that queues jobs and ends waits for them (metafusion's use)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(str(path), None, f"{what} not found",
                          "create it (see config/ in the repository) or pass --config / MULTIGEN_CONFIG")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), None, f"not valid YAML ({e})".replace("\n", " "),
                          "correct the YAML syntax at the line shown") from e
    if not isinstance(data, dict):
        raise ConfigError(str(path), None, "the top level is not a mapping", "write `key: value` lines")
    return data


def _typed(data: dict, key: str, kind: type | tuple, file: Path, default: Any, fix: str,
           where: str | None = None) -> Any:
    """``data[key]`` checked to be a ``kind`` (``where``: the key's full name in messages, e.g. ``server.port``)."""
    if key not in data or data[key] is None:
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ConfigError(str(file), where or key, f"expected {getattr(kind, '__name__', kind)}, got {value!r}", fix)
    return value


def _section(data: dict, key: str, file: Path) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(str(file), key, f"expected a mapping, got {type(value).__name__}",
                          f"write `{key}:` followed by indented `name: value` entries")
    return value


def _dataclass_section(cls, data: dict, key: str, file: Path):
    section = _section(data, key, file)
    obj = cls()
    for k, v in section.items():
        if not hasattr(obj, k):
            known = ", ".join(obj.__dataclass_fields__)
            raise ConfigError(str(file), f"{key}.{k}", "unknown key", f"use one of: {known}")
        default = getattr(obj, k)
        setattr(obj, k, _typed(section, k, type(default), file, default,
                               f"set {key}.{k} to a {type(default).__name__}", where=f"{key}.{k}"))
    return obj


def _model_entries(data: dict, section: str, file: Path, model_dir: Path,
                   require_type: bool) -> dict[str, ModelEntry]:
    out = {}
    for name, entry in _section(data, section, file).items():
        key = f"{section}.{name}"
        if isinstance(entry, str):
            entry = {"id": entry}
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(str(file), key, "entry has no `id`",
                              "give `id:` a path relative to model_dir (a diffusers folder or a .safetensors file)")
        mtype = entry.get("type")
        if mtype is not None and str(mtype).upper() not in MODEL_TYPES:
            raise ConfigError(str(file), f"{key}.type", f"unknown model type {mtype!r}",
                              f"use one of {', '.join(MODEL_TYPES)} or leave it out to detect it")
        path = _model_path(str(entry["id"]), model_dir, file, f"{key}.id")
        cfg = entry.get("config")
        defaults = _model_defaults(entry.get("defaults"), file, f"{key}.defaults") if section == "base" else {}
        memory = _memory_options(entry, section, file, key)
        out[str(name)] = ModelEntry(
            name=str(name), path=path, type=str(mtype).upper() if mtype else None,
            config=(model_dir / str(cfg)).resolve() if cfg else None, defaults=defaults, **memory,
            extra={k: v for k, v in entry.items()
                   if k not in ("id", "type", "config", "defaults", "dtype", *MEMORY_OPTIONS)})
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
    from multigen.pipes.errors import PipeError
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


def _model_defaults(data: Any, file: Path, key: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(file), key, f"expected a mapping, got {data!r}",
                          "write e.g. `defaults: {width: 512, height: 512, steps: 30}`")
    out = {}
    from multigen.pipes.errors import PipeError
    from multigen.pipes.spec import COMMON

    params = {p.name: p for p in COMMON if p.name in MODEL_DEFAULTS}
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


def read_users(data: dict[str, Any], file: Path) -> dict[str, dict[str, Any]]:
    """The config's ``users`` section, each entry checked to carry a ``token_sha256``."""
    users = _section(data, "users", file)
    for name, entry in users.items():
        if not isinstance(entry, dict) or "token_sha256" not in entry:
            raise ConfigError(str(file), f"users.{name}", "user has no token_sha256",
                              "create users with `multigen users add NAME`")
    return users


#: an origin as browsers send it: scheme, host, optional port; no path, no wildcard
ORIGIN_RE = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
#: a shorter metrics token could be guessed by anyone who can reach the port
METRICS_TOKEN_MIN_CHARS = 16


def read_server(data: dict[str, Any], file: Path) -> ServerConfig:
    """The ``server`` section: typed like the others, then origins, the metrics token and the caps checked."""
    server = _dataclass_section(ServerConfig, data, "server", file)
    for i, origin in enumerate(server.cors_origins):
        if not isinstance(origin, str) or not ORIGIN_RE.match(origin):
            why = ("'*' would let every web page use the server" if origin == "*" else
                   "null is what sandboxed pages and files send: any page can send it" if origin in (None, "null")
                   else "it is not scheme://host[:port] (no path, no trailing slash)")
            raise ConfigError(str(file), f"server.cors_origins.{i}", f"{origin!r}: {why}",
                              "list origins exactly as the browser sends them, e.g. http://localhost:3000")
    server.cors_origins = [o.lower() for o in server.cors_origins]
    token = server.metrics_token
    if token and (len(token) < METRICS_TOKEN_MIN_CHARS or token.strip() != token or " " in token):
        raise ConfigError(str(file), "server.metrics_token",
                          f"shorter than {METRICS_TOKEN_MIN_CHARS} characters or holds spaces",
                          "use a random one: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    for key in ("max_event_streams", "max_event_streams_per_user", "threads"):
        if getattr(server, key) < 1:
            raise ConfigError(str(file), f"server.{key}", f"{getattr(server, key)} is below 1",
                              f"set server.{key} to 1 or more")
    return server


def load_users(file: Path) -> dict[str, dict[str, Any]]:
    """Only the ``users`` of a config file (a running server re-reads them when the file changes)."""
    return read_users(_read_yaml(file, "config file"), file)


def load_models(path: Path, model_dir: Path) -> ModelsConfig:
    """Read models.yaml; model ids are relative to ``model_dir``."""
    data = _read_yaml(path, "models list")
    base = _model_entries(data, "base", path, model_dir, True)
    if not base:
        raise ConfigError(str(path), "base", "no base model is listed",
                          "add at least one entry under `base:` (run `multigen models init` for the defaults)")
    lora = _model_entries(data, "lora", path, model_dir, False)
    controlnet = _model_entries(data, "controlnet", path, model_dir, False)
    pipes = {}
    for name, entry in _section(data, "pipes", path).items():
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
    return ModelsConfig(file=path, base=base, lora=lora, controlnet=controlnet, pipes=pipes)


def default_config_path() -> Path:
    """``$MULTIGEN_CONFIG``, else the repository's config/config.yaml, else the packaged one."""
    env = os.environ.get("MULTIGEN_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else PACKAGED_CONFIG


def load_config(path: str | os.PathLike | None = None, check_models_exist: bool = True,
                check_devices: bool | None = None) -> Config:
    """Read and check config.yaml and the models list it names.

    Args:
        path: config file; defaults to :func:`default_config_path`.
        check_models_exist: fail when a listed model's files are missing.
        check_devices: fail when a model's ``quantize``/``offload`` cannot run on the configured devices
            (:func:`check_memory_devices`); default: as ``check_models_exist`` (what serving needs).

    Raises:
        ConfigError: naming the file, the key and the fix.
    """
    file = Path(path or default_config_path()).resolve()
    data = _read_yaml(file, "config file")
    here = file.parent
    known = {"model_list", "model_dir", "logging_folder", "data_dir", "output_dir", "devices", "threads",
             "cache", "server", "limits", "users", "dtype", "drain_on_exit"}
    for key in data:
        if key not in known:
            raise ConfigError(str(file), str(key), "unknown key", f"remove it or use one of: {', '.join(sorted(known))}")

    def folder(key: str) -> Path:
        value = _typed(data, key, str, file, FOLDER_DEFAULTS[key],
                       f"set {key} to a folder path (relative to {file.name})")
        return (here / os.path.expanduser(value)).resolve()

    model_list = _typed(data, "model_list", str, file, None, "set model_list to the models.yaml path")
    if model_list is None:
        raise ConfigError(str(file), "model_list", "missing", "add `model_list: models.yaml` (path relative to this file)")
    model_dir = folder("model_dir")
    models = load_models((here / model_list).resolve(), model_dir)
    if check_models_exist:
        check_model_files(models)
    devices = data.get("devices", "auto")
    if not (devices == "auto" or (isinstance(devices, list) and all(isinstance(d, str) for d in devices))):
        raise ConfigError(str(file), "devices", f"expected `auto` or a list like [cuda:0, cuda:1], got {devices!r}",
                          "write `devices: auto` or a list of torch device names")
    if check_models_exist if check_devices is None else check_devices:
        check_memory_devices(models, devices, file)
    threads = _typed(data, "threads", int, file, None, "set threads to a whole number of torch threads per worker")
    cache = _section(data, "cache", file)
    budget = _typed(cache, "memory_budget_gb", (int, float), file, 8.0, "set cache.memory_budget_gb to a number of GiB")
    users = read_users(data, file)
    dtype = _typed(data, "dtype", str, file, None, "set dtype to float32, bfloat16 or float16, or leave it out")
    if dtype is not None and dtype.lower().replace("torch.", "") not in DTYPE_NAMES:
        raise ConfigError(str(file), "dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPE_NAMES)}")
    drain_on_exit = _typed(data, "drain_on_exit", bool, file, True, "set drain_on_exit to true or false")
    return Config(file=file, model_dir=model_dir, logging_folder=folder("logging_folder"),
                  data_dir=folder("data_dir"), output_dir=folder("output_dir"),
                  models=models, devices=devices, threads=threads, cache_budget_gb=float(budget),
                  server=read_server(data, file),
                  limits=_dataclass_section(Limits, data, "limits", file), users=users, raw=data,
                  dtype=dtype, drain_on_exit=drain_on_exit)


def check_model_files(models: ModelsConfig) -> None:
    """Fail when a listed model's files are missing, naming the entry and how to get them."""
    for section, entries in (("base", models.base), ("lora", models.lora), ("controlnet", models.controlnet)):
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
