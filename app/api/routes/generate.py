"""POST /generate and /generate_stream, in text-generation-inference's request/response shape."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.api.deps import Serving, ServingDep, unless_disconnected
from app.api.errors import APIError, error_body
from app.api.schemas import (
    INFERENCE_ERRORS,
    Details,
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    SpeculationDetails,
    StreamEvent,
    Token,
    error_responses,
)
from app.api.textgen import GenError, GenFinal, GenOptions, GenToken, open_stream, run_to_end
from app.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])


def sse_content(*payloads: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI description of a text/event-stream body: each event's `data` is JSON of one of payloads."""

    def inline(model: type[BaseModel]) -> dict[str, Any]:
        # nested models resolve to components/schemas, where the JSON routes already put them
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        return schema

    schema = {"anyOf": [inline(p) for p in payloads]}
    event = {
        "type": "object",
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": schema},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }
    return {"text/event-stream": {"schema": event}}


STREAM_DESCRIPTION = (
    "Server-sent events: one `data: {StreamEvent}` per token; the last carries generated_text and details; an "
    'error after the first event is sent as `data: {"error": ..., "error_type": ...}`.'
)
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON (stream=false) or, with stream=true, " + STREAM_DESCRIPTION,
        "content": sse_content(StreamEvent, ErrorResponse),
    },
    **error_responses(*INFERENCE_ERRORS),
}
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": STREAM_DESCRIPTION, "content": sse_content(StreamEvent, ErrorResponse)},
    **error_responses(*INFERENCE_ERRORS),
}


# TGI's words (ValidationError::PrefillDetailsStream); TGI sends them as the stream's only event
PREFILL_DETAILS_STREAM = "`decoder_input_details` == true is not supported when streaming tokens"


def options_for(params: GenerateParameters, serving: Serving, stream: bool = False) -> GenOptions:
    """Check the parameters against the service's limits; raises APIError(422)."""
    s = serving.settings
    if stream and params.decoder_input_details:
        raise APIError(422, PREFILL_DETAILS_STREAM)
    if params.max_new_tokens > s.max_new_tokens:
        raise APIError(422, f"max_new_tokens must be at most {s.max_new_tokens}")
    if len(params.stop) > s.max_stop_sequences:
        raise APIError(422, f"at most {s.max_stop_sequences} stop sequences")
    if any(not st or len(st) > s.max_stop_length for st in params.stop):
        raise APIError(422, f"stop sequences must be 1 to {s.max_stop_length} characters")
    if params.temperature is not None and params.temperature > s.max_temperature:
        raise APIError(422, f"temperature must be at most {s.max_temperature:g}")
    unsupported = {
        "best_of": params.best_of not in (None, 1),
        "watermark": params.watermark,
        "grammar": params.grammar is not None,
        "adapter_id": params.adapter_id not in (None, ""),
    }
    for name, used in unsupported.items():
        if used:
            raise APIError(422, f"{name}: not supported by this server (leave it unset or at its neutral value)")
    if (params.top_n_tokens or 0) > s.max_logprobs:
        raise APIError(422, f"top_n_tokens must be at most {s.max_logprobs}")
    return GenOptions(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        typical_p=params.typical_p if params.typical_p not in (None, 1.0) else None,
        do_sample=params.do_sample,
        seed=params.seed,
        stop=params.stop,
        speculative=params.speculative,
        frequency_penalty=params.frequency_penalty or 0.0,
        top_logprobs=params.top_n_tokens or 0,
        prompt_logprobs=params.decoder_input_details,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty is not None else 1.0,
    )


async def prompt_ids(inputs: str, serving: Serving, field: str = "inputs", truncate: int | None = None) -> list[int]:
    """Tokenize a prompt (keeping its last `truncate` tokens, if given) and check it against the
    service's input cap; raises APIError(422). The engine checks it against the model (context,
    vocabulary) when it is submitted."""
    [ids] = await serving.encode([inputs], field)
    if truncate is not None:
        ids = ids[-truncate:]
    if not ids:
        raise APIError(422, f"{field} must not be empty")
    limit = serving.state.max_input_tokens
    if len(ids) > limit:
        raise APIError(422, f"{field} has {len(ids)} tokens; the limit is {limit}")
    return ids


async def prepare(
    params: GenerateParameters, inputs: str, serving: Serving, stream: bool
) -> tuple[list[int], GenOptions]:
    opts = options_for(params, serving, stream)
    return await prompt_ids(inputs, serving, truncate=params.truncate), opts


def details_of(final: GenFinal, with_tokens: bool, prefill: list[PrefillToken] | None = None) -> Details:
    return Details(
        finish_reason=final.finish_reason,
        generated_tokens=final.generated_tokens,
        input_length=final.input_length,
        seed=final.seed,
        speculation=SpeculationDetails(
            enabled=final.speculative,
            verify_steps=final.verify_steps,
            drafted_tokens=final.drafted_tokens,
            accepted_tokens=final.accepted_tokens,
        ),
        tokens=[_token(t) for t in final.tokens] if with_tokens else None,
        top_tokens=[_top(t) for t in final.tokens] if with_tokens and any(t.top for t in final.tokens) else None,
        prefill=prefill or [],
    )


