"""Guards in front of every route: Host and Origin checks, CORS, and the body size each route takes.

- **Host** (DNS rebinding): a server that runs without users on loopback answers only to loopback
  names (``localhost``, ``127.x.y.z``, ``[::1]``) with no port or the port it is bound to. A web
  page that points a name of its own at 127.0.0.1 still sends that name as ``Host``, and is refused.
- **Origin** (cross-site requests): without users, a request whose ``Origin`` is present and is
  neither the server's own nor listed in ``server.cors_origins`` is refused, so no page elsewhere
  can post a form to ``/uploads`` or queue jobs. With users every request needs a bearer token,
  which browsers never add by themselves (there are no cookies): a foreign ``Origin`` on such a
  request was sent by the token's holder and is served, without CORS headers (the page cannot
  read the answer) unless its origin is listed.
- **CORS**: listed origins get ``Access-Control-Allow-Origin`` and answers to their preflights.
- **Auth failures**: failed token checks per client address and HTTP Basic user name
  (``server.auth_failures_per_minute``, ratelimit.py): past the limit, 429 with ``Retry-After``.
- **Body sizes**: :data:`SMALL_BODY_BYTES` for every route but those carrying images
  (:data:`LARGE_BODY_ENDPOINTS`), which take the upload limit plus the envelope.

:meth:`RequestGuard.check_head` applies all of this and the token check to a request's head
alone, so that waitress refuses a body before reading it (server.py); the Flask hooks apply the
same rules to every request that gets through. docs/security.md lists every limit and why.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Callable, TypeVar
from urllib.parse import parse_qs

from flask import Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

from ..config import Config, Limits
from ..errors import Forbidden, MultigenError, TooLarge, Unauthorized
from ..users import UserTable
from . import auth
from .ratelimit import AuthFailures, TooManyAuthFailures, client_address, normalized_proxies

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the body any route but uploads and jobs may have: a session or a cancel is a few hundred bytes, and
#: without it every route would buffer the upload limit (tens of MB) for anyone who can reach the port
SMALL_BODY_BYTES = 1024 * 1024
#: routes whose bodies carry images (multipart uploads, ``data:`` URLs in jobs); they take
#: :func:`upload_body_limit`. Step 9's dialects add their image routes here.
LARGE_BODY_ENDPOINTS = frozenset({"uploads.create_upload", "jobs.create_job", "a1111.txt2img", "a1111.img2img",
                                  "a1111.png_info", "a1111.extra_single_image",
                                  "openai.create_edit"})
#: room for the multipart envelope or a JSON body with an inline data: URL around an upload
BODY_OVERHEAD = 64 * 1024
#: seconds a browser may keep a preflight's answer
PREFLIGHT_MAX_AGE = 600
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"
#: what a listed origin's page may read of an answer beyond the always-readable headers
CORS_EXPOSE = "Retry-After, WWW-Authenticate"

TOKENS = "tokens"
ANONYMOUS_LOOPBACK = "anonymous-loopback"
ANONYMOUS_ALLOWED = "anonymous-allowed"


def upload_body_limit(limits: Limits) -> int:
    """The largest body of an upload or a job: one upload as base64 (4/3) plus the envelope."""
    return int(limits.upload_max_bytes * 4 / 3) + BODY_OVERHEAD


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_mode(config: Config) -> str:
    """``tokens`` (users in config), ``anonymous-loopback`` or ``anonymous-allowed`` (no users, bound
    beyond loopback: ``server.check_bind_auth`` serves it only with ``server.allow_anonymous``)."""
    if config.users:
        return TOKENS
    return ANONYMOUS_LOOPBACK if is_loopback(config.server.host) else ANONYMOUS_ALLOWED


def split_host(value: str) -> tuple[str, int | None]:
    """``"[::1]:8000"`` -> ``("::1", 8000)``, ``"localhost"`` -> ``("localhost", None)``.

    Raises:
        ValueError: the port is not a number.
    """
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ValueError(value)
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, None
    return name, int(port) if port is not None else None


class RequestGuard:
    """Host/Origin checks, CORS and body limits of one app (``app.extensions["multigen.guard"]``).

    Args:
        config: the server's config (mode, listed origins, limits, the file named in messages).
        url_map: the app's routes, to know a request's route from its head.
        users: the users table (auth on), or None.
    """

    def __init__(self, config: Config, url_map: Map, users: UserTable | None):
        self.file = config.file
        self.mode = auth_mode(config)
        self.cors_origins = frozenset(config.server.cors_origins)
        self.large_body = upload_body_limit(config.limits)
        #: the port Host may name; None accepts any. run_server sets the one waitress got (``--port 0``)
        self.bound_port: int | None = config.server.port or None
        self.url_map = url_map
        self.users = users
        #: failed token checks per client address and Basic user name (ratelimit.py)
        self.auth_failures = AuthFailures(config.server.auth_failures_per_minute)
        self.trusted_proxies = normalized_proxies(config.server.trusted_proxies)
        #: URL prefix -> how that dialect words a refusal made from a request's head (its error shape)
        self.dialect_errors: dict[str, Callable[[MultigenError], MultigenError]] = {}

    # ---- the rules -------------------------------------------------------------------------------------
    def body_limit(self, endpoint: str | None) -> int:
        return self.large_body if endpoint in LARGE_BODY_ENDPOINTS else SMALL_BODY_BYTES

    def refusal(self, host: str | None, origin: str | None, preflight: bool) -> Forbidden | None:
        """The 403 for a foreign Host (loopback mode) or Origin (no users, or any preflight), else None."""
        if self.mode == ANONYMOUS_LOOPBACK and host and not self._loopback_host(host):
            port = self.bound_port or "PORT"
            return Forbidden(f"Host {host[:100]!r} is not a loopback name: a server without users answers only to "
                             f"localhost, 127.0.0.1 or [::1] (port {port}), so that no web page can reach it by "
                             f"pointing a name of its own at 127.0.0.1 (DNS rebinding). Open http://127.0.0.1:{port}/"
                             f", or add users (`multigen users add NAME --config {self.file}`) to serve other names",
                             field="Host")
        checked = preflight or self.mode != TOKENS
        if origin is not None and checked and not self.allowed_origin(origin, host):
            return Forbidden(f"the Origin {origin[:100]} may not use this server (it serves its own page and the "
                             f"origins it lists). To let a browser tool at that origin in, add it to "
                             f"server.cors_origins in {self.file} and restart", field="Origin")
        return None

    def allowed_origin(self, origin: str, host: str | None) -> bool:
        return origin.lower() in self.cors_origins or self.own_origin(origin, host)

    def own_origin(self, origin: str, host: str | None) -> bool:
        """The server's own page: the Origin names the Host the request was sent to (or, on loopback, any
        loopback name with the server's port: the same server)."""
        scheme, sep, rest = origin.lower().partition("://")
        if not sep or scheme not in ("http", "https"):
            return False  # "null" (sandboxed frames, files) and anything odd
        if host and rest == host.lower():
            return True
        if self.mode != ANONYMOUS_LOOPBACK or self.bound_port is None:
            return False
        try:
            name, port = split_host(rest)
        except ValueError:
            return False
        return is_loopback(name) and (port or (443 if scheme == "https" else 80)) == self.bound_port

    def _loopback_host(self, host: str) -> bool:
        try:
            name, port = split_host(host)
        except ValueError:
            return False
        return is_loopback(name) and (port is None or self.bound_port is None or port == self.bound_port)

    def too_large(self, size: int | None, limit: int) -> TooLarge:
        what = f"the body is {size} bytes" if size is not None else "the body is too large"
        return TooLarge(f"{what}; this route takes at most {limit} bytes (uploads and jobs, which carry images, "
                        f"up to {self.large_body})", field="body")

    def user_of(self, method: str, endpoint: str | None, authorization: str, query_token: str | None,
                peer: str | None, forwarded_for: str | None) -> tuple[str, str]:
        """:func:`auth.user_for_credentials`, refused with 429 once the client (or the Basic user name) has
        failed too often within a minute; a failure with credentials counts, one without any does not.

        Raises:
            TooManyAuthFailures: the client is over ``server.auth_failures_per_minute``.
            Unauthorized: as :func:`auth.user_for_credentials`.
        """
        users = self.users
        assert users is not None
        return self.failure_limited(
            lambda: auth.user_for_credentials(users, method, endpoint, authorization, query_token),
            authorization, bool(authorization or query_token), peer, forwarded_for)

    def failure_limited(self, check: Callable[[], T], authorization: str, sent: bool, peer: str | None,
                        forwarded_for: str | None) -> T:
        """``check()`` (a token check: the API's, or ``/metrics``'s), refused with 429 for a client over the
        auth failure limit; an Unauthorized it raises counts when credentials were ``sent``.

        Raises:
            TooManyAuthFailures: the client is over ``server.auth_failures_per_minute``.
            Unauthorized: from ``check``.
        """
        keys = auth.failure_keys(client_address(peer, forwarded_for, self.trusted_proxies), authorization)
        self.auth_failures.check(keys)
        try:
            return check()
        except Unauthorized:
            if sent:
                self.auth_failures.record(keys)
            raise

    # ---- Flask hooks -----------------------------------------------------------------------------------
    def before_request(self) -> Response | None:
        """Before auth: refuse a foreign Host or Origin; answer preflights (they carry no token)."""
        origin = request.headers.get("Origin")
        preflight = _is_preflight(request.method, origin, request.headers.get("Access-Control-Request-Method"))
        error = self.refusal(request.headers.get("Host"), origin, preflight)
        if error is not None:
            raise error
        if preflight:
            response = Response(status=204)
            response.headers.update({
                "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS, "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE)})
            response.vary.add("Origin")
            return response
        return None

    def limit_body(self) -> None:
        """After auth: the route's body limit (also what werkzeug enforces while it reads a chunked body)."""
        limit = self.body_limit(request.endpoint)
        request.max_content_length = limit
        if request.content_length is not None and request.content_length > limit:
            raise self.too_large(request.content_length, limit)

    def after_request(self, response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and origin.lower() in self.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            response.vary.add("Origin")
        return response

    # ---- waitress: a request's head, before its body is read -------------------------------------------
    def check_head(self, method: str, path: str, query: str, header: Callable[[str], str | None],
                   peer: str | None = None) -> tuple[MultigenError | None, int]:
        """The error to answer a request with before reading its body (None: read it), and its body limit.

        Args:
            method, path, query: of the request line (path unquoted).
            header: a request header by name, or None.
            peer: the client's address (the TCP peer), for the auth failure limit.
        """
        endpoint = self._endpoint(path, method)
        limit = self.body_limit(endpoint)
        origin = header("Origin")
        preflight = _is_preflight(method, origin, header("Access-Control-Request-Method"))
        error: MultigenError | None = self.refusal(header("Host"), origin, preflight)
        if error is None and not preflight and self.users is not None and auth.needs_token(path, endpoint):
            query_token = (parse_qs(query).get("access_token") or [None])[0]
            try:
                self.user_of(method, endpoint, header("Authorization") or "", query_token, peer,
                             header("X-Forwarded-For"))
            except (Unauthorized, TooManyAuthFailures) as e:
                error = e
        length = header("Content-Length")
        if error is None and length is not None and length.isdigit() and int(length) > limit:
            error = self.too_large(int(length), limit)
        if error is not None:
            error = next((word(error) for prefix, word in self.dialect_errors.items() if path.startswith(prefix)),
                         error)
            log.info("%r %r refused before its body was read: %s %s", method, path, error.http_status, error.code)
        return error, limit

    def _endpoint(self, path: str, method: str) -> str | None:
        try:
            rule, _ = self.url_map.bind("localhost").match(path, method, return_rule=True)
        except HTTPException:  # 404, 405, a redirect: the small limit, and a token under /api/
            return None
        return rule.endpoint


def _is_preflight(method: str, origin: str | None, requested_method: str | None) -> bool:
    return method == "OPTIONS" and origin is not None and requested_method is not None
