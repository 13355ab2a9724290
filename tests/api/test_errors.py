"""Every bad request gets its status and the {"error", "error_type"} envelope, never a traceback,
and the service keeps serving afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import set_fault_hook

GOOD = {"inputs": "To be, or not to be", "top_n": 2}
LONG_TEXT = "to be or not to be " * 40  # far more than the 64-token context
PREFILL_DETAILS = {"details": True, "decoder_input_details": True}


def still_serves(client: TestClient) -> None:
    r = client.post("/predict", json=GOOD)
    assert r.status_code == 200, r.text
    r = client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text


def wait_idle(engine: Any) -> None:
    """Wait out the worker's last step of earlier work (warmup), so a fault_hook set now hits our request."""
    deadline = time.monotonic() + 5
    while (engine.pending() or engine.core.busy_since is not None) and time.monotonic() < deadline:
        time.sleep(0.005)


def failures(client: TestClient, reason: str) -> float:
    registry = client.app.state.service.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("mtp_request_failures_total", {"reason": reason}) or 0.0


BAD_REQUESTS = {
    "predict_empty_text": ("/predict", {"inputs": ""}),
    "predict_empty_list": ("/predict", {"inputs": []}),
    "predict_empty_ids": ("/predict", {"input_ids": []}),
    "predict_empty_nested_ids": ("/predict", {"input_ids": [[]]}),
    "predict_text_and_ids": ("/predict", {"inputs": "a", "input_ids": [1]}),
    "predict_neither": ("/predict", {"top_n": 3}),
    "predict_too_long": ("/predict", {"inputs": LONG_TEXT}),
    "predict_id_too_big": ("/predict", {"input_ids": [1, 300]}),
    "predict_id_negative": ("/predict", {"input_ids": [[-1, 2]]}),
    "predict_top_n_zero": ("/predict", {"inputs": "a", "top_n": 0}),
    "predict_top_n_above_cap": ("/predict", {"inputs": "a", "top_n": 101}),
    "predict_positions_above_model": ("/predict", {"inputs": "a", "positions": 4}),
    "predict_k_above_model": ("/predict", {"inputs": "a", "k": 4}),  # positions' deprecated name
    "predict_positions_and_k_differ": ("/predict", {"inputs": "a", "positions": 2, "k": 1}),
    "predict_too_many_inputs": ("/predict", {"inputs": ["a"] * 33}),
    "predict_candidate_id_out_of_range": ("/predict", {"inputs": "a", "candidates": [[300]]}),
    "predict_too_many_candidates": ("/predict", {"inputs": "a", "candidates": [[1]] * 33}),
    "predict_wrong_type": ("/predict", {"inputs": 5}),
    "predict_unknown_field": ("/predict", {"inputs": "a", "temperature": 1.0}),
    "generate_empty": ("/generate", {"inputs": ""}),
    "generate_too_long": ("/generate", {"inputs": LONG_TEXT}),
    "generate_prompt_plus_new_tokens_over_context": (
        "/generate",
        {"inputs": "to be or not to be, that is", "parameters": {"max_new_tokens": 60}},
    ),
    "generate_temperature_negative": ("/generate", {"inputs": "a", "parameters": {"temperature": -0.5}}),
    "generate_top_p_zero": ("/generate", {"inputs": "a", "parameters": {"top_p": 0.0}}),
    "generate_top_p_above_one": ("/generate", {"inputs": "a", "parameters": {"top_p": 1.5}}),
    "generate_top_k_negative": ("/generate", {"inputs": "a", "parameters": {"top_k": -1}}),
    "generate_max_new_tokens_zero": ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 0}}),
    "generate_max_new_tokens_above_cap": ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 257}}),
    "generate_too_many_stops": ("/generate", {"inputs": "a", "parameters": {"stop": ["x"] * 9}}),
    "generate_empty_stop": ("/generate", {"inputs": "a", "parameters": {"stop": [""]}}),
    "generate_stop_too_long": ("/generate", {"inputs": "a", "parameters": {"stop": ["x" * 65]}}),
    "generate_seed_negative": ("/generate", {"inputs": "a", "parameters": {"seed": -1}}),
    "generate_unknown_field": ("/generate", {"inputs": "a", "bogus": True}),
    "generate_unknown_parameter": ("/generate", {"inputs": "a", "parameters": {"max_tokens": 3}}),
    "generate_stream_bad_temperature": ("/generate_stream", {"inputs": "a", "parameters": {"temperature": -1}}),
    # TGI's decoder_input_details is not for streams (its ValidationError::PrefillDetailsStream)
    "generate_stream_decoder_input_details": ("/generate_stream", {"inputs": "a", "parameters": PREFILL_DETAILS}),
    "generate_streaming_decoder_input_details": (
        "/generate",
        {"inputs": "a", "parameters": PREFILL_DETAILS, "stream": True},
    ),
    "root_streaming_decoder_input_details": ("/", {"inputs": "a", "parameters": PREFILL_DETAILS, "stream": True}),
    "tokenize_unknown_field": ("/tokenize", {"inputs": "a", "extra": 1}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_422_envelope_and_service_still_serves(
    client: TestClient, envelope: Callable[..., Any], case: str
) -> None:
    path, body = BAD_REQUESTS[case]
    before = failures(client, "validation")
    envelope(client.post(path, json=body), 422, "validation")
    assert failures(client, "validation") == before + 1
    still_serves(client)


def test_malformed_json_gets_422_envelope(client: TestClient, envelope: Callable[..., Any]) -> None:
    for path in ("/predict", "/generate", "/generate_stream"):
        r = client.post(path, content=b'{"inputs": "abc", ', headers={"content-type": "application/json"})
        assert envelope(r, 422, "validation")["error"] == "malformed JSON body"
    still_serves(client)


def test_input_above_configured_cap_is_rejected(
    client_factory: Callable[..., TestClient], envelope: Callable[..., Any]
) -> None:
    client = client_factory(max_input_tokens=4)
    assert client.get("/info").json()["limits"]["max_input_tokens"] == 4
    envelope(client.post("/predict", json={"input_ids": [1, 2, 3, 4, 5]}), 422, "validation")
    envelope(client.post("/generate", json={"inputs": "to be or not to be"}), 422, "validation")
    assert client.post("/predict", json={"input_ids": [1, 2, 3, 4]}).status_code == 200


def test_unknown_route_and_wrong_method_get_envelopes(client: TestClient, envelope: Callable[..., Any]) -> None:
    envelope(client.get("/nope"), 404, "not_found")
    envelope(client.get("/predict"), 405, "method_not_allowed")


# ---- body size ------------------------------------------------------------------------------


def test_body_above_limit_with_content_length_gets_413(
    client_factory: Callable[..., TestClient], envelope: Callable[..., Any]
) -> None:
    client = client_factory(max_body_bytes=1024)
    r = client.post("/predict", json={"inputs": "x" * 2000}, headers={"X-Request-Id": "big-1"})
    envelope(r, 413, "too_large")
    assert r.headers["x-request-id"] == "big-1"
    assert failures(client, "too_large") == 1
    still_serves(client)


def test_streamed_body_above_limit_gets_413(
    client_factory: Callable[..., TestClient], envelope: Callable[..., Any]
) -> None:
    client = client_factory(max_body_bytes=1024)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent with chunked transfer encoding
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"x" * 300
        yield b'"}'

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    envelope(r, 413, "too_large")
    still_serves(client)


# ---- overload, readiness, timeouts, faults --------------------------------------------------


async def test_full_queue_gets_429_while_accepted_requests_complete(
    aclient_factory: Callable[..., Any], envelope: Callable[..., Any]
) -> None:
    app, client = await aclient_factory(max_queue_size=2)
    engine = app.state.service.engine
    while engine.pending() or engine.core.busy_since is not None:  # the warmup's last step
        await asyncio.sleep(0.005)
    set_fault_hook(engine, lambda kind: time.sleep(0.3))  # the worker holds each batch 0.3 s
    first = asyncio.create_task(client.post("/predict", json=GOOD))
    while engine.core.busy_since is None:  # the first request is on the worker
        await asyncio.sleep(0.005)
    queued = [
        asyncio.create_task(client.post("/predict", json=GOOD)),
        asyncio.create_task(client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 3}})),
    ]
    while engine.pending() < 2:  # both wait in the queue (capacity 2)
        await asyncio.sleep(0.005)
    rejected = await asyncio.gather(
        client.post("/predict", json=GOOD),
        client.post("/generate", json={"inputs": "a"}),
        client.post("/generate_stream", json={"inputs": "a"}),
    )
    for r in rejected:
        envelope(r, 429, "overloaded")
        assert r.headers["retry-after"] == "1"
    accepted = [await first, *(await asyncio.gather(*queued))]
    assert [r.status_code for r in accepted] == [200, 200, 200]
    set_fault_hook(engine, None)
    assert (await client.post("/predict", json=GOOD)).status_code == 200


