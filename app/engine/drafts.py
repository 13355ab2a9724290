"""How many drafts a greedy verify pass carries: the count with the most expected tokens per second.

A verify pass over [cur, d_1..d_n] emits 1 + (accepted drafts) tokens; draft j counts only if
drafts 1..j all agree, which happens with rate a_j (measured per draft position as the batch
runs). Its cost grows with the tokens fed, steeply where the forward is compute-bound (large
batches) and hardly at batch 1, where the pass is overhead-bound. So the policy times one
step at each (batch size, n) once, at start-up, and each step picks

    n* = argmax_n (1 + a_1 + .. + a_n) / cost(batch, n)

Greedy output does not depend on n. Sampled rows do (through their random draws), so a batch
with a sampled speculative row always verifies every draft: a seeded request then gives the
same text whatever shares its batch.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

PRIOR_STEPS = 8.0  # pseudo-observations behind each position's prior
PRIOR_CONDITIONAL = 0.7  # prior a_j = 0.7 * a_(j-1): positions a busy batch never offers follow the last one measured


class DraftPolicy:
    def __init__(self, max_drafts: int, costs: dict[int, list[float]]) -> None:
        """costs[batch] = step seconds with n = 0 .. max_drafts drafts fed, for a few batch sizes."""
        self.max_drafts = max_drafts
        self.batches = sorted(costs)
        self.costs = costs
        self.offered = [0] * max_drafts  # verify passes in which draft position j was offered
        self.accepted = [0] * max_drafts  # ... and accepted

    def rates(self) -> list[float]:
        """a_j: the rate at which the first j drafts are all accepted."""
        out, prev = [], 1.0
        for j in range(self.max_drafts):
            prev = (self.accepted[j] + PRIOR_STEPS * PRIOR_CONDITIONAL * prev) / (self.offered[j] + PRIOR_STEPS)
            out.append(prev)
        return out

    def choose(self, batch: int) -> int:
        """Drafts to verify in a pass over `batch` rows."""
        if not self.batches or self.max_drafts == 0:
            return self.max_drafts
        i = min(bisect.bisect_left(self.batches, batch), len(self.batches) - 1)
        cost = self.costs[self.batches[i]]  # the nearest measured batch size at or above
        best, best_rate, expected = 0, 1.0 / cost[0], 1.0
        for n, a in enumerate(self.rates(), start=1):
            expected += a
            if expected / cost[n] > best_rate:
                best, best_rate = n, expected / cost[n]
        return best

    def observe(self, offered: list[int], emitted: list[int]) -> None:
        """One step's rows: drafts offered (max_accept) and tokens emitted (accepted + 1)."""
        for m, e in zip(offered, emitted, strict=True):
            for j in range(m):
                self.offered[j] += 1
                self.accepted[j] += j < e - 1


def time_steps(
    step: Callable[[int, int], None], batches: list[int], max_drafts: int, reps: int = 8
) -> dict[int, list[float]]:
    """Fastest of `reps` timings of step(batch, n_drafts) for every batch size and n = 0 .. max_drafts
    (the minimum: interference from other work on the machine only ever adds time), made
    non-decreasing in n: a pass that feeds more tokens never costs less, so a lower timing
    for more drafts is noise."""
    costs: dict[int, list[float]] = {}
    for b in batches:
        row: list[float] = []
        for n in range(max_drafts + 1):
            step(b, n)  # warm this shape
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step(b, n)
                times.append(time.perf_counter() - t0)
            row.append(max(min(times), row[-1] if row else 0.0))
        costs[b] = row
    return costs
