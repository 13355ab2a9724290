"""/health, /ready, /info, /tokenize, /metrics, request ids and the API key."""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import __version__
from app.metrics import Metrics
from tests.conftest import set_fault_hook

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FAMILIES = {
    "mtp_requests": "counter",
    "mtp_request_failures": "counter",
    "mtp_prompt_tokens": "counter",
    "mtp_generated_tokens": "counter",
    "mtp_request_duration_seconds": "histogram",
    "mtp_queue_time_seconds": "histogram",
    "mtp_time_to_first_token_seconds": "histogram",
    "mtp_inter_token_latency_seconds": "histogram",
    "mtp_batch_size": "histogram",
    "mtp_forward_duration_seconds": "histogram",
    "mtp_queue_depth": "gauge",
    "mtp_running_sequences": "gauge",
    "mtp_ready": "gauge",
    "mtp_spec_steps": "counter",
    "mtp_spec_drafted_tokens": "counter",
    "mtp_spec_accepted_tokens": "counter",
    "mtp_spec_accepted_by_head": "counter",
    "mtp_spec_accepted_length": "histogram",
    "mtp_spec_drafts_per_pass": "gauge",
}


def scrape(client: TestClient) -> dict[str, Any]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_health_and_ready_when_serving(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "worker": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "worker": "ok"}


def test_stalled_worker_fails_health_and_readiness(
    client_factory: Callable[..., TestClient], envelope: Callable[..., Any]
) -> None:
    client = client_factory(stall_timeout_s=0.05, warmup=False)
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    set_fault_hook(engine, lambda kind: time.sleep(0.6))  # one forward pass far past the stall timeout
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/predict", json={"inputs": "To be"})
        deadline = time.monotonic() + 5
        while client.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        body = envelope(client.get("/health"), 503, "healthcheck")  # TGI's name
        assert "stalled" in body["error"]
        envelope(client.get("/ready"), 503, "not_ready")
        assert pending.result().status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_info_reports_model_limits_device_and_version(client_factory: Callable[..., TestClient]) -> None:
    info = client_factory(max_batch_size=4, max_new_tokens=50).get("/info").json()
    assert info["k"] == 3 and info["vocab_size"] == 300 and info["max_seq_len"] == 64
    assert info["model"]["d_model"] == 32 and info["model"]["k"] == 3
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["kv_cache_dtype"] == "float32"  # eager steps (compile off here): auto keeps the weights' dtype
    assert info["version"] == __version__
    assert info["model_id"] == "tiny"
    assert info["speculative"] is True and info["auth_required"] is False
    assert info["compiled"] is None  # compile is off in the tests; compiled shapes: tests/engine/test_compiled.py
    if info["threads"] is not None:  # CPU with more than one thread: the warm-up's steps were timed
        timings = info["thread_timings"]
        assert set(timings) == {"cost_ms", "passes", "early_retimings", "moves"}
        assert sum(timings["passes"]["decode/1"].values()) > 0
    limits = info["limits"]
    assert limits["max_batch_size"] == 4 and limits["max_new_tokens"] == 50
    assert limits["max_running"] == 4  # by default every waiting request joins the running batch
    assert limits["max_input_tokens"] == 64
    assert {"max_top_n", "max_candidates", "max_body_bytes", "max_queue_size", "request_timeout_s"} <= set(limits)


def test_info_reports_a_cap_on_the_rows_decoding_at_once(client_factory: Callable[..., TestClient]) -> None:
    limits = client_factory(max_batch_size=4, max_running=2).get("/info").json()["limits"]
    assert limits["max_running"] == 2 and limits["max_batch_size"] == 4


