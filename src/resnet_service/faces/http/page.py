"""The upload page at ``GET /``: plain HTML/CSS/JS shipped inside the package, served by the
same app (no build step, no CDN). The page talks to the public API like any other client."""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

#: Everything comes from this origin; previews are blob: URLs made in the page.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

_PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny and changes with the package: always revalidate.
    "Cache-Control": "no-cache",
}


def install(app: FastAPI) -> None:
    """Add ``GET /`` and ``/static/*``; neither appears in the OpenAPI spec."""
    web = files("resnet_service") / "web"
    page = (web / "index.html").read_text(encoding="utf-8")  # read once: it never changes
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    app.include_router(router)
    app.mount("/static", StaticFiles(packages=[("resnet_service", "web")]), name="static")
