"""OpenAI-compatible /v1/chat/completions: the conversation becomes a prompt through the
checkpoint's chat template (app/model/chat.py), and the reply ends where the template's turn ends."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app.api.deps import Serving, ServingDep, unless_disconnected
from app.api.errors import APIError, error_body
from app.api.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Usage,
)
from app.api.routes.generate import prompt_ids
from app.api.routes.openai import all_or_nothing, check_model, finish_reason, gen_options, nth_choice
from app.api.schemas import INFERENCE_ERRORS, OpenAIError, error_responses
from app.api.textgen import GenError, GenFinal, GenOptions, GenToken, open_stream, run_to_end
from app.model.tokenizer import Tokenizer

router = APIRouter(prefix="/v1", tags=["openai"])

STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A ChatCompletion, or with stream=true server-sent events: `data: {chat.completion.chunk}` "
        "per step, then `data: [DONE]`.",
        "content": {
            "text/event-stream": {
                "schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
            }
        },
    },
    **error_responses(400, 404, *INFERENCE_ERRORS, model=OpenAIError),
}


async def _prepare(req: ChatCompletionRequest, serving: Serving) -> tuple[list[int], GenOptions]:
    """The prompt ids (the conversation through the chat template) and the generation options."""
    check_model(req.model, serving)
    template = serving.tokenizer.chat_template
    messages = [("system" if m.role == "developer" else m.role, m.text(), m.name) for m in req.messages]
    ids = await prompt_ids(template.render(messages), serving, "messages")
    if req.top_logprobs and not req.logprobs:
        raise APIError(422, "top_logprobs: needs logprobs set to true")
    # without a limit: what the context leaves after the prompt (the engine's check), up to max_new_tokens
    room = min(serving.settings.max_new_tokens, serving.model_config.max_seq_len - len(ids))
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, room)
    opts = gen_options(req, serving, max_tokens, (req.top_logprobs or 0) if req.logprobs else 0)
    opts.stop = [*opts.stop, *template.stop]  # the end of the assistant's turn
    return ids, opts


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAM_DOC)
async def chat_completions(
    req: ChatCompletionRequest, serving: ServingDep, request: Request
) -> ChatCompletion | Response:
    """Reply to a conversation: n choices, or with "stream": true SSE chunks ending in [DONE]."""
    if req.n > serving.max_inputs:
        raise APIError(422, f"n: at most {serving.max_inputs} choices")
    ids, opts = await _prepare(req, serving)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        if req.n != 1:
            raise APIError(422, "n: streaming takes n = 1")
        return await _stream(serving, ids, opts, req, cid)
    # each choice is its own sequence (nth_choice: a seeded request seeds choice i with seed + i)
    runs = [run_to_end(serving, ids, nth_choice(opts, i)) for i in range(req.n)]
    finals = await unless_disconnected(request, all_or_nothing(runs))
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=f.text_without_stop), finish_reason=finish_reason(f))
        for i, f in enumerate(finals)
    ]
    completion = sum(f.generated_tokens for f in finals)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=completion, total_tokens=len(ids) + completion)
    reply = ChatCompletion(id=cid, created=int(time.time()), model=serving.state.model_id, choices=choices, usage=usage)
    if not req.logprobs:
        return reply
    return Response(await _with_logprobs(reply, finals, serving.tokenizer), media_type="application/json")


async def _with_logprobs(reply: ChatCompletion, finals: list[GenFinal], tok: Tokenizer) -> str:
    """The reply's JSON with each choice's `logprobs`, written a choice at a time with the event
    loop given back between choices. As pydantic models, n = 32 choices of 200 tokens with 20
    most likely tokens each are 130,000 objects: building them held the loop for up to a second,
    most of it the garbage collector walking the heap they were promoted into."""
    parts = []
    for choice, final in zip(reply.choices, finals, strict=True):
        body = choice.model_dump_json(exclude={"logprobs"})
        parts.append(f'{body[:-1]},"logprobs":{{"content":{_logprobs_json(tok, final.tokens)}}}}}')
        await asyncio.sleep(0)
    return f'{reply.model_dump_json(exclude={"choices"})[:-1]},"choices":[{",".join(parts)}]}}'


def _logprobs_json(tok: Tokenizer, tokens: list[GenToken]) -> str:
    """A list of TokenLogprob as JSON text, written without building the models (see _with_logprobs);
    tests/api/test_chat.py holds it to the model's own JSON."""
    entries = []
    for t in tokens:
        top = ",".join(f'{{{_token_json(tok, c.id)},"logprob":{_number(c.logprob)}}}' for c in t.top)
        entries.append(f'{{{_token_json(tok, t.id)},"logprob":{_number(t.logprob)},"top_logprobs":[{top}]}}')
    return f"[{','.join(entries)}]"


