"""OpenAI-compatible /v1/completions and /v1/models (errors in OpenAI's shape on these routes)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.api.deps import Serving, ServingDep, StateDep, unless_disconnected
from app.api.errors import APIError, error_body
from app.api.routes.generate import options_for, prompt_ids
from app.api.schemas import INFERENCE_ERRORS, MAX_SEED, GenerateParameters, OpenAIError, Strict, error_responses
from app.api.textgen import GenError, GenFinal, GenOptions, GenToken, open_stream, run_generation

router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(Strict):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM's extension: 1 = off")
    logit_bias: dict[str, float] = Field(
        default_factory=dict, description="Token id (as a string) -> bias in [-100, 100]"
    )
    n: Literal[1] = 1
    best_of: Literal[1] = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(None, ge=0, le=0, description="Only the chosen token's logprob (0) is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: Literal[False] = False
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mtp"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


STARTED = int(time.time())


@router.get("/models", response_model=ModelList, responses=error_responses(401, model=OpenAIError))
async def models(state: StateDep) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[ModelCard(id=state.model_id or "mtp", created=STARTED)])


def _params(req: CompletionRequest) -> GenerateParameters:
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return GenerateParameters(
        max_new_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p if req.top_p < 1.0 else None,
        do_sample=req.temperature > 0,
        seed=req.seed,
        stop=stops,
    )


def _logit_bias(req: CompletionRequest) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(token), value) for token, value in req.logit_bias.items())
    except ValueError:
        raise APIError(422, "logit_bias: keys must be token ids") from None


def _choice(final: GenFinal, index: int, with_logprobs: bool) -> CompletionChoice:
    logprobs = None
    if with_logprobs:
        offsets, pos = [], 0
        for t in final.tokens:
            offsets.append(pos)
            pos += len(t.text)
        logprobs = CompletionLogprobs(
            tokens=[t.text for t in final.tokens], token_logprobs=[t.logprob for t in final.tokens], text_offset=offsets
        )
    reason: Literal["length", "stop"] = "length" if final.finish_reason == "length" else "stop"
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


async def _run(serving: Serving, ids: list[int], opts: GenOptions) -> GenFinal:
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
    if req.model not in (None, serving.state.model_id):
        raise APIError(404, f"The model `{req.model}` does not exist.", "NotFoundError")
    params = _params(req)
    opts = options_for(params, serving)
    opts.frequency_penalty, opts.presence_penalty = req.frequency_penalty, req.presence_penalty
    opts.repetition_penalty, opts.logit_bias = req.repetition_penalty, _logit_bias(req)
    prepared = [await prompt_ids(p, serving, "prompt") for p in prompts]
    model = serving.state.model_id
    cid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        if len(prompts) != 1:
            raise APIError(422, "streaming takes a single prompt")
        return await _stream(serving, prepared[0], opts, req, cid, model)
    finals = await unless_disconnected(request, all_or_nothing([_run(serving, ids, opts) for ids in prepared]))
    completion_tokens = sum(f.generated_tokens for f in finals)
    prompt_tokens = sum(len(ids) for ids in prepared)
    return Completion(
        id=cid,
        created=int(time.time()),
        model=model,
        choices=[_choice(f, i, req.logprobs is not None) for i, f in enumerate(finals)],
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

    def chunk(text: str, reason: str | None, lp: float | None = None) -> str:
        logprobs = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": None, "text_offset": [0]}
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
                pending.append(chunk(out.released, None, out.logprob if want_lp else None))  # one per token
                if not out.flush:
                    continue
            else:
                if rest := out.text_without_stop[sent:]:
                    pending.append(chunk(rest, None))
                pending.append(chunk("", "length" if out.finish_reason == "length" else "stop"))
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
