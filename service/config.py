"""Loading and checking ``config.yaml`` (``models.yaml``: :mod:`.models_config`, re-exported here).

metafusion's keys (``model_list``, ``model_dir``, ``logging_folder``; ``base``,
``lora``, ``pipes``) are read as they are; paths are relative to the file that
names them, and a folder a config leaves out is beside it (``FOLDER_DEFAULTS``): a
metafusion config with only its three keys keeps ``data/`` and ``outputs/`` in its own
folder. Every problem is a :class:`ConfigError` naming the file, the key and the fix,
raised at start-up rather than at the first job.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .presets import PresetLibrary, load_presets
from .prompt_tools import WildcardLibrary
from .styles import StyleLibrary, load_styles
from .webhook_targets import WebhookSettings, read_webhook_settings
from .models_config import (BUILTIN_MODELS, DTYPE_NAMES, KNOWN_PIPE_CLASSES, MEMORY_OPTIONS, MODEL_DEFAULTS,  # noqa: F401
                            MODEL_TYPES, ModelEntry, ModelsConfig, PipeEntry, builtin_model_path, check_memory_devices,
                            check_model_files, load_models)
from .yamlfields import mapping_at, read_yaml, typed

#: where ``multigen`` looks when neither ``--config`` nor ``MULTIGEN_CONFIG`` is given
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"
#: ...and when that is not there (installed from a wheel): the demo model, data under ~/.multigen
PACKAGED_CONFIG = Path(__file__).resolve().parent / "defaults" / "config.yaml"
#: folders a config.yaml may leave out, relative to its own folder: everything a config does not
#: place stays beside it (the repository's config/config.yaml names its ../ folders explicitly)
FOLDER_DEFAULTS = {"model_dir": "models", "logging_folder": "logs", "data_dir": "data", "output_dir": "outputs",
                   "styles_dir": "styles", "wildcards_dir": "wildcards"}


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
    #: seconds a call of the waiting dialects (AUTOMATIC1111's /sdapi/v1, OpenAI's images) waits for its job;
    #: past it the job is cancelled and the call answers 504
    sync_call_timeout: float = 600.0
    #: failed token checks one client address (or HTTP Basic user name) may make within a minute; past it
    #: 429 with Retry-After (service/api/ratelimit.py); 0 = no limit
    auth_failures_per_minute: int = 10
    #: reverse proxies whose X-Forwarded-For names the client (docs/security.md); IP addresses
    trusted_proxies: list[str] = field(default_factory=list)
    #: how much lower (nice) a lone CPU worker runs than the HTTP threads under `multigen serve`, so polls are
    #: answered while it generates (devices.py, docs/performance.md); 0 = the same; $MULTIGEN_WORKER_NICE wins
    worker_nice: int = 10


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
    #: images one user may queue within a day (429 with Retry-After past it); 0 = no quota
    max_images_per_user_day: int = 0
    #: wall-clock seconds one image may take before its job fails (a stuck or far too slow device); 0 = none
    max_seconds_per_image: int = 3600


@dataclass
class ClusterSettings:
    """The ``cluster`` section: how processes sharing a PostgreSQL store work together (cluster.py,
    docs/deploy.md). With the embedded SQLite store only ``host`` is used (recorded with each image)."""

    #: the name this process's workers show (GET /api/v1/queue, /metrics, image metadata); "" = the hostname
    host: str = ""
    #: seconds a worker's claim on a job holds without renewal: past it the job goes back to the queue
    lease_seconds: float = 60.0
    #: seconds between lease renewals, worker heartbeats and checks for expired leases
    heartbeat_seconds: float = 15.0
    #: how often a user's turn may go to a job of a model a worker holds (0: no model affinity)
    max_affinity_skips: int = 2


def read_cluster(data: dict[str, Any], file: Path) -> ClusterSettings:
    """The ``cluster`` section, checked: a lease must outlive a few heartbeats."""
    cluster = _dataclass_section(ClusterSettings, data, "cluster", file)
    if not 0 < cluster.heartbeat_seconds <= cluster.lease_seconds / 2:
        raise ConfigError(str(file), "cluster.heartbeat_seconds", f"{cluster.heartbeat_seconds} is not above 0 "
                          f"and at most half of cluster.lease_seconds ({cluster.lease_seconds})",
                          "renew leases a few times per lease, e.g. lease_seconds: 60, heartbeat_seconds: 15")
    if cluster.max_affinity_skips < 0:
        raise ConfigError(str(file), "cluster.max_affinity_skips", "is below 0", "use 0 (no affinity) or more")
    cluster.host = cluster.host.strip() or socket.gethostname()
    return cluster


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
    #: the users' style files (styles.py); None: the built-in styles only
    styles_dir: Path | None = None
    #: the built-in styles with the users' on top, read at start-up
    styles: StyleLibrary = field(default_factory=lambda: load_styles(None))
    #: the ``webhooks`` section: allowed targets, timeout, retries (webhooks.py)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    #: the users' wildcard files (prompt_tools.py), over the built-in ones; None: the built-in ones only
    wildcards_dir: Path | None = None
    #: the wildcard files jobs' prompts may name (read when used, so files may change while the server runs)
    wildcards: WildcardLibrary = field(default_factory=WildcardLibrary)
    #: the performance presets (presets.py): the built-in ones with config.yaml's ``presets:`` on top
    presets: PresetLibrary = field(default_factory=load_presets)
    #: ``store``: a ``postgresql://`` URL (pgstore.py), or None for the embedded SQLite file in ``data_dir``
    store: str | None = None
    #: ``workers``: 0 = `multigen serve` runs no device worker (an API host of a cluster); None = one per device
    workers: int | None = None
    #: the ``cluster`` section
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def inputs_root(self) -> Path:
        """Where jobs' input images are kept (``<it>/inputs/<job>``): the data folder, or with a PostgreSQL store
        (processes on several hosts run the jobs) ``<output_dir>/.multigen``, the shared storage (docs/deploy.md)."""
        return self.data_dir if self.store is None else self.output_dir / ".multigen"


def _dataclass_section(cls, data: dict, key: str, file: Path):
    section = mapping_at(data, key, file)
    obj = cls()
    for k, v in section.items():
        if not hasattr(obj, k):
            known = ", ".join(obj.__dataclass_fields__)
            raise ConfigError(str(file), f"{key}.{k}", "unknown key", f"use one of: {known}")
        default = getattr(obj, k)
        kind = (int, float) if isinstance(default, float) else type(default)  # `600` for a number of seconds
        value = typed(section, k, kind, file, default, f"set {key}.{k} to a {type(default).__name__}",
                      where=f"{key}.{k}")
        setattr(obj, k, float(value) if isinstance(default, float) else value)
    return obj


def read_users(data: dict[str, Any], file: Path) -> dict[str, dict[str, Any]]:
    """The config's ``users`` section, each entry checked to carry a ``token_sha256``."""
    users = mapping_at(data, "users", file)
    for name, entry in users.items():
        if isinstance(entry, dict) and "token" in entry:  # a plain token must never sit in a config file
            raise ConfigError(str(file), f"users.{name}.token", "tokens are stored only as SHA-256 hashes, a plain "
                              "`token` is not accepted", "remove the entry and run `multigen users add NAME` (it "
                              "prints a new token once), or replace `token: T` with `token_sha256: <sha256 hex of T>`"
                              " (printf %s T | sha256sum)")
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
    for i, proxy in enumerate(server.trusted_proxies):
        try:
            ipaddress.ip_address(str(proxy))
        except ValueError:
            raise ConfigError(str(file), f"server.trusted_proxies.{i}", f"{proxy!r} is not an IP address",
                              "list the proxy's address as it connects, e.g. 127.0.0.1") from None
    token = server.metrics_token
    if token and (len(token) < METRICS_TOKEN_MIN_CHARS or token.strip() != token or " " in token):
        raise ConfigError(str(file), "server.metrics_token",
                          f"shorter than {METRICS_TOKEN_MIN_CHARS} characters or holds spaces",
                          "use a random one: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not server.sync_call_timeout > 0:
        raise ConfigError(str(file), "server.sync_call_timeout", f"{server.sync_call_timeout} is not above 0",
                          "set server.sync_call_timeout to the seconds an A1111/OpenAI call may wait, e.g. 600")
    if not 0 <= server.worker_nice <= 19:
        raise ConfigError(str(file), "server.worker_nice", f"{server.worker_nice} is not within 0..19",
                          "use 0 (workers at the HTTP threads' priority) up to 19 (lowest); 10 is the default")
    for key in ("max_event_streams", "max_event_streams_per_user", "threads"):
        if getattr(server, key) < 1:
            raise ConfigError(str(file), f"server.{key}", f"{getattr(server, key)} is below 1",
                              f"set server.{key} to 1 or more")
    return server


#: overrides config.yaml's ``store`` (docs/service.md)
STORE_ENV = "MULTIGEN_STORE"


def read_store(data: dict[str, Any], file: Path) -> str | None:
    """``store`` (or ``$MULTIGEN_STORE``, first): a postgresql:// URL, or None (also for ``sqlite``)."""
    env = os.environ.get(STORE_ENV, "").strip()
    value = env or typed(data, "store", str, file, None, "set store to a postgresql:// URL, or leave it out")
    if value is None or value == "sqlite":
        return None
    if not value.startswith(("postgresql://", "postgres://")):
        raise ConfigError(str(file), STORE_ENV if env else "store",
                          f"{value.split(':')[0]!r}... is not a postgresql:// URL",
                          "use postgresql://user:password@host:5432/dbname, or sqlite (the default: data_dir's file)")
    return value


def load_users(file: Path) -> dict[str, dict[str, Any]]:
    """Only the ``users`` of a config file (a running server re-reads them when the file changes)."""
    return read_users(read_yaml(file, "config file"), file)


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
    data = read_yaml(file, "config file")
    here = file.parent
    known = {"model_list", "model_dir", "logging_folder", "data_dir", "output_dir", "devices", "threads",
             "cache", "server", "limits", "users", "dtype", "drain_on_exit", "styles_dir",
             "wildcards_dir", "presets", "webhooks", "store", "workers", "cluster"}
    for key in data:
        if key not in known:
            raise ConfigError(str(file), str(key), "unknown key", f"remove it or use one of: {', '.join(sorted(known))}")

    def folder(key: str) -> Path:
        value = typed(data, key, str, file, FOLDER_DEFAULTS[key],
                       f"set {key} to a folder path (relative to {file.name})")
        return (here / os.path.expanduser(value)).resolve()

    model_list = typed(data, "model_list", str, file, None, "set model_list to the models.yaml path")
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
    threads = typed(data, "threads", int, file, None, "set threads to a whole number of torch threads per worker")
    cache = mapping_at(data, "cache", file)
    budget = typed(cache, "memory_budget_gb", (int, float), file, 8.0, "set cache.memory_budget_gb to a number of GiB")
    users = read_users(data, file)
    dtype = typed(data, "dtype", str, file, None, "set dtype to float32, bfloat16 or float16, or leave it out")
    if dtype is not None and dtype.lower().replace("torch.", "") not in DTYPE_NAMES:
        raise ConfigError(str(file), "dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPE_NAMES)}")
    drain_on_exit = typed(data, "drain_on_exit", bool, file, True, "set drain_on_exit to true or false")
    styles_dir = folder("styles_dir")
    workers = typed(data, "workers", int, file, None, "set workers to 0 (no local workers) or leave it out")
    if workers is not None and workers != 0:
        raise ConfigError(str(file), "workers", f"{workers}: only 0 is meaningful (no device workers in this process)",
                          "leave workers out for one worker per device (`devices`), or set 0 on an API-only host")
    return Config(file=file, model_dir=model_dir, logging_folder=folder("logging_folder"),
                  data_dir=folder("data_dir"), output_dir=folder("output_dir"),
                  models=models, devices=devices, threads=threads, cache_budget_gb=float(budget),
                  server=read_server(data, file), webhooks=read_webhook_settings(data, file),
                  limits=_dataclass_section(Limits, data, "limits", file), users=users, raw=data,
                  dtype=dtype, drain_on_exit=drain_on_exit, styles_dir=styles_dir,
                  styles=load_styles(styles_dir), wildcards_dir=folder("wildcards_dir"),
                  wildcards=WildcardLibrary(folder("wildcards_dir")),
                  presets=load_presets(data.get("presets"), models.lora, file), store=read_store(data, file),
                  workers=workers, cluster=read_cluster(data, file))


