"""The one place that turns what the engine does into Prometheus metrics (vLLM's stat loggers).

The engine reports events (a batch formed, a decode step, tokens delivered, a cancellation);
EngineStats decides what each means for the metrics in app/metrics.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from app.metrics import Metrics

KINDS = ("predict", "prefill", "decode")  # of forward passes and batches


class EngineStats:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # the labelled series the core touches each step, looked up once (labels() takes a lock)
        self._forward = {kind: metrics.forward_duration.labels(kind) for kind in KINDS}
        self._batch = {kind: metrics.batch_size.labels(kind) for kind in KINDS}
        self._by_head: dict[int, Any] = {}  # drafting head -> its accepted-drafts counter
        self._gauges: tuple[int, int] | None = None  # the last values set (the core reports every step)

    def cancelled(self) -> None:
        self.metrics.failures.labels("cancelled").inc()

    def forward(self, kind: str) -> AbstractContextManager[Any]:
        """Times one forward pass of kind ("predict", "prefill", "decode")."""
        return self._forward[kind].time()

    def batch(self, kind: str, submitted: Iterable[float], now: float) -> None:
        """A batch of `kind` formed from requests submitted at these times."""
        waits = [now - t for t in submitted]
        for wait in waits:
            self.metrics.queue_time.observe(wait)
        self._batch[kind].observe(len(waits))

    def prompt_tokens(self, n: int) -> None:
        self.metrics.prompt_tokens.inc(n)

    def decode_step(self, rows: int, drafts_per_row: int, max_accept: list[int], emitted: list[int]) -> None:
        """A decode step over `rows` rows: per verify pass, drafts offered, accepted, and accepted
        per drafting head (draft j is head j+1's)."""
        m = self.metrics
        self._batch["decode"].observe(rows)
        m.drafts_per_pass.set(drafts_per_row)
        for offered, n in zip(max_accept, emitted, strict=True):
            if not offered:
                continue
            m.spec_steps.inc()
            m.spec_drafted.inc(offered)
            m.spec_accepted.inc(n - 1)
            m.spec_accepted_length.observe(n)
            for head in range(2, n + 1):  # draft j is head j+1's
                counter = self._by_head.get(head)
                if counter is None:
                    counter = self._by_head[head] = m.spec_accepted_by_head.labels(str(head))
                counter.inc()

    def tokens(self, n: int, submitted: float, last_token_at: float | None, now: float) -> None:
        """n tokens of one sequence delivered now: time to first token, or the gap per token."""
        m = self.metrics
        if last_token_at is None:
            m.ttft.observe(now - submitted)
        else:
            gap = (now - last_token_at) / n
            for _ in range(n):
                m.itl.observe(gap)
        m.generated_tokens.inc(n)

    def gauges(self, queued: int, running: int) -> None:
        if (queued, running) == self._gauges:
            return
        self._gauges = (queued, running)
        self.metrics.queue_depth.set(queued)
        self.metrics.running.set(running)
