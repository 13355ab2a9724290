"""How many intra-op threads a decode step uses: the count that runs it fastest now.

On a quiet 2-core machine two OpenMP threads serve the most. With a busy process on one of
the cores, a team of two waits at every barrier of every op for whichever member the kernel
has descheduled: served single-stream /generate fell to 0.28x of its quiet speed with two
threads and kept 0.96x with one (`python -m bench.contention`, docs/benchmarks.md). A fixed
count is wrong on one machine or the other, and a neighbour's load comes and goes.

So the core loop times each decode step at the thread count it used, per batch size, and runs
each step at the count whose recent steps were fastest. Now and then it re-times the other
count, at an interval that doubles (up to MAX_INTERVAL steps) while the choice holds and drops
back to MIN_INTERVAL when it changes, so an exploration step under contention costs little; a
re-timing clearly faster than the current choice is repeated at once, so the choice follows
the machine's load within a few steps of the next re-timing. Prefills and /predict passes,
few and of varied sizes, run at the full count.

Only warm passes are timed (warmth.py): one after WARM_AFTER passes in a row of the same key
at the same count. A compiled step at the other count is another graph, with its own copy of
the weights (Inductor freezes them into each graph) and a new team of threads, and it takes
several passes to be warm again. Timing the second pass after a switch as if warm made the
other count look dearer than it runs, so a policy that had moved to one thread under contention
could stay there on a quiet machine (tests/engine/test_threads.py). A re-timing is therefore a
run of EXPLORE_RUN passes, the last ones timed.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable
from typing import TypeVar

import torch

from app.engine.warmth import EXPLORE_RUN, Warmth

T = TypeVar("T")
RECENT = 5  # pass durations kept per (key, threads); their median is the cost
MIN_INTERVAL = 64  # passes of a key between re-timings of the other thread count, at first
MAX_INTERVAL = 512  # ... doubling up to this while the same count stays fastest

CONFIRM_BELOW = 0.9  # a re-timing this much faster than the current choice is repeated at once
Key = tuple[str, int]  # (kind of pass, size bucket)


def size_bucket(n: int) -> int:
    """The power of two at or above n: passes of similar size share their timings."""
    return 1 << max(0, n - 1).bit_length()


class ThreadPolicy:
    def __init__(self, max_threads: int) -> None:
        self.choices = sorted({1, max(1, max_threads)})
        self.current = 0  # unknown on the core's thread until the first pass sets it
        self.recent: dict[Key, dict[int, deque[float]]] = {}
        self.until_explore: dict[Key, int] = {}
        self.interval: dict[Key, int] = {}
        self.best: dict[Key, int] = {}
        self.exploring: dict[Key, int] = {}  # passes left in a re-timing run of the other count
        self.warmth = Warmth()  # of the passes run: (key, count, graph)

    def choose(self, key: Key, allowed: Collection[int] | None = None) -> int:
        """Threads for the next pass of `key`, among `allowed` (default: every count)."""
        choices = [n for n in self.choices if allowed is None or n in allowed] or self.choices[-1:]
        if len(choices) == 1:
            return choices[0]
        recent = self.recent.setdefault(key, {n: deque(maxlen=RECENT) for n in self.choices})
        for n in choices:
            if not recent[n]:
                return n  # time every count once first
        best = min(choices, key=lambda n: statistics.median(recent[n]))
        if best != self.best.get(key):
            self.best[key] = best
            self.interval[key] = MIN_INTERVAL
            self.until_explore[key] = MIN_INTERVAL
        if self.exploring.get(key):
            self.exploring[key] -= 1
            return next(n for n in choices if n != best)
        self.until_explore[key] -= 1
        if self.until_explore[key] <= 0:
            self.interval[key] = min(2 * self.interval[key], MAX_INTERVAL)
            self.until_explore[key] = self.interval[key]
            self.exploring[key] = EXPLORE_RUN - 1
            return next(n for n in choices if n != best)
        return best

    def run(
        self,
        key: Key,
        fn: Callable[[], T],
        allowed: Collection[int] | None = None,
        graph: Callable[[], Hashable] | None = None,
    ) -> T:
        """Run fn at the thread count chosen among `allowed` (a compiled step: the counts it
        was compiled for; Dynamo guards on the count), and record how long it took.
        graph(), asked after the pass, tells which of the key's graphs it ran (a decode step:
        its draft count, fused or not): a pass is warm only after WARM_AFTER of the same key,
        count and graph, so the draft policy's re-timing runs, another graph at the same key
        and count, are not timed cold here either."""
        n = self.choose(key, allowed)
        if n != self.current:
            torch.set_num_threads(n)  # this thread's OpenMP team: the core runs every pass
            self.current = n
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        warm = self.warmth.step((key, n, graph() if graph is not None else None))
        if key in self.recent and warm:
            recent = self.recent[key]
            best = self.best.get(key)
            if best is not None and n != best and seconds < CONFIRM_BELOW * statistics.median(recent[best]):
                self.until_explore[key] = 1  # the other count looks clearly faster now: confirm it at once
            recent[n].append(seconds)
        return result

    def describe(self) -> dict[str, int]:
        """The thread count each kind and size runs at now, for /info."""
        return {f"{kind}/{size}": n for (kind, size), n in sorted(self.best.items())}
