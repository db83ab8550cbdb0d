"""``/ui``: the web dashboard, served from the installed package.

The dashboard is plain HTML, CSS and JavaScript (ES modules) kept next to this module
as package data: no build step, nothing fetched from a CDN, so it works offline. It
reads everything through the public ``/v1`` API with the token its user signs in
with (kept in the tab's ``sessionStorage``, sent as a bearer header).

Both routes are public: the files hold no data. Only the files listed in
:data:`ASSETS` are served (never this package's Python source), each with a strict
Content-Security-Policy (scripts, styles and requests from this origin only, so an
injected string cannot run), ``ETag`` revalidation and ``no-cache`` so a browser
picks up a new version at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from aiohttp import web

from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import PUBLIC, Response, Routes

routes = Routes(tag="dashboard")

# Every file the dashboard loads, by name. Adding a module means adding it here.
ASSETS: Final = {
    "index.html": "text/html",
    "style.css": "text/css",
    "app.js": "text/javascript",
    "api.js": "text/javascript",
    "nav.js": "text/javascript",
    "dom.js": "text/javascript",
    "format.js": "text/javascript",
    "decimal.js": "text/javascript",
    "range.js": "text/javascript",
    "chart.js": "text/javascript",
    "icons.js": "text/javascript",
    "csv.js": "text/javascript",
    "fleet.js": "text/javascript",
    "account.js": "text/javascript",
    "revenue.js": "text/javascript",
}

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


_cache: dict[str, Asset] = {}
NOT_MODIFIED: Final = Response(304, "Not modified since the version whose ETag was sent")


def asset(name: str) -> Asset:
    """A dashboard file, read from the package on first use."""
    found = _cache.get(name)
    if found is None:
        content_type = ASSETS.get(name)
        if content_type is None:
            raise ApiProblem(ProblemType.NOT_FOUND, f"the dashboard has no file {name!r}")
        body = resources.files(__name__).joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        found = _cache[name] = Asset(body, content_type, etag)
    return found


def _serve(request: web.Request, name: str) -> web.Response:
    item = asset(name)
    headers = {
        "ETag": item.etag,
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if item.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=item.body, content_type=item.content_type, charset="utf-8",
                        headers=headers)


@routes.get(
    "/ui",
    PUBLIC,
    summary="The web dashboard",
    description="The dashboard's page. Sign in there with an API token; it calls this API "
    "with it. No token is needed for the page itself: it holds no data.",
    response=str,
    media_type="text/html",
    extra_responses=(NOT_MODIFIED,),
)
async def dashboard_page(request: web.Request) -> web.StreamResponse:
    return _serve(request, "index.html")


@routes.get(
    "/ui/{asset}",
    PUBLIC,
    summary="A script or style sheet of the web dashboard",
    path_params={"asset": "file name, such as app.js or style.css"},
    response=str,
    media_type="text/*",
    extra_responses=(NOT_MODIFIED,),
)
async def dashboard_asset(request: web.Request) -> web.StreamResponse:
    return _serve(request, request.match_info["asset"])
