"""POST /generate and /generate_stream (text-generation-inference's shape): finish reasons,
streaming events, seeds, speculative decoding, continuous batching and dropped streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import forward_passes, set_fault_hook

PROMPT = "To be, or not to be"
SPEC_KEYS = {"enabled", "verify_steps", "drafted_tokens", "accepted_tokens", "mean_accepted_length"}


def gen(client: TestClient, inputs: str = PROMPT, **params: Any) -> dict[str, Any]:
    r = client.post("/generate", json={"inputs": inputs, "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(client: TestClient, sse: Callable[[str], list[Any]], path: str, body: dict[str, Any]) -> list[Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse(r.text)


def test_generate_returns_tgi_shape_with_details(client: TestClient) -> None:
    body = gen(client, max_new_tokens=9, details=True)
    assert set(body) == {"generated_text", "details"}
    d = body["details"]
    assert d["finish_reason"] == "length"
    assert d["generated_tokens"] == 9 == len(d["tokens"])
    assert d["input_length"] == len(client.app.state.service.tokenizer.encode(PROMPT))  # type: ignore[attr-defined]
    assert d["seed"] is None  # greedy
    assert set(d["speculation"]) == SPEC_KEYS and d["speculation"]["enabled"] is True
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    for t in d["tokens"]:
        assert set(t) == {"id", "text", "logprob", "special"} and t["logprob"] <= 0


def test_details_off_and_return_full_text(client: TestClient) -> None:
    plain = gen(client, max_new_tokens=5)
    assert plain["details"] is None
    full = gen(client, max_new_tokens=5, return_full_text=True)
    assert full["generated_text"] == PROMPT + plain["generated_text"]


@pytest.mark.parametrize("how", ["stream_flag", "generate_stream"])
def test_stream_sends_one_event_per_token_and_details_last(
    client: TestClient, sse: Callable[[str], list[Any]], how: str
) -> None:
    params = {"max_new_tokens": 9, "details": True}
    want = gen(client, **params)
    if how == "stream_flag":
        events = stream_events(client, sse, "/generate", {"inputs": PROMPT, "parameters": params, "stream": True})
    else:
        events = stream_events(client, sse, "/generate_stream", {"inputs": PROMPT, "parameters": params})
    assert len(events) == 9
    assert [e["index"] for e in events] == list(range(9))
    for e in events:
        assert set(e) == {"index", "token", "generated_text", "details"}
        assert set(e["token"]) == {"id", "text", "logprob", "special"}
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == want["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == last["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in want["details"]["tokens"]]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 9
    assert "tokens" not in last["details"]


def test_token_texts_add_up_to_generated_text_when_ending_mid_character(
    client_factory: Callable[..., TestClient], lead_byte_checkpoint: Path, sse: Callable[[str], list[Any]]
) -> None:
    client = client_factory(checkpoint=lead_byte_checkpoint)
    params = {"max_new_tokens": 4, "speculative": False}
    events = stream_events(client, sse, "/generate_stream", {"inputs": PROMPT, "parameters": params})
    body = gen(client, details=True, **params)
    assert body["generated_text"] == events[-1]["generated_text"]
    assert "".join(t["text"] for t in body["details"]["tokens"]) == body["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]


def test_stop_sequence_cuts_text_and_reports_stop(client: TestClient, sse: Callable[[str], list[Any]]) -> None:
    full = gen(client, max_new_tokens=30, details=True)
    text = full["generated_text"]
    stop = text[6:9]
    cut = text.find(stop) + len(stop)
    body = gen(client, max_new_tokens=30, stop=["never appears", stop], details=True)
    assert body["generated_text"] == text[:cut]
    d = body["details"]
    assert d["finish_reason"] == "stop_sequence"
    assert d["generated_tokens"] < 30
    assert [t["id"] for t in d["tokens"]] == [t["id"] for t in full["details"]["tokens"][: d["generated_tokens"]]]
    events = stream_events(
        client, sse, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 30, "stop": [stop]}}
    )
    assert events[-1]["generated_text"] == text[:cut]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert len(events) == d["generated_tokens"]


def test_a_non_streamed_reply_is_handed_over_by_the_engine_once_unless_a_stop_sequence_is_watched(
    client: TestClient, sse: Callable[[str], list[Any]]
) -> None:
    """The engine hands a non-streamed generation's tokens to the event loop in one piece when it
    ends (GenerateJob.final_only): the same tokens, log-probabilities and top tokens as the
    streamed reply. With a stop sequence the text is watched as it grows, step by step (the
    stream interval set to 0 here, so that a streamed reply's every step is handed over)."""
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    post, hand_offs = engine.core.post, []
    engine.core.post = lambda out: (hand_offs.append(out), post(out))
    interval, engine.core.stream_interval = engine.core.stream_interval, 0.0
    try:
        params = {"max_new_tokens": 20, "details": True, "top_n_tokens": 2, "speculative": False}
        events = stream_events(client, sse, "/generate_stream", {"inputs": PROMPT, "parameters": params})
        streamed = len(hand_offs)
        hand_offs.clear()
        body = gen(client, **params)
        assert len(hand_offs) == 2 < streamed  # leaving the queue, then everything at the end
        assert body["generated_text"] == events[-1]["generated_text"]
        assert body["details"]["tokens"] == [e["token"] for e in events]
        assert body["details"]["top_tokens"] == [e["top_tokens"] for e in events]
        hand_offs.clear()
        watched = gen(client, **params, stop=["never appears in it"])
        assert watched["generated_text"] == body["generated_text"]
        assert len(hand_offs) == streamed  # leaving the queue, then one hand-off per step
    finally:
        engine.core.post, engine.core.stream_interval = post, interval


def test_a_stop_sequence_finish_is_a_success_not_a_cancellation(
    client: TestClient, sse: Callable[[str], list[Any]]
) -> None:
    state = client.app.state.service  # type: ignore[attr-defined]
    registry = state.metrics.registry
    text = gen(client, max_new_tokens=30)["generated_text"]
    stop = text[6:9]
    cancelled = registry.get_sample_value("mtp_request_failures_total", {"reason": "cancelled"}) or 0.0
    assert gen(client, max_new_tokens=30, stop=[stop], details=True)["details"]["finish_reason"] == "stop_sequence"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 30, "stop": [stop]}}
    assert stream_events(client, sse, "/generate_stream", body)[-1]["details"]["finish_reason"] == "stop_sequence"
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [stop]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    deadline = time.monotonic() + 5
    while state.engine.pending() and time.monotonic() < deadline:  # the core lets them go at a step boundary
        time.sleep(0.01)
    assert state.engine.pending() == 0
    assert (registry.get_sample_value("mtp_request_failures_total", {"reason": "cancelled"}) or 0.0) == cancelled


