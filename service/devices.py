"""Which devices get a worker, and how many torch threads each worker uses."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how much lower (``nice``) the threads of a CPU-only worker run than the HTTP threads under ``multigen
#: serve``: at 10 the scheduler gives a waking HTTP thread the core at once (weight 1024 against 110), so polls
#: do not queue behind generation, while generation still has every core whenever no request runs
#: (docs/performance.md measures it against giving generation fewer threads). The default of config.yaml's
#: ``server.worker_nice``; ``$MULTIGEN_WORKER_NICE`` overrides both; 0 turns it off.
WORKER_NICE = 10


def resolve_devices(spec: str | list[str], config_file: Path | None = None) -> list[str]:
    """``auto`` -> every visible CUDA device, else ``["cpu"]``; a list is checked and kept.

    Raises:
        ConfigError: a device that is not ``cpu`` or a visible ``cuda:N``.
    """
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out = []
    for d in spec:
        ok = d == "cpu" or (d.startswith("cuda:") and d[5:].isdigit() and int(d[5:]) < n) or (d == "cuda" and n)
        if not ok:
            visible = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(n)])
            raise ConfigError(str(config_file or "config.yaml"), "devices", f"device {d!r} is not available",
                              f"use `auto` or some of: {visible}")
        d = "cuda:0" if d == "cuda" else d
        if d in out:  # two workers on one device would share (and race on) the same cached pipe objects
            raise ConfigError(str(config_file or "config.yaml"), "devices", f"device {d!r} is listed twice",
                              "list each device once (one worker per device)")
        out.append(d)
    return out


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def worker_threads(configured: int | None, devices: list[str]) -> int:
    """Torch threads per worker: the configured number, else all cores for a lone CPU worker,
    else the cores shared out between the workers (each GPU worker needs a little CPU)."""
    cores = cpu_cores()
    if configured:
        return configured
    return cores if devices == ["cpu"] else max(1, cores // len(devices))


def worker_nice(devices: list[str], configured: int = WORKER_NICE) -> int:
    """How much lower the workers of ``devices`` should run than the HTTP threads: ``configured`` (config.yaml
    ``server.worker_nice``; ``$MULTIGEN_WORKER_NICE`` wins) for a lone CPU worker, 0 where GPUs do the work
    (their workers mostly wait)."""
    env = os.environ.get("MULTIGEN_WORKER_NICE")
    nice = int(env) if env not in (None, "") else configured
    return max(0, nice) if devices == ["cpu"] else 0


def run_lowered(start: Callable[[], T], nice: int) -> T:
    """Call ``start`` in a helper thread that first lowers its own priority by ``nice``; the threads it
    starts (the workers, and the OpenMP threads torch starts from them) inherit the lower priority, the
    calling thread keeps its own. Linux only (elsewhere, or with ``nice`` 0, ``start`` runs here as it is).

    Raises:
        Whatever ``start`` raises.
    """
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return start()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            tid = threading.get_native_id()  # on Linux PRIO_PROCESS with a thread id sets that thread only
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError as exc:  # pragma: no cover - a sandbox that forbids it: run at the same priority
            log.warning("could not lower the workers' priority: %s", exc)
        try:
            box["result"] = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    helper = threading.Thread(target=run, name="multigen-start-workers")
    helper.start()
    helper.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
