"""/v1/chat/completions: the chat template, plain and streamed replies, n, logprobs, errors;
and per-token top log-probabilities on /v1/completions and TGI's top_n_tokens."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.model.chat import DEFAULT, ChatTemplate
from app.model.checkpoint import CheckpointError, load_tokenizer

HELLO = [{"role": "user", "content": "To be"}]


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    r = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True, **body}
    )
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_the_default_template_writes_a_conversation_as_a_play() -> None:
    prompt = DEFAULT.render(
        [("system", "Be brief."), ("user", "Who art thou?"), ("assistant", "A man."), ("user", "Why?")]
    )
    assert prompt == "SYSTEM:\nBe brief.\n\nUSER:\nWho art thou?\n\nASSISTANT:\nA man.\n\nUSER:\nWhy?\n\nASSISTANT:\n"
    assert DEFAULT.stop == ("\n\n",)


def test_a_reply_is_the_completion_of_the_rendered_conversation(client: TestClient) -> None:
    messages = [
        {"role": "developer", "content": "Speak."},
        {"role": "user", "content": [{"type": "text", "text": "To be"}]},
    ]
    reply = chat(client, messages=messages, max_tokens=12)
    prompt = DEFAULT.render([("system", "Speak."), ("user", "To be")])
    done = client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": ["\n\n"]}
    ).json()
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": done["choices"][0]["text"]}
    assert reply["choices"][0]["finish_reason"] == done["choices"][0]["finish_reason"]
    assert reply["usage"] == done["usage"]


def test_a_messages_name_is_its_speakers_name_in_the_prompt(client: TestClient) -> None:
    """A message's `name` takes its role's place in the rendered prompt: a reply to the
    conversation with names is the completion of that prompt."""
    messages = [{"role": "user", "content": "Wherefore?", "name": "JULIET"}, {"role": "assistant", "content": "Ay."}]
    prompt = DEFAULT.render([("user", "Wherefore?", "JULIET"), ("assistant", "Ay.", None)])
    assert prompt.startswith("JULIET:\nWherefore?\n\nASSISTANT:\nAy.")
    reply = chat(client, messages=messages, max_tokens=12)
    done = client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": ["\n\n"]}
    ).json()
    assert reply["choices"][0]["message"]["content"] == done["choices"][0]["text"]
    assert reply["usage"] == done["usage"]
    unnamed = chat(client, messages=[{**m, "name": None} for m in messages], max_tokens=1)
    assert unnamed["usage"]["prompt_tokens"] != reply["usage"]["prompt_tokens"]


def test_streamed_reply_equals_the_unstreamed_one(client: TestClient) -> None:
    whole = chat(client, max_tokens=10)
    chunks = stream_chunks(client, max_tokens=10, stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0][
        "finish_reason"
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_n_choices_are_separate_sequences(client: TestClient) -> None:
    greedy = chat(client, n=2)["choices"]
    assert [c["index"] for c in greedy] == [0, 1] and greedy[0]["message"] == greedy[1]["message"]
    sampled = chat(client, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert len({c["message"]["content"] for c in sampled["choices"]}) > 1  # seeds 7, 8, 9
    assert chat(client, n=3, temperature=1.0, seed=7, max_tokens=12)["choices"] == sampled["choices"]
    assert 3 <= sampled["usage"]["completion_tokens"] <= 36  # each of the 3 choices counts


def test_logprobs_and_top_logprobs(client: TestClient) -> None:
    body = chat(client, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for tok in content:
        top = tok["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["bytes"] == tok["bytes"] and top[0]["logprob"] == pytest.approx(tok["logprob"])  # greedy
        assert bytes(tok["bytes"]).decode(errors="replace") == tok["token"]
    streamed = [c for c in stream_chunks(client, logprobs=True, top_logprobs=3) if c["choices"]]
    got = [t for c in streamed if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in got] == [t["token"] for t in content]


def test_a_reply_with_logprobs_parses_as_openais_chat_completion(client: TestClient) -> None:
    """The reply with log-probabilities is written as JSON text a choice at a time, not through
    the response model: it still parses as the openai library's ChatCompletion, and as ours."""
    from openai.types.chat import ChatCompletion as OpenAIChatCompletion

    from app.api.openai_protocol import ChatCompletion

    body = chat(client, n=3, temperature=1.0, seed=3, logprobs=True, top_logprobs=20)
    reply = OpenAIChatCompletion.model_validate(body)
    assert ChatCompletion.model_validate(body).model_dump(mode="json") == body
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage is not None
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        for tok in choice.logprobs.content:
            assert len(tok.top_logprobs) == 20
            for t in [tok, *tok.top_logprobs]:
                assert t.bytes is not None and bytes(t.bytes).decode(errors="replace") == t.token


