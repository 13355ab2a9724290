"""How many intra-op threads a decode step uses: the count that runs it fastest now.

On a quiet 2-core machine two OpenMP threads serve the most. With a busy process on one of
the cores, a team of two waits at every barrier of every op for whichever member the kernel
has descheduled: served single-stream /generate fell to 0.28x of its quiet speed with two
threads and kept 0.96x with one (`python -m bench.contention`, docs/benchmarks.md). A fixed
count is wrong on one machine or the other, and a neighbour's load comes and goes.

So the core loop times each decode step at the thread count it used, per batch size, and runs
each step at the count it has found faster. Now and then it re-times the other count, at an
interval that doubles (up to MAX_INTERVAL steps) while the choice holds and drops back to
MIN_INTERVAL when it changes, so an exploration step under contention costs little. The chosen
count's own steps are timed too: when the median of its steady steps drifts DRIFT times above
where its cost stood at the last re-timing (a neighbour has taken a core, and a team of two
waits on it), the other count is re-timed at the next step instead of at the end of the
interval. So the interval can be long on a quiet machine, where each re-timing costs a few
steps' time (a run at the slower count, then the cold steps back), while a neighbour's arrival
is followed within a few dozen steps. A neighbour leaving makes the one-thread steps no slower,
so that is seen at the next periodic re-timing.

The counts are compared only on timings of the same moment, and of the same distance from a
switch of count. A re-timing's timed step is the second of its run, and it is set against the
chosen count's second step after the run, its first timed one: each is a step after a switch,
whose graph's weights are not yet all back in the CPU's caches. The choice moves only
when MOVE_VOTES of the last VOTES such comparisons put the other count clearly ahead: by
SWITCH_BELOW for more threads, by SWITCH_DOWN for fewer (`lead`); one that puts it that far
ahead is repeated right after. The margins differ because a
comparison is two single passes, and what delays one of them (the server's event loop taking
a core for its turn, the first passes after a switch) delays a team of two, which waits at
each barrier for its slower member, by more than one thread: with one margin of 10 % both
ways a server on a quiet machine, where two threads were about 1.6 times as fast per token
by the policy's own timings, moved to one thread within its first
requests, back, and there again: it ran 1,134 of its first 1,279 batch-1 steps at one thread
(docs/benchmarks.md, benchmark 56). A busy neighbour
slows the team by several times, far past SWITCH_DOWN. The choice used to move
whenever the median of the chosen count's last few steps rose past the other count's timing
from its last re-timing, minutes old: a few slow steps in a row (this host's speed moves by
tens of per cent within a minute, and the server's own event loop takes its turn) were enough.
Served single-stream steps then ran at one thread for stretches of a hundred steps and more,
three times in each server's life, at 1.5-1.9 times two threads' cost per token by the policy's
own timings (docs/benchmarks.md, benchmark 36). Both sides of a comparison now see the same
moment. The chosen count's side was once the lower of its warm steps before the run and the
median of its first three after it, set against the other count's second step: a second step
after a switch costs about 1.5 times a warm one at batch 1, so the other count had to be about
1.7 times as fast once warm to win one (1.5 / SWITCH_BELOW), and servers that had moved to
one thread on a quiet machine stayed there through every later comparison, for whole
benchmark phases (docs/benchmarks.md, benchmark 47). The first choice is every thread: each
count's first timing is a single warm pass, one after the other, and a server that began at one
thread on them stayed there for its first few hundred steps; their ratio is a first comparison,
and one that puts one thread ahead is repeated at once. A neighbour's 3-100x is far past the
margin, and two counts within a few per cent of each other (batch 1, where the step is short)
do not trade places on noise.

A steady step is the STEADY-th or a later one of its graph since that graph began at its size
and count. Every warm step used to count towards drift, and a few slow ones in a row lifted the
median of five past DRIFT: the steps right after a switch of graph (the draft policy's re-timing
runs switch graphs at the same thread count every few dozen steps), and short bursts whose
cause was not found. Served in process, 16 requests made 7 and 4 drift re-timings in about
1,000 batch-1 steps, and none with steady steps and a median of DRIFT_WINDOW (`python -m
bench.thread_switch`, docs/benchmarks.md, benchmark 31). Each re-timing runs one-thread steps
at about three times a two-thread one's cost per token, and restarts the interval at
MIN_INTERVAL. A prefill, or a pass of another size, between two steps does not restart the
count: with many streams one comes every few steps, and drift would never be seen. A switch of
thread count does. A neighbour moves the median of DRIFT_WINDOW within five steady steps.

Only a pass that follows one of the same key, at the same count and running the same graph, is
timed. The first pass after a switch is cold: a compiled step at the other count is another
graph, with its own copy of the weights (Inductor freezes them into each graph) to bring back
into the CPU's caches, and a new team of threads. At batch 1 a step right after 31 steps of
another graph took 1.9 times a warm one (`mtp bench step --autotune`, docs/bench/step-switch.json),
so a single re-timing made the other count look about twice as slow as it runs. A re-timing is
therefore a run of EXPLORE_RUN passes, of which the first is not timed. The same holds when the
draft policy (drafts.py) moves a batch size to another draft count, another graph at the same
thread count, and after a prefill or /predict pass: such steps were once timed as warm, and a
draft-count re-timing's cold steps in a row lifted the chosen count's median past DRIFT and
started re-timings at one thread on a quiet machine (docs/benchmarks.md, benchmark 25).

A decode step's time is taken per token it is expected to yield (`work`: 1 + the acceptance
rates of the drafts it verified, from the draft policy). Each thread count has its own draft
table, so at one batch size the two counts may run different draft counts: a one-thread step
verifying fewer drafts is cheaper and yields fewer tokens, and per step it looked faster than
a two-thread step that serves more tokens per second. Keeping one graph's timings and
comparing the counts only there was tried and did worse: the counts' graphs differed, the
comparison never came, and whole single-stream phases stayed at one thread (benchmark 28).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")
RECENT = 5  # pass durations kept per (key, threads); their median is the cost
MIN_INTERVAL = 32  # passes of a key between re-timings of the other thread count, at first
MAX_INTERVAL = 2048  # ... doubling up to this while the same count stays fastest
DRIFT = 1.25  # the chosen count's median this many times its level at the last re-timing: re-time now

SWITCH_BELOW = 0.9  # a re-timing this much faster than the chosen count votes for a move to more threads
SWITCH_DOWN = 0.75  # ... to fewer threads: this much faster (the module doc: what biases a comparison downwards)
VOTES = 3  # the last comparisons of the two counts kept per key
MOVE_VOTES = 2  # ... of which this many must vote for the other count to move to it
EXPLORE_RUN = 2  # passes a re-timing of the other count runs; the first, cold, is not timed
STEADY = 5  # passes of one graph at a key and count from which a pass is steady: only those show drift
DRIFT_WINDOW = 9  # the chosen count's steady passes whose median shows drift: a burst of four slow ones does not
Key = tuple[str, int]  # (kind of pass, size bucket)


def lead(other: int, chosen: int) -> float:
    """The most a step at `other` threads may cost, over one at the `chosen` count's, to vote
    for a move to it: SWITCH_DOWN for fewer threads, SWITCH_BELOW for more."""
    return SWITCH_DOWN if other < chosen else SWITCH_BELOW


def size_bucket(n: int) -> int:
    """The power of two at or above n: passes of similar size share their timings."""
    return 1 << max(0, n - 1).bit_length()


class ThreadPolicy:
    def __init__(self, max_threads: int, min_interval: int = MIN_INTERVAL, max_interval: int = MAX_INTERVAL) -> None:
        self.choices = sorted({1, max(1, max_threads)})
        self.min_interval, self.max_interval = min_interval, max_interval
        self.current = 0  # unknown on the core's thread until the first pass sets it
        self.recent: dict[Key, dict[int, deque[float]]] = {}
        self.cost: dict[Key, dict[int, float]] = {}  # the medians of recent, kept as passes are timed
        self.until_explore: dict[Key, int] = {}
        self.interval: dict[Key, int] = {}
        self.best: dict[Key, int] = {}
        self.level: dict[Key, float] = {}  # the chosen count's cost at the last re-timing (DRIFT)
        self.exploring: dict[Key, int] = {}  # passes left in a re-timing run of the other count
        self.last: tuple[Key, int, Hashable] | None = None  # last pass: key, count, graph (the next is warm if equal)
        self.graph_passes: dict[tuple[Key, int], tuple[Hashable, int]] = {}  # (key, count) -> its graph, passes of it
        self.steady: dict[Key, deque[float]] = {}  # the chosen count's recent steady passes (DRIFT)
        self.passes: Counter[tuple[Key, int]] = Counter()  # passes run, by (key, threads): for the benchmarks
        self.early = 0  # re-timings started by the chosen count's drift (DRIFT), not by the interval
        self.moves: Counter[tuple[Key, int]] = Counter()  # times the choice moved to a count after its first
        # the last comparisons of the two counts at one moment: the cost at choices[0] over the cost at choices[-1]
        self.votes: dict[Key, deque[float]] = {}
        # a re-timing waiting for the chosen count's first timed pass after it: its count and its time
        self.pending: dict[Key, tuple[int, float]] = {}
        self.extended: dict[Key, int] = {}  # passes added to the current re-timing run: its warm pass did not come

    def choose(self, key: Key, allowed: Collection[int] | None = None) -> int:
        """Threads for the next pass of `key`, among `allowed` (default: every count)."""
        choices = self.choices if allowed is None else [n for n in self.choices if n in allowed] or self.choices[-1:]
        if len(choices) == 1:
            return choices[0]
        cost = self.cost.get(key)
        if cost is None or any(n not in cost for n in choices):
            return next(n for n in choices if cost is None or n not in cost)  # time every count once first
        best = self.best.get(key)
        first = False
        if best is None or best not in choices:  # every thread, the quiet machine's count; the first
            first, best = True, choices[-1]  # timings, one after the other, are a first comparison
            if not self.votes.get(key):
                self.votes[key] = deque([cost[choices[0]] / cost[choices[-1]]], maxlen=VOTES)
        elif sum(self._ahead(key, other, best) for other in choices if other != best) >= MOVE_VOTES:
            best = next(n for n in choices if n != best)
        if best != self.best.get(key):
            if key in self.best:
                self.moves[key, best] += 1
            self.best[key] = best
            self.level[key] = cost[best]
            self.steady.pop(key, None)  # the other count's steady passes
            self.interval[key] = self.until_explore[key] = self.min_interval
            if first and self._ahead(key, choices[0], best):
                self.until_explore[key] = 1  # one thread looked faster at once: compare again now
        if self.exploring.get(key):
            self.exploring[key] -= 1
            return next(n for n in choices if n != best)
        self.until_explore[key] -= 1
        if self.until_explore[key] <= 0:
            self.interval[key] = min(2 * self.interval[key], self.max_interval)
            self.until_explore[key] = self.interval[key]
            self.exploring[key] = EXPLORE_RUN - 1
            self.extended[key] = 0
            self.level[key] = cost[best]
            return next(n for n in choices if n != best)
        return best

    def run(
        self,
        key: Key,
        fn: Callable[[], T],
        allowed: Collection[int] | None = None,
        graph: Callable[[], Hashable] | None = None,
        work: Callable[[], float] | None = None,
    ) -> T:
        """Run fn at the thread count chosen among `allowed` (a compiled step: the counts it
        was compiled for; Dynamo guards on the count), and record how long it took if it was
        warm. graph: called after fn, what fn ran (a decode step: its width and modules, which
        the draft policy picks inside fn): a pass of another graph than the last is cold too.
        work: called after a warm fn, what it is expected to yield (a decode step: tokens per
        row): the time recorded is per unit of it."""
        n = self.choose(key, allowed)
        self.passes[key, n] += 1
        switched = n != self.current  # the last pass, this key's or not, ran at another count
        if switched:
            torch.set_num_threads(n)  # this thread's OpenMP team: the core runs every pass
            self.current = n
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        ran = (key, n, graph() if graph is not None else None)
        warm, self.last = self.last == ran, ran
        same = self.graph_passes.get((key, n))
        runs = same[1] + 1 if same is not None and same[0] == ran[2] and not switched else 1
        self.graph_passes[key, n] = (ran[2], runs)
        if warm:
            self._timed(key, n, seconds / work() if work is not None else seconds, runs >= STEADY)
        elif n != self.best.get(key, n) and not self.exploring.get(key) and self.extended.get(key, 0) < EXPLORE_RUN:
            # a re-timing run whose last pass was cold (another pass came between): one more pass,
            # or with a prefill every few steps its runs never time anything
            self.exploring[key] = 1
            self.extended[key] = self.extended.get(key, 0) + 1
        return result

    def run_like(self, key: Key, fn: Callable[[], T]) -> T:
        """Run fn, untimed, at the count chosen for `key` (every thread until key has a choice):
        prefills and /predict passes at the batch-1 decode step's count. The core's OpenMP team
        is the one the last decode pass left, maybe one thread for a large batch or a re-timing:
        taken as it was, /predict after 16 streams whose last steps ran at one thread stayed at
        one until the next decode step (a third fewer requests served; docs/benchmarks.md,
        benchmark 23). The batch-1 choice is the one that follows a busy neighbour: there a team
        of two waits at every barrier, and one thread is the better count for any pass. The next
        decode pass is cold after it: it is not timed."""
        n = self.best.get(key, self.choices[-1])
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
            self.current = n
        self.last = None  # the pass brings its own weights and activations into the caches
        return fn()

    def _timed(self, key: Key, n: int, seconds: float, steady: bool = False) -> None:
        """A warm pass of `key` at n threads took `seconds`; steady: its graph's STEADY-th or later."""
        if (recent := self.recent.get(key)) is None:
            recent = self.recent[key] = {c: deque(maxlen=RECENT) for c in self.choices}
        cost = self.cost.setdefault(key, {})
        best = self.best.get(key)
        if best is not None and n != best:
            self.pending[key] = (n, seconds)  # compared once the chosen count has run again
        elif (waiting := self.pending.pop(key, None)) is not None and waiting[0] != n:
            # this pass is the chosen count's second after the run, as the re-timing's was the other's second
            other, other_seconds = waiting
            lo, hi = (other_seconds, seconds) if other < n else (seconds, other_seconds)
            self.votes.setdefault(key, deque(maxlen=VOTES)).append(lo / hi)
            if other_seconds < lead(other, n) * seconds:
                self.until_explore[key] = 1  # a vote for the other count: compare again at once
        recent[n].append(seconds)
        cost[n] = statistics.median(recent[n])
        if n != best or not steady:
            return
        held = self.steady.setdefault(key, deque(maxlen=DRIFT_WINDOW))
        held.append(seconds)
        drifted = statistics.median(held)
        if drifted > DRIFT * self.level[key] and not self.exploring.get(key):
            self.until_explore[key] = min(self.until_explore[key], 1)  # slower than it was: re-time the other now
            self.early += 1
            self.interval[key] = self.min_interval
            self.level[key] = drifted

    def _ahead(self, key: Key, other: int, best: int) -> int:
        """How many of the last comparisons at one moment put `other` clearly ahead of `best` (`lead`)."""
        lo_over_hi = self.votes.get(key, ())
        return sum((r if other < best else 1 / r) < lead(other, best) for r in lo_over_hi)

    def describe(self) -> dict[str, int]:
        """The thread count each kind and size runs at now, for /info."""
        return {f"{kind}/{size}": n for (kind, size), n in sorted(self.best.items())}

    def timings(self) -> dict[str, object]:
        """What the choices were made from, for /info: per kind and size, each count's cost (the
        median of its recent warm passes, in ms per unit of work: a decode step's per expected
        token) and the passes run at it; the re-timings the chosen count's drift started; and the
        moves of the choice after its first, by the count moved to."""
        keys = sorted({key for key, _ in self.passes} | set(self.cost))
        return {
            "cost_ms": {
                f"{kind}/{size}": {
                    str(n): round(c * 1e3, 4) for n, c in sorted(self.cost.get((kind, size), {}).items())
                }
                for kind, size in keys
            },
            "passes": {
                f"{kind}/{size}": {
                    str(n): self.passes[(kind, size), n] for n in self.choices if self.passes[(kind, size), n]
                }
                for kind, size in keys
            },
            "early_retimings": self.early,
            # moves of the choice, by the count moved to: each costs cold steps and restarts the interval
            "moves": {
                f"{kind}/{size}": {str(n): m for n in self.choices if (m := self.moves[(kind, size), n])}
                for kind, size in keys
            },
        }
