"""Which devices get a worker, and how many torch threads each worker uses."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


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
