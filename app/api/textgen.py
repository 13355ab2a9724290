"""Turns the engine's token events into text: incremental decoding and stop sequences.

Shared by /generate, /generate_stream and /v1/completions.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from app.api.deps import Serving
from app.api.errors import APIError
from app.decoding.sampling import SamplingParams
from app.engine.types import EngineError, ErrorEvent, FinishEvent, GenerateJob, PromptEvent, TokenEvent
from app.logs import request_id_var


@dataclass
class GenOptions:
    max_new_tokens: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    speculative: bool | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0  # per generated token, this many most likely tokens with their logprobs
    prompt_logprobs: bool = False  # score the prompt's tokens too (TGI's decoder_input_details)

    def sampling(self) -> SamplingParams:
        # As in text-generation-inference: setting temperature (> 0), top_k or top_p turns sampling on.
        sample = self.do_sample or bool(self.temperature) or bool(self.top_k) or self.top_p is not None
        sample = sample or self.typical_p is not None
        if self.temperature == 0.0:
            sample = False
        seed = self.seed if self.seed is not None else (secrets.randbelow(2**63) if sample else None)
        return SamplingParams(
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k or 0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            typical_p=self.typical_p if self.typical_p is not None else 1.0,
            do_sample=sample,
            seed=seed,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias,
        )


@dataclass(slots=True)
class GenToken:
    index: int
    id: int
    text: str
    logprob: float
    special: bool
    last: bool = False  # the GenFinal follows at once
    flush: bool = True  # no further token is ready now (False: more of the same engine step follow)
    released: str = ""  # text now safe to stream: none of it can turn out to begin a stop sequence
    top: list[TopToken] = field(default_factory=list)  # the most likely tokens here, when asked for


@dataclass
class TopToken:
    id: int
    text: str
    logprob: float


@dataclass
class GenFinal:
    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    input_length: int
    seed: int | None
    speculative: bool
    verify_steps: int
    drafted_tokens: int
    accepted_tokens: int
    tokens: list[GenToken]
    stop_sequence: str | None = None  # the stop sequence that ended generation (kept at the end of the text)
    prompt_logprobs: list[float] | None = None  # when asked: log p(prompt[t] | prompt[:t]) for t = 1..L-1

    @property
    def text_without_stop(self) -> str:
        """The text without a trailing stop sequence (OpenAI's convention)."""
        stop = self.stop_sequence
        return self.generated_text[: -len(stop)] if stop else self.generated_text


async def run_generation(
    serving: Serving, prompt_ids: list[int], opts: GenOptions, whole: bool = False
) -> AsyncGenerator[GenToken | GenFinal, None]:
    """Yield one GenToken per generated token, then a GenFinal. Raises EngineError on failure.

    Leaving the loop early (client gone, stop sequence) closes the engine stream, which
    removes the sequence from the batch at the next step. whole: the caller uses nothing before
    the GenFinal (a non-streamed reply); unless a stop sequence must be watched for as the text
    grows, the engine then hands the tokens over once, at the end (GenerateJob.final_only).
    """
    engine, tok = serving.engine, serving.tokenizer
    sampling = opts.sampling()
    request = GenerateJob(
        prompt_ids=prompt_ids,
        max_new_tokens=opts.max_new_tokens,
        sampling=sampling,
        speculative=opts.speculative,
        request_id=request_id_var.get(),
        top_logprobs=opts.top_logprobs,
        prompt_logprobs=opts.prompt_logprobs,
        final_only=whole and not opts.stop,
    )
    spec = engine.speculates(request)
    decoder = tok.stream_decoder()
    special_ids = tok.special_ids
    text = ""
    tokens: list[GenToken] = []
    longest_stop = max((len(s) for s in opts.stop), default=0)
    released = 0  # characters of text handed out as GenToken.released
    prompt_scores: list[float] | None = None
    stream = engine.generate(request, serving.reservation)
    try:
        async for event in stream:
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, PromptEvent):
                prompt_scores = event.logprobs
            elif isinstance(event, TokenEvent):
                n = len(event.token_ids)
                for i, (tid, lp) in enumerate(zip(event.token_ids, event.logprobs, strict=True)):
                    special = tid in special_ids
                    final_token = event.final and i == n - 1
                    # special tokens (end-of-text) show in their token's text but not in the generated text
                    piece = "" if special else decoder.step(tid)
                    if final_token:  # a trailing partial character becomes U+FFFD in this token, not later
                        piece += decoder.flush()
                    start = max(0, len(text) - longest_stop + 1)
                    text += piece
                    shown = tok.id_to_text(tid) if special else piece
                    if opts.stop:
                        cut = _find_stop(text, opts.stop, start)
                        safe = released if cut is not None else len(text) - _stop_prefix(text, opts.stop)
                    else:  # no stop sequence to watch for: every character is safe at once
                        cut, safe = None, len(text)
                    gt = GenToken(
                        index=len(tokens),
                        id=tid,
                        text=shown,
                        logprob=lp,
                        special=special,
                        last=cut is not None or final_token,
                        flush=i == n - 1,
                        released=text[released:safe],
                        top=[TopToken(t, tok.id_to_text(t), v) for t, v in event.top[i]] if event.top else [],
                    )
                    released = max(released, safe)
                    tokens.append(gt)
                    yield gt
                    if cut is not None:
                        final = _final(text[:cut], "stop_sequence", tokens, prompt_ids, sampling, spec, None)
                        final.prompt_logprobs = prompt_scores
                        final.stop_sequence = next(st for st in opts.stop if text[:cut].endswith(st))
                        engine.stop(request)  # closing the stream below is a finish, not a cancellation
                        yield final
                        return
            elif isinstance(event, FinishEvent):
                final = _final(text, event.reason, tokens, prompt_ids, sampling, spec, event)
                final.prompt_logprobs = prompt_scores
                yield final
                return
    finally:
        await stream.aclose()


