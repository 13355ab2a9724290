"""OpenAI-compatible /v1/completions and /v1/models (errors in OpenAI's shape on these routes),
and what /v1/chat/completions (chat.py) shares with them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import Serving, ServingDep, StateDep, unless_disconnected
from app.api.errors import APIError, error_body
from app.api.openai_protocol import (
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from app.api.routes.generate import options_for, prompt_ids
from app.api.schemas import INFERENCE_ERRORS, GenerateParameters, OpenAIError, error_responses
from app.api.textgen import GenError, GenFinal, GenOptions, GenToken, open_stream, run_to_end
from app.model.tokenizer import Tokenizer

router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")
TOKEN_KEY = re.compile(r"0|[1-9][0-9]*", re.ASCII)  # a logit_bias key: a token id in decimal


STARTED = int(time.time())


@router.get("/models", response_model=ModelList, responses=error_responses(401, model=OpenAIError))
async def models(state: StateDep) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[ModelCard(id=state.model_id or "mtp", created=STARTED)])


# What TGI's clients send as the model when they were given a server's URL rather than a model
# name (huggingface_hub's InferenceClient: "dummy"; TGI's own docs: "tgi"): they mean this model.
URL_CLIENT_MODELS = ("dummy", "tgi")


@router.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(401, 404, model=OpenAIError))
async def model_card(model_id: str, state: StateDep) -> ModelCard:
    """This model's card; any other id is 404."""
    if model_id != (state.model_id or "mtp"):
        raise APIError(404, f"The model `{model_id}` does not exist.", "NotFoundError")
    return ModelCard(id=model_id, created=STARTED)


def check_model(model: str | None, serving: Serving) -> None:
    """An unknown model is 404 (as vLLM answers it); none, this one's id, or a URL client's placeholder is fine."""
    if model not in (None, serving.state.model_id, *URL_CLIENT_MODELS):
        raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError")