def prefill_tokens(ids: list[int], final: GenFinal, tok: Tokenizer) -> list[PrefillToken]:
    """TGI's details.prefill: the prompt's tokens, each with log p(token | the tokens before it)
    under head 1; the first has none (null, where TGI's NaN serializes as null). Empty unless asked."""
    if final.prompt_logprobs is None:
        return []
    scores = [None, *final.prompt_logprobs]
    return [PrefillToken(id=i, text=tok.id_to_text(i), logprob=lp) for i, lp in zip(ids, scores, strict=True)]


def _top(t: GenToken) -> list[Token]:
    return [Token(id=c.id, text=c.text, logprob=c.logprob, special=False) for c in t.top]


def _token(t: GenToken) -> Token:
    return Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def sse(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


_TOKEN_FRAME = (
    'data: {"index":%d,"token":{"id":%d,"text":%s,"logprob":%s,"special":%s},"generated_text":null,"details":null}\n\n'
)


def token_frame(out: GenToken) -> str:
    """A token's event without its most likely tokens: byte for byte what sse() makes of its
    StreamEvent's model_dump(exclude={"top_tokens"}), without the two models and the dict
    walk. A stream sends one per token, and at 16 streams these frames took about a sixth of
    the event loop's time, which the steps' threads share two cores with (docs/benchmarks.md,
    benchmark 26)."""
    lp = float(out.logprob)
    number = repr(lp) if math.isfinite(lp) else json.dumps(lp)  # json's NaN / Infinity for the rest
    return _TOKEN_FRAME % (out.index, out.id, json.dumps(out.text), number, "true" if out.special else "false")


async def event_stream(outs: AsyncIterator[GenToken | GenFinal | GenError], prefix: str) -> AsyncGenerator[str, None]:
    """TGI's SSE frames: one event per token, the last with generated_text and details; a
    failure after the start is sent as a last {"error", "error_type"} event."""
    # The events of the tokens one engine step emitted (several, when drafts were accepted)
    # go out in one write: one send, and one read for the client, instead of one per token.
    # No asyncio.timeout here: it would cancel the response task while this generator waits
    # at a yield (a traceback in the log); the engine's deadline ends the stream with a 504 event.
    pending: list[str] = []
    last: GenToken | None = None
    async for out in outs:
        if isinstance(out, GenError):
            err = APIError.from_engine(out.error)
            pending.append(sse(error_body(err.message, err.error_type, openai=False)))
        elif isinstance(out, GenToken) and out.last:  # held back one moment: the final event carries it
            last = out
            continue
        elif isinstance(out, GenToken):
            if out.top:
                ev = StreamEvent(index=out.index, token=_token(out), top_tokens=_top(out))
                pending.append(sse(ev.model_dump()))
            else:
                pending.append(token_frame(out))
            if not out.flush:
                continue
        elif last is not None:
            ev = StreamEvent(
                index=last.index,
                token=_token(last),
                top_tokens=_top(last) if last.top else None,
                generated_text=prefix + out.generated_text,
                details=details_of(out, with_tokens=False),
            )
            skip: dict[str, Any] = {"details": {"tokens", "top_tokens"}}
            if not last.top:
                skip["top_tokens"] = True
            pending.append(sse(ev.model_dump(exclude=skip)))
        if pending:
            yield "".join(pending)
            pending.clear()


@router.post("/generate", response_model=GenerateResponse, responses=SSE_DOC)
async def generate(req: GenerateRequest, serving: ServingDep, request: Request) -> GenerateResponse | StreamingResponse:
    """Generate a continuation; with "stream": true, as server-sent events."""
    params = req.parameters
    ids, opts = await prepare(params, req.inputs, serving, req.stream)
    if req.stream:
        return await _stream(serving, ids, opts, req)
    final = await unless_disconnected(request, run_to_end(serving, ids, opts))
    text = (req.inputs if params.return_full_text else "") + final.generated_text
    if not (params.details or params.decoder_input_details):  # either one asks for details, as in TGI
        return GenerateResponse(generated_text=text)
    return GenerateResponse(
        generated_text=text, details=details_of(final, True, prefill_tokens(ids, final, serving.tokenizer))
    )


@router.post("/", response_model=list[GenerateResponse], responses=SSE_DOC)
async def compat_generate(
    req: GenerateRequest, serving: ServingDep, request: Request
) -> list[GenerateResponse] | StreamingResponse:
    """TGI's root route: with "stream": true /generate_stream's events, else /generate's reply in a list."""
    out = await generate(req, serving, request)
    return out if isinstance(out, StreamingResponse) else [out]


@router.post("/generate_stream", response_class=StreamingResponse, responses=STREAM_DOC)
async def generate_stream(req: GenerateRequest, serving: ServingDep) -> StreamingResponse:
    """Generate a continuation as server-sent events, one event per token."""
    ids, opts = await prepare(req.parameters, req.inputs, serving, stream=True)
    return await _stream(serving, ids, opts, req)


async def _stream(serving: Serving, ids: list[int], opts: GenOptions, req: GenerateRequest) -> StreamingResponse:
    outs = await open_stream(serving, ids, opts)
    frames = event_stream(outs, req.inputs if req.parameters.return_full_text else "")
    return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
