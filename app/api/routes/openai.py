"""OpenAI-compatible /v1/completions and /v1/models (errors in OpenAI's shape on these routes),
and what /v1/chat/completions (chat.py) shares with them."""

from __future__ import annotations

import asyncio
import json
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
from app.api.textgen import GenError, GenFinal, GenOptions, GenToken, open_stream, run_generation
from app.model.tokenizer import Tokenizer

router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")


STARTED = int(time.time())


@router.get("/models", response_model=ModelList, responses=error_responses(401, model=OpenAIError))
async def models(state: StateDep) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[ModelCard(id=state.model_id or "mtp", created=STARTED)])


# What TGI's clients send as the model when they were given a server's URL rather than a model
# name (huggingface_hub's InferenceClient: "dummy"; TGI's own docs: "tgi"): they mean this model.
URL_CLIENT_MODELS = ("dummy", "tgi")


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
    try:
        opts.logit_bias = tuple((int(token), value) for token, value in req.logit_bias.items())
    except ValueError:
        raise APIError(422, "logit_bias: keys must be token ids") from None
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


async def run_to_end(serving: Serving, ids: list[int], opts: GenOptions) -> GenFinal:
    async for out in run_generation(serving.engine, serving.tokenizer, ids, opts):
        if isinstance(out, GenFinal):
            return out
    raise APIError(500, "generation ended without a result", "internal")


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
    """Complete one prompt or several (one choice each); "stream": true sends SSE chunks ending in [DONE]."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or len(prompts) > serving.settings.max_inputs_per_request:
        raise APIError(422, f"prompt must hold 1 to {serving.settings.max_inputs_per_request} texts")
    check_model(req.model, serving)
    opts = gen_options(req, serving, req.max_tokens, req.logprobs or 0)
    prepared = [await prompt_ids(p, serving, "prompt") for p in prompts]
    model = serving.state.model_id
    cid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        if len(prompts) != 1:
            raise APIError(422, "streaming takes a single prompt")
        return await _stream(serving, prepared[0], opts, req, cid, model)
    finals = await unless_disconnected(request, all_or_nothing([run_to_end(serving, ids, opts) for ids in prepared]))
    completion_tokens = sum(f.generated_tokens for f in finals)
    prompt_tokens = sum(len(ids) for ids in prepared)
    return Completion(
        id=cid,
        created=int(time.time()),
        model=model,
        choices=[_choice(f, i, req.logprobs is not None, serving.tokenizer) for i, f in enumerate(finals)],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def _stream(
    serving: Serving, ids: list[int], opts: GenOptions, req: CompletionRequest, cid: str, model: str
) -> StreamingResponse:
    created = int(time.time())

    def chunk(text: str, reason: str | None, lp: float | None = None, top: dict[str, float] | None = None) -> str:
        tops = [top] if top else None
        logprobs = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": tops, "text_offset": [0]}
        body = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"text": text, "index": 0, "logprobs": logprobs if lp is not None else None, "finish_reason": reason}
            ],
        }
        return f"data: {json.dumps(body)}\n\n"

    outs = await open_stream(serving.engine, serving.tokenizer, ids, opts, serving.state.metrics.failures)

    async def body() -> AsyncGenerator[str, None]:
        """Chunks, then [DONE]; no asyncio.timeout across yields (the engine's deadline ends it)."""
        want_lp = req.logprobs is not None
        pending: list[str] = []  # one engine step's chunks, sent in one write (as /generate does)
        sent = 0  # characters of text sent; text that may begin a stop sequence waits (GenToken.released)
        async for out in outs:
            if isinstance(out, GenError):
                err = APIError.from_engine(out.error)
                pending.append(f"data: {json.dumps(error_body(err.message, err.error_type, openai=True))}\n\n")
            elif isinstance(out, GenToken):
                sent += len(out.released)
                top = {c.text: c.logprob for c in out.top} if out.top else None
                pending.append(chunk(out.released, None, out.logprob if want_lp else None, top))  # one per token
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