def test_eos_token_finishes_generation(
    client_factory: Callable[..., TestClient], eos_checkpoint: Path, sse: Callable[[str], list[Any]]
) -> None:
    client = client_factory(checkpoint=eos_checkpoint)
    eot = client.app.state.service.tokenizer.eot_id  # type: ignore[attr-defined]
    d = gen(client, max_new_tokens=10, details=True)["details"]
    assert d["finish_reason"] == "eos_token" and d["generated_tokens"] == 1
    assert d["tokens"][0]["id"] == eot and d["tokens"][0]["special"] is True
    events = stream_events(client, sse, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 10}})
    assert len(events) == 1
    assert events[0]["token"]["special"] is True
    assert events[0]["details"]["finish_reason"] == "eos_token"


def test_eos_token_text_is_not_part_of_generated_text(
    client_factory: Callable[..., TestClient], eos_checkpoint: Path
) -> None:
    client = client_factory(checkpoint=eos_checkpoint)
    body = gen(client, max_new_tokens=10, details=True)
    assert body["details"]["finish_reason"] == "eos_token"
    assert body["generated_text"] == ""


def test_seeded_sampling_is_reproducible(client: TestClient) -> None:
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "seed": 7, "details": True}
    a, b = gen(client, **params), gen(client, **params)
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 7
    other = gen(client, **{**params, "seed": 8})
    assert other["generated_text"] != a["generated_text"]
    unseeded = gen(client, max_new_tokens=3, do_sample=True, details=True)
    assert isinstance(unseeded["details"]["seed"], int)  # a drawn seed is reported so the run can be replayed


