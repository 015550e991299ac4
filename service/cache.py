"""The model cache: one loaded base pipeline per (model, device, dtype), shared by pipe classes.

A base is loaded once with ``multigen.pipes.load_base``; each pipe class asked for on it
(Prompt2Im, Im2Im, Inpainting, ...) is built with ``pipe=base``, so it shares the base's
weights (``from_pipe``) and costs no second copy. Bases are kept least-recently-used
first within a memory budget per device; a base leased to a running job is never evicted.

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
from .errors import InvalidInput

log = logging.getLogger(__name__)

GiB = 1024 ** 3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def module_bytes(obj: Any) -> int:
    """Bytes of the distinct tensors held by a diffusers pipeline (or any object with torch modules).

    Tensors shared between modules count once (by storage pointer). An object with an
    ``nbytes`` attribute (the fakes of the tests) reports that.
    """
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    import torch

    seen: set[tuple[str, int]] = set()
    total = 0
    components = getattr(obj, "components", None) or {}
    for comp in components.values():
        modules = comp if isinstance(comp, (list, tuple)) else [comp]
        for m in modules:
            if not isinstance(m, torch.nn.Module):
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                key = (str(t.device), t.untyped_storage().data_ptr())
                if key in seen:
                    continue
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def disk_bytes(entry: ModelEntry) -> int:
    """Size of a model's weight files: the estimate used to make room before loading it."""
    path = entry.path
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    return 0


@dataclass
class BaseEntry:
    """One loaded base pipeline and the pipe objects built on it."""

    model: str
    device: str
    dtype: str
    base: Any
    model_type: Any
    nbytes: int
    load_seconds: float
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
        loader: ``loader(path, model_type=, config_dir=, device=, dtype=) -> (pipeline, model_type)``;
            default ``multigen.pipes.load_base``.
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
        return loader(str(entry.path), model_type=entry.type, config_dir=str(entry.config) if entry.config else None,
                      device=device, dtype=dtype)

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
            dtype: torch dtype (part of the key).
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
                     "pipes": sorted(e.pipes), "in_use": e.in_use, "load_seconds": round(e.load_seconds, 3)}
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
                self._make_room(str(device), disk_bytes(self.models[model]))
            t0 = time.perf_counter()
            base, model_type = self._load(self.models[model], str(device), dtype)
            seconds = time.perf_counter() - t0
            entry = BaseEntry(model=model, device=str(device), dtype=str(dtype), base=base, model_type=model_type,
                              nbytes=module_bytes(base), load_seconds=seconds, in_use=1)
            with self._lock:
                self._make_room(str(device), entry.nbytes)
                self._entries[key] = entry
                self.counters["loads"] += 1
                self.counters["load_seconds"] += seconds
            log.info("model %s loaded on %s (%s) in %.2f s, %.1f MiB", model, device,
                     str(dtype).replace("torch.", ""), seconds, entry.nbytes / 2**20)
            return entry, False

    def _take(self, key: tuple[str, str, str]) -> BaseEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.in_use += 1
        return entry

    def _make_room(self, device: str, need: int) -> None:
        """Evict least recently used, unpinned bases on ``device`` until ``need`` more bytes fit."""
        used = sum(e.nbytes for k, e in self._entries.items() if k[1] == device)
        for key in [k for k in self._entries if k[1] == device]:
            if used + need <= self.budget_bytes:
                return
            entry = self._entries[key]
            if entry.in_use == 0:
                used -= entry.nbytes
                self._evict(key)
        if used + need > self.budget_bytes:
            log.warning("cache on %s: %.1f MiB in use + %.1f MiB needed exceeds the budget of %.1f MiB "
                        "(cache.memory_budget_gb); loading anyway", device, used / 2**20, need / 2**20,
                        self.budget_bytes / 2**20)

    def _evict(self, key: tuple[str, str, str]) -> None:
        entry = self._entries.pop(key)
        self.counters["evictions"] += 1
        log.info("model %s evicted from %s (%.1f MiB)", entry.model, entry.device, entry.nbytes / 2**20)
        if entry.device.startswith("cuda"):
            try:
                import torch

                del entry
                torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass

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


def _dtype_arg(dtype: str) -> Any:
    """The dtype as given to the pipe constructor: a torch dtype when the key names one."""
    if dtype.startswith("torch."):
        import torch

        return getattr(torch, dtype[len("torch."):])
    return None if dtype == "None" else dtype
