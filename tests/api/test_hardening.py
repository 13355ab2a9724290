"""Regression tests for the second hardening round, in process: each names the attack it pins.

The attacks that need a socket, signals or a server log are in test_hardening_server.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.api import openai_protocol, schemas
from app.api.deps import Serving
from app.model.checkpoint import save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from tests.conftest import TINY, set_fault_hook

GOOD_GEN = {"inputs": "To be, or not to be", "parameters": {"max_new_tokens": 8}}
KEY = {"Authorization": "Bearer s3cret"}


async def slow_body(release: asyncio.Event) -> Any:
    yield b'{"inputs": "To be",'
    await release.wait()
    yield b' "top_n": 2}'


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ---- 1. keyless clients hold nothing --------------------------------------------------------


async def test_keyless_request_is_refused_from_its_headers_and_holds_no_queue_place(
    aclient_factory: Callable[..., Any], envelope: Callable[..., Any]
) -> None:
    app, client = await aclient_factory(api_key="s3cret", max_queue_size=1)
    engine = app.state.service.engine
    release = asyncio.Event()
    stalled = asyncio.create_task(
        client.post("/predict", content=slow_body(release), headers={"content-type": "application/json"})
    )
    envelope(await stalled, 401, "unauthorized")  # answered before its body finished arriving
    assert not engine.queue_full()
    r = await client.post("/predict", json={"inputs": "To be"}, headers=KEY)
    assert r.status_code == 200, r.text
    release.set()


def test_keyless_malformed_json_gets_401_not_422(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(api_key="s3cret")
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"


async def test_one_client_with_stalled_bodies_cannot_fill_the_queue(
    aclient_factory: Callable[..., Any], envelope: Callable[..., Any]
) -> None:
    """Without a key, the last 2 free places (max_pending_bodies_per_client) are kept from a
    client that already holds 2 places whose bodies have not arrived; with room it is not limited."""
    app, _ = await aclient_factory(max_queue_size=8, max_pending_bodies_per_client=2)
    engine = app.state.service.engine
    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1234))
    other = httpx.ASGITransport(app=app, client=("10.0.0.2", 1234))
    release = asyncio.Event()
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as slow,
        httpx.AsyncClient(transport=other, base_url="http://test") as fair,
    ):
        headers = {"content-type": "application/json"}
        stalled = []
        for i in range(6):  # while more than 2 places are free, one client may hold many
            stalled.append(asyncio.create_task(slow.post("/predict", content=slow_body(release), headers=headers)))
            await wait_for(lambda i=i: engine._at_door == i + 1)
        body = envelope(await slow.post("/predict", content=slow_body(release), headers=headers), 429, "overloaded")
        assert "still sending their body" in body["error"]
        assert (await fair.post("/predict", json={"inputs": "To be"})).status_code == 200
        release.set()
        assert [r.status_code for r in await asyncio.gather(*stalled)] == [200] * 6


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", GOOD_GEN),
        ("/generate_stream", GOOD_GEN),
        ("/v1/completions", {"prompt": "To be", "max_tokens": 8}),
        ("/v1/completions", {"prompt": "To be", "max_tokens": 8, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "To be"}], "max_tokens": 8}),
        ("/predict", {"inputs": "To be, or not to be"}),
    ],
)
async def test_each_route_hands_its_door_place_to_the_engine(
    aclient_factory: Callable[..., Any], path: str, body: dict[str, Any]
) -> None:
    """A request's place, reserved at the door, becomes its queue entry: once the engine runs
    it, it holds no place (a route that kept its reservation would count twice until it ended)."""
    app, client = await aclient_factory(max_queue_size=2)
    engine = app.state.service.engine
    set_fault_hook(engine, lambda kind: time.sleep(0.05))
    task = asyncio.create_task(client.post(path, json=body))
    await wait_for(lambda: engine.core.busy_since is not None)  # its first pass runs
    # the core hands the place back before that pass, through the event loop (a callback that
    # may not have run yet); the reservation must be gone while the request is still running
    await wait_for(lambda: engine.pending() == 1 and engine.places_free() == 2, timeout=2)
    assert (await task).status_code == 200


# ---- 2. bounded tokenizing, off the event loop ----------------------------------------------


def test_inputs_longer_than_the_character_cap_get_422_naming_the_field(
    client_factory: Callable[..., TestClient], envelope: Callable[..., Any]
) -> None:
    client = client_factory(max_input_chars=1000)
    big = "a " * 1000
    for path, body, field in [
        ("/tokenize", {"inputs": big}, "inputs"),
        ("/predict", {"inputs": [big]}, "inputs"),
        ("/predict", {"inputs": "a", "candidates": [big]}, "candidates"),
        ("/generate", {"inputs": big}, "inputs"),
    ]:
        assert envelope(client.post(path, json=body), 422, "validation")["error"].startswith(field), path
    r = client.post("/v1/completions", json={"prompt": big})
    assert r.status_code == 400 and "prompt has 2000 characters" in r.json()["error"]["message"]
    assert client.get("/info").json()["limits"]["max_input_chars"] == 1000


def test_tokenize_output_is_capped(client_factory: Callable[..., TestClient], envelope: Callable[..., Any]) -> None:
    client = client_factory(max_tokenize_tokens=10)
    body = envelope(client.post("/tokenize", json={"inputs": "To be, or not to be, that is the question"}), 422)
    assert "at most 10" in body["error"]
    assert client.get("/info").json()["limits"]["max_tokenize_tokens"] == 10


async def test_tokenizing_a_large_input_does_not_stall_the_event_loop(aclient_factory: Callable[..., Any]) -> None:
    _, client = await aclient_factory(max_input_chars=2_000_000, max_tokenize_tokens=1, max_body_bytes=4_000_000)
    text = "hello world, " * 120_000  # 1.5 M characters: well over 0.1 s of tokenizing
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    r = await client.post("/tokenize", json={"inputs": text})
    elapsed = time.perf_counter() - t0
    done.set()
    await tick
    assert r.status_code == 422  # over the token cap, after tokenizing
    assert worst < max(0.1, elapsed / 3), (worst, elapsed)


async def test_a_short_input_is_tokenized_on_the_loop_without_letting_the_gil_go(
    aclient_factory: Callable[..., Any],
) -> None:
    """Between the ops of an eager pass the inference thread holds the GIL: a call on the loop
    that lets it go waits to win it back. A thread that never waits stands in for the
    inference thread here, and the interpreter takes the GIL from it only every 50 ms."""
    app, _ = await aclient_factory()
    state = app.state.service
    serving = Serving(state, state.engine, state.tokenizer, state.model_config, state.settings)
    texts = ["To be, or not to be", "that is the question"]
    want = [state.tokenizer.encode(t) for t in texts]
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        t0 = time.perf_counter()
        got = [await serving.encode(texts, "inputs") for _ in range(10)]
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)
    assert got == [want] * 10
    assert elapsed < 0.1, elapsed  # each call that let the GIL go would wait out a 50 ms turn


async def test_too_many_predict_inputs_are_refused_before_any_is_tokenized(
    aclient_factory: Callable[..., Any], envelope: Callable[..., Any]
) -> None:
    """Short inputs are tokenized on the event loop one at a time: a request of thousands of
    one-character inputs would hold the loop for all of them before the count refused it."""
    app, client = await aclient_factory(max_inputs_per_request=4)
    tok = app.state.service.tokenizer
    real, calls = tok.hf, []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            if name.startswith("encode"):
                calls.append(name)
            return getattr(real, name)

    tok.hf = Counting()
    try:
        body = envelope(await client.post("/predict", json={"inputs": ["a"] * 2000}), 422)
        assert body["error"] == "at most 4 inputs per request" and calls == []
        assert (await client.post("/predict", json={"inputs": ["To be", "or not"]})).status_code == 200
        assert calls  # the spy sees the tokenizing of a request that is let in
    finally:
        tok.hf = real


# ---- 3. a bad sampling parameter fails only its own request ---------------------------------


async def test_huge_sampling_parameters_get_422_and_batch_mates_are_untouched(
    aclient_factory: Callable[..., Any],
) -> None:
    _, client = await aclient_factory()
    want = (await client.post("/generate", json=GOOD_GEN)).json()["generated_text"]
    bad = [
        {"top_k": 2**63, "do_sample": True},
        {"top_k": 10**30},
        {"temperature": 1e308, "do_sample": True},
        {"top_k": 301},  # the vocabulary has 300 tokens
    ]
    requests = [client.post("/generate", json=GOOD_GEN) for _ in range(6)]
    requests += [client.post("/generate", json={"inputs": "To be", "parameters": p}) for p in bad]
    replies = await asyncio.gather(*requests)
    assert [r.status_code for r in replies] == [200] * 6 + [422] * len(bad), [r.text for r in replies]
    assert all(r.json()["generated_text"] == want for r in replies[:6])


# ---- 4. multi-prompt requests are all or nothing ---------------------------------------------


async def test_a_refused_multi_prompt_completion_cancels_its_admitted_siblings(
    aclient_factory: Callable[..., Any],
) -> None:
    app, client = await aclient_factory(max_queue_size=4, warmup=False)
    engine = app.state.service.engine
    set_fault_hook(engine, lambda kind: time.sleep(0.05))
    held = [engine.enter() for _ in range(2)]  # two places taken by requests still at the door
    r = await client.post("/v1/completions", json={"prompt": ["To be"] * 3, "max_tokens": 40, "temperature": 0})
    for place in held:
        assert place is not None
        place.release()
    assert r.status_code == 429, r.text  # two prompts admitted, the third refused
    await wait_for(lambda: engine.pending() == 0, timeout=2)
    tokens = app.state.service.metrics.registry.get_sample_value("mtp_generated_tokens_total")
    await asyncio.sleep(0.5)
    assert app.state.service.metrics.registry.get_sample_value("mtp_generated_tokens_total") == tokens
    assert tokens < 2 * 40  # the two admitted prompts did not run to the end


# ---- 8. text that cannot be encoded ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/predict", '{"inputs": "a\\ud800"}', "inputs"),
        ("/predict", '{"inputs": ["ok", "\\udfff"]}', "inputs.1"),
        ("/tokenize", '{"inputs": "\\ud800"}', "inputs"),
        ("/generate", '{"inputs": "To be", "parameters": {"stop": ["\\ud800"]}}', "parameters.stop.0"),
        ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": "To be", "model": "\\ud800"}', "model"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, '
            '{"type": "text", "text": "\\ud800"}]}]}',
            "messages.0.content.1.text",
        ),
        # a bad key is named escaped: the message naming it raw could not be encoded (a 500)
        ("/generate", '{"inputs": "To be", "\\udc00": 1}', "\\udc00"),
        ("/generate", '{"inputs": "To be", "parameters": {"x\\ud800": null}}', "parameters.x\\ud800"),
        ("/v1/completions", '{"prompt": "To be", "logit_bias": {"\\ud800": 1}}', "logit_bias.\\ud800"),
    ],
)
def test_lone_surrogates_get_422_naming_the_field(client: TestClient, path: str, body: str, field: str) -> None:
    """422 naming the field; on /v1, OpenAI's 400 invalid_request_error."""
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == (400 if path.startswith("/v1/") else 422), r.text
    message = r.json()["error"]["message"] if path.startswith("/v1/") else r.json()["error"]
    assert message.startswith(f"{field}: not valid Unicode"), message