@functools.lru_cache(maxsize=1 << 16)
def _token_json(tok: Tokenizer, token_id: int) -> str:
    """A token's own text (its exact bytes as they decode alone) and bytes, as JSON members."""
    return f'"token":{json.dumps(tok.id_to_text(token_id))},"bytes":{json.dumps(list(tok.token_bytes(token_id)))}'


def _number(x: float) -> str:
    return repr(x) if math.isfinite(x) else "null"  # as pydantic writes a float that JSON cannot


async def _stream(
    serving: Serving, ids: list[int], opts: GenOptions, req: ChatCompletionRequest, cid: str
) -> StreamingResponse:
    head = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": serving.state.model_id}
    tok = serving.tokenizer

    def chunk(delta: dict[str, str], reason: str | None = None, tokens: list[GenToken] | None = None) -> str:
        logprobs = f'{{"content":{_logprobs_json(tok, tokens)}}}' if tokens else "null"
        choice = f'{{"index":0,"delta":{json.dumps(delta)},"logprobs":{logprobs},"finish_reason":{json.dumps(reason)}}}'
        return f'data: {json.dumps(head)[:-1]}, "choices": [{choice}]}}\n\n'

    outs = await open_stream(serving, ids, opts)

    async def body() -> AsyncGenerator[str, None]:
        """A role chunk, then one chunk per engine step, a finish chunk, usage if asked, [DONE]."""
        pending = [chunk({"role": "assistant", "content": ""})]
        step: list[GenToken] = []  # one engine step's tokens: one chunk (text that may begin a stop waits)
        sent = 0
        async for out in outs:
            if isinstance(out, GenError):
                err = APIError.from_engine(out.error)
                pending.append(f"data: {json.dumps(error_body(err.message, err.error_type, openai=True))}\n\n")
            elif isinstance(out, GenToken):
                step.append(out)
                if not out.flush:
                    continue
                text = "".join(t.released for t in step)
                sent += len(text)
                if text or req.logprobs:
                    pending.append(chunk({"content": text}, tokens=step if req.logprobs else None))
                step = []
            else:  # the tokens of a step not handed over yet go with the text they end on
                pending.extend(_finish(out, sent, chunk, req, len(ids), head, step if req.logprobs else None))
                step = []
            yield "".join(pending)
            pending.clear()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _finish(
    final: GenFinal,
    sent: int,
    chunk: Any,
    req: ChatCompletionRequest,
    prompt_tokens: int,
    head: dict[str, Any],
    tokens: list[GenToken] | None,
) -> list[str]:
    """The last chunks: text held back for a possible stop sequence that did not complete, with
    the log-probabilities of the tokens not yet handed over (the unstreamed reply lists them
    too, a stop sequence's own tokens included), the finish reason, and the usage when
    stream_options.include_usage asks for it."""
    out = []
    rest = final.text_without_stop[sent:]
    if rest or tokens:
        out.append(chunk({"content": rest}, tokens=tokens))
    out.append(chunk({}, finish_reason(final)))
    if req.stream_options and req.stream_options.include_usage:
        n = final.generated_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        out.append(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n")
    return out
