"""The clients people already use, unchanged, against a real server: TGI's (huggingface_hub's
InferenceClient, text-generation's Client) and OpenAI's (openai, LangChain's OpenAI LLM)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import text_generation.errors as tgi_errors
from huggingface_hub import InferenceClient
from huggingface_hub import errors as hub_errors
from langchain_openai import OpenAI as LangChainOpenAI
from text_generation import Client as TGIClient

from app.model.checkpoint import load_checkpoint
from tests.conftest import head1_prompt_logprobs

PROMPT = "To be, or not to be"


def test_huggingface_hub_text_generation_at_the_url_tgi_documents(server: Any) -> None:
    client = InferenceClient(model=server.url)
    text = client.text_generation(PROMPT, max_new_tokens=6)
    assert isinstance(text, str) and text
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True, repetition_penalty=1.3, seed=1)
    assert out.details is not None and out.details.generated_tokens == len(out.details.tokens) == 6
    assert out.details.finish_reason == "length"
    streamed = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True))
    assert "".join(s.token.text for s in streamed) == streamed[-1].generated_text
    assert streamed[-1].generated_text == client.text_generation(PROMPT, max_new_tokens=6)


def test_text_generation_client_at_the_root_url(server: Any) -> None:
    client = TGIClient(server.url, timeout=30)
    res = client.generate(PROMPT, max_new_tokens=6, stop_sequences=["zzz"])
    assert res.details.generated_tokens == 6 and res.details.prefill == []
    assert res.generated_text == "".join(t.text for t in res.details.tokens)
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=6))
    assert streamed[-1].generated_text == res.generated_text
    with pytest.raises(Exception, match="watermark"):
        client.generate(PROMPT, max_new_tokens=2, watermark=True)  # not supported: a clear 422
    assert client.generate(PROMPT, max_new_tokens=4, typical_p=0.5, seed=1).details.seed == 1


def assert_prefill_is_the_prompt_scored_by_head_1(prefill: list[Any], checkpoint: Path) -> None:
    """details.prefill: the prompt's tokens and texts, the first without a logprob, token t with
    log p(token t | tokens before it) under head 1 of the served model, computed here by its forward."""
    model, tok = load_checkpoint(checkpoint)
    ids = tok.encode(PROMPT)
    assert [t.id for t in prefill] == ids and [t.text for t in prefill] == [tok.id_to_text(i) for i in ids]
    assert prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx(head1_prompt_logprobs(model, ids), abs=1e-4)


def test_huggingface_hub_decoder_input_details(server: Any, checkpoint: Path) -> None:
    client = InferenceClient(model=server.url)
    out = client.text_generation(PROMPT, max_new_tokens=4, details=True, decoder_input_details=True)
    assert out.details is not None and out.details.generated_tokens == 4
    assert_prefill_is_the_prompt_scored_by_head_1(out.details.prefill, checkpoint)
    top = client.text_generation(PROMPT, max_new_tokens=4, details=True, decoder_input_details=True, top_n_tokens=3)
    assert top.details is not None and top.details.top_tokens is not None
    assert_prefill_is_the_prompt_scored_by_head_1(top.details.prefill, checkpoint)  # no top tokens there, as TGI
    assert [len(t) for t in top.details.top_tokens] == [3] * 4 and top.generated_text == out.generated_text
    with pytest.raises(hub_errors.ValidationError, match="not supported when streaming"):
        list(client.text_generation(PROMPT, max_new_tokens=2, details=True, decoder_input_details=True, stream=True))


def test_text_generation_client_decoder_input_details(server: Any, checkpoint: Path) -> None:
    client = TGIClient(server.url, timeout=30)
    res = client.generate(PROMPT, max_new_tokens=4, decoder_input_details=True)
    assert_prefill_is_the_prompt_scored_by_head_1(res.details.prefill, checkpoint)
    top = client.generate(PROMPT, max_new_tokens=4, decoder_input_details=True, top_n_tokens=3)
    assert_prefill_is_the_prompt_scored_by_head_1(top.details.prefill, checkpoint)
    assert top.details.top_tokens is not None and [len(t) for t in top.details.top_tokens] == [3] * 4


def test_error_types_are_tgis_names_over_http(server_factory: Callable[..., Any]) -> None:
    """422 is "validation" and a full queue's 429 is "overloaded", as TGI names them, so TGI's
    clients raise their ValidationError and OverloadedError."""
    srv = server_factory(MTP_MAX_QUEUE_SIZE="1")
    bad = {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}
    for path, body in [
        ("/generate_stream", bad),
        ("/generate", {**bad, "stream": True}),
        ("/", {**bad, "stream": True}),
    ]:
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=30)
        assert r.status_code == 422 and r.json()["error_type"] == "validation", (path, r.text)
        assert "not supported when streaming" in r.json()["error"]
    with pytest.raises(tgi_errors.ValidationError):
        TGIClient(srv.url, timeout=30).generate(PROMPT, max_new_tokens=2, watermark=True)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        # a request whose body is still arriving holds the one queue place
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b'Content-Length: 23\r\n\r\n{"inputs": ')
        r = httpx.post(f"{srv.url}/generate", json={"inputs": PROMPT}, timeout=30)
        assert r.status_code == 429 and r.json() == {"error": r.json()["error"], "error_type": "overloaded"}
        assert r.headers["retry-after"] == "1"
        with pytest.raises(tgi_errors.OverloadedError):
            TGIClient(srv.url, timeout=30).generate(PROMPT, max_new_tokens=2)
        with pytest.raises(hub_errors.OverloadedError):
            InferenceClient(model=srv.url).text_generation(PROMPT, max_new_tokens=2)
        sock.sendall(b'"a", "x": 1}')  # the body completes: an unknown field, a 422
        assert sock.recv(65536).startswith(b"HTTP/1.1 422 ")
    assert httpx.post(f"{srv.url}/generate", json={"inputs": PROMPT}, timeout=30).status_code == 200


def test_langchain_openai_llm_invoke_stream_and_batch(server: Any) -> None:
    """LangChain's OpenAI LLM always sends frequency_penalty, presence_penalty, n and logit_bias."""
    llm = LangChainOpenAI(base_url=f"{server.url}/v1", api_key="x", model="tiny", max_tokens=8, temperature=0)
    text = llm.invoke(PROMPT)
    assert isinstance(text, str) and text
    assert "".join(llm.stream(PROMPT)) == text
    assert llm.batch([PROMPT, PROMPT]) == [text, text]