def test_a_body_of_many_token_ids_is_checked_for_bad_text_without_a_walk_per_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check for lone surrogates named the path of every element it passed: a 1 MB body of
    500,000 token ids held the event loop for a third of a second per Strict model it went
    through, and two clients sending such bodies slowed /health to seconds. Now the path is
    looked for only once a bad string is known to be there."""
    walks: list[str] = []
    walk = schemas._first_unencodable
    monkeypatch.setattr(schemas, "_first_unencodable", lambda data, path: walks.append(path) or walk(data, path))
    many = {"input_ids": [1] * 200_000}
    r = client.post("/predict", json=many)
    assert r.status_code == 422 and "tokens; the limit is" in r.json()["error"], r.text
    r = client.post("/v1/completions", json={"prompt": [[1] * 100_000, "ok", [2]], "max_tokens": 2})
    assert r.status_code == 400 and walks == []
    bad = b'{"inputs": ["ok", "\\udfff"]}'
    r = client.post("/predict", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("inputs.1: not valid Unicode"), r.text
    assert walks  # the path of the bad string is still named


def test_a_bad_string_nested_as_deep_as_json_allows_gets_422_not_500(client: TestClient) -> None:
    """Naming the path of a lone surrogate recursed once per level: lists nested about 960 deep,
    which json.loads still takes, overran Python's recursion limit (a 500 and a traceback). The
    depth where json.loads gives up depends on the stack, so every depth near it is tried."""
    named = 0
    for depth in range(1000, 800, -4):
        body = '{"inputs": "To be", "parameters": {"stop": ' + "[" * depth + '"\\ud800"' + "]" * depth + "}}"
        r = client.post("/generate", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, (depth, r.text[:200])
        message = r.json()["error"]
        assert message == "malformed JSON body" or message.startswith("parameters.stop.0.0.0"), message[:200]
        named += message.endswith("not valid Unicode text (a lone surrogate)")
    assert named > 0


def test_a_body_is_checked_for_bad_text_once_not_again_in_each_part(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chat message (and generate's parameters) walked its own dict again after the body's
    walk, which made a 1 MB body of 30,000 messages dearer to validate on the event loop. Now
    the body is walked once, and its parts are not."""
    walks: list[object] = []
    walk = schemas._any_unencodable
    monkeypatch.setattr(schemas, "_any_unencodable", lambda data: walks.append(data) or walk(data))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "é"}]}]
    r = client.post("/v1/chat/completions", json={"messages": messages * 500, "max_tokens": 1})
    assert r.status_code == 400 and "tokens; the limit is" in r.text, r.text  # validated, then too long
    assert len(walks) == 1
    walks.clear()
    r = client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 1, "stop": ["x"]}})
    assert r.status_code == 200 and len(walks) == 1, r.text


