"""Where webhooks may go: config.yaml's ``webhooks`` section and the checks of a job's ``webhook_url``.

``webhooks.allowed_hosts`` (networks, addresses, host names and ``*.domain`` patterns; default:
loopback only) decides at queue time which URLs a job may name (:func:`check_webhook_url`, a 400
naming ``webhook_url``, the allowed hosts and the key), and again at each delivery after the name is
resolved (:func:`allowed_addresses`): a name that resolves outside the allowed networks (DNS
rebinding) is refused. webhooks.py delivers.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from multigen.pipes.spec import MAX_WEBHOOK_URL_CHARS

from .errors import ConfigError, InvalidInput
from .yamlfields import mapping_at, typed

#: what a config that says nothing allows: this machine only (no SSRF into the server's network)
DEFAULT_ALLOWED_HOSTS = ("127.0.0.0/8", "::1", "localhost")
#: longest ``webhook_url`` a job may carry
MAX_URL_CHARS = MAX_WEBHOOK_URL_CHARS
#: the config key that lists the allowed targets (named in every refusal)
ALLOWED_HOSTS_KEY = "webhooks.allowed_hosts"


@dataclass
class WebhookSettings:
    """config.yaml's ``webhooks`` section."""

    #: targets a job's ``webhook_url`` may name: networks/addresses (``10.1.0.0/16``, ``::1``), host names
    #: (``hooks.example.org``) and ``*.example.org``; a listed name may resolve to public addresses only
    allowed_hosts: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS))
    timeout_seconds: float = 10.0  # one POST: connect, send and read the answer
    max_attempts: int = 8  # then the delivery is ``failed``
    backoff_seconds: float = 10.0  # wait before the second attempt; doubled after each failure...
    backoff_max_seconds: float = 3600.0  # ...up to this
    #: e.g. ``https://gen.example.org``: image URLs in the payload are absolute; "" = relative to the server
    public_base_url: str = ""


def read_webhook_settings(data: dict[str, Any], file: Path) -> WebhookSettings:
    """The ``webhooks`` section of a config.yaml, each key checked.

    Raises:
        ConfigError: naming the key and the fix.
    """
    section = mapping_at(data, "webhooks", file)
    out = WebhookSettings()
    for key, value in section.items():
        if not hasattr(out, key):
            raise ConfigError(str(file), f"webhooks.{key}", "unknown key",
                              f"use one of: {', '.join(out.__dataclass_fields__)}")
        default = getattr(out, key)
        kind = list if isinstance(default, list) else (int, float) if isinstance(default, float) else type(default)
        value = typed(section, key, kind, file, default, f"set webhooks.{key} like the default {default!r}",
                      where=f"webhooks.{key}")
        setattr(out, key, float(value) if isinstance(default, float) else value)
    for i, entry in enumerate(out.allowed_hosts):
        if not isinstance(entry, str) or not entry.strip() or _network(entry) is None and not _is_name(entry):
            raise ConfigError(str(file), f"{ALLOWED_HOSTS_KEY}.{i}", f"{entry!r} is not a network, address or "
                              "host name", "write e.g. 127.0.0.0/8, ::1, localhost or *.example.org")
    for key in ("timeout_seconds", "backoff_seconds", "backoff_max_seconds"):
        if not getattr(out, key) > 0:
            raise ConfigError(str(file), f"webhooks.{key}", f"{getattr(out, key)} is not above 0",
                              f"set webhooks.{key} to a number of seconds")
    if out.max_attempts < 1:
        raise ConfigError(str(file), "webhooks.max_attempts", f"{out.max_attempts} is below 1",
                          "set webhooks.max_attempts to 1 or more")
    base = out.public_base_url
    if base and (urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).hostname):
        raise ConfigError(str(file), "webhooks.public_base_url", f"{base!r} is not an http(s) URL",
                          "write it as the clients reach the server, e.g. https://gen.example.org")
    out.public_base_url = base.rstrip("/")
    return out


# ---- which targets are allowed ----------------------------------------------------------------
def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry.strip().strip("[]"), strict=False)
    except ValueError:
        return None


def _is_name(entry: str) -> bool:
    name = entry.strip().lower().removeprefix("*.")
    return bool(name) and all(part and part.replace("-", "").isalnum() for part in name.split("."))


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _in_networks(address: Any, allowed: list[str]) -> bool:
    nets = [n for n in (_network(e) for e in allowed) if n is not None]
    return any(address.version == n.version and address in n for n in nets)