def test_speculative_on_and_off_give_identical_greedy_output(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(adaptive_drafts=False)  # the random tiny model's drafts would be dropped as useless
    for prompt in (PROMPT, "The quick brown fox", "naïve"):
        on = gen(client, prompt, max_new_tokens=25, speculative=True, details=True)
        off = gen(client, prompt, max_new_tokens=25, speculative=False, details=True)
        assert on["generated_text"] == off["generated_text"]
        assert [t["id"] for t in on["details"]["tokens"]] == [t["id"] for t in off["details"]["tokens"]]
        assert on["details"]["speculation"]["enabled"] and on["details"]["speculation"]["verify_steps"] > 0
        assert not off["details"]["speculation"]["enabled"] and off["details"]["speculation"]["verify_steps"] == 0


def test_speculation_details_on_a_model_whose_drafts_are_accepted(
    client_factory: Callable[..., TestClient], repeat_checkpoint: Path
) -> None:
    client = client_factory(checkpoint=repeat_checkpoint, adaptive_drafts=False)  # every pass verifies k - 1
    spec = gen(client, max_new_tokens=13, details=True)["details"]["speculation"]
    assert spec["accepted_tokens"] == spec["drafted_tokens"] > 0
    assert spec["mean_accepted_length"] == pytest.approx(3.0)  # k tokens per verify pass


def test_draft_tokens_setting_caps_the_drafts_per_verify_pass(
    client_factory: Callable[..., TestClient], repeat_checkpoint: Path
) -> None:
    client = client_factory(checkpoint=repeat_checkpoint, draft_tokens=1)
    spec = gen(client, max_new_tokens=13, details=True)["details"]["speculation"]
    assert spec["accepted_tokens"] == spec["drafted_tokens"] == spec["verify_steps"] > 0
    assert spec["mean_accepted_length"] == pytest.approx(2.0)  # one draft + the bonus per pass


async def test_concurrent_generations_match_solo_in_fewer_passes(aclient_factory: Callable[..., Any]) -> None:
    app, client = await aclient_factory(max_batch_size=8)
    engine = app.state.service.engine
    prompts = [PROMPT, "The quick brown fox", "naïve café", "q", "whether 'tis nobler"]

    def body(i: int, p: str) -> dict[str, Any]:
        return {"inputs": p, "parameters": {"max_new_tokens": 8 + 2 * i, "details": True}}

    solo, solo_passes = [], 0
    for i, p in enumerate(prompts):
        before = forward_passes(engine)
        solo.append((await client.post("/generate", json=body(i, p))).json())
        solo_passes += forward_passes(engine) - before
    before = forward_passes(engine)
    replies = await asyncio.gather(*(client.post("/generate", json=body(i, p)) for i, p in enumerate(prompts)))
    assert forward_passes(engine) - before < solo_passes
    for a, r in zip(solo, replies, strict=True):
        assert r.status_code == 200
        b = r.json()
        assert [t["id"] for t in a["details"]["tokens"]] == [t["id"] for t in b["details"]["tokens"]]
        assert a["generated_text"] == b["generated_text"]


async def test_dropped_stream_frees_its_slot(aclient_factory: Callable[..., Any], sse: Callable[..., Any]) -> None:
    """Drive the ASGI app directly: the client disconnects right after the first event."""
    app, _ = await aclient_factory()
    state = app.state.service
    set_fault_hook(state.engine, lambda kind: time.sleep(0.01))  # 100 tokens take over a second
    registry = state.metrics.registry
    cancelled = registry.get_sample_value("mtp_request_failures_total", {"reason": "cancelled"})
    payload = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 50, "speculative": False}}).encode()
    got_event = asyncio.Event()
    chunks: list[bytes] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await got_event.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            got_event.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/generate_stream",
        "raw_path": b"/generate_stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    assert len(sse(b"".join(chunks).decode())) < 50
    deadline = time.monotonic() + 5
    while state.engine.pending() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert registry.get_sample_value("mtp_running_sequences") == 0
    assert registry.get_sample_value("mtp_queue_depth") == 0
    assert registry.get_sample_value("mtp_request_failures_total", {"reason": "cancelled"}) == cancelled + 1


