"""/docs (Swagger UI) and /redoc from assets the service serves itself, so they render offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN: where nothing outside is reachable
they are blank. fastapi-offline ships the same bundles (Swagger UI 5, which reads the OpenAPI
3.1 that FastAPI emits, and ReDoc 2); they are mounted under ASSETS_PATH. Like /openapi.json,
the pages and assets need no API key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs/assets"
# swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


def install_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc from local assets; the app must be built with docs_url=None, redoc_url=None."""
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def page(path: str, render: Callable[..., HTMLResponse], title: str, **assets: str | bool) -> None:
        """Serve path with render(...): its script, style and icon are asset file names, under root_path."""

        async def endpoint(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            urls = {name: f"{root}{ASSETS_PATH}/{v}" if isinstance(v, str) else v for name, v in assets.items()}
            return render(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - {title}", **urls)

        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)

    page(
        "/docs",
        get_swagger_ui_html,
        "Swagger UI",
        swagger_js_url="swagger-ui-bundle.js",
        swagger_css_url="swagger-ui.css",
        swagger_favicon_url="favicon.png",
    )
    page(
        "/redoc",
        get_redoc_html,
        "ReDoc",
        redoc_js_url="redoc.standalone.js",
        redoc_favicon_url="favicon.png",
        with_google_fonts=False,
    )
