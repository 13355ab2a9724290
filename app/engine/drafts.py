"""How many drafts a greedy verify pass carries: the count with the most expected tokens per second.

A verify pass over [cur, d_1..d_n] emits 1 + (accepted drafts) tokens; draft j counts only if
drafts 1..j all agree, which happens with rate a_j (measured per draft position as the batch
runs). Its cost grows with the tokens verified, steeply where the forward is compute-bound (large
batches) and hardly at batch 1, where the pass is overhead-bound. So the policy times one
step at each (batch size, n) once, at start-up, and each step picks

    n* = argmax_n (1 + a_1 + .. + a_n) / cost(batch, n)

Sequential (DeepSeek-V3) modules make even n = 0 cost more than a plain step: a drafting step
runs k-1 module blocks over its windows to draft for the next one. There the policy may pick
PLAIN instead, a step that drafts nothing, when 1 / cost_plain beats the best n by PLAIN_MARGIN.
The rows it is picked for stop speculating for good (their modules' caches are not kept up to
date from then on, so their drafts would be worse than measured); rows admitted later speculate
again, and the choice is made anew for them. Large batches, which are compute-bound, go plain;
small ones, which are overhead-bound, keep drafting.

The start-up table is only a first estimate: a noisy neighbour during those few milliseconds
would otherwise fix a wrong choice for the life of the process. So each greedy step's own
duration is verified back (`observe_cost`), a cost is the median of the recent steps at that
(batch, n), and every EXPLORE_EVERY-th step at a batch size starts a run of EXPLORE_RUN steps
that re-time the draft count seen least recently. Start-up timings are medians of interleaved
rounds, and capped at what n+1 plain steps would cost (feeding n+1 tokens in one pass never
costs more).

Only warm steps are timed: one that follows a step of the same batch size, draft count and
thread count. The first step after a change is cold: a compiled step of another shape is another
graph, with its own copy of the weights (Inductor freezes them into each graph) to bring back
into the CPU's caches. A batch-1 step took 0.249 ms warm and 0.476 ms after 31 steps of another
width (`mtp bench step --autotune`, docs/bench/step-switch.json), so timing single steps between
others made every draft count but the running one look about twice its cost. Start-up rounds run each
shape twice in a row and time the second; a re-timing run's first step is not timed.

Greedy output does not depend on n. Sampled rows do (through their random draws), so a batch
with a sampled speculative row always verifies every draft: a seeded request then gives the
same text whatever shares its batch.
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from app.decoding.generate import forward_step
from app.decoding.sampling import BatchSampling, SamplingParams
from app.decoding.speculative import accept_drafts
from app.model.model import MTPTransformer, SequentialHeads

if TYPE_CHECKING:
    from app.decoding.compiled import CompiledDecoder

log = logging.getLogger(__name__)

PRIOR_STEPS = 8.0  # pseudo-observations behind each position's prior
PRIOR_CONDITIONAL = 0.7  # prior a_j = 0.7 * a_(j-1): positions a busy batch never offers follow the last one measured
RECENT_STEPS = 16  # step timings kept per (batch, n); their median is the cost
EXPLORE_EVERY = 32  # every 32nd step at a batch size re-times the draft count measured least recently
EXPLORE_RUN = 2  # ... in a run of this many steps, the first of which (cold) is not timed
PLAIN = -1  # choose(): a step that drafts nothing, and its rows stop speculating (sequential heads)
PLAIN_MARGIN = 1.1  # PLAIN must give this many times the best draft count's tokens/s: it is for good


class DraftPolicy:
    def __init__(
        self,
        max_drafts: int,
        costs: dict[int, list[float]],
        choices: list[int] | None = None,
        plain: dict[int, float] | None = None,
    ) -> None:
        """costs[batch] = step seconds with n = 0 .. max_drafts drafts verified, for a few batch sizes;
        choices: the draft counts a step may verify (compiled steps: the widths compiled), default all;
        plain[batch] = seconds of a step that drafts nothing, where that is cheaper than n = 0
        (sequential heads): PLAIN becomes a choice."""
        self.max_drafts = max_drafts
        self.choices = sorted(set(choices)) if choices is not None else list(range(max_drafts + 1))
        self.batches = sorted(costs)
        self.costs = costs
        self.offered = [0] * max_drafts  # verify passes in which draft position j was offered
        self.accepted = [0] * max_drafts  # ... and accepted
        self.recent = {b: [deque([c], maxlen=RECENT_STEPS) for c in row] for b, row in costs.items()}
        self.steps = dict.fromkeys(costs, 0)  # choices made per measured batch size
        self.last_seen = {b: [0] * (max_drafts + 1) for b in costs}  # step count when n was last timed
        self.plain = {b: deque([c], maxlen=RECENT_STEPS) for b, c in (plain or {}).items() if b in costs}
        self.last: tuple[int, int, int] | None = None  # the last step's (batch, n, threads): the next is warm if equal

    def cost(self, batch: int) -> list[float]:
        """Current seconds per step at n = 0 .. max_drafts for a measured batch size: medians of recent steps."""
        return [statistics.median(window) for window in self.recent[batch]]

    def _bucket(self, batch: int) -> int:
        return self.batches[min(bisect.bisect_left(self.batches, batch), len(self.batches) - 1)]

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
        b = self._bucket(batch)  # the nearest measured batch size at or above
        self.steps[b] += 1
        if -self.steps[b] % EXPLORE_EVERY < EXPLORE_RUN:  # steps 31, 32, 63, 64, ..: the first is cold,
            seen = self.last_seen[b]  # untimed, and leaves last_seen as it was: the second re-times the same n
            return min(self.choices, key=lambda n: seen[n])
        return self.best(b)

    def best(self, b: int) -> int:
        """The draft count with the most expected tokens per second at measured batch size b, or PLAIN."""
        cost = self.cost(b)
        expected = [1.0]  # tokens a pass verifying n drafts is expected to emit
        for a in self.rates():
            expected.append(expected[-1] + a)
        n = max(self.choices, key=lambda n: (expected[n] / cost[n], -n))
        if b in self.plain:
            plain = statistics.median(self.plain[b])
            if cost[n] > PLAIN_MARGIN * expected[n] * plain:  # 1 / plain > margin * expected / cost
                return PLAIN
        return n

    def observe_cost(self, batch: int, n: int, seconds: float) -> None:
        """A greedy step's duration (n = PLAIN: a step that drafted nothing); only exact measured
        batch sizes count (a smaller batch costs less), and only warm steps (see the module's doc)."""
        shape = (batch, n, torch.get_num_threads())
        warm, self.last = self.last == shape, shape
        if not warm:
            return
        if n == PLAIN:
            if batch in self.plain:
                self.plain[batch].append(seconds)
        elif batch in self.recent and n in self.choices:
            self.recent[batch][n].append(seconds)
            self.last_seen[batch][n] = self.steps[batch]

    def describe(self) -> dict[str, object]:
        """What the policy does now, for /info."""
        out: dict[str, object] = {
            "acceptance": [round(a, 3) for a in self.rates()],
            "drafts_by_batch": {b: "plain" if (n := self.best(b)) == PLAIN else n for b in self.batches},
            "step_ms": {b: [round(c * 1e3, 3) for c in self.cost(b)] for b in self.batches},
        }
        if self.plain:
            out["plain_step_ms"] = {b: round(statistics.median(c) * 1e3, 3) for b, c in self.plain.items()}
        return out

    def observe(self, offered: list[int], emitted: list[int]) -> None:
        """One step's rows: drafts offered (max_accept) and tokens emitted (accepted + 1)."""
        for m, e in zip(offered, emitted, strict=True):
            for j in range(m):
                self.offered[j] += 1
                self.accepted[j] += j < e - 1


def time_steps(
    step: Callable[[int, int], None],
    batches: list[int],
    max_drafts: int,
    reps: int = 8,
    counts: list[int] | None = None,
    plain: bool = False,
) -> tuple[dict[int, list[float]], dict[int, float]]:
    """Seconds of step(batch, n_drafts) for every batch size and n = 0 .. max_drafts, and, with
    `plain`, of step(batch, PLAIN) for every batch size (else {}).

    With `counts`, only those draft counts are run; any other n costs what the next count
    above it does (a compiled step pads its tokens to that width).

    Each shape is run once to warm it, then `reps` rounds time every shape in turn, so a burst
    of interference hits all shapes alike rather than a few; in each round a shape runs twice
    and its second, warm, run is timed (the module's doc); the median of a shape's rounds is
    its cost. A row is then made non-decreasing in n (feeding more tokens never costs less)
    and capped at (n+1) x the plain step (one pass never costs more than n+1 plain ones).
    """
    timed = sorted(set(counts)) if counts is not None else list(range(max_drafts + 1))
    shapes = [(b, n) for b in batches for n in ([PLAIN] if plain else []) + timed]
    for b, n in shapes:
        step(b, n)
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(reps):
        for b, n in shapes:
            step(b, n)  # cold: the shape before was another
            t0 = time.perf_counter()
            step(b, n)
            times[b, n].append(time.perf_counter() - t0)
    costs: dict[int, list[float]] = {}
    for b in batches:
        row: list[float] = []
        for n in range(max_drafts + 1):
            median = statistics.median(times[b, next(m for m in timed if m >= n)])
            row.append(median if not row else min(max(median, row[-1]), (n + 1) * row[0]))
        costs[b] = row
    plain_costs = {b: statistics.median(times[b, PLAIN]) for b in batches} if plain else {}
    return costs, plain_costs


def time_verify_steps(
    model: MTPTransformer, max_batch_size: int, compiled: CompiledDecoder | None = None
) -> tuple[dict[int, list[float]], dict[int, float]]:
    """Seconds of a greedy decode step at batch sizes 1, 2, 4, .. max_batch_size and 0 .. k-1
    drafts, on random tokens at position 64 (the inference thread, before any sequence holds a
    cache row). With `compiled`, the steps that will run: compiled ones where it has the shape,
    at the draft counts it compiled. With sequential heads, also the plain step (no modules) at
    each batch size (time_steps' second result; else {})."""
    k, vocab, dev = model.cfg.k, model.cfg.vocab_size, model.head.proj.weight.device
    sizes = sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
    counts = None
    widths = (compiled.greedy_widths or compiled.widths) if compiled is not None else None
    if compiled is not None and widths is not None:
        counts = [w - 1 for w in widths]  # batches past the compiled sizes run eager steps, timed as such
    pos0 = max(0, min(64, model.cfg.max_seq_len - k))
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs: dict[tuple[int, int], tuple[Any, ...]] = {}  # built once per shape, outside the timings

    def build(b: int, n: int) -> tuple[Any, ...]:
        inputs[b, n] = (
            torch.randint(0, vocab, (b,), device=dev, generator=gen),  # cur
            torch.randint(0, vocab, (b, n), device=dev, generator=gen),  # drafts
            torch.full((b,), pos0, device=dev),  # pos
            torch.full((b,), n, device=dev),  # max_accept
            BatchSampling.from_params([SamplingParams()] * b, [None] * b, dev),
            torch.ones(b, dtype=torch.bool, device=dev),  # the rows that draft: all
        )
        return inputs[b, n]

    def step(b: int, n: int) -> None:
        if compiled is not None and (threads := compiled.thread_counts(b)):
            torch.set_num_threads(max(threads))  # a count the step was compiled at
        if n == PLAIN:  # what a batch of rows that do not speculate runs: the forward step alone
            plain_step(b)
            return
        cur, drafts, pos, max_accept, sampling, drafting = inputs.get((b, n)) or build(b, n)
        if compiled is not None and compiled.covers(b, n + 1, greedy=True):  # what greedy batches run
            compiled.greedy_step(cur, drafts if n else None, pos, max_accept, want_drafts=True)
        else:
            forward = compiled if compiled is not None and compiled.covers(b, n + 1) else None
            out = forward_step(model, cur, drafts if n else None, pos, compiled=forward)
            accept_drafts(out.head1, drafts, None, max_accept, sampling, drafting, out.drafts, k - 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain_step(b: int) -> None:
        if (b, PLAIN) not in inputs:
            cur, _, pos, _, sampling, _ = inputs.get((b, 0)) or build(b, 0)
            zero = torch.zeros(b, dtype=torch.long, device=dev)
            inputs[b, PLAIN] = (cur, cur.new_zeros(b, 0), pos, zero, sampling, zero.bool())
        cur, no_drafts, pos, zero, sampling, no_rows = inputs[b, PLAIN]
        forward = compiled if compiled is not None and compiled.covers(b, 1) else None
        out = forward_step(model, cur, None, pos, want_drafts=False, compiled=forward)
        accept_drafts(out.head1, no_drafts, None, zero, sampling, no_rows, None, k - 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        costs, plain = time_steps(step, sizes, k - 1, counts=counts, plain=isinstance(model.head, SequentialHeads))
    log.info(
        "verify-step cost (ms) by batch size and drafts: %s; plain steps: %s",
        {b: [round(c * 1e3, 2) for c in row] for b, row in costs.items()},
        {b: round(c * 1e3, 2) for b, c in plain.items()},
    )
    return costs, plain