def test_openai_client_with_penalties_and_nulls(server: Any) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    tokens = httpx.post(f"{server.url}/tokenize", json={"inputs": "e"}, timeout=30).json()["tokens"]
    biased = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logit_bias={str(tokens[0]["id"]): 100}
    )
    assert biased.choices[0].text == "e" * 12 != plain.choices[0].text  # applied, not ignored
    penalized = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
        logit_bias={str(tokens[0]["id"]): 10},
    )
    text = penalized.choices[0].text
    assert text.startswith("e") and text.count("e") < 12  # each "e" makes the next less likely
    body = {"model": None, "prompt": PROMPT, "max_tokens": None, "temperature": None, "stop": None, "seed": None}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text  # null is the default
    choice, used = r.json()["choices"][0], r.json()["usage"]["completion_tokens"]
    # max_tokens null: 16. Sampled, so an end-of-text can come first, as the 16th token too (a "stop" at 16).
    assert 0 < used <= 16 and (used == 16 or choice["finish_reason"] == "stop")
    assert r.json()["model"] == "tiny"  # model null: this one


def test_chat_clients_openai_langchain_and_huggingface_hub(server: Any) -> None:
    from langchain_openai import ChatOpenAI

    messages = [{"role": "user", "content": PROMPT}]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    text = reply.choices[0].message.content
    assert text is not None and reply.usage is not None
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model="tiny", max_tokens=8, temperature=0)
    assert chat.invoke(PROMPT).content == text
    assert "".join(str(c.content) for c in chat.stream(PROMPT)) == text
    assert [m.content for m in chat.batch([PROMPT, PROMPT])] == [text, text]

    hub = InferenceClient(model=server.url)
    out = hub.chat_completion(messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == text
    streamed = hub.chat_completion(messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_litellm_openai_and_huggingface_providers(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list: nothing outside
    import litellm

    messages = [{"role": "user", "content": PROMPT}]
    want = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    text = want.choices[0].message.content
    got = litellm.completion(
        model="openai/tiny", api_base=f"{server.url}/v1", api_key="x", messages=messages, max_tokens=8, temperature=0
    )
    assert got.choices[0].message.content == text
    streamed = litellm.completion(
        model="openai/tiny",
        api_base=f"{server.url}/v1",
        api_key="x",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    hf = litellm.completion(
        model="huggingface/tiny", api_base=server.url, api_key="x", messages=messages, max_tokens=8, temperature=0
    )
    assert hf.choices[0].message.content == text
