"""The core loop: on the one inference thread, schedule -> execute -> update, step after step.

The event loop talks to the core only through its inbox (submit, abort, fail all, call, stop);
the core hands each step's outputs back in one `post` call (vLLM's EngineCore busy loop). A
step never waits on the event loop, and an idle core blocks on its inbox instead of spinning.
The passes a step runs, and the events their outputs become, are in passes.py. While no
request waits and no message comes, one turn of the loop runs several decode steps in a row
(`decode_steps_in_a_row`, `_steps_in_a_row`), its work around a step done once for them.

Streamed tokens are handed over at most every `stream_interval_ms` (SGLang's and vLLM's
stream interval, in time rather than tokens). Each hand-off costs the event loop a wake-up,
a turn of every stream it carries, and a socket write per stream, and on a host whose cores
the step's threads fill, that time comes out of the steps: with every step handed over, a
streamed client got clearly less than the same server gave it as JSON replies
(docs/benchmarks.md, benchmark 21). So a step whose outputs are only further tokens of
streams that already have their first is held, and goes with the next hand-off, each
sequence's tokens then as one event (one write). A first token, a sequence's last tokens, its
end or error, a /predict result, a request leaving the queue or let go: any of these hands
over everything held at once, and so does the core before it waits on its inbox. A held token
therefore waits at most the interval plus one step.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.batch import DecodeBatch
from app.engine.config import EngineConfig
from app.engine.passes import Passes
from app.engine.scheduler import Scheduler
from app.engine.stats import EngineStats
from app.engine.types import (
    EngineFailure,
    EngineTimeout,
    GenerateItem,
    PredictItem,
    StepOutput,
    TokenEvent,
    WorkItem,
    joined,
)
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)

POLICY_INFO_EVERY = 64  # decode steps between snapshots of the policies for /info


def holdable(out: StepOutput) -> bool:
    """Whether `out` may wait for a later hand-off: only tokens of streams that already have
    their first, none of them the last; no result, error, end, or freed queue place."""
    if out.results or out.left_queue or out.released:
        return False
    return all(isinstance(e, TokenEvent) and not e.final and item.streamed for item, e in out.events)


def merged(events: list[tuple[GenerateItem, Any]]) -> list[tuple[GenerateItem, Any]]:
    """Each sequence's events in order, its token events as one where they follow each other."""
    by_item: dict[GenerateItem, list[Any]] = {}
    for item, event in events:
        by_item.setdefault(item, []).append(event)
    if all(len(evs) == 1 for evs in by_item.values()):
        return events
    return [(item, e) for item, evs in by_item.items() for e in (joined(evs) if len(evs) > 1 else evs)]


# ---- inbox messages ---------------------------------------------------------------------------


@dataclass
class Submit:
    items: list[PredictItem] | list[GenerateItem]


@dataclass
class Abort:
    items: list[WorkItem]


@dataclass
class DropAll:
    """The event loop has ended every request (shutdown): forget them all."""


@dataclass
class Call:
    fn: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass
class Stop:
    pass


Message = Submit | Abort | DropAll | Call | Stop