@pytest.mark.parametrize("stop", ["one that completes", "a prefix that holds text back", "none"])
def test_streamed_logprobs_list_every_token_the_unstreamed_reply_lists(client: TestClient, stop: str) -> None:
    """The streamed chunks' log-probabilities name the unstreamed reply's tokens, in order: also
    the last ones, whose text a stop sequence held back (or cut) until the reply ended."""
    body: dict[str, Any] = {"logprobs": True, "top_logprobs": 2, "max_tokens": 12}
    text = chat(client, **body)["choices"][0]["message"]["content"]
    if stop == "one that completes":
        body["stop"] = [text[4:6]]
    elif stop != "none":  # the text's start, then a character it never has: matches, then never ends
        body["stop"] = [text[1:4] + next(c for c in "~|#@" if c not in text)]
    whole = chat(client, **body)["choices"][0]
    streamed = [c for c in stream_chunks(client, **body) if c["choices"]]
    got = [t for c in streamed if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in got] == [t["token"] for t in whole["logprobs"]["content"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == whole["message"]["content"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": []}]},
        {"messages": [{"role": "user", "content": "x", "name": "two words"}]},
        {"messages": [{"role": "user", "content": "x", "name": ""}]},
        {"messages": HELLO, "top_logprobs": 2},
        {"messages": HELLO, "logprobs": True, "top_logprobs": 50},
        {"messages": HELLO, "n": 2, "stream": True},
        {"messages": HELLO, "stream_options": {"include_usage": True}},  # ignored without stream
        {"messages": HELLO, "n": 1000},
        {"messages": HELLO, "temperature": 5},
        {"messages": HELLO, "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "to be or not to be " * 40}]},
    ],
)
def test_bad_chat_requests_get_400_in_openais_shape(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["message"]


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "model": "gpt-4"})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]


def test_a_checkpoint_carries_its_own_template(
    tmp_path: Path, checkpoint: Path, client_factory: Callable[..., TestClient]
) -> None:
    own = tmp_path / "own"
    shutil.copytree(checkpoint, own)
    template = ChatTemplate(names={"system": "NOTE", "user": "Q", "assistant": "A"}, stop=("\n",))
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": template.to_dict()}))
    assert load_tokenizer(own).chat_template == template
    client = client_factory(checkpoint=own)
    reply = chat(client, max_tokens=10)["choices"][0]["message"]["content"]
    done = client.post(
        "/v1/completions", json={"prompt": "Q:\nTo be\n\nA:\n", "max_tokens": 10, "temperature": 0, "stop": ["\n"]}
    ).json()
    assert reply == done["choices"][0]["text"]
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": {"names": {"user": "Q"}}}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json"):
        load_tokenizer(own)


# ---- top log-probabilities elsewhere --------------------------------------------------------


def test_completion_logprobs_n_gives_the_most_likely_tokens(client: TestClient) -> None:
    body = client.post(
        "/v1/completions", json={"prompt": "To be", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    ).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == 5 and all(len(d) <= 2 for d in lp["top_logprobs"])
    for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert max(top, key=top.get) == tok


def test_tgi_top_n_tokens(client: TestClient) -> None:
    body = {"inputs": "To be", "parameters": {"max_new_tokens": 4, "details": True, "top_n_tokens": 3}}
    details = client.post("/generate", json=body).json()["details"]
    assert len(details["top_tokens"]) == 4
    for tok, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(top) == 3 and top[0]["id"] == tok["id"]
    r = client.post("/generate_stream", json=body)
    events = [json.loads(line[5:]) for line in r.text.split("\n") if line.startswith("data:")]
    assert [e["top_tokens"][0]["id"] for e in events] == [t["id"] for t in details["tokens"]]


@pytest.mark.parametrize("stream", [False, True])
def test_without_max_tokens_a_reply_may_fill_what_the_context_leaves(
    client_factory: Callable[..., TestClient], stream: bool
) -> None:
    """max_new_tokens at least the context (the default model's case: 256 and 256): a request
    without max_tokens asked for one token more than the context left, and got 400."""
    client = client_factory(max_new_tokens=1000)  # the tiny model's context is 64 tokens
    body = {"messages": HELLO, "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}
    if not stream:
        del body["stream_options"]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        usage = json.loads([line[6:] for line in r.text.split("\n") if line.startswith("data: {")][-1])["usage"]
    else:
        usage = r.json()["usage"]
    assert 1 <= usage["completion_tokens"] <= 64 - usage["prompt_tokens"]
