"""The service benchmark's load generators against a real uvicorn server: they count what the
server sent (one SSE event per token) and count refusals as errors."""

import asyncio
from typing import Any

import pytest

from bench.service import generate_load, predict_load


def test_generate_load_counts_one_token_per_event(server: Any) -> None:
    r = asyncio.run(generate_load(server.url, ["To be", "or not"], streams=2, new_tokens=12, rounds=2))
    assert r["sequences"] == 4 and r["errors"] == 0
    assert 4 <= r["tokens"] <= 4 * 12
    assert r["ttft_p50_ms"] <= r["latency_p50_ms"]


def test_generate_load_counts_the_tokens_of_json_replies_from_their_details(server: Any) -> None:
    streamed = asyncio.run(generate_load(server.url, ["To be", "or not"], streams=1, new_tokens=12, rounds=2))
    whole = asyncio.run(generate_load(server.url, ["To be", "or not"], 1, 12, 2, stream=False))
    assert whole["sequences"] == 2 and whole["errors"] == 0 and not whole["streamed"]
    assert whole["tokens"] == streamed["tokens"]  # greedy: the same tokens either way
    assert whole["ttft_p50_ms"] is None


@pytest.mark.parametrize("stream", [True, False])
def test_generate_load_counts_refused_requests_as_errors(server: Any, stream: bool) -> None:
    too_long = "word " * 200  # past the tiny model's 64-token context: 422 before the stream starts
    r = asyncio.run(generate_load(server.url, [too_long], streams=1, new_tokens=4, rounds=2, stream=stream))
    assert r["sequences"] == 0 and r["errors"] == 2


def test_predict_load_completes_requests_on_keep_alive_connections(server: Any) -> None:
    r = asyncio.run(predict_load(server.url, ["To be", "or not"], clients=2, seconds=1.0))
    assert r["requests"] > 0 and r["errors"] == 0