def stops_of(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else (stop or [])


def gen_options(
    req: CompletionRequest | ChatCompletionRequest, serving: Serving, max_tokens: int, top_logprobs: int
) -> GenOptions:
    """The generation options of an OpenAI request, checked against the service's limits."""
    if req.stream_options is not None and not req.stream:  # OpenAI's answer too: nothing would read it
        raise APIError(422, "stream_options: only allowed when stream is true")
    params = GenerateParameters(
        max_new_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p if req.top_p < 1.0 else None,
        do_sample=req.temperature > 0,
        seed=req.seed,
        stop=stops_of(req.stop),
    )
    opts = options_for(params, serving)
    if top_logprobs > serving.settings.max_logprobs:
        raise APIError(422, f"logprobs: at most {serving.settings.max_logprobs} most likely tokens per token")
    # one entry per token id at most: a longer map names an id past the vocabulary, and each of
    # its keys was checked on the event loop first (a map of 60,000: 55 ms of the loop a body,
    # 28 ms with its length checked first; docs/reliability.md)
    vocab = serving.model_config.vocab_size
    if len(req.logit_bias) > vocab:
        raise APIError(422, f"logit_bias: at most {vocab} entries, one per token id (got {len(req.logit_bias)})")
    # keys as OpenAI writes them: decimal ASCII digits, no sign, spaces, underscores or leading
    # zeros (int() takes all of those, and "5" and "05" were one token, the last value winning)
    if bad := next((t for t in req.logit_bias if not TOKEN_KEY.fullmatch(t)), None):
        raise APIError(422, f"logit_bias: keys must be token ids written in decimal digits (got {bad!r})")
    opts.logit_bias = tuple((int(token), value) for token, value in req.logit_bias.items())
    opts.frequency_penalty, opts.presence_penalty = req.frequency_penalty, req.presence_penalty
    opts.repetition_penalty, opts.top_logprobs = req.repetition_penalty, top_logprobs
    return opts


def finish_reason(final: GenFinal) -> Literal["length", "stop"]:
    return "length" if final.finish_reason == "length" else "stop"


def _choice(final: GenFinal, index: int, with_logprobs: bool, tok: Tokenizer) -> CompletionChoice:
    logprobs = None
    with_top = any(t.top for t in final.tokens)
    if with_logprobs:
        offsets, pos = [], 0
        for t in final.tokens:
            offsets.append(pos)
            pos += len(t.text)
        logprobs = CompletionLogprobs(
            tokens=[tok.id_to_text(t.id) for t in final.tokens],  # each token's own text, as in top_logprobs
            token_logprobs=[t.logprob for t in final.tokens],
            top_logprobs=[{c.text: c.logprob for c in t.top} for t in final.tokens] if with_top else None,
            text_offset=offsets,
        )
    reason = finish_reason(final)
    return CompletionChoice(text=final.text_without_stop, index=index, logprobs=logprobs, finish_reason=reason)


async def all_or_nothing(works: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the works together; the first failure cancels the others at once and is raised."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()  # no-op for finished ones; a refused sibling frees the queue places of the rest
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        200: {
            "description": "A Completion, or with stream=true server-sent events: `data: {Completion chunk}` "
            "per token, then `data: [DONE]`.",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                        "required": ["data"],
                    }
                }
            },
        },
        **error_responses(400, 404, *INFERENCE_ERRORS, model=OpenAIError),
    },
)
async def completions(req: CompletionRequest, serving: ServingDep, request: Request) -> Completion | StreamingResponse:
    """Complete one prompt or several (n choices each, the best n of best_of); "stream": true sends
    SSE chunks ending in [DONE]."""
    check_model(req.model, serving)
    prepared = await _prompts(req, serving)
    best_of = req.best_of or req.n
    if best_of < req.n:
        raise APIError(422, "best_of: must be at least n")
    if len(prepared) * best_of > serving.max_inputs:
        raise APIError(422, f"n: prompts times best_of must be at most {serving.max_inputs}")
    if req.echo and req.logprobs is not None:
        raise APIError(422, "echo: not supported together with logprobs (the prompt's log-probabilities)")
    opts = gen_options(req, serving, req.max_tokens, req.logprobs or 0)
    model = serving.state.model_id
    cid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        if len(prepared) != 1 or best_of != 1 or req.echo:
            raise APIError(422, "stream: takes a single prompt, n = best_of = 1 and no echo")
        return await _stream(serving, prepared[0], opts, req, cid, model)
    runs = [run_to_end(serving, ids, nth_choice(opts, i)) for ids in prepared for i in range(best_of)]
    finals = await unless_disconnected(request, all_or_nothing(runs))
    choices: list[CompletionChoice] = []
    for p, ids in enumerate(prepared):
        ranked = finals[p * best_of : (p + 1) * best_of]
        if best_of > req.n:  # the n of highest total log-probability, as OpenAI's best_of
            ranked = sorted(ranked, key=lambda f: -sum(t.logprob for t in f.tokens))[: req.n]
        echo = serving.tokenizer.decode(ids) if req.echo else ""
        for f in ranked:
            choice = _choice(f, len(choices), req.logprobs is not None, serving.tokenizer)
            choice.text = echo + choice.text
            choices.append(choice)
    completion_tokens = sum(f.generated_tokens for f in finals)
    prompt_tokens = sum(len(ids) for ids in prepared)
    return Completion(
        id=cid,
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def _prompts(req: CompletionRequest, serving: Serving) -> list[list[int]]:
    """The prompts as token ids: texts are tokenized; ids are checked by the engine."""
    p = req.prompt
    if isinstance(p, str):
        texts_or_ids: list[str] | list[list[int]] = [p]
    elif p and isinstance(p[0], int):
        texts_or_ids = [p]
    else:
        texts_or_ids = p  # type: ignore[assignment]
    if not texts_or_ids or len(texts_or_ids) > serving.max_inputs:
        raise APIError(422, f"prompt must hold 1 to {serving.max_inputs} prompts")
    out = []
    for item in texts_or_ids:
        if isinstance(item, str):
            out.append(await prompt_ids(item, serving, "prompt"))
        elif not item or len(item) > serving.state.max_input_tokens:
            raise APIError(422, f"prompt must hold 1 to {serving.state.max_input_tokens} token ids")
        else:
            out.append(list(item))
    return out


def nth_choice(opts: GenOptions, i: int) -> GenOptions:
    """Choice i's options: a seeded request seeds choice i with seed + i, so the choices differ."""
    return opts if i == 0 or opts.seed is None else dataclasses.replace(opts, seed=opts.seed + i)


async def _stream(
    serving: Serving, ids: list[int], opts: GenOptions, req: CompletionRequest, cid: str, model: str
) -> StreamingResponse:
    created = int(time.time())

    tok = serving.tokenizer

    def chunk(text: str, reason: str | None, token: GenToken | None = None, offset: int = 0) -> str:
        """A chunk of text; with `token`, its log-probabilities as the unstreamed reply gives them
        for that token: its own text, and where it starts in the completion. The chunk's text is
        what is released then, which text that may begin a stop sequence holds back."""
        logprobs = None
        if token is not None:
            tops = [{c.text: c.logprob for c in token.top}] if token.top else None
            logprobs = {
                "tokens": [tok.id_to_text(token.id)],
                "token_logprobs": [token.logprob],
                "top_logprobs": tops,
                "text_offset": [offset],
            }
        body = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}],
        }
        return f"data: {json.dumps(body)}\n\n"

    outs = await open_stream(serving, ids, opts)

    async def body() -> AsyncGenerator[str, None]:
        """Chunks, then [DONE]; no asyncio.timeout across yields (the engine's deadline ends it)."""
        want_lp = req.logprobs is not None
        pending: list[str] = []  # one engine step's chunks, sent in one write (as /generate does)
        sent = 0  # characters of text sent; text that may begin a stop sequence waits (GenToken.released)
        offset = 0  # where the next token's text starts in the completion
        async for out in outs:
            if isinstance(out, GenError):
                err = APIError.from_engine(out.error)
                pending.append(f"data: {json.dumps(error_body(err.message, err.error_type, openai=True))}\n\n")
            elif isinstance(out, GenToken):
                sent += len(out.released)
                pending.append(chunk(out.released, None, out if want_lp else None, offset))  # one per token
                offset += len(out.text)
                if not out.flush:
                    continue
            else:
                if rest := out.text_without_stop[sent:]:
                    pending.append(chunk(rest, None))
                pending.append(chunk("", finish_reason(out)))
                if req.stream_options and req.stream_options.include_usage:
                    usage = {
                        "prompt_tokens": len(ids),
                        "completion_tokens": out.generated_tokens,
                        "total_tokens": len(ids) + out.generated_tokens,
                    }
                    payload = {"id": cid, "object": "text_completion", "created": created, "model": model}
                    pending.append(f"data: {json.dumps({**payload, 'choices': [], 'usage': usage})}\n\n")
            yield "".join(pending)
            pending.clear()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
