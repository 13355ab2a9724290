"""Admission: queue places reserved at the door, and the checks a request passes before it joins a batch.

The checks are against the model's limits (vocabulary, context); the API checks the shape of
a request, the engine what the model can take. A bad row would otherwise fail every request
batched with it.
"""

from __future__ import annotations

from collections.abc import Callable

from app.decoding.sampling import SamplingParams
from app.engine.types import InvalidRequest


class Reservation:
    """A queue place held from the moment a request passes the door (before its body is read)
    until it is submitted to the engine or ends. Without it a burst would pass the door while
    the queue still looked empty and be refused only after parsing, validation and tokenizing.

    The door (the HTTP middleware) takes it from `EngineClient.enter`; the route hands it to
    `generate` or `predict`, whose queue entry replaces it; whoever holds it when the request
    ends without reaching the queue releases it. Releasing twice is a no-op."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release  # gives the place back; called at most once

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


NO_RESERVATION = Reservation(None)  # for requests that hold no place (no engine yet, or not from the door)


def check_ids(ids: list[int], vocab: int, context: int, extra: int = 0) -> None:
    """Token ids in [0, vocab) that, with `extra` new tokens, fit the context."""
    if not ids:
        raise InvalidRequest("the input is empty")
    if len(ids) + extra > context:  # the phrase client libraries look for: "maximum context length"
        asked = f"{len(ids)} input tokens" + (f" + {extra} new tokens (max_new_tokens)" if extra else "")
        raise InvalidRequest(f"this model's maximum context length is {context} tokens; the request asks for {asked}")
    if min(ids) < 0 or max(ids) >= vocab:
        raise InvalidRequest(f"token ids must be in [0, {vocab})")


MAX_REPETITION_PENALTY = 100.0


def check_sampling(p: SamplingParams, vocab: int) -> None:
    """Parameters that become batch tensors without overflow or NaN."""
    if not 0 <= p.top_k <= vocab:
        raise InvalidRequest(f"top_k must be in [0, {vocab}] (0 = off)")
    if not 0.0 <= p.temperature < float("inf"):
        raise InvalidRequest("temperature must be a finite number >= 0")
    if not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]")
    if not 0.0 < p.typical_p <= 1.0:
        raise InvalidRequest("typical_p must be in (0, 1]")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        raise InvalidRequest("seed must be in [0, 2^64)")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(p, name) <= 2.0:
            raise InvalidRequest(f"{name} must be in [-2, 2]")
    if not 0.0 < p.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequest(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]")
    for token, value in p.logit_bias:
        if not 0 <= token < vocab:
            raise InvalidRequest(f"logit_bias: token ids must be in [0, {vocab})")
        if not -100.0 <= value <= 100.0:
            raise InvalidRequest("logit_bias: values must be in [-100, 100]")