def test_tokenize_returns_ids_and_offsets(client: TestClient) -> None:
    text = "To be, or not"
    tokens = client.post("/tokenize", json={"inputs": text}).json()["tokens"]
    tok = client.app.state.service.tokenizer  # type: ignore[attr-defined]
    assert [t["id"] for t in tokens] == tok.encode(text)
    assert "".join(text[t["start"] : t["stop"]] for t in tokens) == text
    assert all(t["text"] == tok.id_to_text(t["id"]) for t in tokens)


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_expose_every_family_with_its_type(client: TestClient) -> None:
    client.post("/predict", json={"inputs": "To be"})
    client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 5}})
    client.post("/predict", json={"inputs": ""})
    families = scrape(client)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
    own = {m.name for m in Metrics(k=3).registry.collect()}
    assert own == set(EXPECTED_FAMILIES)  # a new metric must be added to this list (and the dashboards)
    assert sample(families, "mtp_requests", "mtp_requests_total", route="/predict", status="200") == 1
    assert sample(families, "mtp_requests", "mtp_requests_total", route="/predict", status="422") == 1
    assert sample(families, "mtp_request_failures", "mtp_request_failures_total", reason="validation") == 1
    assert sample(families, "mtp_generated_tokens", "mtp_generated_tokens_total") >= 5
    assert sample(families, "mtp_ready", "mtp_ready") == 1
    assert sample(families, "mtp_queue_depth", "mtp_queue_depth") == 0
    count = sample(families, "mtp_batch_size", "mtp_batch_size_count", kind="predict")
    assert count >= 1
    assert sample(families, "mtp_request_duration_seconds", "mtp_request_duration_seconds_count", route="/predict") == 2


def test_metrics_cover_every_name_the_dashboards_and_alerts_use(client: TestClient) -> None:
    client.get("/health")  # labelled request counters appear with the first request
    families = scrape(client)
    exposed = {s.name for f in families.values() for s in f.samples} | set(families)
    used: set[str] = set()
    for path in [*(REPO_ROOT / "deploy").rglob("*.json"), *(REPO_ROOT / "deploy").rglob("*.yml")]:
        used |= set(re.findall(r"\bmtp_[a-z_]+", path.read_text()))
    assert used, "no metric names found under deploy/"
    # histograms expose _bucket/_count/_sum only once observed or labelled; accept the family name
    missing = {n for n in used if n not in exposed and re.sub(r"_(bucket|count|sum)$", "", n) not in exposed}
    assert not missing


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_metrics_pass_promtool_check(client: TestClient) -> None:
    client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 3}})
    text = client.get("/metrics").content
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# ---- request ids ----------------------------------------------------------------------------


