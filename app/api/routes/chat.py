"""OpenAI-compatible /v1/chat/completions: the conversation becomes a prompt through the
checkpoint's chat template (app/model/chat.py), and the reply ends where the template's turn ends."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import Serving, ServingDep, unless_disconnected
from app.api.errors import APIError, error_body
from app.api.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
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
    messages = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
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
) -> ChatCompletion | StreamingResponse:
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
    tok = serving.tokenizer
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=f.text_without_stop),
            logprobs=ChoiceLogprobs(content=[_logprob(tok, t) for t in f.tokens]) if req.logprobs else None,
            finish_reason=finish_reason(f),
        )
        for i, f in enumerate(finals)
    ]
    completion = sum(f.generated_tokens for f in finals)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=completion, total_tokens=len(ids) + completion)
    return ChatCompletion(id=cid, created=int(time.time()), model=serving.state.model_id, choices=choices, usage=usage)


def _logprob(tok: Tokenizer, t: GenToken) -> TokenLogprob:
    top = [TopLogprob(token=c.text, logprob=c.logprob, bytes=list(tok.token_bytes(c.id))) for c in t.top]
    text = tok.id_to_text(t.id)  # the token's own text, as the top ones have it (with its exact bytes)
    return TokenLogprob(token=text, logprob=t.logprob, bytes=list(tok.token_bytes(t.id)), top_logprobs=top)


async def _stream(
    serving: Serving, ids: list[int], opts: GenOptions, req: ChatCompletionRequest, cid: str
) -> StreamingResponse:
    head = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": serving.state.model_id}
    tok = serving.tokenizer

    def chunk(delta: dict[str, str], reason: str | None = None, tokens: list[GenToken] | None = None) -> str:
        logprobs = {"content": [_logprob(tok, t).model_dump() for t in tokens]} if tokens else None
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

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