class EngineCore:
    def __init__(
        self,
        model: MTPTransformer,
        eos: frozenset[int],
        cfg: EngineConfig,
        stats: EngineStats,
        speculates: Callable[[GenerateItem], bool],
    ) -> None:
        self.stats = stats
        self.scheduler = Scheduler(model, cfg)
        self.passes = Passes(self.scheduler, model, eos, stats, speculates)
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.post: Callable[[StepOutput], object] = lambda out: None  # set by the engine before run()
        self.policy_info: dict[str, Any] = {}  # the draft and thread policies, as /info shows them
        self._steps = 0
        self._stopping = False
        self.stream_interval = cfg.stream_interval_ms / 1000
        self.steps_in_a_row = cfg.decode_steps_in_a_row  # decode steps a turn of the loop may run at most
        self._held: StepOutput | None = None  # token events held back for a later hand-off (stream_interval)
        self._last_post = 0.0

    @property
    def batch(self) -> DecodeBatch:
        return self.scheduler.batch

    @property
    def busy_since(self) -> float | None:
        """Start of the forward pass running now (the stall clock /health reads); None between passes."""
        return self.passes.busy_since

    def put(self, message: Message) -> None:
        """Thread-safe: the event loop's only way in."""
        self.inbox.put(message)

    def report_to(self, stats: EngineStats) -> None:
        """Report steps to these statistics from now on (inference thread, between steps)."""
        self.stats = self.passes.stats = stats

    def timed_out(self, where: str) -> EngineTimeout:
        """The one timeout error (504), logged as one line: an expected event, not a fault."""
        return self.passes.timed_out(where)

    # ---- the loop --------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self) -> None:
        """The inference thread's main loop, until a Stop message (in inference mode throughout)."""
        while not self._stopping:
            s = self.scheduler
            timeout = None if s.idle() else s.predict_fill_wait(time.monotonic())
            if timeout != 0:  # about to wait: nothing stays held, and the metrics are up to date
                if self._held is not None:
                    self._post(self._held)
                self.stats.flush()
            self._receive(timeout)
            if self._stopping or s.idle() or s.predict_fill_wait(time.monotonic()) > 0:
                continue
            out = StepOutput()
            try:
                self.step(out)
            except Exception:  # never let the loop die on a bug; fail the requests it held
                log.exception("engine core error")
                error = EngineFailure("internal error in the inference worker")
                self.passes.fail_running(out, error)
                self._fail_waiting(out, error)
            self._emit(out)

    def _receive(self, timeout: float | None) -> None:
        """Handle the inbox: block for a first message (None: without limit; 0: not at all), then take the rest."""
        try:
            message = self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: Message) -> None:
        if isinstance(message, Submit):
            for item in message.items:
                self.scheduler.add(item)
        elif isinstance(message, Abort):
            out = StepOutput()
            for waiting in message.items:
                if self.scheduler.remove(waiting):  # still waiting: leave now, not when a row frees up
                    out.left_queue += 1
                    out.released.append(waiting)
                    self.passes.count_cancelled(waiting)
            self._emit(out)  # running sequences leave at the next step boundary
        elif isinstance(message, DropAll):
            self._drop_all()
        elif isinstance(message, Call):
            self._call(message)
        else:
            self._stopping = True

    def _call(self, message: Call) -> None:
        try:
            with torch.inference_mode():
                result = message.fn()
        except BaseException as exc:  # handed to the caller
            message.done(None, exc)
        else:
            message.done(result, None)

    def _emit(self, out: StepOutput) -> None:
        self.stats.gauges(self.scheduler.waiting(), len(self.batch))
        if self.stats.due(time.monotonic()):  # steps whose outputs are held or none still show
            self.stats.flush()
        if not (out.events or out.results or out.left_queue or out.released):
            return
        if self._held is not None:
            out.events[:0] = self._held.events
        if self.stream_interval and holdable(out) and time.monotonic() - self._last_post < self.stream_interval:
            self._held = out
        else:
            self._post(out)

    def _post(self, out: StepOutput) -> None:
        """Hand `out` to the event loop, each sequence's token events merged into one."""
        self._held = None
        self._last_post = time.monotonic()
        self.stats.flush()  # a reply's metrics are in before the reply
        if len(out.events) > 1:
            out.events = merged(out.events)
        for item, event in out.events:
            if isinstance(event, TokenEvent):
                item.streamed = True
        try:
            self.post(out)
        except RuntimeError:  # the event loop has closed: nobody is left to answer
            log.warning("step outputs dropped: the event loop is closed")

    def _fail_waiting(self, out: StepOutput, error: EngineFailure) -> None:
        """After a fault outside the passes, the waiting requests fail too: a fault that comes
        before they are taken would otherwise recur at every turn of the loop, which would spin
        at full speed with them queued until their deadlines."""
        s = self.scheduler
        out.left_queue += s.waiting()
        waiting: list[PredictItem | GenerateItem] = [*s.predict_q, *s.gen_q]
        for item in waiting:
            self.passes.end_waiting(out, item, error)
        s.predict_q.clear()
        s.gen_q.clear()

    def _drop_all(self) -> None:
        out = StepOutput(left_queue=self.scheduler.waiting())
        self.scheduler.predict_q.clear()
        self.scheduler.gen_q.clear()
        self.batch.filter([False] * len(self.batch))
        self._emit(out)

    # ---- one step --------------------------------------------------------------------------

    def step(self, out: StepOutput) -> None:
        """Schedule -> execute -> update: a /predict batch, new sequences' prefill, one decode step.

        Requests taken from the waiting queues are handed back at once (their queue places free
        up before the pass runs); everything else the step produces goes in `out`, one hand-off."""
        s = self.scheduler
        if s.predict_q and s.others_may_run():
            items, dropped = s.take_predict(time.monotonic())
            self._emit(StepOutput(left_queue=len(items) + len(dropped)))  # places free before the pass
            for item in dropped:
                self.passes.drop_waiting(out, item, "predict")
            if items:
                rows_waited, t0 = len(self.batch) > 0, time.perf_counter()
                self.passes.run_predict(out, items)
                s.ran_other(time.perf_counter() - t0, rows_waited)
        if s.wants_prefill():
            gen_items, gen_dropped = s.take_prefill(time.monotonic())
            self._emit(StepOutput(left_queue=len(gen_items) + len(gen_dropped)))
            for gen_item in gen_dropped:
                self.passes.drop_waiting(out, gen_item, "generate")
            if gen_items:
                rows_waited, t0 = len(self.batch) > 0, time.perf_counter()
                self.passes.run_prefill(out, gen_items)
                s.ran_other(time.perf_counter() - t0, rows_waited)
        if len(self.batch):
            t0 = time.perf_counter()
            if self.passes.run_decode(out):
                before = self._steps
                self._steps += 1 + self._steps_in_a_row(out)
                if (self._steps - 1) // POLICY_INFO_EVERY != (before - 1) // POLICY_INFO_EVERY:
                    self.snapshot_policies()
            s.ran_decode(time.perf_counter() - t0)

    def _steps_in_a_row(self, out: StepOutput) -> int:
        """After a decode step, more of them at once while nothing else is there to do: no request
        waits, no message is in the inbox, the step's outputs may be held (holdable), and a
        stream's held tokens are not yet due (stream_interval), nor the metrics (EngineStats.due).
        Each turn of the loop costs a step its work around the pass (the inbox, the scheduler's
        checks, the rows' expiry, a hand-off's bookkeeping); steps in a row pay it once. Any
        message ends them at the next step boundary, as it would between turns."""
        s = self.scheduler
        if self.steps_in_a_row <= 1 or s.waiting() or not len(self.batch) or not self.inbox.empty():
            return 0
        if not holdable(out):
            return 0
        # rows this turn's prefill added show while the run goes on, not only when the turn ends
        # (a short request's whole life may be one turn)
        self.stats.gauges(s.waiting(), len(self.batch))
        due = float("inf")
        if any(not seq.item.request.final_only for seq in self.batch.seqs):
            due = self._last_post + self.stream_interval

        def go_on() -> bool:
            now = time.monotonic()
            return self.inbox.empty() and now < due and not self.stats.due(now)

        return self.passes.run_decode_steps(out, self.steps_in_a_row - 1, go_on)

    def snapshot_policies(self) -> None:
        """What the draft and thread policies do now, for /info (read from the event loop)."""
        policy, threads = self.batch.policy, self.passes.threads
        self.policy_info = {
            "draft_policy": policy.describe() if policy is not None else None,
            "threads": threads.describe() if threads is not None else None,
            "thread_timings": threads.timings() if threads is not None else None,
        }
