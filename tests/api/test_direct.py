"""Direct routes (app/api/direct.py): a well-formed POST /predict skips FastAPI's per-request
layers, and every reply is the one FastAPI's own path gives."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from app.api.direct import DirectRoutes

JSON = {"content-type": "application/json"}
# (body, headers): well-formed requests, and ones each refused somewhere else: by the JSON
# parser, the schema, the route's own checks (an APIError from the endpoint), the media type
REQUESTS: list[tuple[bytes, dict[str, str]]] = [
    (json.dumps({"inputs": "To be, or not to be", "top_n": 3}).encode(), JSON),
    (json.dumps({"inputs": ["naïve café", "question"], "positions": 2}).encode(), JSON),
    (json.dumps({"input_ids": [[5, 6, 7]], "candidates": ["ab", "c"]}).encode(), JSON),
    (json.dumps({"inputs": "x", "k": 2}).encode(), {"content-type": "application/json; charset=utf-8"}),
    (json.dumps({"inputs": "x"}).encode(), {"content-type": "application/vnd.api+json"}),
    (b'{"inputs": "x", "inputs": "To be", "positions": null}', JSON),  # the last of a repeated key
    (b'{"inputs": "x", "top_n": 3', JSON),  # malformed JSON
    (b"", JSON),  # no body
    (b"[1, 2]", JSON),  # not an object
    (json.dumps({"inputs": "x", "temperature": 1}).encode(), JSON),  # unknown field
    (json.dumps({"inputs": "x", "top_n": "5"}).encode(), JSON),  # no "5" -> 5 coercion
    (json.dumps({"inputs": "x", "positions": 99}).encode(), JSON),  # over the head count: the endpoint's 422
    (json.dumps({"inputs": ""}).encode(), JSON),  # the endpoint's 422
    (json.dumps({"inputs": "x", "k": 2, "positions": 3}).encode(), JSON),  # the schema's own validator
    (b'{"inputs": "\\ud800"}', JSON),  # a lone surrogate
    (b'{"input_ids": [99999999999999999999999]}', JSON),  # validates; the engine's 422 (vocabulary)
    (b'{"inputs": "x", "top_n": 5.0}', JSON),  # strict: a float is not an int in either path
    (json.dumps({"inputs": "x"}).encode(), {"content-type": "text/plain"}),
    (json.dumps({"inputs": "x"}).encode(), {}),
]


def _direct(client: TestClient) -> DirectRoutes:
    client.get("/health")  # the stack is built at the first request
    door = client.app.door  # type: ignore[attr-defined]
    assert isinstance(door.app, DirectRoutes)
    return door.app


def test_each_reply_is_byte_for_byte_the_one_fastapis_path_gives(client_factory: Callable[..., TestClient]) -> None:
    """Against an app with CORS on, which routes every request through FastAPI's stack (a
    request without an Origin header gets no CORS headers from it)."""
    direct, through_fastapi = client_factory(), client_factory(cors_origins=["https://ok.example"])
    _direct(direct)
    through_fastapi.get("/health")
    assert not isinstance(through_fastapi.app.door.app, DirectRoutes)  # type: ignore[attr-defined]
    statuses = []
    for body, headers in REQUESTS:
        a = direct.post("/predict", content=body, headers=headers)
        b = through_fastapi.post("/predict", content=body, headers=headers)
        assert (a.status_code, a.headers["content-type"], a.content) == (
            b.status_code,
            b.headers["content-type"],
            b.content,
        ), body
        statuses.append(a.status_code)
    assert statuses.count(200) == 6 and all(s == 422 for s in statuses[6:]), statuses


def test_only_requests_the_direct_path_cannot_answer_itself_reach_fastapi(client: TestClient) -> None:
    direct = _direct(client)
    inner, reached = direct.app, []

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await inner(scope, receive, send)

    direct.app = counting
    assert client.post("/predict", json={"inputs": "To be"}).status_code == 200
    assert client.post("/predict", json={"inputs": "x", "positions": 99}).status_code == 422  # the endpoint's refusal
    assert reached == []
    assert client.post("/predict", json={"inputs": 5}).status_code == 422
    assert (
        client.post("/predict", content=b'{"inputs": "x"}', headers={"content-type": "text/plain"}).status_code == 422
    )
    assert client.get("/predict").status_code == 405
    assert client.post("/tokenize", json={"inputs": "x"}).status_code == 200
    assert reached == ["/predict", "/predict", "/predict", "/tokenize"]


def test_a_direct_reply_counts_in_the_routes_metrics(client: TestClient) -> None:
    _direct(client)

    def count() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("mtp_requests_total{") and 'route="/predict"' in line and 'status="200"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    r = client.post("/predict", json={"inputs": "To be"}, headers={"X-Request-Id": "direct-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "direct-1"
    assert count() == before + 1