async def run_to_end(serving: Serving, prompt_ids: list[int], opts: GenOptions) -> GenFinal:
    """Run a generation to the end for a non-streamed reply; the engine's deadline bounds it (504)."""
    async for out in run_generation(serving, prompt_ids, opts, whole=True):
        if isinstance(out, GenFinal):
            return out
    raise APIError(500, "generation ended without a result", "incomplete_generation")


@dataclass
class GenError:
    """A failure after the stream began: the route sends it as its API family's last SSE event."""

    error: EngineError


async def open_stream(
    serving: Serving, prompt_ids: list[int], opts: GenOptions
) -> AsyncIterator[GenToken | GenFinal | GenError]:
    """run_generation with its first output pulled before the response starts, shared by the
    streaming routes. A failure before it (queue full, not ready, timed out in the queue)
    raises EngineError, so the reply still gets its HTTP status; a later one ends the stream
    as a GenError and is counted in mtp_request_failures_total (the status is 200 by then)."""
    gen = run_generation(serving, prompt_ids, opts)
    failures = serving.state.metrics.failures
    try:
        first = await anext(gen)
    except BaseException:
        await gen.aclose()
        raise

    async def rest() -> AsyncGenerator[GenToken | GenFinal | GenError, None]:
        try:
            yield first
            async for out in gen:
                yield out
        except EngineError as exc:
            failures.labels(exc.kind).inc()
            yield GenError(exc)
        finally:
            await gen.aclose()  # client gone: the engine drops the sequence at its next step

    return rest()


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that begins some stop sequence (0 if none)."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """End index of the earliest stop sequence found at or after start, if any."""
    best: int | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return best


def _final(
    text: str,
    reason: str,
    tokens: list[GenToken],
    prompt_ids: list[int],
    sampling: SamplingParams,
    spec: bool,
    event: FinishEvent | None,
) -> GenFinal:
    return GenFinal(
        generated_text=text,
        finish_reason=reason,
        generated_tokens=len(tokens),
        input_length=len(prompt_ids),
        seed=sampling.seed if sampling.do_sample else None,
        speculative=spec,
        verify_steps=event.verify_steps if event else 0,
        drafted_tokens=event.drafted_tokens if event else 0,
        accepted_tokens=event.accepted_tokens if event else 0,
        tokens=tokens,
    )
