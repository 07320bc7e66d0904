"""The chat page: `GET /` and its static files under `/ui/`, shipped inside the package.

The page (static/index.html, static/app.js, static/style.css) is plain HTML, CSS and JavaScript
modules: no build step, nothing fetched from a CDN. The markdown renderer (marked) and the HTML
sanitizer (DOMPurify) are vendored byte for byte from their npm tarballs under static/vendor/,
with their licences and static/vendor/manifest.json (versions, tarball integrity, sha256 per file;
tests/serving/test_webui_assets.py checks the files against it).

Every answer goes through marked, then DOMPurify, before it reaches the DOM, and the page is
served with a strict Content-Security-Policy: scripts, styles and connections from this origin
only, images from this origin or data:/blob: URLs (the model's images arrive as data URLs), no
inline script, no frames. The page and its files need no API key (they hold no data); the API
calls the page makes carry the key the user types, as a Bearer header.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from .protocol import ApiError

STATIC = Path(__file__).with_name("static")
PREFIX = "/ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# what the page is made of; anything else under /ui/ is a 404
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".svg": "image/svg+xml", ".json": "application/json"}


def static_file(name: str) -> Path:
    """The file `name` under static/ (no way out of it), or a 404."""
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise ApiError(404, f"no file {PREFIX}/{name}", code="not_found")
    return path


def add_webui(app: FastAPI) -> None:
    """Adds `GET /` (the page) and `GET /ui/{file}` (its scripts, styles, vendored libraries)."""

    def send(path: Path) -> FileResponse:
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def page():
        return send(static_file("index.html"))

    @app.get(PREFIX + "/{name:path}", include_in_schema=False)
    async def asset(name: str):
        return send(static_file(name))
