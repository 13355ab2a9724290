"""POST /predict: the heads' top tokens per position, greedy continuation, candidate scores, batching."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.decoding.predict import score_next
from tests.conftest import forward_passes

TEXTS = ["To be, or not to be", "The quick brown fox", "naïve café", "question"]


def service(client: TestClient) -> Any:
    return client.app.state.service  # type: ignore[attr-defined]


def test_single_text_returns_k_positions_of_top_n(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": "To be, or not to be", "top_n": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    srv = service(client)
    ids = srv.tokenizer.encode("To be, or not to be")
    assert body["positions"] == body["k"] == 3 and len(body["results"]) == 1
    result = body["results"][0]
    assert result["input_length"] == len(ids)
    assert [p["position"] for p in result["positions"]] == [1, 2, 3]
    want = score_next(srv.engine.model, [ids], 4)
    for j, pos in enumerate(result["positions"]):
        assert [t["id"] for t in pos["top"]] == want.top_ids[0][j]
        probs = [t["prob"] for t in pos["top"]]
        assert probs == sorted(probs, reverse=True)
        assert probs == pytest.approx(want.top_probs[0][j], abs=1e-5)
        for t in pos["top"]:
            assert t["logprob"] == pytest.approx(math.log(t["prob"]), abs=1e-5)
            assert t["text"] == srv.tokenizer.id_to_text(t["id"])
    assert result["greedy"]["ids"] == want.greedy[0]
    assert result["greedy"]["ids"] == [pos["top"][0]["id"] for pos in result["positions"]]
    assert result["greedy"]["text"] == srv.tokenizer.decode(want.greedy[0])
    assert result["candidates"] is None


def test_list_of_texts_gives_one_result_each_in_order(client: TestClient) -> None:
    batch = client.post("/predict", json={"inputs": TEXTS, "top_n": 2}).json()["results"]
    singles = [client.post("/predict", json={"inputs": t, "top_n": 2}).json()["results"][0] for t in TEXTS]
    assert len(batch) == len(TEXTS)
    for a, b in zip(batch, singles, strict=True):
        assert a["input_length"] == b["input_length"]
        assert a["greedy"] == b["greedy"]
        for pa, pb in zip(a["positions"], b["positions"], strict=True):
            assert [t["id"] for t in pa["top"]] == [t["id"] for t in pb["top"]]
            assert [t["prob"] for t in pa["top"]] == pytest.approx([t["prob"] for t in pb["top"]], abs=1e-4)


def test_input_ids_flat_and_nested_match_text(client: TestClient) -> None:
    ids = service(client).tokenizer.encode(TEXTS[1])
    by_text = client.post("/predict", json={"inputs": TEXTS[1]}).json()["results"][0]
    flat = client.post("/predict", json={"input_ids": ids}).json()["results"]
    nested = client.post("/predict", json={"input_ids": [ids, ids[:2]]}).json()["results"]
    assert len(flat) == 1 and len(nested) == 2
    assert flat[0]["greedy"] == by_text["greedy"] == nested[0]["greedy"]
    assert nested[1]["input_length"] == 2


def test_ids_and_candidates_are_validated_as_the_one_shape_their_first_element_gives(
    client: TestClient, envelope: Callable[..., Any]
) -> None:
    """input_ids and candidates were validated against each of their shapes in turn, each
    refusing every element of another shape (a long list of id lists: an error recorded per
    element and shape, and all of them in the reply). Now the first element picks the shape, and a bad
    element gets one error that names it."""
    for body, message in (
        ({"input_ids": [[1]] * 1000 + [2]}, "input_ids.id_lists.1000: Input should be a valid list"),
        (
            {"inputs": "To be", "candidates": [[1]] * 1000 + ["a"]},
            "candidates.id_lists.1000: Input should be a valid list",
        ),
        (
            {"inputs": "To be", "candidates": [1]},
            "candidates: Input should be a list of texts or a list of lists of token ids",
        ),
    ):
        assert envelope(client.post("/predict", json=body), 422, "validation")["error"] == message
    r = client.post("/predict", json={"inputs": "To be", "candidates": [[1], [2, 3]]})
    assert r.status_code == 200 and len(r.json()["results"][0]["candidates"]) == 2, r.text


def test_positions_below_model_k_trims_positions_and_greedy(client: TestClient) -> None:
    full = client.post("/predict", json={"inputs": TEXTS[0]}).json()
    one = client.post("/predict", json={"inputs": TEXTS[0], "positions": 1, "top_n": 1}).json()
    assert one["positions"] == one["k"] == 1
    result = one["results"][0]
    assert len(result["positions"]) == 1 and len(result["positions"][0]["top"]) == 1
    assert result["greedy"]["ids"] == full["results"][0]["greedy"]["ids"][:1]


@pytest.mark.parametrize("sent", [{"k": 2}, {"positions": 2, "k": 2}])
def test_deprecated_k_still_asks_for_positions(client: TestClient, sent: dict[str, int]) -> None:
    by_positions = client.post("/predict", json={"inputs": TEXTS[0], "positions": 2}).json()
    r = client.post("/predict", json={"inputs": TEXTS[0], **sent})
    assert r.status_code == 200, r.text
    assert r.json() == by_positions
    assert by_positions["positions"] == by_positions["k"] == 2 and len(by_positions["results"][0]["positions"]) == 2


def test_positions_and_k_that_differ_get_422_envelope(client: TestClient, envelope: Callable[..., Any]) -> None:
    r = client.post("/predict", json={"inputs": TEXTS[0], "positions": 2, "k": 1})
    assert "positions and k" in envelope(r, 422, "validation")["error"]


def test_schema_names_positions_and_marks_response_k_deprecated(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "positions" in schemas["PredictRequest"]["properties"]
    assert "k" not in schemas["PredictRequest"]["properties"]  # accepted, but only positions is documented
    response = schemas["PredictResponse"]["properties"]
    assert response["k"]["deprecated"] is True and not response["positions"].get("deprecated", False)


def test_candidates_are_scored_head_by_head(client: TestClient) -> None:
    srv = service(client)
    tok = srv.tokenizer
    prompt = tok.encode(TEXTS[0])
    cand_ids = [[tok.eot_id], [10, 20], [30, 40, 50]]
    text_cands = [" be", " the"]
    want = score_next(srv.engine.model, [prompt], 1, [cand_ids + [tok.encode(c) for c in text_cands]])
    by_ids = client.post("/predict", json={"inputs": TEXTS[0], "candidates": cand_ids}).json()
    by_text = client.post("/predict", json={"inputs": TEXTS[0], "candidates": text_cands}).json()
    scored = by_ids["results"][0]["candidates"] + by_text["results"][0]["candidates"]
    assert [c["ids"] for c in scored] == cand_ids + [tok.encode(c) for c in text_cands]
    assert [c["text"] for c in scored[3:]] == text_cands
    for c, lps in zip(scored, want.candidates[0], strict=True):
        assert c["logprobs"] == pytest.approx(lps, abs=1e-5)
        assert c["total_logprob"] == pytest.approx(sum(lps), abs=1e-5)
    # the first position's candidate log-probability is head 1's log-probability for that token
    top = client.post("/predict", json={"inputs": TEXTS[0], "top_n": 1}).json()["results"][0]["positions"][0]["top"][0]
    again = client.post("/predict", json={"inputs": TEXTS[0], "candidates": [[top["id"]]]}).json()
    assert again["results"][0]["candidates"][0]["total_logprob"] == pytest.approx(top["logprob"], abs=1e-5)


def test_candidate_longer_than_positions_is_rejected(client: TestClient, envelope: Callable[..., Any]) -> None:
    r = client.post("/predict", json={"inputs": TEXTS[0], "positions": 2, "candidates": [[1, 2, 3]]})
    assert envelope(r, 422, "validation")["error"] == "each candidate must be 1 to 2 tokens (got 3)"


async def test_concurrent_predicts_match_sequential_in_fewer_passes(aclient_factory: Callable[..., Any]) -> None:
    app, client = await aclient_factory(max_batch_size=16)
    engine = app.state.service.engine
    texts = [t + suffix for t in TEXTS for suffix in ("", " and", " of the sea")]
    sequential = [(await client.post("/predict", json={"inputs": t, "top_n": 5})).json() for t in texts]
    before = forward_passes(engine)
    replies = await asyncio.gather(*(client.post("/predict", json={"inputs": t, "top_n": 5}) for t in texts))
    passes = forward_passes(engine) - before
    assert all(r.status_code == 200 for r in replies)
    assert passes < len(texts)
    for seq, r in zip(sequential, replies, strict=True):
        a, b = seq["results"][0], r.json()["results"][0]
        assert a["greedy"] == b["greedy"]
        for pa, pb in zip(a["positions"], b["positions"], strict=True):
            assert [t["id"] for t in pa["top"]] == [t["id"] for t in pb["top"]]
            assert [t["prob"] for t in pa["top"]] == pytest.approx([t["prob"] for t in pb["top"]], abs=1e-4)
