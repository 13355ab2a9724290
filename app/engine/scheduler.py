"""What runs next: the waiting queues, batch formation and expiry (bookkeeping only, no tensors).

Owned by the core loop's thread: the event loop never touches it, it only sends messages.
The running decode batch (with its draft policy) lives here too; the core executes its steps.
"""

from __future__ import annotations

from collections import deque

from app.engine.batch import DecodeBatch
from app.engine.config import EngineConfig
from app.engine.types import GenerateItem, PredictItem, WorkItem
from app.model.model import MTPTransformer


class Scheduler:
    def __init__(self, model: MTPTransformer, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.predict_q: deque[PredictItem] = deque()
        self.gen_q: deque[GenerateItem] = deque()
        self.batch = DecodeBatch(model, cfg.draft_tokens)
        self.last_predict_batch = 0  # requests in the last /predict batch
        self.running_limit = cfg.running_limit  # rows decoding at once (MTP_MAX_RUNNING)
        self.chains = model.cfg.head_type == "sequential"  # a candidate costs a pass over its prompt
        # seconds the running rows are owed in decode steps before the next prefill or /predict pass
        self.owed = 0.0

    def add(self, item: PredictItem | GenerateItem) -> None:
        (self.predict_q if isinstance(item, PredictItem) else self.gen_q).append(item)  # type: ignore[arg-type]

    def remove(self, item: WorkItem) -> bool:
        """Take a still-waiting item out of its queue; False if it is not waiting."""
        q: deque[WorkItem] = self.predict_q if isinstance(item, PredictItem) else self.gen_q  # type: ignore[assignment]
        try:
            q.remove(item)
        except ValueError:
            return False
        return True

    def waiting(self) -> int:
        return len(self.predict_q) + len(self.gen_q)

    def idle(self) -> bool:
        return not (self.predict_q or self.gen_q or len(self.batch))

    def predict_fill_wait(self, now: float) -> float:
        """Seconds to wait for more /predict requests before running the batch (0: run now).

        A lone request on an idle core runs at once; under concurrency (the last batch held
        several requests) wait up to max_wait_ms from the oldest arrival to fill the batch.
        Never while sequences are decoding: they would stall for it."""
        if not self.predict_q or len(self.batch) or self.last_predict_batch <= 1:
            return 0.0
        if len(self.predict_q) >= self.cfg.max_batch_size:
            return 0.0
        return max(0.0, self.predict_q[0].submitted + self.cfg.max_wait_ms / 1000 - now)

    def take_predict(self, now: float) -> tuple[list[PredictItem], list[PredictItem]]:
        """The next /predict batch, and the waiting requests found expired or cancelled. With
        sequential heads each candidate gets a copy of its input's cached module positions, so a
        batch takes at most max_candidate_tokens of prompt x candidates (its first input always):
        16 inputs of 250 tokens with 32 candidates each were one pass of 40 s when each candidate
        ran the modules over the whole prompt (docs/reliability.md)."""
        items: list[PredictItem] = []
        dropped: list[PredictItem] = []
        budget = self.cfg.max_candidate_tokens
        while self.predict_q and len(items) < self.cfg.max_batch_size:
            item = self.predict_q[0]
            if item.cancelled or now > item.deadline:
                dropped.append(self.predict_q.popleft())
                continue
            cost = item.request.candidate_tokens if self.chains else 0
            if items and cost > budget:  # the next pass takes it
                break
            budget -= cost
            items.append(self.predict_q.popleft())
        self.last_predict_batch = len(items)
        return items, dropped

    def take_prefill(self, now: float) -> tuple[list[GenerateItem], list[GenerateItem]]:
        """Sequences to prefill into the free rows of the batch, in arrival order, as many as
        max_prefill_tokens of prompt allows (the first always goes), and those found expired or
        cancelled. The running rows' next decode step waits for the prefill pass: without a
        budget, a burst of long prompts was one pass that every stream waited behind, and two
        clients sending them back to back slowed a stream 360-fold (docs/reliability.md)."""
        items: list[GenerateItem] = []
        dropped: list[GenerateItem] = []
        free = self.running_limit - len(self.batch)
        budget = self.cfg.max_prefill_tokens
        while self.gen_q and len(items) < free:
            item = self.gen_q[0]
            if item.cancelled or now > item.deadline:
                dropped.append(self.gen_q.popleft())
                continue
            size = len(item.request.prompt_ids)
            if items and size > budget:  # the next step takes it
                break
            budget -= size
            items.append(self.gen_q.popleft())
        return items, dropped

    def wants_prefill(self) -> bool:
        return bool(self.gen_q) and len(self.batch) < self.running_limit and self.others_may_run()

    def others_may_run(self) -> bool:
        """A prefill or /predict pass may run now: no row is decoding, or the rows have had the
        decode time the last such pass left them owed (EngineConfig.prefill_share)."""
        if not len(self.batch):
            self.owed = 0.0
        return self.owed <= 0.0

    def ran_other(self, seconds: float, rows_waited: bool) -> None:
        """A prefill or /predict pass took `seconds`; rows_waited: rows were decoding before it."""
        share = self.cfg.prefill_share
        if rows_waited and share < 1.0:
            self.owed += seconds * (1.0 - share) / share

    def ran_decode(self, seconds: float) -> None:
        self.owed = max(0.0, self.owed - seconds)
