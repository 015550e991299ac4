"""Repeated auth failures from one client are refused for a while (429 with ``Retry-After``).

A token is 256 random bits, so guessing one is hopeless; the limit is there so that a script on the
network cannot spend the server's CPU and logs on millions of tries, and so that a client that keeps
sending a revoked token stops. Failures are counted per client address, and per user name for HTTP
Basic (``user:token``), within a sliding minute: past ``server.auth_failures_per_minute`` every request
that needs a token from that address (or for that name) gets 429 until the oldest failure leaves the
minute, a valid token included (otherwise the answer would still tell a right guess from a wrong one).
A success does not count and does not reset the count. Requests without any credentials do not
count: they are no guesses (a browser opening the API, a health check).

Behind a reverse proxy every request comes from the proxy's address: list it in
``server.trusted_proxies`` and the client is the address the proxy names last in ``X-Forwarded-For``
(the one it saw itself; what the client wrote there is ignored). docs/security.md shows the proxy's side.
"""
from __future__ import annotations

import collections
import ipaddress
import math
import threading
import time
from typing import Callable, Iterable

from ..errors import MultigenError

#: the sliding window of the count
WINDOW_SECONDS = 60.0
#: keys (addresses, names) remembered at most; past it the ones idle longest are forgotten, so that a
#: flood of made-up names or addresses cannot grow memory
MAX_KEYS = 10000


class TooManyAuthFailures(MultigenError):
    code = "too_many_auth_failures"
    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, field="Authorization")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def client_address(peer: str | None, forwarded_for: str | None, trusted: frozenset[str]) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the last address of
    ``X-Forwarded-For`` that is not itself a trusted proxy (what a client put first is its own claim)."""
    address = peer or "unknown"
    if address in trusted and forwarded_for:
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            if not hop:
                break
            address = hop
            if hop not in trusted:
                break
    return address


def normalized_proxies(values: Iterable[str]) -> frozenset[str]:
    """``server.trusted_proxies`` as addresses compare (``::1``, not ``0:0::1``).

    Raises:
        ValueError: naming a value that is no IP address.
    """
    return frozenset(str(ipaddress.ip_address(v)) for v in values)


class AuthFailures:
    """Failed token checks per key within a sliding minute.

    Args:
        per_minute: failures allowed within :data:`WINDOW_SECONDS` per key; 0 turns the limit off.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def check(self, keys: Iterable[str]) -> None:
        """Raise when any of ``keys`` has used up its failures.

        Raises:
            TooManyAuthFailures: with the seconds until the oldest counted failure leaves the window.
        """
        if not self.per_minute:
            return
        with self._lock:
            now = self._clock()
            for key in keys:
                times = self._recent(key, now)
                if times is not None and len(times) >= self.per_minute:
                    retry = max(1, math.ceil(times[0] + WINDOW_SECONDS - now))
                    raise TooManyAuthFailures(
                        f"{len(times)} failed token checks within a minute from this client: wait {retry} s. "
                        "Check the token (`multigen users add NAME` makes a new one); the limit is "
                        "server.auth_failures_per_minute", retry)

    def record(self, keys: Iterable[str]) -> None:
        """Count one failure against each of ``keys``."""
        if not self.per_minute:
            return
        with self._lock:
            now = self._clock()
            for key in keys:
                times = self._recent(key, now)
                if times is None:
                    times = self._failures[key] = collections.deque()
                self._failures.move_to_end(key)
                times.append(now)
                while len(times) > self.per_minute:  # older ones no longer matter
                    times.popleft()
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)

    def _recent(self, key: str, now: float) -> collections.deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times