def test_a_chat_of_too_many_messages_or_parts_is_refused_before_any_is_looked_at(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0.87 MB chat body of 28,000 short messages held the event loop about 90 ms: each message
    was validated, walked for bad text and rendered before the prompt was found too long. Now
    more messages (or content parts) than any context holds are refused from their count."""
    walks: list[object] = []
    walk = schemas._any_unencodable
    monkeypatch.setattr(schemas, "_any_unencodable", lambda data: walks.append(data) or walk(data))
    many = [{"role": "user", "content": "hi"}] * (openai_protocol.MAX_MESSAGES + 1)
    r = client.post("/v1/chat/completions", json={"messages": many, "max_tokens": 1})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(f"messages: at most {openai_protocol.MAX_MESSAGES} messages"), message
    parts = [{"type": "text", "text": "a"}] * 600
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}] * 4})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"at most {openai_protocol.MAX_CONTENT_PARTS} content parts in all (got 2400)" in message, message
    assert walks == []  # neither body was walked
    fits = [{"role": "user", "content": parts[:1]}] * 3  # at the limits' side that is served
    r = client.post("/v1/chat/completions", json={"messages": fits, "max_tokens": 2})
    assert r.status_code == 200 and len(walks) == 1, r.text


# ---- 9. streamed text equals unstreamed text with stop sequences -----------------------------


def streamed_text(client: TestClient, body: dict[str, Any], sse: Callable[[str], list[Any]]) -> str:
    r = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e for e in sse(r.text) if e != "[DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_streamed_completion_never_leaks_part_of_a_stop_sequence(
    client: TestClient, sse: Callable[[str], list[Any]]
) -> None:
    base = {"prompt": "To be, or not", "max_tokens": 40, "temperature": 0}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    tok = client.app.state.service.tokenizer  # type: ignore[attr-defined]
    ids = tok.encode(text)
    assert len(ids) > 10
    stops = set()
    for i in range(2, min(len(ids) - 2, 14)):  # stop strings that start inside one token and end in another
        piece = tok.decode(ids[: i + 1])
        end = len(piece)
        for start in (end - 3, end - 2):
            stops.add(text[max(0, start) : end + 2])
    checked = 0
    for stop in sorted(s for s in stops if len(s) >= 2 and "\ufffd" not in s):
        body = {**base, "stop": [stop, "zzzz" + stop]}
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert streamed_text(client, body, sse) == plain, stop
        checked += 1
    assert checked >= 5


# ---- 10. the draft policy recovers from a noisy start-up ------------------------------------


def test_info_and_metrics_show_what_the_draft_policy_does(client: TestClient) -> None:
    client.post("/generate", json=GOOD_GEN)
    policy = client.get("/info").json()["draft_policy"]
    assert set(policy) == {"acceptance", "drafts_by_batch", "step_ms", "around_step_ms"}
    assert set(policy["drafts_by_batch"]) == set(policy["around_step_ms"]) == {"1", "2", "4", "8", "16"}
    assert "mtp_spec_drafts_per_pass " in client.get("/metrics").text


# ---- 12. smaller ones -----------------------------------------------------------------------


def test_trailing_slash_is_not_redirected_through_the_host_header(client: TestClient) -> None:
    r = client.post("/predict/", json={"inputs": "a"}, headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_head_on_health_and_ready(client: TestClient) -> None:
    assert client.head("/health").status_code == 200
    assert client.head("/ready").status_code == 200


def test_every_get_route_answers_head_as_it_answers_get(client: TestClient) -> None:
    """HEAD gets GET's status and content type, without the body; /openapi.json lists no HEAD
    operation beside /health's and /ready's own."""
    paths = ["/info", "/metrics", "/v1/models", "/v1/models/nope", "/docs", "/redoc", "/openapi.json", "/health"]
    for path in paths:
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code, path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.content == b"", path
    headed = [p for p, ops in client.get("/openapi.json").json()["paths"].items() if "head" in ops]
    assert sorted(headed) == ["/health", "/ready"]


def test_ids_the_tokenizer_lacks_decode_as_empty_text(
    tmp_path: Path, tiny_tokenizer: Tokenizer, client_factory: Callable[..., TestClient]
) -> None:
    """A model vocabulary padded past its tokenizer's (as GPT-2 imports are), whose head 1 always
    picks a padding id: generation answers 200 with empty text for it."""
    vocab = tiny_tokenizer.vocab_size + 8
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(**{**TINY, "vocab_size": vocab})).eval()
    with torch.no_grad():
        model.head.proj.bias[vocab - 1] = 100.0
    ckpt = save_checkpoint(tmp_path / "padded", model, tiny_tokenizer)
    client = client_factory(checkpoint=ckpt)
    r = client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 3, "details": True}})
    assert r.status_code == 200, r.text
    assert [t["id"] for t in r.json()["details"]["tokens"]] == [vocab - 1] * 3
    assert r.json()["generated_text"] == ""
    r = client.post("/predict", json={"input_ids": [vocab - 1, 5]})
    assert r.status_code == 200, r.text


def test_a_request_of_more_sequences_than_the_queue_holds_is_refused_as_invalid_not_overloaded(
    client_factory: Callable[..., TestClient],
) -> None:
    """n choices, or prompts times best_of, past the queue's capacity could never be admitted: on /v1 they
    were answered 429 with Retry-After on an idle server, and a client retrying on 429 retried forever."""
    client = client_factory(max_queue_size=4)
    assert client.get("/info").json()["limits"]["max_inputs_per_request"] == 4
    one = {"role": "user", "content": "To be"}
    refused = [
        ("/v1/completions", {"prompt": "To be", "max_tokens": 2, "n": 5}),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 2, "n": 1, "best_of": 2}),
        ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [one], "max_tokens": 2, "n": 5}),
    ]
    for path, body in refused:
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (path, body, r.text)
    r = client.post("/predict", json={"inputs": ["a"] * 5})
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    r = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 2, "n": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_a_compressed_body_gets_415_in_its_familys_envelope(client: TestClient) -> None:
    """A body in a content coding the server does not decode is refused, not read as JSON."""
    body = gzip.compress(json.dumps({"inputs": "To be", "parameters": {"max_new_tokens": 2}}).encode())
    r = client.post("/generate", content=body, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type"
    assert "gzip" in r.json()["error"]
    chat = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode()
    r = client.post(
        "/v1/chat/completions",
        content=gzip.compress(chat),
        headers={"content-type": "application/json", "content-encoding": "GZIP"},
    )
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"
    r = client.post(
        "/v1/chat/completions",
        content=chat,
        headers={"content-type": "application/json", "content-encoding": "identity"},
    )
    assert r.status_code == 200, r.text
