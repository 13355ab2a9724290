"""What goes into and comes out of the engine: token ids, never text or HTTP."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from app.decoding.predict import Scores
from app.decoding.sampling import SamplingParams


class EngineError(Exception):
    """Base of the engine's errors; `kind` is the failure reason used in metrics and replies."""

    kind = "error"


class EngineOverloaded(EngineError):
    """The queue is full: come back later (429)."""

    kind = "overloaded"


class EngineNotReady(EngineError):
    """Not started yet, draining or stopped: nothing new is accepted (503)."""

    kind = "not_ready"


class EngineTimeout(EngineError):
    """The request's deadline passed, waiting in the queue or while it ran (504)."""

    kind = "timeout"


class EngineFailure(EngineError):
    """A forward pass failed; only the requests of that pass get it (500)."""

    kind = "error"


class InvalidRequest(EngineError):
    """The request does not fit the model: empty, too long, ids or counts out of range (422)."""

    kind = "validation"


@dataclass
class PredictJob:
    prompt_ids: list[int]
    top_n: int = 5
    candidates: list[list[int]] = field(default_factory=list)

    @property
    def candidate_tokens(self) -> int:
        """Sequential heads: the cached module positions copied to score the candidates (the whole
        prompt's, for each candidate: app/decoding/predict.py)."""
        return len(self.prompt_ids) * len(self.candidates)


@dataclass
class GenerateJob:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speculative: bool | None = None  # None = the engine's default
    stop_token_ids: frozenset[int] = frozenset()
    request_id: str = ""
    top_logprobs: int = 0  # per generated token, the most likely tokens and their logprobs
    prompt_logprobs: bool = False  # score the prompt's own tokens under head 1 (a PromptEvent)
    # the caller reads nothing before the end (a non-streamed reply with no stop sequence to
    # watch): its events wait in the core and come in one hand-off with the FinishEvent, their
    # tokens as one TokenEvent, so that its steps never wake the event loop (vLLM's FINAL_ONLY)
    final_only: bool = False


@dataclass
class PromptEvent:
    """The prompt scored by head 1 (GenerateJob.prompt_logprobs), before the first TokenEvent:
    logprobs[t - 1] = log p(prompt[t] | prompt[:t]) for t = 1..L-1; the first token has none."""

    logprobs: list[float]


@dataclass
class TokenEvent:
    """Tokens emitted by one decode step for one sequence (1..k of them)."""

    token_ids: list[int]
    logprobs: list[float]
    final: bool = False  # the sequence ends with these tokens; a FinishEvent follows at once
    top: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), most likely first


@dataclass
class FinishEvent:
    reason: str  # "length" | "eos_token" | "cancelled"
    generated_tokens: int
    prompt_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    verify_steps: int
    seed: int | None


@dataclass
class ErrorEvent:
    error: EngineError


Event = PromptEvent | TokenEvent | FinishEvent | ErrorEvent


def joined(events: list[Event]) -> list[Event]:
    """A final_only request's held events as it gets them: its TokenEvents as one (where the
    first was), whose `final` is the last one's."""
    out: list[Event] = []
    one: TokenEvent | None = None
    for e in events:
        if not isinstance(e, TokenEvent):
            out.append(e)
        elif one is None:
            one = TokenEvent(list(e.token_ids), list(e.logprobs), e.final, None if e.top is None else list(e.top))
            out.append(one)
        else:
            one.token_ids += e.token_ids
            one.logprobs += e.logprobs
            one.final = e.final
            if e.top is not None:
                one.top = (one.top or []) + e.top
    return out


@dataclass(eq=False)
class WorkItem:
    """A request waiting for, or held by, the worker."""

    submitted: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")
    cancelled: bool = False  # the caller has gone, or has what it wanted (stopped)
    stopped: bool = False  # ... what it wanted: a stop sequence matched; a success, not a failure


@dataclass(eq=False)
class PredictItem(WorkItem):
    request: PredictJob = field(default_factory=lambda: PredictJob([]))
    future: asyncio.Future[Scores] | None = None


@dataclass(eq=False)
class GenerateItem(WorkItem):
    request: GenerateJob = field(default_factory=lambda: GenerateJob([], 1))
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    finished: bool = False
    held: list[Event] = field(default_factory=list)  # a final_only request's events so far (the core's)
    streamed: bool = False  # the core has handed over a token of it (its first is never held back)


@dataclass
class StepOutput:
    """Everything one core iteration hands to the event loop, in one call."""

    events: list[tuple[GenerateItem, Event]] = field(default_factory=list)
    results: list[tuple[PredictItem, Scores | EngineError]] = field(default_factory=list)
    left_queue: int = 0  # requests that left the waiting queues (started, dropped or cancelled)
    released: list[WorkItem] = field(default_factory=list)  # cancelled requests the core has let go
