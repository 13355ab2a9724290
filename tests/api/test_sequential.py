"""A checkpoint with sequential MTP heads served over HTTP: /predict chains, /generate speculates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

PROMPT = "To be, or not to be"


def test_predict_and_generate_serve_sequential_heads(
    client_factory: Callable[..., TestClient], sequential_checkpoint: Path
) -> None:
    client = client_factory(checkpoint=sequential_checkpoint)
    srv = client.app.state.service  # type: ignore[attr-defined]
    model, tok = srv.engine.model, srv.tokenizer
    ids = tok.encode(PROMPT)
    body = client.post("/predict", json={"inputs": PROMPT, "top_n": 2, "candidates": [" be", " the"]}).json()
    result = body["results"][0]
    greedy = result["greedy"]["ids"]
    with torch.no_grad():  # teacher-forced on the greedy continuation: depth j reads its tokens 1..j
        ref = torch.log_softmax(model(torch.tensor([ids + greedy]))[0, len(ids) - 1].float(), dim=-1)
    assert greedy == ref.argmax(-1).tolist()
    for cand in result["candidates"]:  # chain probabilities on the candidate's own tokens
        with torch.no_grad():
            own = torch.log_softmax(model(torch.tensor([ids + cand["ids"]]))[0, len(ids) - 1].float(), dim=-1)
        assert cand["logprobs"] == pytest.approx([float(own[j, t]) for j, t in enumerate(cand["ids"])], abs=1e-4)

    def text(speculative: bool) -> dict:
        params = {"max_new_tokens": 24, "details": True, "speculative": speculative}
        return client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()

    spec, plain = text(True), text(False)
    assert spec["generated_text"] == plain["generated_text"]
    assert spec["details"]["speculation"]["drafted_tokens"] > 0


def test_candidates_over_the_chain_budget_are_refused_and_a_pass_takes_no_more_than_it(
    client_factory: Callable[..., TestClient], sequential_checkpoint: Path
) -> None:
    """Each candidate of each input runs the modules over the input's prompt: a request asking for
    more prompt tokens x candidates than MTP_MAX_CANDIDATE_TOKENS gets a 422 in TGI's envelope,
    before any pass; one within it is scored, and with others waiting a pass stops at the budget."""
    client = client_factory(checkpoint=sequential_checkpoint, max_candidate_tokens=40)
    assert client.get("/info").json()["limits"]["max_candidate_tokens"] == 40
    srv = client.app.state.service  # type: ignore[attr-defined]
    n = len(srv.tokenizer.encode(PROMPT))
    cands = [" be", " the", " a"]
    over = client.post("/predict", json={"inputs": [PROMPT] * 2, "candidates": cands})
    assert 2 * n * 3 > 40 and over.status_code == 422
    assert over.json()["error_type"] == "validation" and "the limit is 40" in over.json()["error"]
    ok = client.post("/predict", json={"inputs": PROMPT, "candidates": cands[:2]})
    assert n * 2 <= 40 and ok.status_code == 200 and len(ok.json()["results"][0]["candidates"]) == 2