def test_fault_in_forward_pass_fails_that_request_only(client: TestClient, sse: Callable[[str], list[Any]]) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    faults = {"prefill": 1}

    def hook(kind: str) -> None:
        if faults.get(kind):
            faults[kind] -= 1
            raise RuntimeError("injected fault")

    set_fault_hook(engine, hook)
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 500
    assert r.json()["error_type"] == "generation" and "injected" not in r.text  # TGI's GenerationError
    assert gen(client, max_new_tokens=4)["generated_text"]
    # after the first event the status is already 200: the error arrives as an SSE error event
    deadline = time.monotonic() + 5
    while engine.pending() and time.monotonic() < deadline:  # the worker's last step of the previous request
        time.sleep(0.01)
    faults["decode"] = 1
    events = stream_events(
        client, sse, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "speculative": False}}
    )
    assert events[-1] == {"error": events[-1]["error"], "error_type": "generation"}
    assert "index" in events[0]
    assert gen(client, max_new_tokens=4)["generated_text"]


def test_tokens_of_one_verify_step_share_a_write_as_separate_events(
    client_factory: Callable[..., TestClient], repeat_checkpoint: Path, sse: Callable[[str], list[Any]]
) -> None:
    # every draft accepted: k = 3 tokens per step (a fixed draft count: the timed policy may re-time fewer)
    client = client_factory(checkpoint=repeat_checkpoint, adaptive_drafts=False)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 13}, "stream": True}
    with client.stream("POST", "/generate", json=body) as r:
        chunks = [c.decode() for c in r.iter_raw()]
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)  # whole events only
    events = sse("".join(chunks))
    assert [e["index"] for e in events] == list(range(13))
    assert len(chunks) < len(events)


def test_a_k1_model_reports_speculation_off(
    tmp_path: Path, tiny_tokenizer: Any, client_factory: Callable[..., TestClient]
) -> None:
    import torch

    from app.model.checkpoint import save_checkpoint
    from app.model.config import ModelConfig
    from app.model.model import MTPTransformer
    from tests.conftest import TINY

    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(**{**TINY, "k": 1, "vocab_size": tiny_tokenizer.vocab_size})).eval()
    client = client_factory(checkpoint=save_checkpoint(tmp_path / "k1", model, tiny_tokenizer))
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True, "speculative": True}}
    spec = client.post("/generate", json=body).json()["details"]["speculation"]
    assert spec["enabled"] is False and spec["verify_steps"] == 0 and spec["mean_accepted_length"] == 1.0
    assert client.get("/info").json()["speculative"] is False


TGI_NEUTRAL = {
    "best_of": 1,
    "decoder_input_details": False,
    "details": True,
    "do_sample": False,
    "frequency_penalty": None,
    "max_new_tokens": 5,
    "repetition_penalty": None,
    "return_full_text": False,
    "seed": None,
    "stop": [],
    "temperature": None,
    "top_k": None,
    "top_n_tokens": None,
    "top_p": None,
    "truncate": None,
    "typical_p": None,
    "watermark": False,
    "grammar": None,
    "adapter_id": None,
}


