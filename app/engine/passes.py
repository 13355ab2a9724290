"""The passes the core loop runs on the inference thread, and what their outputs do to the sequences.

A /predict batch, the prefill of new sequences, one decode step: each runs as one timed forward
pass at the thread count the policy picks, and its outputs go into the step's StepOutput as
results and events (vLLM's execute_model, then update_from_output): tokens cut at a stop token
or the length, a FinishEvent for each sequence that ends, an error for each that expires or fails.
Ended sequences leave the decode batch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from app.decoding.generate import first_tokens, prefill, prompt_logprobs
from app.decoding.predict import Scores, score_next
from app.decoding.sampling import BatchSampling, make_generator, penalty_state, top_logprobs
from app.engine.batch import DecodeBatch, RunningSequence
from app.engine.scheduler import Scheduler
from app.engine.stats import EngineStats
from app.engine.threads import ThreadPolicy, size_bucket
from app.engine.types import (
    EngineError,
    EngineFailure,
    EngineTimeout,
    ErrorEvent,
    FinishEvent,
    GenerateItem,
    PredictItem,
    PromptEvent,
    StepOutput,
    TokenEvent,
    WorkItem,
    joined,
)
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Emitted:
    """What one pass gives one sequence: its tokens (cut at a stop token or its length), their
    log-probabilities, and the most likely tokens at each, when the request asks for them."""

    seq: RunningSequence
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None = None


class Passes:
    """Runs the forward passes over the scheduler's requests and its decode batch (inference thread only)."""

    def __init__(
        self,
        scheduler: Scheduler,
        model: MTPTransformer,
        eos: frozenset[int],
        stats: EngineStats,
        speculates: Callable[[GenerateItem], bool],
    ) -> None:
        self.scheduler = scheduler
        self.cfg = scheduler.cfg
        self.model = model
        self.eos = eos
        self.stats = stats
        self.speculates = speculates
        self.device = model.head.proj.weight.device
        # intra-op threads per pass: the fastest count now (threads.py); CPU only
        adaptive = self.cfg.adaptive_threads and self.device.type == "cpu"
        self.threads = ThreadPolicy(torch.get_num_threads()) if adaptive else None
        self.busy_since: float | None = None  # start of the forward pass running now

    @property
    def batch(self) -> DecodeBatch:
        return self.scheduler.batch

    # ---- running a pass --------------------------------------------------------------------

    def _forward(self, kind: str, size: int, fn: Callable[[], T]) -> T:
        """Run fn as one forward pass of `kind` over `size` rows or tokens, timed, with the stall
        clock running, at the thread count the policy picks for its kind and size."""
        self.busy_since = time.monotonic()
        try:
            with self.stats.forward(kind):
                if kind != "decode" and self.batch.policy is not None:
                    self.batch.policy.interrupted()  # the next decode step follows another pass: cold
                if self.threads is None:
                    return self._guarded(kind, fn)
                if kind != "decode":  # prefills and /predict: few, varied passes, untimed
                    return self.threads.run_like(("decode", 1), lambda: self._guarded(kind, fn))
                compiled = self.batch.compiled
                allowed = (
                    compiled.threads.get(compiled.padded_batch(size)) if compiled and compiled.covers(size, 1) else None
                )
                key = (kind, size_bucket(size))
                batch = self.batch
                return self.threads.run(
                    key, lambda: self._guarded(kind, fn), allowed, lambda: batch.last_graph, batch.expected_tokens
                )
        finally:
            self.busy_since = None

    def _guarded(self, kind: str, fn: Callable[[], T]) -> T:
        """One forward pass of `kind` ("predict", "prefill" or "decode"), in inference mode (the
        core loop runs in it throughout: entering it costs a step a few microseconds)."""
        if torch.is_inference_mode_enabled():
            return fn()
        with torch.inference_mode():
            return fn()

    def run_predict(self, out: StepOutput, items: list[PredictItem]) -> None:
        self.stats.batch("predict", (i.submitted for i in items), time.monotonic())
        prompts = [i.request.prompt_ids for i in items]
        top_n = max(i.request.top_n for i in items)
        cands = [i.request.candidates for i in items]
        try:
            size = sum(map(len, prompts))
            scores = self._forward("predict", size, lambda: score_next(self.model, prompts, top_n, cands))
        except Exception as exc:
            log.exception("predict batch of %d failed", len(items))
            error = EngineFailure(f"forward pass failed: {type(exc).__name__}")
            out.results.extend((item, error) for item in items)
            return
        out.results.extend((item, _row(scores, b, item.request.top_n)) for b, item in enumerate(items))

    def run_prefill(self, out: StepOutput, items: list[GenerateItem]) -> None:
        self.stats.batch("prefill", (i.submitted for i in items), time.monotonic())
        seqs = [
            RunningSequence(
                item=i,
                generator=None if i.request.sampling.greedy else make_generator(i.request.sampling.seed),
                speculative=self.speculates(i),
                stop_ids=i.request.stop_token_ids | self.eos,
            )
            for i in items
        ]
        try:
            size = sum(len(i.request.prompt_ids) for i in items)
            outputs, scored = self._forward("prefill", size, lambda: self._prefill(seqs))
        except Exception as exc:
            log.exception("prefill of %d sequences failed", len(items))
            error = EngineFailure(f"forward pass failed: {type(exc).__name__}")
            out.events.extend((item, ErrorEvent(error)) for item in items)
            return
        for item, lps in scored:  # before the first tokens
            self._send(out, item, PromptEvent(lps))
        self._update(out, outputs)

    def _prefill(self, seqs: list[RunningSequence]) -> tuple[list[Emitted], list[tuple[GenerateItem, list[float]]]]:
        """The first tokens, and the prompt scores of the rows that ask for them."""
        self.batch.compact()  # rows 0..n-1 hold the running sequences; new ones go after them
        row0 = len(self.batch)
        prompts = [s.item.request.prompt_ids for s in seqs]
        params = [s.item.request.sampling for s in seqs]
        penalty = (
            penalty_state(prompts, self.model.cfg.vocab_size, self.device) if any(p.penalized for p in params) else None
        )
        sampling = BatchSampling.from_params(params, [s.generator for s in seqs], self.device, penalty)
        # the next step's draft choice, made now: rows that will not draft skip the modules' pass
        # over their prompts (a plain choice), or run only the modules they keep (a shallow one)
        joined = size_bucket(len(self.batch) + len(seqs))
        threads = self.threads.best.get(("decode", joined)) if self.threads is not None else None
        modules = self.batch.plan(seqs, threads)  # at the count the step is expected to run at
        drafting = torch.tensor([s.speculative for s in seqs], dtype=torch.bool, device=self.device)
        last = prefill(self.model, prompts, row0=row0, n_drafts=modules)  # logits [B, k or 1, V] at the last position
        first = first_tokens(last, sampling, drafting)
        self.batch.concatenate(seqs, first, [len(p) for p in prompts], penalty)
        for p in prompts:
            self.stats.prompt_tokens(len(p))
        top = self._top(seqs, last.logits[:, None, 0])
        rows = [b for b, s in enumerate(seqs) if s.item.request.prompt_logprobs]
        scores = prompt_logprobs(self.model, last.hidden, prompts, rows)  # [] when no row asks
        scored = [(seqs[b].item, lps) for b, lps in zip(rows, scores, strict=True)]
        tokens, logprobs = first.tokens[:, :1].tolist(), first.logprobs[:, :1].tolist()
        return self._collect(tokens, logprobs, [1] * len(seqs), row0, top), scored

    def _top(self, seqs: list[RunningSequence], head1: Tensor | None) -> tuple[list[Any], list[Any]] | None:
        """The most likely tokens at each offset [B, T, n] (ids, logprobs), for the rows that ask."""
        n = min(max((s.item.request.top_logprobs for s in seqs), default=0), self.model.cfg.vocab_size)
        if n == 0 or head1 is None:
            return None
        ids, lps = top_logprobs(head1, n)
        return ids.tolist(), lps.tolist()

    def run_decode(self, out: StepOutput) -> bool:
        """One decode step of the running batch, after cancelled and expired sequences leave it;
        False when no step ran (nothing left to decode, or the pass failed)."""
        now = time.monotonic()
        for seq in self.batch.seqs:
            if seq.item.cancelled:
                self.count_cancelled(seq.item)
                out.released.append(seq.item)
                seq.ended = True
            elif now > seq.item.deadline:
                self._end(out, seq, error=self.timed_out("generate"))
        self._drop_ended()
        if not len(self.batch):
            return False
        try:
            outputs = self._forward("decode", len(self.batch), self._decode)
        except Exception as exc:
            log.exception("decode step of %d sequences failed", len(self.batch))
            self.fail_running(out, EngineFailure(f"forward pass failed: {type(exc).__name__}"))
            return False
        self._update(out, outputs)
        return True

    def run_decode_steps(self, out: StepOutput, steps: int, go_on: Callable[[], bool]) -> int:
        """Up to `steps` more decode steps of the running batch, one after another with nothing
        between them, while go_on() holds before each; the steps run, or 0 at once where a row is
        cancelled or could expire during a step. They end after a step in which a row ends (a
        stop token or its length), or that fails. Each row's tokens from them become one event,
        in `out` (core.py: the core runs them while nothing else waits)."""
        seqs = self.batch.seqs
        if any(s.item.cancelled for s in seqs):
            return 0
        deadline = min(s.item.deadline for s in seqs)  # the rows stay the same throughout
        kept: dict[RunningSequence, Emitted] = {}
        ran, took = 0, 0.0
        while ran < steps and go_on() and (t0 := time.monotonic()) + 2 * took < deadline:
            try:
                outputs = self._forward("decode", len(self.batch), self._decode)
            except Exception as exc:
                log.exception("decode step of %d sequences failed", len(self.batch))
                self._update(out, list(kept.values()))  # what the steps before made is theirs
                self.fail_running(out, EngineFailure(f"forward pass failed: {type(exc).__name__}"))
                return ran
            ran, took = ran + 1, time.monotonic() - t0
            for e in outputs:
                if (row := kept.get(e.seq)) is None:
                    kept[e.seq] = e
                else:
                    row.tokens += e.tokens
                    row.logprobs += e.logprobs
                    if e.top is not None:
                        row.top = (row.top or []) + e.top
            if any(e.seq.remaining <= 0 or (e.tokens and e.tokens[-1] in e.seq.stop_ids) for e in outputs):
                break
        if kept:
            self._update(out, list(kept.values()))
        return ran

    def _decode(self) -> list[Emitted]:
        res = self.batch.step()
        counts = self.batch.last_emitted
        self.stats.decode_step(len(self.batch), self.batch.last_drafts, self.batch.last_max_accept, counts)
        top = self._top(self.batch.seqs, self.batch.last_head1)
        return self._collect(res.tokens.tolist(), res.logprobs.tolist(), counts, 0, top)

    def _collect(
        self,
        tokens: list[list[int]],
        logprobs: list[list[float]],
        counts: list[int],
        row0: int,
        top: tuple[list[Any], list[Any]] | None = None,
    ) -> list[Emitted]:
        """Per sequence: the tokens to emit, cut at EOS / stop tokens / max_new_tokens."""
        out = []
        for r, (toks, lps, n) in enumerate(zip(tokens, logprobs, counts, strict=True)):
            seq = self.batch.seqs[row0 + r]
            keep = min(n, seq.remaining)
            for t in range(keep):
                if toks[t] in seq.stop_ids:
                    keep = t + 1
                    break
            seq.generated += keep
            n_top = seq.item.request.top_logprobs
            row_top = None
            if top is not None and n_top:
                ids, values = top[0][r], top[1][r]
                row_top = [list(zip(ids[t][:n_top], values[t][:n_top], strict=True)) for t in range(keep)]
            out.append(Emitted(seq, toks[:keep], lps[:keep], row_top))
        return out

    # ---- update: outputs into events -------------------------------------------------------

    def _update(self, out: StepOutput, outputs: list[Emitted]) -> None:
        """Turn a pass's tokens into events; finished, cancelled and expired sequences leave the batch."""
        now = time.monotonic()
        for e in outputs:
            seq, toks, lps = e.seq, e.tokens, e.logprobs
            if seq.item.cancelled:  # counted and dropped at the next step boundary
                continue
            if now > seq.item.deadline:  # a pass that ended past the deadline delivers nothing
                self._end(out, seq, error=self.timed_out("generate"))
                continue
            reason = "eos_token" if toks and toks[-1] in seq.stop_ids else ("length" if seq.remaining <= 0 else None)
            if toks:
                self.stats.tokens(len(toks), seq.item.submitted, seq.last_token_at, now)
                seq.last_token_at = now
                self._send(out, seq.item, TokenEvent(toks, lps, final=reason is not None, top=e.top))
            if reason is not None:
                self._end(out, seq, reason=reason)
        self._drop_ended()

    def _end(self, out: StepOutput, seq: RunningSequence, reason: str = "", error: EngineError | None = None) -> None:
        seq.ended = True
        if error is not None:
            out.events.append((seq.item, ErrorEvent(error)))
            return
        req = seq.item.request
        finish = FinishEvent(
            reason=reason,
            generated_tokens=seq.generated,
            prompt_tokens=len(req.prompt_ids),
            drafted_tokens=seq.drafted,
            accepted_tokens=seq.accepted,
            verify_steps=seq.verify_steps,
            seed=req.sampling.seed,
        )
        self._send(out, seq.item, finish)

    def _send(self, out: StepOutput, item: GenerateItem, event: PromptEvent | TokenEvent | FinishEvent) -> None:
        """Hand `event` over with this step's outputs; a final_only request's wait on its item
        until its FinishEvent, and go with it, their tokens as one TokenEvent."""
        if not item.request.final_only:
            out.events.append((item, event))
        elif not isinstance(event, FinishEvent):
            item.held.append(event)
        else:
            out.events.extend((item, e) for e in joined(item.held))
            item.held = []
            out.events.append((item, event))

    def _drop_ended(self) -> None:
        """Ended sequences leave the batch now; their cache rows are compacted before the next pass."""
        self.batch.filter([not s.ended for s in self.batch.seqs])

    def fail_running(self, out: StepOutput, error: EngineError) -> None:
        """A failed step: fail every running sequence and start a fresh batch."""
        for seq in self.batch.seqs:
            if seq.item.cancelled:
                out.released.append(seq.item)
            elif not seq.ended:
                out.events.append((seq.item, ErrorEvent(error)))
        self.scheduler.batch = DecodeBatch(self.model, self.cfg.draft_tokens, self.batch.policy)

    def drop_waiting(self, out: StepOutput, item: PredictItem | GenerateItem, where: str) -> None:
        """A request that waited until cancelled or past its deadline."""
        self.end_waiting(out, item, None if item.cancelled else self.timed_out(f"{where}, in the queue"))

    def end_waiting(self, out: StepOutput, item: PredictItem | GenerateItem, error: EngineError | None) -> None:
        """A request taken out of the waiting queue without a pass: a cancelled one is let go,
        any other gets `error`."""
        if item.cancelled:
            self.count_cancelled(item)
            out.released.append(item)
            return
        assert error is not None, "a request still wanted needs its error"
        if isinstance(item, PredictItem):
            out.results.append((item, error))
        else:
            out.events.append((item, ErrorEvent(error)))

    def count_cancelled(self, item: WorkItem) -> None:
        if not item.stopped:  # a stop-sequence finish is a success
            self.stats.cancelled()

    def timed_out(self, where: str) -> EngineTimeout:
        """The one timeout error (504), logged as one line: an expected event, not a fault."""
        log.info("request timed out after %gs (%s)", self.cfg.request_timeout_s, where)
        return EngineTimeout(f"request timed out after {self.cfg.request_timeout_s:g}s")


def _row(scores: Scores, b: int, top_n: int) -> Scores:
    """Row b of a batch's scores, trimmed to that request's top_n."""
    return Scores(
        top_ids=[[ids[:top_n] for ids in scores.top_ids[b]]],
        top_probs=[[p[:top_n] for p in scores.top_probs[b]]],
        top_logprobs=[[p[:top_n] for p in scores.top_logprobs[b]]],
        greedy=[scores.greedy[b]],
        candidates=[scores.candidates[b]],
    )