def _name_listed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.strip().lower()
        if _network(entry) is not None:
            continue
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _refusal(url: str, why: str, allowed: list[str]) -> str:
    return (f"webhook_url {url!r}: {why}; allowed hosts: {', '.join(allowed) or 'none'} (config "
            f"{ALLOWED_HOSTS_KEY}: ask the admin to add the receiver's host or network)")


def check_webhook_url(url: Any, settings: WebhookSettings) -> str:
    """A job's ``webhook_url`` checked at queue time: http(s), not too long, its host allowed.

    Raises:
        InvalidInput: naming ``webhook_url``, the allowed hosts and the config key to change.
    """
    if not isinstance(url, str) or not url:
        raise InvalidInput("webhook_url must be an http:// or https:// URL", field="webhook_url")
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"webhook_url is {len(url)} characters long, more than {MAX_URL_CHARS}",
                           field="webhook_url")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.port == 0:  # reading it checks it: a port not a number or out of range is a ValueError
            raise ValueError("port 0")
    except ValueError as e:
        raise InvalidInput(f"webhook_url {url!r} is not a valid URL ({e})", field="webhook_url") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidInput(f"webhook_url {url!r} must be an http:// or https:// URL with a host",
                           field="webhook_url")
    if parts.username or parts.password or any(c in url for c in "\r\n\t "):
        raise InvalidInput(f"webhook_url {url!r} may not hold credentials or white space", field="webhook_url")
    address = _address(host)
    allowed = settings.allowed_hosts
    ok = _in_networks(address, allowed) if address is not None else _name_listed(host, allowed)
    if not ok:
        raise InvalidInput(_refusal(url, f"the host {host!r} is not allowed as a webhook target", allowed),
                           field="webhook_url", code="webhook_host_not_allowed")
    return url


def take_job_extras(setup_params: dict[str, Any], settings: WebhookSettings) -> dict[str, Any]:
    """Take a job's ``webhook_url`` and ``grid`` out of its setup parameters, checked; returns the set ones
    (they ride in the job's stored params, and the runner keeps them from the pipe).

    Raises:
        InvalidInput: naming ``webhook_url`` or ``grid``.
    """
    out: dict[str, Any] = {}
    url = setup_params.pop("webhook_url", None)
    if url is not None:
        out["webhook_url"] = check_webhook_url(url, settings)
    grid = setup_params.pop("grid", None)
    if grid is not None and not isinstance(grid, bool):
        raise InvalidInput(f"grid must be true or false, got {grid!r}", field="grid")
    if grid:
        out["grid"] = True
    return out


def allowed_addresses(host: str, port: int, allowed: list[str]) -> list[str]:
    """The addresses ``host`` resolves to now, each allowed, or raise (DNS rebinding, a changed config).

    An address is allowed inside a listed network, or, for a listed host name, when it is a public one
    (a listed name that suddenly resolves into a private or loopback network is refused unless that
    network is listed too).

    Raises:
        WebhookRefused: naming the host, the address and the config key.
    """
    literal = _address(host)
    listed_name = literal is None and _name_listed(host, allowed)
    if literal is None and not listed_name:
        raise WebhookRefused(f"host {host!r} is no longer allowed ({ALLOWED_HOSTS_KEY})")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise WebhookRefused(f"host {host!r} does not resolve ({e})") from None
    out = []
    for info in infos:
        addr = _address(str(info[4][0]))
        if addr is None:
            continue
        if not (_in_networks(addr, allowed) or (listed_name and addr.is_global)):
            raise WebhookRefused(f"host {host!r} resolves to {addr}, outside the allowed hosts "
                                 f"({ALLOWED_HOSTS_KEY}: {', '.join(allowed)})")
        out.append(str(addr))
    if not out:
        raise WebhookRefused(f"host {host!r} resolves to no address")
    return out


class WebhookRefused(Exception):
    """A delivery that must not be sent to where its URL points now (it is retried: the DNS may change)."""


__all__ = ["WebhookSettings", "WebhookRefused", "read_webhook_settings", "check_webhook_url", "take_job_extras",
           "allowed_addresses", "DEFAULT_ALLOWED_HOSTS", "MAX_URL_CHARS", "ALLOWED_HOSTS_KEY"]