def test_tgi_parameters_with_neutral_values_are_accepted(client: TestClient) -> None:
    """What text-generation's Client sends on every call."""
    body = client.post("/generate", json={"inputs": PROMPT, "parameters": TGI_NEUTRAL}).json()
    assert body["generated_text"] == gen(client, max_new_tokens=5)["generated_text"]
    assert body["details"]["prefill"] == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("best_of", 2),
        ("watermark", True),
        ("grammar", {"type": "json"}),
    ],
)
def test_unsupported_tgi_parameters_get_422_naming_them(
    client: TestClient, envelope: Callable[..., dict[str, Any]], name: str, value: Any
) -> None:
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, name: value}})
    assert envelope(r, 422, "validation")["error"].startswith(name)


def test_truncate_keeps_the_last_input_tokens(client: TestClient) -> None:
    full = gen(client, max_new_tokens=4, details=True)["details"]["input_length"]
    cut = gen(client, max_new_tokens=4, details=True, truncate=3)
    assert full > 3 and cut["details"]["input_length"] == 3
    tail = client.post("/tokenize", json={"inputs": PROMPT}).json()["tokens"][-3:]
    same = gen(client, "".join(t["text"] for t in tail), max_new_tokens=4)
    assert cut["generated_text"] == same["generated_text"]


def test_root_route_is_tgis_generate_or_stream(client: TestClient, sse: Callable[[str], list[Any]]) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    listed = client.post("/", json=body).json()
    assert listed == [gen(client, max_new_tokens=4)]
    events = stream_events(client, sse, "/", {**body, "stream": True})
    assert events[-1]["generated_text"] == listed[0]["generated_text"]


def test_repetition_and_frequency_penalties_change_generate(client: TestClient) -> None:
    text = "ab " * 20
    plain = gen(client, text, max_new_tokens=12, details=True)
    penalized = gen(client, text, max_new_tokens=12, details=True, repetition_penalty=50.0)
    prompt_ids = {t["id"] for t in client.post("/tokenize", json={"inputs": text}).json()["tokens"]}
    assert [t["id"] for t in penalized["details"]["tokens"]] != [t["id"] for t in plain["details"]["tokens"]]
    assert not prompt_ids & {t["id"] for t in penalized["details"]["tokens"]}  # a huge penalty avoids them


def test_typical_p_samples_from_the_typical_set(client: TestClient) -> None:
    body = gen(client, max_new_tokens=12, typical_p=0.3, seed=5, details=True)
    assert body == gen(client, max_new_tokens=12, typical_p=0.3, seed=5, details=True)  # seeded: reproducible
    assert body["details"]["seed"] == 5  # typical_p turns sampling on, as in TGI
    assert body != gen(client, max_new_tokens=12, seed=5, do_sample=True, details=True)


@pytest.mark.parametrize("logprob", [0.0, -0.0, -1e-300, -0.1234567890123, -5, float("-inf"), float("nan")])
@pytest.mark.parametrize("text", ["", " the", '"quoted" \\ back', "\n\t\x00\x1f", "é✓😀", "\ud800"])
@pytest.mark.parametrize("special", [False, True])
def test_a_token_event_is_written_as_its_model_would_be(logprob: float, text: str, special: bool) -> None:
    """/generate_stream writes token events without building their pydantic models: the same bytes."""
    from app.api.routes.generate import token_frame
    from app.api.schemas import StreamEvent, Token
    from app.api.textgen import GenToken

    out = GenToken(index=7, id=3, text=text, logprob=logprob, special=special)
    token = Token(id=3, text=text, logprob=logprob, special=special)
    payload = StreamEvent(index=7, token=token).model_dump(exclude={"top_tokens"})
    assert token_frame(out) == f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
