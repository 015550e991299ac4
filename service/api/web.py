"""The web page: ``GET /`` and its static files, shipped in the package (no build step).

The page (service/web/) talks only to the REST API of this server. The Content-Security-Policy
header makes the browser refuse anything from another host, so the page works offline and leaks
nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, Response, send_from_directory

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# everything from this origin only; images may also be blob: (fetched with the token) or data:
CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
       "script-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'")

bp = Blueprint("web", __name__)


def _page_headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    # small files: always revalidate (ETag / Last-Modified), so an upgraded server serves the new page
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/")
def index() -> Response:
    """The page itself."""
    return _page_headers(send_from_directory(WEB_DIR, "index.html"))


@bp.get("/favicon.ico")
def favicon() -> Response:
    """No icon (the page declares none); answering 204 keeps browsers' logs free of 404s."""
    return Response(status=204)


@bp.get("/static/<path:name>")
def static_file(name: str) -> Response:
    """The page's scripts and stylesheet (``send_from_directory`` refuses paths leaving WEB_DIR)."""
    resp = send_from_directory(WEB_DIR, name)
    if name.endswith(".js"):
        resp.mimetype = "text/javascript"
    return _page_headers(resp)