def test_request_id_is_echoed_when_given(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": "a"}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post("/predict", json={"inputs": ""}, headers={"X-Request-Id": "bad.req:1"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "bad.req:1"


def test_request_id_is_generated_when_absent_or_malformed(client: TestClient) -> None:
    a = client.get("/health").headers["x-request-id"]
    b = client.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", a) and a != b
    unsafe = client.get("/health", headers={"X-Request-Id": "no spaces\tor tabs"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)


# ---- API key --------------------------------------------------------------------------------

PROTECTED = [
    ("/predict", {"inputs": "To be"}),
    ("/generate", {"inputs": "To be", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", {"inputs": "To be", "parameters": {"max_new_tokens": 2}}),
    ("/tokenize", {"inputs": "To be"}),
]


def test_api_key_guards_inference_routes(
    client_factory: Callable[..., TestClient], envelope: Callable[..., Any]
) -> None:
    client = client_factory(api_key="s3cret")
    for path, body in PROTECTED:
        envelope(client.post(path, json=body), 401, "unauthorized")
        envelope(client.post(path, json=body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        envelope(client.post(path, json=body, headers={"Authorization": "s3cret"}), 401, "unauthorized")
        r = client.post(path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, (path, r.text)
    r = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    r = client.post(
        "/v1/completions", json={"prompt": "To be", "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 200
    assert client.get("/info").json()["auth_required"] is True
    families = scrape(client)
    assert sample(families, "mtp_request_failures", "mtp_request_failures_total", reason="unauthorized") == 13


def test_every_post_route_needs_the_key_and_every_one_that_queues_is_shed_at_the_door(
    client_factory: Callable[..., TestClient],
) -> None:
    """POST / (TGI's compat route for /generate) once ran generation without the key, and it and
    /v1/chat/completions were not shed at the door: any route added later is held to the same."""
    client = client_factory(api_key="s3cret")
    posts = sorted(path for path, ops in client.get("/openapi.json").json()["paths"].items() if "post" in ops)
    assert {"/", "/generate", "/v1/chat/completions"} <= set(posts)
    for path in posts:
        r = client.post(path, json={"inputs": "To be"})
        assert r.status_code == 401, (path, r.status_code, r.text)
    client.app.state.service.engine.enter = lambda: None  # type: ignore[attr-defined]  # the queue is full
    for path in posts:
        r = client.post(path, json={"inputs": "To be"}, headers={"Authorization": "Bearer s3cret"})
        if path == "/tokenize":  # tokenizing queues nothing
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 429, (path, r.status_code, r.text)


def test_health_ready_and_metrics_stay_open_with_api_key(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(api_key="s3cret")
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_model_loading_caches_and_forward_passes_run_on_the_inference_thread(
    client_factory: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import app.main
    from app.model.model import MTPTransformer

    threads: dict[str, set[str]] = {"load": set(), "caches": set(), "trunk": set()}
    load, setup, trunk = app.main.load_checkpoint, MTPTransformer.setup_caches, MTPTransformer.trunk

    def spy(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            threads[kind].add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(app.main, "load_checkpoint", spy("load", load))
    monkeypatch.setattr(MTPTransformer, "setup_caches", spy("caches", setup))
    monkeypatch.setattr(MTPTransformer, "trunk", spy("trunk", trunk))
    client = client_factory()  # the lifespan loads the model and warms the engine up
    assert client.post("/predict", json={"inputs": "To be"}).status_code == 200
    assert client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 4}}).status_code == 200
    names = set().union(*threads.values())
    assert all(threads.values()) and len(names) == 1 and names.pop().startswith("mtp-worker"), threads


def test_what_start_up_leaves_is_frozen_out_of_the_collectors_scans(
    client_factory: Callable[..., TestClient],
) -> None:
    """A full collection walks every tracked object; after start-up (torch, the engine, on a real
    model Inductor's graphs) the collector only scans what serving makes: requests stay
    collected, the start-up heap is never walked again."""
    before = [object()]  # a tracked container, alive from before the start-up
    client = client_factory()
    assert gc.get_freeze_count() > 0
    assert not any(o is before for o in gc.get_objects())  # permanent generation: not in any scanned one
    r = client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200
    cycle: list[object] = []
    cycle.append(cycle)  # made while serving: collected as ever
    del cycle
    assert gc.collect() >= 1


def test_start_up_builds_every_route_before_the_first_request(
    client_factory: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI may build an included router's routes at the first request matched against it
    (about 20 ms for a fresh server's first /generate). Start-up builds them, and leaves no
    trace in the request metrics."""
    client = client_factory()
    built: list[str] = []
    build = APIRoute.get_route_handler
    monkeypatch.setattr(APIRoute, "get_route_handler", lambda route: built.append(route.path) or build(route))
    model = client.get("/info").json()["model_id"]
    requests = [
        ("/generate", {"inputs": "To be", "parameters": {"max_new_tokens": 2}}),
        ("/generate_stream", {"inputs": "To be", "parameters": {"max_new_tokens": 2}}),
        ("/predict", {"inputs": "To be"}),
        ("/v1/completions", {"model": model, "prompt": "To be", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ]
    for path, body in requests:
        assert client.post(path, json=body).status_code == 200, path
    assert client.get("/health").status_code == 200
    assert built == []
    metrics = client.get("/metrics").text
    assert 'status="404"' not in metrics


def test_info_carries_tgis_flat_fields(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["model_id"] and info["version"]
    assert info["model_dtype"] == info["dtype"] and info["model_device_type"] == "cpu"
    assert info["max_input_tokens"] == info["limits"]["max_input_tokens"]
    assert info["max_total_tokens"] == info["max_seq_len"] and info["max_best_of"] == 1
    assert info["max_stop_sequences"] == info["limits"]["max_stop_sequences"]
    assert info["max_concurrent_requests"] == info["limits"]["max_queue_size"]
    assert info["sha"] is None or len(info["sha"]) == 40