async def test_a_request_past_the_door_holds_its_queue_place(
    aclient_factory: Callable[..., Any], envelope: Callable[..., Any]
) -> None:
    """The door counts requests whose body is still arriving, so a burst is refused at once
    instead of after every request has been parsed and tokenized."""
    app, client = await aclient_factory(max_queue_size=1)
    engine = app.state.service.engine
    body_done = asyncio.Event()

    async def slow_body() -> Any:
        yield b'{"inputs": "To be",'
        await body_done.wait()
        yield b' "top_n": 2}'

    headers = {"content-type": "application/json"}
    slow = asyncio.create_task(client.post("/predict", content=slow_body(), headers=headers))
    for _ in range(500):  # the slow request is past the door: the one place is taken
        if engine.queue_full():
            break
        await asyncio.sleep(0.005)
    assert engine.queue_full(), "a request past the door does not hold a queue place"
    assert engine.pending() == 0  # nothing is queued yet
    envelope(await client.post("/predict", json=GOOD), 429, "overloaded")
    body_done.set()
    assert (await slow).status_code == 200
    assert not engine.queue_full()
    assert (await client.post("/predict", json=GOOD)).status_code == 200


async def test_a_request_refused_after_the_door_frees_its_place(aclient_factory: Callable[..., Any]) -> None:
    app, client = await aclient_factory(max_queue_size=1)
    engine = app.state.service.engine
    for path, body in BAD_REQUESTS.values():
        assert (await client.post(path, json=body)).status_code == 422
        assert not engine.queue_full(), path
    assert (await client.post("/predict", json=GOOD)).status_code == 200


