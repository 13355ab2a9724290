"""/docs and /redoc render from the service alone: no CDN, no key, and a real browser shows the operations."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bench.server import Server

OPERATIONS = {"/predict", "/generate", "/generate_stream", "/tokenize", "/v1/completions"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# In CI (.ci/run installs chromium) a missing browser fails the test instead of skipping it.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium not installed (apt-get install chromium; CI installs it)",
)


def asset_urls(html: str) -> list[str]:
    """Every src= and href= in a page."""
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = asset_urls(r.text)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from outside the service"
        assert client.get(url).status_code == 200, url
    assert "cdn." not in r.text and "https://" not in r.text and "fonts.googleapis" not in r.text
    assert "/openapi.json" in r.text


def test_every_operation_in_the_schema_has_an_operation_id_of_its_own(client: TestClient) -> None:
    """Client generators (openapi-generator, openapi-python-client) key methods by operationId."""
    paths = client.get("/openapi.json").json()["paths"]
    ids = [(op["operationId"], path, method) for path, ops in paths.items() for method, op in ops.items()]
    seen: dict[str, tuple[str, str]] = {}
    for op_id, path, method in ids:
        assert op_id not in seen, f"{method.upper()} {path} shares {op_id} with {seen[op_id]}"
        seen[op_id] = (path, method)
    assert {"get", "head"} <= set(paths["/health"]) and {"get", "head"} <= set(paths["/ready"])
    r = client.head("/health")
    assert r.status_code == 200 and not r.content


def test_docs_stay_open_with_an_api_key(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(api_key="s3cret")
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 200, path
    assert client.post("/predict", json={"inputs": "a"}).status_code == 401


def test_docs_traffic_has_route_labels_of_its_own(client: TestClient) -> None:
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui.css", "/docs/assets/missing.js"):
        client.get(path)
    text = client.get("/metrics").text
    for route, status in [("/docs", 200), ("/openapi.json", 200), ("/docs/assets", 200), ("/docs/assets", 404)]:
        assert f'mtp_requests_total{{route="{route}",status="{status}"}} 1.0' in text, (route, status)
    assert 'route="unmatched"' not in text  # kept for paths that no route serves


def render(url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, from headless Chromium that can resolve no host but 127.0.0.1."""
    assert CHROMIUM is not None, "chromium not installed: CI must install it (.ci/run)"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # nothing reachable but the service
        "--virtual-time-budget=20000",  # let the page fetch /openapi.json and render
        "--dump-dom",
        url,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@needs_chromium
def test_swagger_ui_renders_every_operation_in_a_browser(server: Server, tmp_path: Path) -> None:
    dom = render(f"{server.url}/docs", tmp_path)
    rendered = set(re.findall(r'class="opblock-summary-path"[^>]*data-path="([^"]+)"', dom))
    assert OPERATIONS <= rendered, dom[-3000:]
    assert "Unable to render this definition" not in dom  # what Swagger UI 4 says of OpenAPI 3.1


@needs_chromium
def test_redoc_renders_every_operation_in_a_browser(server: Server, tmp_path: Path) -> None:
    dom = render(f"{server.url}/redoc", tmp_path)
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "Something went wrong" not in text, text[-3000:]
    for path in OPERATIONS:
        assert re.search(rf"\b(?:post|get)\s+{re.escape(path)}\b", text, flags=re.I), path
