"""OpenAI-compatible /v1/models and /v1/completions, in-process and with the official client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

PROMPT = "To be, or not to be"


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_served_model(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model"


def test_completion_matches_generate_and_reports_usage(client: TestClient) -> None:
    body = complete(client, max_tokens=6, logprobs=0)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny"
    (choice,) = body["choices"]
    want = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}})
    assert choice["text"] == want.json()["generated_text"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 6
    assert lp["token_logprobs"] == pytest.approx([t["logprob"] for t in want.json()["details"]["tokens"]], abs=1e-5)
    n_prompt = len(client.app.state.service.tokenizer.encode(PROMPT))  # type: ignore[attr-defined]
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6, "total_tokens": n_prompt + 6}


def test_completion_of_several_prompts_gives_one_choice_each(client: TestClient) -> None:
    prompts = [PROMPT, "The quick brown fox"]
    body = complete(client, prompt=prompts, max_tokens=4)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for p, c in zip(prompts, body["choices"], strict=True):
        assert c["text"] == complete(client, prompt=p, max_tokens=4)["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 8


def test_completion_stop_string_finishes_with_stop(client: TestClient) -> None:
    text = complete(client, max_tokens=20)["choices"][0]["text"]
    stop = text[4:7]
    choice = complete(client, max_tokens=20, stop=stop)["choices"][0]
    assert text.startswith(choice["text"]) and len(choice["text"]) < len(text)
    assert choice["finish_reason"] == "stop"


def test_completion_text_excludes_the_stop_sequence(client: TestClient) -> None:
    text = complete(client, max_tokens=20)["choices"][0]["text"]
    stop = text[4:7]
    choice = complete(client, max_tokens=20, stop=stop)["choices"][0]
    assert choice["text"] == text[: text.find(stop)]


def test_streamed_completion_ends_with_done_and_usage(client: TestClient, sse: Callable[[str], list[Any]]) -> None:
    want = complete(client, max_tokens=9)["choices"][0]["text"]
    r = client.post(
        "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 9,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk, token_chunks = events[-2], events[-3], events[:-3]
    assert len(token_chunks) == 9
    assert all(c["object"] == "text_completion" and c["choices"][0]["finish_reason"] is None for c in token_chunks)
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == want
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 9
    assert len({c["id"] for c in events[:-1]}) == 1


def test_streamed_chunks_of_one_verify_step_share_a_write(
    client_factory: Callable[..., TestClient], repeat_checkpoint: Path, sse: Callable[[str], list[Any]]
) -> None:
    # every draft accepted: k = 3 tokens per step (a fixed draft count: the timed policy may re-time fewer)
    client = client_factory(checkpoint=repeat_checkpoint, adaptive_drafts=False)
    body = {"prompt": PROMPT, "max_tokens": 13, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        writes = [c.decode() for c in r.iter_raw()]
    assert all(w.startswith("data: ") and w.endswith("\n\n") for w in writes)  # whole events only
    events = sse("".join(writes))
    assert len(events) == 13 + 2 and events[-1] == "[DONE]"  # 13 token chunks, the finish chunk, [DONE]
    assert len(writes) < len(events)


def test_streamed_completion_without_usage_option_has_no_usage_chunk(
    client: TestClient, sse: Callable[[str], list[Any]]
) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True})
    events = sse(r.text)
    assert events[-1] == "[DONE]" and len(events) == 5
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])


def test_streamed_text_equals_completion_text_when_ending_mid_character(
    client_factory: Callable[..., TestClient], lead_byte_checkpoint: Any, sse: Callable[[str], list[Any]]
) -> None:
    client = client_factory(checkpoint=lead_byte_checkpoint)
    want = complete(client, max_tokens=4)["choices"][0]["text"]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in sse(r.text)[:-1]) == want


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": PROMPT, "temperature": 2.5},
        {"prompt": PROMPT, "top_p": 0},
        {"prompt": PROMPT, "n": 2, "best_of": 1},
        {"prompt": PROMPT, "n": 100},
        {"prompt": [10**9]},
        {"prompt": PROMPT, "logprobs": 50},
        {"prompt": PROMPT, "max_tokens": 0},
        {"prompt": PROMPT, "max_tokens": 300},
        {"prompt": PROMPT, "frequency_penalty": 3.0},
        {"prompt": PROMPT, "logit_bias": {"x": 1.0}},
        # keys int() takes, but not token ids as OpenAI writes them ("05" and "5" were one token)
        *({"prompt": PROMPT, "logit_bias": {key: 1.0}} for key in (" 5", "1_0", "05", "+5", "-1", "\u0663")),
        {"prompt": PROMPT, "logit_bias": {"1": 500.0}},
        {"prompt": PROMPT, "best_of": 2, "stream": True},
        {"prompt": PROMPT, "stream_options": {"include_usage": True}},  # ignored without stream
        {"prompt": ""},
        {"prompt": []},
        {"prompt": [PROMPT, PROMPT], "stream": True},
        {"prompt": "to be or not to be " * 40},
    ],
)
def test_bad_completion_gets_openai_error_shape(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text  # OpenAI's and vLLM's status for a request it cannot take
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["message"]
    assert "Traceback" not in r.text
    assert complete(client, max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_a_logit_bias_of_more_entries_than_token_ids_is_refused_from_its_length(client: TestClient) -> None:
    """Each logit_bias key was checked to be a token id, one by one on the event loop, before any
    id was found past the vocabulary: now a map longer than the vocabulary is refused at once."""
    vocab = client.get("/info").json()["vocab_size"]
    bias = {str(i): 1.0 for i in range(vocab + 1)}
    chat = {"messages": [{"role": "user", "content": PROMPT}]}
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", chat)):
        r = client.post(path, json={**body, "max_tokens": 2, "logit_bias": bias})
        assert r.status_code == 400, r.text
        want = f"logit_bias: at most {vocab} entries, one per token id (got {vocab + 1})"
        assert r.json()["error"]["message"] == want
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logit_bias": {"0": 1.0}})
    assert r.status_code == 200, r.text


def test_a_prompt_is_validated_as_the_one_shape_its_first_element_gives(client: TestClient) -> None:
    """A prompt was validated against each shape in turn (text, texts, ids, id lists), each
    refusing every element of another shape: 200,000 id lists held the event loop 171 ms, and a
    bad element got an error from every shape. Now the first element picks the shape, and a bad
    element gets one error that names it."""
    for prompt, message in (
        ([[1]] * 1000 + ["a"], "prompt.id_lists.1000: Input should be a valid list"),
        ([1] * 1000 + [[2]], "prompt.ids.1000: Input should be a valid integer"),
        (["a"] * 1000 + [True], "prompt.texts.1000: Input should be a valid string"),
        (5, "prompt: Input should be a text, a list of texts, a list of token ids or a list of lists of token ids"),
    ):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == message
    for prompt in ([[1, 2]], [1, 2], ["To be"], "To be"):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_openai_errors_before_ready_and_for_malformed_json(app_factory: Callable[..., Any]) -> None:
    client = TestClient(app_factory())  # lifespan not run
    r = client.post("/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "malformed JSON body"


# ---- the official client against a real server ----------------------------------------------


def test_official_openai_client_works_against_the_server(server: Any) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == done.usage.total_tokens
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=3.0)
    assert isinstance(exc.value.body, dict) and exc.value.body.get("type") == "invalid_request_error"
    assert exc.value.body.get("param") == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=6)


def test_model_card_by_id(client: TestClient) -> None:
    model_id = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get(f"/v1/models/{model_id}").json()["id"] == model_id
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


def test_token_id_prompts_complete_like_their_text(client: TestClient) -> None:
    ids = [t["id"] for t in client.post("/tokenize", json={"inputs": PROMPT}).json()["tokens"]]
    by_text = complete(client, max_tokens=6, temperature=0)
    assert complete(client, prompt=ids, max_tokens=6, temperature=0)["choices"] == by_text["choices"]
    two = complete(client, prompt=[ids, ids], max_tokens=6, temperature=0)["choices"]
    assert [c["text"] for c in two] == [by_text["choices"][0]["text"]] * 2 and [c["index"] for c in two] == [0, 1]


def test_n_best_of_and_echo(client: TestClient) -> None:
    sampled = complete(client, max_tokens=8, temperature=1.0, seed=3, n=3)["choices"]
    assert [c["index"] for c in sampled] == [0, 1, 2] and len({c["text"] for c in sampled}) > 1
    best = complete(client, max_tokens=8, temperature=1.0, seed=3, n=1, best_of=3, logprobs=0)["choices"]
    totals = [
        sum(
            complete(client, max_tokens=8, temperature=1.0, seed=3 + i, logprobs=0)["choices"][0]["logprobs"][
                "token_logprobs"
            ]
        )
        for i in range(3)
    ]
    assert sum(best[0]["logprobs"]["token_logprobs"]) == pytest.approx(max(totals))
    echoed = complete(client, max_tokens=4, temperature=0, echo=True)["choices"][0]["text"]
    assert echoed == PROMPT + complete(client, max_tokens=4, temperature=0)["choices"][0]["text"]
    for bad in ({"n": 2, "best_of": 1}, {"echo": True, "logprobs": 1}, {"n": 2, "stream": True}):
        assert client.post("/v1/completions", json={"prompt": PROMPT, **bad}).status_code == 400


@pytest.mark.parametrize("stops", ["a prefix that holds text back", "none"])
def test_streamed_logprobs_name_each_token_and_its_offset_as_the_unstreamed_reply_does(
    client: TestClient, sse: Callable[[str], list[Any]], stops: str
) -> None:
    """Streamed chunks gave the text released with the token as its `tokens` entry (empty while a
    possible stop sequence held text back, several tokens' text after) and 0 as every offset."""
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2}
    text = complete(client, **{k: v for k, v in body.items() if k != "prompt"})["choices"][0]["text"]
    if stops != "none":  # the text's start, then a character it never has: matches, then never ends
        body["stop"] = [text[1:4] + next(c for c in "~|#@" if c not in text)]
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    lps = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"] and e["choices"][0]["logprobs"]]
    assert [lp["tokens"][0] for lp in lps] == whole["logprobs"]["tokens"]
    assert [lp["text_offset"][0] for lp in lps] == whole["logprobs"]["text_offset"]
    # the same values, up to the last digits: the two runs' passes may batch and add up differently
    assert [lp["token_logprobs"][0] for lp in lps] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-4)
    for streamed, unstreamed in zip([lp["top_logprobs"][0] for lp in lps], whole["logprobs"]["top_logprobs"]):
        assert streamed.keys() == unstreamed.keys()
        assert list(streamed.values()) == pytest.approx(list(unstreamed.values()), abs=1e-4)
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == whole["text"]
