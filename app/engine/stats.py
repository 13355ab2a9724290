"""The one place that turns what the engine does into Prometheus metrics (vLLM's stat loggers).

The engine reports events (a batch formed, a decode step, tokens delivered, a cancellation);
EngineStats decides what each means for the metrics in app/metrics.py.

What a decode step reports for each of its rows (drafts offered and accepted, accepted
lengths, per-token gaps, tokens generated) is summed here and goes to the metrics in one
`flush`, which the core runs before it hands a step's outputs to the event loop (so a reply's
metrics are in before the reply), before it waits for work, and at least every FLUSH_EVERY_S.
Each metric update takes a lock and walks its buckets; at 16 rows a step made over a hundred
of them, which the step's thread paid for in Python, holding the GIL.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from prometheus_client import Histogram

from app.metrics import Metrics

KINDS = ("predict", "prefill", "decode")  # of forward passes and batches
FLUSH_EVERY_S = 0.1  # the longest the summed decode statistics wait for a flush while steps run


class PendingHistogram:
    """Observations of one histogram, summed by bucket until `flush` adds them to it at once.

    prometheus_client has no call that observes a value n times; this adds the counts to the
    histogram's bucket and sum values, which observe() itself updates. A release of the client
    whose histograms lack them gets each observation through observe() at once instead."""

    def __init__(self, hist: Histogram) -> None:
        self.hist = hist
        inner = [getattr(hist, name, None) for name in ("_upper_bounds", "_buckets", "_sum")]
        self.direct = any(x is None for x in inner) or len(inner[0] or ()) != len(inner[1] or ())
        self.bounds: list[float] = [] if self.direct else list(hist._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, amount: float, n: int = 1) -> None:
        if self.direct:
            for _ in range(n):
                self.hist.observe(amount)
            return
        self.counts[bisect.bisect_left(self.bounds, amount)] += n  # observe(): the first bound >= amount
        self.sum += amount * n

    def flush(self) -> None:
        if self.direct or not any(self.counts):
            return
        for bucket, n in zip(self.hist._buckets, self.counts, strict=True):
            if n:
                bucket.inc(n)
        self.hist._sum.inc(self.sum)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0


class EngineStats:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # the labelled series the core touches each step, looked up once (labels() takes a lock)
        self._forward = {kind: metrics.forward_duration.labels(kind) for kind in KINDS}
        self._batch = {kind: metrics.batch_size.labels(kind) for kind in KINDS}
        self._by_head: dict[int, Any] = {}  # drafting head -> its accepted-drafts counter
        self._gauges: tuple[int, int] | None = None  # the last values set (the core reports every step)
        # what decode steps reported since the last flush (see the module's docstring)
        self._rows = PendingHistogram(self._batch["decode"])
        self._accepted_length = PendingHistogram(metrics.spec_accepted_length)
        self._itl = PendingHistogram(metrics.itl)
        self._drafts_per_pass: int | None = None
        self._spec = [0, 0, 0]  # verify passes with drafts, drafts offered, drafts accepted
        self._accepted_by_head: dict[int, int] = {}
        self._generated = 0
        self._flushed_at = time.monotonic()

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
        self._rows.observe(rows)
        self._drafts_per_pass = drafts_per_row
        spec, by_head = self._spec, self._accepted_by_head
        for offered, n in zip(max_accept, emitted, strict=True):
            if not offered:
                continue
            spec[0] += 1
            spec[1] += offered
            spec[2] += n - 1
            self._accepted_length.observe(n)
            for head in range(2, n + 1):  # draft j is head j+1's
                by_head[head] = by_head.get(head, 0) + 1

    def tokens(self, n: int, submitted: float, last_token_at: float | None, now: float) -> None:
        """n tokens of one sequence delivered now: time to first token, or the gap per token."""
        if last_token_at is None:
            self.metrics.ttft.observe(now - submitted)
        else:
            self._itl.observe((now - last_token_at) / n, n)
        self._generated += n

    def flush(self) -> None:
        """Add what decode steps reported since the last flush to the metrics (inference thread)."""
        m = self.metrics
        self._flushed_at = time.monotonic()
        self._rows.flush()
        self._accepted_length.flush()
        self._itl.flush()
        if self._drafts_per_pass is not None:
            m.drafts_per_pass.set(self._drafts_per_pass)
            self._drafts_per_pass = None
        if self._generated:
            m.generated_tokens.inc(self._generated)
            self._generated = 0
        if self._spec[0]:
            m.spec_steps.inc(self._spec[0])
            m.spec_drafted.inc(self._spec[1])
            m.spec_accepted.inc(self._spec[2])
            self._spec = [0, 0, 0]
        for head, n in self._accepted_by_head.items():
            counter = self._by_head.get(head)
            if counter is None:
                counter = self._by_head[head] = m.spec_accepted_by_head.labels(str(head))
            counter.inc(n)
        self._accepted_by_head.clear()

    def due(self, now: float) -> bool:
        """Whether the summed statistics have waited FLUSH_EVERY_S."""
        return now - self._flushed_at >= FLUSH_EVERY_S

    def gauges(self, queued: int, running: int) -> None:
        if (queued, running) == self._gauges:
            return
        self._gauges = (queued, running)
        self.metrics.queue_depth.set(queued)
        self.metrics.running.set(running)
