"""The model cache: one loaded base pipeline per (model, device, dtype), shared by pipe classes.

A base is loaded once with ``multigen.pipes.load_base``; each pipe class asked for on it
(Prompt2Im, Im2Im, Inpainting, ...) is built with ``pipe=base``, so it shares the base's
weights (``from_pipe``) and costs no second copy. Bases are kept least-recently-used
first within a memory budget per device; a base leased to a running job is never evicted.

The budget counts what a base really holds on its device, measured once it is loaded
(``multigen.pipes.memory.footprint``: quantized weights by their int8/fp8 bytes, an offloaded
model by what it puts on the GPU at once); before loading, the size of its weight files is
the estimate that makes room. A model that does not fit even once every idle model is evicted
is refused with :class:`ModelTooLarge`, which says by how many GiB and what to change.

Loads are slow (seconds to minutes) and happen outside the cache's lock, under a lock of
their own per key: a worker loading model A never blocks another worker taking model B,
and two workers asking for A at once load it once.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .config import ModelEntry
from .errors import InvalidInput, MultigenError

log = logging.getLogger(__name__)

GiB = 1024 ** 3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


class ModelTooLarge(InvalidInput):
    """A model that does not fit its device's cache budget, even with every idle model evicted.

    Its message names the model, the GiB it needs, the budget, what models in use hold, the GiB
    missing, and the fix (``cache.memory_budget_gb``, or ``quantize``/``offload`` in models.yaml).
    """

    code = "model_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="model")
        self.param = "model"  # the field a failed job's error names (like the pipes' errors)


class ModelLoadFailed(Exception):
    """A model's files could not be read (corrupt, truncated or missing since the server started): the
    message names the model, its file and what to do; the job fails, the worker goes on."""

    param = "model"


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a device out-of-memory error (``torch.OutOfMemoryError``, or CUDA's RuntimeError text)."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def gib(nbytes: float) -> str:
    """``nbytes`` in GiB with three significant digits (``0.0977 GiB``, ``12.3 GiB``)."""
    return f"{nbytes / GiB:.3g} GiB"


def module_bytes(obj: Any) -> int:
    """Bytes of the distinct tensors held by a diffusers pipeline (or any object with torch modules).

    Tensors shared between modules count once; torchao's quantized tensors count by their inner
    data and scales (``multigen.pipes.memory.module_bytes``). An object with an ``nbytes``
    attribute (the fakes of the tests) reports that.
    """
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    from multigen.pipes.memory import module_bytes as measure

    return measure(obj)


def resident_bytes(obj: Any) -> int:
    """What a loaded base holds on its device at once: the bytes the cache budget counts.

    All of its weights; with ``offload: model`` its largest component, with ``sequential`` its
    largest layer (the rest waits in CPU memory). Fakes report their ``nbytes``.
    """
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    from multigen.pipes.memory import footprint

    return footprint(obj).device_bytes


def _weights_on_disk(path: Any) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    return 0


def disk_bytes(entry: ModelEntry) -> int:
    """Size of a model's weight files: the estimate used to make room before loading it.

    Offloaded models put less on the device: their largest component folder (``offload: model``)
    or nearly nothing (``sequential``). Quantization is not counted in: the files' precision is
    not known before loading, and an estimate too high only evicts more.
    """
    path = entry.path
    if entry.offload == "sequential":
        return 0
    if entry.offload == "model" and path.is_dir():
        return max((_weights_on_disk(p) for p in path.iterdir() if p.is_dir()), default=0)
    return _weights_on_disk(path)


@dataclass
class BaseEntry:
    """One loaded base pipeline and the pipe objects built on it."""

    model: str
    device: str
    dtype: str
    base: Any
    model_type: Any
    nbytes: int  # what it holds on its device (the budget counts this)
    load_seconds: float
    total_bytes: int = 0  # all of its weights, offloaded ones included
    quantize: str = "none"
    offload: str = "none"
    pipes: dict[str, Any] = field(default_factory=dict)
    in_use: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # builds of pipe objects on this base


@dataclass
class Lease:
    """A pipe object handed to a job; its base stays loaded until the lease ends."""

    pipe: Any
    model_type: Any
    entry: BaseEntry
    hit: bool  # the base was already loaded


class ModelCache:
    """LRU cache of base pipelines per device within ``budget_bytes``.

    Args:
        models: the ``base`` entries of models.yaml, by name.
        budget_bytes: memory budget per device.
        loader: ``loader(path, model_type=, config_dir=, device=, dtype=) -> (pipeline, model_type)``,
            also given ``quantize=`` and ``offload=`` for the models that set them; default
            ``multigen.pipes.load_base``.
        pipe_factory: ``pipe_factory(classname) -> class``; default: the pipes' registry.
    """

    def __init__(self, models: dict[str, ModelEntry], budget_bytes: int,
                 loader: Callable[..., tuple[Any, Any]] | None = None,
                 pipe_factory: Callable[[str], Any] | None = None) -> None:
        self.models = models
        self.budget_bytes = int(budget_bytes)
        self._loader = loader
        self._pipe_factory = pipe_factory
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, str, str], BaseEntry] = collections.OrderedDict()
        self._load_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self.counters = {"loads": 0, "hits": 0, "evictions": 0, "load_seconds": 0.0}

    # -- collaborators ------------------------------------------------------------------
    def _load(self, entry: ModelEntry, device: str, dtype: Any) -> tuple[Any, Any]:
        loader = self._loader
        if loader is None:
            from multigen.pipes import load_base as loader
        memory = {k: v for k, v in (("quantize", entry.quantize), ("offload", entry.offload)) if v != "none"}
        try:
            return loader(str(entry.path), model_type=entry.type,
                          config_dir=str(entry.config) if entry.config else None, device=device, dtype=dtype, **memory)
        except Exception as e:
            from multigen.pipes.errors import PipeError

            if is_out_of_memory(e) or isinstance(e, (PipeError, MultigenError)):  # the device, or a checked input
                raise
            log.exception("loading model %s from %s failed", entry.name, entry.path)
            raise ModelLoadFailed(
                f"model {entry.name!r} could not be loaded from {entry.path} ({type(e).__name__}: {str(e)[:200]}): "
                "its files may be corrupt, truncated or missing; ask the admin to check or download the model "
                "again, or use another model") from e

    def _pipe_class(self, classname: str) -> Any:
        if self._pipe_factory is not None:
            return self._pipe_factory(classname)
        from multigen.pipes.registry import pipe_class

        return pipe_class(classname)

    # -- public -------------------------------------------------------------------------
    def get(self, model: str, pipe_class: str, device: str, dtype: Any, **pipe_kwargs: Any) -> Any:
        """The pipe object of class ``pipe_class`` on ``model`` (loading the model if needed).

        Prefer :meth:`lease` in workers: it keeps the model from being evicted while in use.
        """
        with self.lease(model, pipe_class, device, dtype, **pipe_kwargs) as lease:
            return lease.pipe

    @contextlib.contextmanager
    def lease(self, model: str, pipe_class: str, device: str, dtype: Any, **pipe_kwargs: Any) -> Iterator[Lease]:
        """Context manager giving a :class:`Lease` on the pipe; the base is pinned until exit.

        Args:
            model: name in models.yaml ``base``.
            pipe_class: class name in ``multigen.pipes`` (``Prompt2ImPipe``...).
            device: torch device name.
            dtype: torch dtype (part of the key); a models.yaml ``dtype`` of the model replaces it.
            **pipe_kwargs: more constructor arguments (``controlnets=``, ``ctypes=``); part of the pipe key.
        """
        entry, hit = self._base(model, device, dtype)
        try:
            pipe = self._pipe(entry, pipe_class, pipe_kwargs)
            yield Lease(pipe=pipe, model_type=entry.model_type, entry=entry, hit=hit)
        finally:
            with self._lock:
                entry.in_use -= 1

    def held(self, device: str) -> set[str]:
        """Names of the models loaded on ``device``."""
        with self._lock:
            return {k[0] for k in self._entries if k[1] == device}

    def used_bytes(self, device: str | None = None) -> int:
        with self._lock:
            return sum(e.nbytes for k, e in self._entries.items() if device is None or k[1] == device)

    def entries(self) -> list[dict[str, Any]]:
        """What is loaded, least recently used first (for status pages)."""
        with self._lock:
            return [{"model": e.model, "device": e.device, "dtype": e.dtype.replace("torch.", ""), "bytes": e.nbytes,
                     "total_bytes": e.total_bytes, "quantize": e.quantize, "offload": e.offload,
                     # pipe classes by name: their keys' constructor arguments hold server paths (ControlNets...)
                     "pipes": sorted(k.split("{", 1)[0] for k in e.pipes), "in_use": e.in_use,
                     "load_seconds": round(e.load_seconds, 3)}
                    for e in self._entries.values()]

    def clear(self) -> None:
        """Drop every model not in use."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.in_use == 0]:
                self._evict(key)

    # -- internals ----------------------------------------------------------------------
    def _base(self, model: str, device: str, dtype: Any) -> tuple[BaseEntry, bool]:
        if model not in self.models:
            raise InvalidInput(f"unknown model {model!r}; known: {', '.join(sorted(self.models))}", field="model")
        spec = self.models[model]
        dtype = _model_dtype(spec, dtype)
        key = (model, str(device), str(dtype))
        with self._lock:
            entry = self._take(key)
            if entry is not None:
                self.counters["hits"] += 1
                return entry, True
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:  # only this key: other models load and run meanwhile
            with self._lock:
                entry = self._take(key)
                if entry is not None:  # another worker loaded it while we waited
                    self.counters["hits"] += 1
                    return entry, True
            if spec.quantize != "none" or spec.offload != "none":  # refused before the slow load
                from multigen.pipes.memory import check_memory_options

                check_memory_options(spec.quantize, spec.offload, str(device), model)
            with self._lock:
                evict, _ = self._room(str(device), disk_bytes(spec))  # an estimate: evict, never refuse
                for k in evict:
                    self._evict(k)
            t0 = time.perf_counter()
            base, model_type = self._load(spec, str(device), dtype)
            seconds = time.perf_counter() - t0
            entry = BaseEntry(model=model, device=str(device), dtype=str(dtype), base=base, model_type=model_type,
                              nbytes=resident_bytes(base), total_bytes=module_bytes(base), load_seconds=seconds,
                              in_use=1, quantize=spec.quantize, offload=spec.offload)
            with self._lock:
                evict, missing = self._room(str(device), entry.nbytes)
                if missing:
                    message = self._too_large(entry, missing)
                else:
                    for k in evict:
                        self._evict(k)
                    self._entries[key] = entry
                    self.counters["loads"] += 1
                    self.counters["load_seconds"] += seconds
            if missing:
                del entry, base  # nothing else holds it: its memory goes back before the job fails
                _release_device_memory(str(device))
                raise ModelTooLarge(message)
            log.info("model %s loaded on %s (%s, quantize %s, offload %s) in %.2f s, %.1f MiB on the device",
                     model, device, str(dtype).replace("torch.", ""), spec.quantize, spec.offload, seconds,
                     entry.nbytes / 2**20)
            return entry, False

    def _take(self, key: tuple[str, str, str]) -> BaseEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.in_use += 1
        return entry

    def _room(self, device: str, need: int) -> tuple[list[tuple[str, str, str]], int]:
        """What to evict so that ``need`` more bytes fit on ``device``, and the bytes still missing.

        Returns:
            ``(keys, missing)``: the least recently used idle bases on ``device`` to evict, oldest
            first, and how many bytes would still be over the budget with all of them evicted
            (0: it fits). Nothing is evicted here.
        """
        used = sum(e.nbytes for k, e in self._entries.items() if k[1] == device)
        evict = []
        for key in [k for k in self._entries if k[1] == device]:
            if used + need <= self.budget_bytes:
                break
            entry = self._entries[key]
            if entry.in_use == 0:
                used -= entry.nbytes
                evict.append(key)
        return evict, max(0, used + need - self.budget_bytes)

    def _too_large(self, entry: BaseEntry, missing: int) -> str:
        """The message of :class:`ModelTooLarge`: the model, its GiB, the budget, what is in use, the fix."""
        busy = [e for k, e in self._entries.items() if k[1] == entry.device and e.in_use > 0]
        held = sum(e.nbytes for e in busy)
        fixes = ["raise cache.memory_budget_gb in config.yaml"]
        if entry.quantize == "none":
            fixes.append(f"set `quantize: int8` for {entry.model} in models.yaml")
        if entry.offload == "none" and entry.device.startswith("cuda"):
            fixes.append(f"set `offload: model` for {entry.model} in models.yaml")
        in_use = (f"{gib(held)} of it held by models in use ({', '.join(sorted(e.model for e in busy))})"
                  if busy else "no other model in use")
        return (f"model {entry.model!r} needs {gib(entry.nbytes)} on {entry.device} "
                f"(dtype {entry.dtype.replace('torch.', '')}, quantize {entry.quantize}, offload {entry.offload}), "
                f"but the cache budget there is {gib(self.budget_bytes)} (cache.memory_budget_gb) with {in_use}: "
                f"{gib(missing)} missing. Fix: {', or '.join(fixes)}")

    def _evict(self, key: tuple[str, str, str]) -> None:
        entry = self._entries.pop(key)
        self.counters["evictions"] += 1
        log.info("model %s evicted from %s (%.1f MiB)", entry.model, entry.device, entry.nbytes / 2**20)
        device = entry.device
        del entry
        _release_device_memory(device)

    def _pipe(self, entry: BaseEntry, pipe_class: str, kwargs: dict[str, Any]) -> Any:
        pkey = pipe_class + (json.dumps(kwargs, sort_keys=True, default=str) if kwargs else "")
        with entry.lock:
            pipe = entry.pipes.get(pkey)
            if pipe is None:
                cls = self._pipe_class(pipe_class)
                pipe = cls(pipe=entry.base, model_type=entry.model_type, device=entry.device,
                           dtype=_dtype_arg(entry.dtype), **kwargs)
                entry.pipes[pkey] = pipe
            return pipe


def _release_device_memory(device: str) -> None:
    """Give a CUDA device's cached blocks back once a base is dropped (nothing to do elsewhere)."""
    if device.startswith("cuda"):
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - a broken CUDA state must not fail an eviction
            log.warning("could not empty the CUDA cache of %s", device, exc_info=True)


def _model_dtype(spec: ModelEntry, dtype: Any) -> Any:
    """The precision a model loads in: its models.yaml ``dtype`` when set, else the worker's ``dtype``."""
    if spec.dtype is None:
        return dtype
    from multigen.pipes.loading import parse_dtype

    return parse_dtype(spec.dtype, f"base.{spec.name}.dtype")


def _dtype_arg(dtype: str) -> Any:
    """The dtype as given to the pipe constructor: a torch dtype when the key names one."""
    if dtype.startswith("torch."):
        import torch

        return getattr(torch, dtype[len("torch."):])
    return None if dtype == "None" else dtype
