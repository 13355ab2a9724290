"""TGI's decoder_input_details on /generate and POST /: details.prefill is the input's tokens, each
scored by head 1 of the served model given the tokens before it (the first unscored, as TGI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.model.checkpoint import load_checkpoint
from tests.conftest import head1_prompt_logprobs

PROMPT = "To be, or not to be, that is the question"


def assert_prefill(prefill: list[dict[str, Any]], ids: list[int], checkpoint: Path) -> None:
    model, tok = load_checkpoint(checkpoint)
    assert [t["id"] for t in prefill] == ids
    assert [t["text"] for t in prefill] == [tok.id_to_text(i) for i in ids]
    assert prefill[0]["logprob"] is None
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(head1_prompt_logprobs(model, ids), abs=1e-4)


def input_ids(client: TestClient, text: str) -> list[int]:
    return [t["id"] for t in client.post("/tokenize", json={"inputs": text}).json()["tokens"]]


def test_decoder_input_details_alone_gives_details_with_the_scored_prompt(client: TestClient, checkpoint: Path) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "decoder_input_details": True}}
    details = client.post("/generate", json=body).json()["details"]  # implies details, as in TGI
    assert details["generated_tokens"] == len(details["tokens"]) == 3
    assert_prefill(details["prefill"], input_ids(client, PROMPT), checkpoint)
    [root] = client.post("/", json=body).json()
    assert root["details"]["prefill"] == details["prefill"]
    plain = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}})
    assert plain.json()["details"]["prefill"] == [] and plain.json()["generated_text"] == root["generated_text"]


def test_prefill_is_the_truncated_input_scored_on_its_own(client: TestClient, checkpoint: Path) -> None:
    params = {"max_new_tokens": 2, "details": True, "decoder_input_details": True, "truncate": 4}
    details = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()["details"]
    assert details["input_length"] == 4
    assert_prefill(details["prefill"], input_ids(client, PROMPT)[-4:], checkpoint)


def test_a_one_token_input_has_one_unscored_prefill_token(client: TestClient) -> None:
    [tid] = input_ids(client, "a")
    params = {"max_new_tokens": 2, "details": True, "decoder_input_details": True, "top_n_tokens": 2}
    details = client.post("/generate", json={"inputs": "a", "parameters": params}).json()["details"]
    assert details["prefill"] == [{"id": tid, "text": "a", "logprob": None}]
    assert [len(t) for t in details["top_tokens"]] == [2, 2]  # top tokens are the generated tokens' only
