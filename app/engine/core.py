"""The core loop: on the one inference thread, schedule -> execute -> update, step after step.

The event loop talks to the core only through its inbox (submit, abort, fail all, call, stop);
the core hands each step's outputs back in one `post` call (vLLM's EngineCore busy loop). A
step never waits on the event loop, and an idle core blocks on its inbox instead of spinning.
The passes a step runs, and the events their outputs become, are in passes.py.
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
from app.engine.types import EngineFailure, EngineTimeout, GenerateItem, PredictItem, StepOutput, WorkItem
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)

POLICY_INFO_EVERY = 64  # decode steps between snapshots of the policies for /info


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

    def timed_out(self, where: str) -> EngineTimeout:
        """The one timeout error (504), logged as one line: an expected event, not a fault."""
        return self.passes.timed_out(where)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """The inference thread's main loop, until a Stop message."""
        while not self._stopping:
            s = self.scheduler
            self._receive(None if s.idle() else s.predict_fill_wait(time.monotonic()))
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
        if out.events or out.results or out.left_queue or out.released:
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
        if s.predict_q:
            items, dropped = s.take_predict(time.monotonic())
            self._emit(StepOutput(left_queue=len(items) + len(dropped)))  # places free before the pass
            for item in dropped:
                self.passes.drop_waiting(out, item, "predict")
            if items:
                self.passes.run_predict(out, items)
        if s.wants_prefill():
            gen_items, gen_dropped = s.take_prefill(time.monotonic())
            self._emit(StepOutput(left_queue=len(gen_items) + len(gen_dropped)))
            for gen_item in gen_dropped:
                self.passes.drop_waiting(out, gen_item, "generate")
            if gen_items:
                self.passes.run_prefill(out, gen_items)
        if len(self.batch) and self.passes.run_decode(out):
            self._steps += 1
            if self._steps % POLICY_INFO_EVERY == 1:
                self.snapshot_policies()

    def snapshot_policies(self) -> None:
        """What the draft and thread policies do now, for /info (read from the event loop)."""
        policy, threads = self.batch.policy, self.passes.threads
        self.policy_info = {
            "draft_policy": policy.describe() if policy is not None else None,
            "threads": threads.describe() if threads is not None else None,
        }