def test_request_larger_than_queue_is_not_answered_as_retryable_overload(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(max_queue_size=4)
    r = client.post("/predict", json={"inputs": ["To be"] * 5})
    assert r.status_code in (200, 422), r.text


def test_not_ready_before_startup_gets_503(app_factory: Callable[..., Any], envelope: Callable[..., Any]) -> None:
    client = TestClient(app_factory())  # not entered: the lifespan has not loaded the model
    envelope(client.get("/health"), 503, "healthcheck")  # as TGI: healthy only once it can serve
    envelope(client.get("/ready"), 503, "not_ready")
    envelope(client.post("/predict", json=GOOD), 503, "not_ready")
    envelope(client.post("/generate", json={"inputs": "a"}), 503, "not_ready")
    envelope(client.get("/info"), 503, "not_ready")


def test_draining_gets_503_and_recovers(client: TestClient, envelope: Callable[..., Any]) -> None:
    state = client.app.state.service  # type: ignore[attr-defined]
    state.draining = True
    envelope(client.get("/ready"), 503, "not_ready")
    envelope(client.post("/predict", json=GOOD), 503, "not_ready")
    envelope(client.post("/generate_stream", json={"inputs": "a"}), 503, "not_ready")
    assert client.get("/health").status_code == 200  # alive, just not taking work
    state.draining = False
    assert client.get("/ready").status_code == 200
    still_serves(client)


def test_request_timeout_gets_504(client_factory: Callable[..., TestClient], envelope: Callable[..., Any]) -> None:
    client = client_factory(request_timeout_s=0.2, warmup=False)
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    set_fault_hook(engine, lambda kind: time.sleep(0.5))
    envelope(client.post("/predict", json=GOOD), 504, "timeout")
    envelope(client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 3}}), 504, "timeout")
    envelope(client.post("/generate_stream", json={"inputs": "To be"}), 504, "timeout")
    assert failures(client, "timeout") == 3
    set_fault_hook(engine, None)
    time.sleep(0.5)  # let the worker finish what it was holding
    still_serves(client)


def test_fault_in_predict_batch_gets_500_and_next_request_succeeds(
    client: TestClient, envelope: Callable[..., Any]
) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    faults = [RuntimeError("injected: secret detail")]

    def hook(kind: str) -> None:
        if faults:
            raise faults.pop()

    wait_idle(engine)
    set_fault_hook(engine, hook)
    body = envelope(client.post("/predict", json=GOOD), 500, "generation")  # TGI's name for a failed pass
    assert "secret detail" not in body["error"]
    still_serves(client)
    assert client.get("/health").json()["status"] == "ok"


def test_failed_pass_is_tgis_generation_error_and_keeps_its_type_on_v1(client: TestClient) -> None:
    """The one table: error_type "generation" (TGI's name, which its clients turn into
    GenerationError) in the TGI envelope; /v1's OpenAI envelope keeps the type it had, "internal"."""
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    faults = ["prefill", "prefill"]

    def hook(kind: str) -> None:
        if faults and kind == faults[0]:
            faults.pop()
            raise RuntimeError("injected")

    wait_idle(engine)
    set_fault_hook(engine, hook)
    tgi = client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 2}})
    assert tgi.status_code == 500 and tgi.json()["error_type"] == "generation"
    v1 = client.post("/v1/completions", json={"model": "tiny", "prompt": "To be", "max_tokens": 2})
    assert v1.status_code == 500 and v1.json()["error"]["type"] == "internal", v1.text
    still_serves(client)


def test_the_schema_says_null_is_each_optional_field_s_default_and_unknown_fields_only_take_null(
    client: TestClient, envelope: Callable[..., Any]
) -> None:
    """Clients send null for fields they leave unset (openai's max_tokens=None), and the service
    takes it as the default; the published schema says so too, so that schema-driven clients and
    fuzzers do not take accepted requests for violations. An unknown field with a value is still
    an error."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert {"type": "null"} in chat["properties"]["logit_bias"]["anyOf"]
    assert {"type": "null"} in chat["properties"]["temperature"]["anyOf"]
    assert "anyOf" not in chat["properties"]["messages"]  # required: null is no default there
    for name in ("ChatCompletionRequest", "CompletionRequest", "GenerateRequest", "PredictRequest", "TokenizeRequest"):
        assert schemas[name]["additionalProperties"] == {"type": "null"}, name
    message = [{"role": "user", "content": "hi"}]
    ok = client.post("/v1/chat/completions", json={"messages": message, "max_tokens": 2, "logit_bias": None})
    assert ok.status_code == 200, ok.text
    assert client.post("/tokenize", json={"inputs": "to be", "unset": None}).status_code == 200
    r = client.post("/tokenize", json={"inputs": "to be", "unset": 1})
    assert "unset" in envelope(r, 422, "validation")["error"]
    assert client.post("/tokenize", json={"inputs": None}).status_code == 422  # required
