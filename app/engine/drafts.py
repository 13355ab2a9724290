"""How many drafts a greedy verify pass carries: the count with the most expected tokens per second.

A verify pass over [cur, d_1..d_n] emits 1 + (accepted drafts) tokens; draft j counts only if
drafts 1..j all agree, which happens with rate a_j (measured per draft position as the batch
runs). Its cost grows with the tokens verified, steeply where the forward is compute-bound (large
batches) and hardly at batch 1, where the pass is overhead-bound. So the policy times one
step at each (batch size, n) once, at start-up, and each step picks

    n* = argmax_n (1 + a_1 + .. + a_n) / (cost(batch, n) + around(batch))

around(batch) is the work the core does around each step, outside the step's timed part: the
batch's bookkeeping before and after its forward call (this choice, the rows' limits, the
new positions), the thread policy, turning the step's tokens into events and handing them
over, the core loop. The timed part is the forward call alone, up to its tokens read back,
as the start-up table times it: timed with the bookkeeping, as it first was, the choice that
ran carried work that the start-up timings of the others, which do none of it, left out.
It is about the same whatever the step verifies, so it weighs on a step that emits fewer
tokens. At one stream served one-module passes took 0.55-0.61 ms of forward time where the
policy had timed 0.41-0.54 for their steps, and the core's work between passes came on top (benchmark 51):
close as the two are at batch 1, on the timed parts alone plain won by its margin where whole
passes of one module emitted as many tokens per second or more. It is measured as the gap
between one greedy step's timed part and the next one's, with no other pass between (the
median of the last OVERHEAD_STEPS at each batch size).

Sequential (DeepSeek-V3) modules make every drafting step pay for the k-1 module blocks that
draft for the next one, even one that verifies few of their drafts. There the policy may also
pick a shallow step, shallow(d): the first d modules draft, and the step verifies those d
(d = 0 is PLAIN, a step that drafts nothing). Its rows keep only d modules for good: a
module that skips a step leaves its cache without that step's positions, so its later drafts
would be worse than measured. So a shallow choice with modules must beat the best n by a
margin (SHALLOW_MARGIN), and a batch whose rows are shallow chooses only among shallower steps.
PLAIN, which ends speculation, goes the other way: drafting must beat it by 1 / PLAIN_MARGIN
(10 %). Drafting rows pay for what the timed step leaves out: the modules' pass over each
prompt (9.98 against 7.76 ms for a batch-1 request), the cold steps after each switch of
graph, the re-timing runs. Where the table put the one-module step and plain within 10 % of
each other, as it did at batch 1 and at batch 16 at long keys on this project's CPU host, a
margin the other way (plain had to win by 10 %) kept drafting, and requests that did not
speculate made 5-16 % more tokens per second than the policy's (benchmarks 67, 68). Rows
admitted later draft with every module
again, and the choice is made anew for them, before their prefill (DecodeBatch.plan): rows that
will run plain skip the modules' pass over their prompts, and shallow ones run only the modules
they keep. Large batches, which are compute-bound, go
plain; at batch 1, which is overhead-bound, a step with one module verifying one draft can
beat one with all of them verifying more.

The start-up table is only a first estimate: a noisy neighbour during those few milliseconds
would otherwise fix a wrong choice for the life of the process. So each greedy step's own
duration is verified back (`observe_cost`), a cost is the median of the recent steps at that
(batch, n), and every so many steps at a batch size a run of EXPLORE_RUN steps re-times the
draft count seen least recently. Such a run costs: its steps verify another count than the best,
and the graphs it switches between are cold for a few steps: at one stream, holding the same
count as a fixed one, the policy made 7 % fewer tokens per second than it with a run every 32
steps (docs/benchmarks.md, benchmark 22). So the interval starts at EXPLORE_EVERY steps and
doubles after each run, up to MAX_EXPLORE_EVERY, while the choice holds; when the choice moves,
it is back at EXPLORE_EVERY. Start-up timings are medians of interleaved rounds, and capped at
what n+1 plain steps would cost (feeding n+1 tokens in one pass never costs more).

A shallow step (PLAIN included) cannot be re-timed in passing: running one commits its rows to
it. So its cost would stay the start-up one for as long as another choice wins, and a noisy
moment at start-up that timed a plain step at twice its cost would keep its batch size on a
slower choice for the life of the process. Instead, a shallow step not timed
for a period of greedy steps is chosen once, at a choice for rows deeper than it (below:
at their last tokens where it can wait), a run of SHALLOW_RETIME_RUN steps (its rows keep
that depth); its warm steps, the last five of the run,
replace its timings, as a draft count's re-timing does. Five, not one: the run's first timed
step is the WARM_STEP-th after a prefill, and one step alone that read dear by chance kept a
batch size off the shallow step for another whole period. The price is one batch's rows at a
possibly worse depth once a period. The period starts at SHALLOW_RETIME_EVERY steps, doubles after each re-timing up to
SHALLOW_RETIME_STEPS, and is back at SHALLOW_RETIME_EVERY when the choice at that batch size
moves. A fixed period of 4,096 steps, whose re-timings joined the step's window, kept a
worse choice for thousands of steps after any stretch of dear steps: a neighbour's burst on
the cores made the running one-module step dear for tens of steps at one stream, its median
passed plain's, and every later request went plain, while the one-module step kept the dear
timings of that stretch (benchmark 51). (A thread count's table, below, begun later counts
its period from its start.)

A re-timing's rows keep the depth it gives them for the rest of their lives, so where it falls
in a request decides its price: at one stream it fell at the first step past its period,
and the rest of that request ran the worse choice, about half a request each time. In a fresh
server's first few dozen requests, where the periods are short, a server on the default model
ran requests plain or with one module that way, where offline two drafts made 7-23 % more
tokens per second than plain (benchmark 71). So each choice is told the most tokens its rows
may still emit (their budgets, `left`), and a re-timing the rows could still take later (one
shallower than the choice now) waits for their last RETIME_TAIL tokens, or a period more at
most (rows that stop early, batches that rows keep joining). One deeper than the choice now
cannot wait: rows past it cannot get their modules back. Rows that run shallow are offered
the shallower re-timings too, at their own last tokens.

A step's cost also grows with the keys it attends: a compiled CPU step reads the filled part
of the cache, so its cost rises with the longest row's length. Taken as they
were, timings made at different lengths were set against each other as equals: sixteen rows
that start and end together time plain steps at the end of a wave, 200 positions on, and a
re-timing of the one-module step at the start of the next one, so that step read cheap, and
the wave's rows kept it, at twice a plain step's cost, for most of a request (benchmark 53).
So each timing comes with its step's key length (the largest position of its rows) and is
brought to the length the start-up table was timed at (`position`) with the seconds per key
position that the timings themselves show: the slope of each choice's medians by key bucket
about its own mean, re-estimated every KEY_EVERY timings at a batch size; and each choice is
weighed at the key length of the step being chosen. The slope is each choice's own where its
timings span two buckets (`step_us_per_key_by_choice` in /info), else the one all choices'
timings share (`step_us_per_key`). One shared slope, as it first was, assumed the same cost per
position whatever the step verifies; but a step that verifies a draft attends the keys with more
query positions and, with modules, in more layers, so its cost may grow by more per position.
Under one slope fitted mostly to the timings of the choice that runs most, another choice's
timings at other lengths are brought to the timing position by the wrong amount, and its cost
at the length being chosen for is wrong by as much (benchmark 68).
Where no choice has been timed across two buckets the slope is 0, which is how every timing
was taken before. It is capped at half the cheapest start-up step over `position`, so that no
choice's cost at a short length falls below half its timing.

Timings are kept per intra-op thread count. The thread policy (threads.py) runs a batch size
at one thread or at all of them, and re-times the other now and then; a step at one thread costs
more, and by another ratio for each draft count. Mixed in one window, a stretch of one-thread
steps made the draft count that ran look dearer than the others, timed at two threads, and
turned the batch-1 choice to plain steps on a quiet machine. So each thread count has its own
table, which starts from the start-up timings and follows the steps run at that count. Those
timings were made at the start-up count: in another count's table, a draft count not yet timed
there is its start-up timing times the median ratio, over the counts timed there, of their
timing there to their start-up one. Taken as they were, the thread policy's one-thread
re-timings (two steps, every so often) read the running draft count at one thread, twice its
cost, against the others at two, so the choice moved at each of them and each move brought
the draft re-timings back every EXPLORE_EVERY steps (benchmark 25).

Only warm steps are timed: the WARM_STEP-th or later of a row of steps of the same batch size,
draft count and thread count, with no other pass (a prefill, a /predict pass: `interrupted`)
between. Timing from the second step of such a row, as the policy first did, let each request's
prefill decide its choice for good at one stream: the prefill chose a drafting step (one module
verifying one draft), whose second step, still cold from the eager prefill, was timed dear (the
servers held two to six times its warm cost); that timing moved the median past the plain
step's, and the row went plain at its second or third step. Plain steps, which then ran the
rest of each request, were timed warm; the drafting steps only ever right after a prefill
(benchmark 50). The first
step after a change is cold: a compiled step of another shape is another
graph, with its own copy of the weights (Inductor freezes them into each graph) to bring back
into the CPU's caches. A batch-1 step took 0.249 ms warm and 0.476 ms after 31 steps of another
width (`mtp bench step --autotune`, docs/bench/step-switch.json), so timing single steps between
others made every draft count but the running one look about twice its cost. A re-timing run's first
step is not timed. A graph also stays cold for a few steps: the 2nd to 6th steps after the switch
took 1.55, 1.26, 1.12, 1.06 and 1.03 times a warm one (docs/benchmarks.md, benchmark 5, run 6).
Taken as they were, re-timings read each count that was not running about 1.5 times dearer than
it runs, so the count that ran first kept winning. Setting a run's second step against the
running count's second step back (benchmark 22) was still unfair: the graph re-timed had waited
hundreds of steps, the running one two, and at one stream the policy still held 3 drafts where
5 emit more in half of the runs (benchmark 25). So a re-timing is a run of EXPLORE_RUN steps,
and only its last, warm one (the 6th after the switch) is timed, taken as it is. Its steps verify
another count than the best, which is why the interval grows so fast. And a re-timing replaces
the count's timings rather than joining them: a count that ran slowly for a while (the first
seconds of serving) and then lost kept those steps in its window, and one re-timing per
interval, the interval doubling while the choice held, would take thousands of steps to
outvote them. One warm step is the count's cost until it runs again; a re-timing that reads
fast by chance makes the count run, where its own steps show what it costs, and the choice
moves back. Each move brings the interval back to EXPLORE_EVERY, so two counts within noise of
each other (3 and 5 drafts at batch 1, 5 % apart) traded places every few hundred steps, each
time paying re-timing runs anew: another count must promise MOVE_MARGIN times the running
one's tokens per second to replace it. So
start-up rounds, which set the costs of the shapes that do not run until they are chosen (shallow
steps: until chosen or re-timed, since their rows keep the fewer modules for good), run each compiled
shape STARTUP_WARM_STEPS times in a row before the one they time (an eager one once: eager
steps share one copy of the weights).

A step's drafts add tokens only to the rows that draft; a row that stopped speculating (PLAIN
made it plain, or its request asked for no speculation) emits one token whatever the step
verifies, though it rides in the wider pass and pays for its modules. So the expected tokens
per row are 1 + s (a_1 + .. + a_n), s the share of the rows that draft (`speculating`). Taken
for every row, as they were, one request joining fifteen plain rows at batch 16 was given the
one-module step (1.6 tokens per row expected, the key length's shared cost narrowing plain's
lead), and the whole batch ran it, at twice a plain step's cost, until that one row ended
(benchmark 68).

Greedy output does not depend on n. Sampled rows do (through their random draws), so a batch
with a sampled speculative row always verifies every draft: a seeded request then gives the
same text whatever shares its batch.
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
EXPLORE_EVERY = 32  # steps at a batch size between re-timings of the draft count measured least recently, at first
MAX_EXPLORE_EVERY = 1024  # ... doubling up to this while the choice holds (back to EXPLORE_EVERY when it moves)
WARM_STEP = 6  # a greedy step is timed only as the WARM_STEP-th or later in a row of its shape (module doc)
EXPLORE_RUN = WARM_STEP  # ... in a run of this many steps, of which only the last (warm by then) is timed
SHALLOW_RETIME_EVERY = 512  # greedy steps after which a shallow step not timed since is re-timed, at first ...
SHALLOW_RETIME_STEPS = 4096  # ... doubling after each re-timing up to this while the choice holds (module doc)
SHALLOW_RETIME_RUN = WARM_STEP + 4  # ... in a run of this many steps on one full-depth choice's rows (5 timed)
RETIME_TAIL = 2 * SHALLOW_RETIME_RUN  # ... begun once the rows may emit at most this many more tokens (module doc)
STARTUP_WARM_STEPS = 4  # untimed steps of a shape in a row before each start-up timing of it (its 5th)
PLAIN = -1  # choose(): a step that drafts nothing, and its rows stop speculating (sequential heads)
PLAIN_MARGIN = 1 / 1.1  # PLAIN must give this many times the best draft count's tokens/s: drafting must win by 10 %
SHALLOW_MARGIN = 1.05  # ... and a shallow step with modules this many times: its rows lose the deeper drafts
MOVE_MARGIN = 1.03  # another draft count must promise this many times the running one's tokens/s to replace it
OVERHEAD_STEPS = 64  # gaps between greedy steps kept per batch size; their median is the work around a step
TIMING_POSITION = 64  # the position the start-up table times its steps at (less where the model's context is short)
KEY_BUCKET = 32  # the key lengths of a step's timings are grouped by this many positions to estimate their cost
KEY_STEPS = 512  # warm timings kept per batch size (with their choice and key length) for that estimate ...
KEY_EVERY = 128  # ... which is made again after each this many of them
KEY_BUCKET_STEPS = 3  # a bucket counts in it with at least this many timings of one choice


def shallow(depth: int) -> int:
    """choose()'s answer for a step whose first `depth` modules draft and which verifies those
    drafts; its rows keep `depth` modules for good (sequential heads). shallow(0) is PLAIN."""
    return -1 - depth


def shallow_depth(choice: int) -> int | None:
    """The depth of a shallow choice (0 for PLAIN), or None for a draft count n >= 0."""
    return -1 - choice if choice < 0 else None


class Window(deque[float]):
    """Recent step timings (or gaps) whose median is computed once after each change.

    Each choice compares the medians of every draft count's and shallow depth's window, and
    of the work around a step (a window of OVERHEAD_STEPS), where a step changes one or two
    of them: sorted at every choice, most of them had not changed since the last one. Every
    mutating method forgets the median."""

    def __init__(self, values: Iterable[float] = (), maxlen: int | None = None) -> None:
        super().__init__(values, maxlen)
        self._median: float | None = None

    def median(self) -> float:
        if self._median is None:
            self._median = statistics.median(self)
        return self._median


def _forgetting(name: str) -> Callable[..., Any]:
    method = getattr(deque, name)

    def forget(self: Window, *args: Any) -> Any:
        self._median = None
        return method(self, *args)

    forget.__name__ = name
    return forget


for _name in (
    "append",
    "appendleft",
    "extend",
    "extendleft",
    "insert",
    "pop",
    "popleft",
    "remove",
    "clear",
    "rotate",
    "reverse",
    "__setitem__",
    "__delitem__",
    "__iadd__",
):
    setattr(Window, _name, _forgetting(_name))


def median(window: Iterable[float]) -> float:
    """A window's median: cached for a Window, computed for any other collection."""
    return window.median() if isinstance(window, Window) else statistics.median(window)


@dataclass
class Timings:
    """One intra-op thread count's recent step timings (DraftPolicy.table)."""

    recent: dict[int, list[deque[float]]]
    shallow: dict[int, dict[int, deque[float]]]
    last_seen: dict[int, list[int]]
    shallow_seen: dict[int, dict[int, int]]  # [batch][depth]: the policy's clock when last timed (or re-timed)
    timed: dict[int, set[int]] = field(default_factory=dict)  # [batch]: the draft counts timed at this count
    # (batch, depth) of shallow steps whose re-timing began: their next timing replaces their window
    retimed: set[tuple[int, int]] = field(default_factory=set)
    # [batch]: (choice, key length, seconds) of the recent warm timings, and the seconds a step's cost
    # grows by per key position that they show (module doc)
    keyed: dict[int, deque[tuple[int, int, float]]] = field(default_factory=dict)
    per_key: dict[int, float] = field(default_factory=dict)
    # [batch][choice]: the same for a choice from its own timings, where they span two key buckets
    own_key: dict[int, dict[int, float]] = field(default_factory=dict)
    key_clock: dict[int, int] = field(default_factory=dict)  # [batch]: keyed timings taken, all told


class DraftPolicy:
    def __init__(
        self,
        max_drafts: int,
        costs: dict[int, list[float]],
        choices: list[int] | None = None,
        shallow: dict[int, dict[int, float]] | None = None,
        position: int = TIMING_POSITION,
    ) -> None:
        """costs[batch] = step seconds with n = 0 .. max_drafts drafts verified, for a few batch sizes;
        choices: the draft counts a step may verify (compiled steps: the widths compiled), default all;
        shallow[batch][d] = seconds of a step whose first d < max_drafts modules draft and which
        verifies d drafts (d = 0: one that drafts nothing; sequential heads): shallow(d) becomes
        a choice. position: the largest position of the rows those steps were timed at (the key
        length their costs are for)."""
        self.max_drafts = max_drafts
        self.position = position
        self.keys: int | None = None  # the key length of the step being chosen (choose()), if given
        self.left: int | None = None  # ... and the most tokens its rows may still emit, if given
        self.share = 1.0  # ... and the share of its rows that draft
        self.choices = sorted(set(choices)) if choices is not None else list(range(max_drafts + 1))
        self.batches = sorted(costs)
        self.costs = costs
        self.start_shallow = shallow or {}
        self.offered = [0] * max_drafts  # verify passes in which draft position j was offered
        self.accepted = [0] * max_drafts  # ... and accepted
        self._expected_tokens: list[float] | None = None  # _expected(), until observe() changes the rates
        self.steps = dict.fromkeys(costs, 0)  # choices made per measured batch size
        self.made: Counter[tuple[int, int]] = Counter()  # choices made, by (batch, choice): for the benchmarks
        self.until_explore = dict.fromkeys(costs, EXPLORE_EVERY)  # steps at a batch size to its next re-timing run
        self.explore_every = dict.fromkeys(costs, EXPLORE_EVERY)  # ... and the interval after that run
        self.shallow_every = dict.fromkeys(costs, SHALLOW_RETIME_EVERY)  # greedy steps a shallow timing stays fresh
        self.chosen: dict[int, int] = {}  # the last choice at each batch size (a change shortens the interval)
        self.tables: dict[int, Timings] = {}  # by intra-op thread count (the module's doc)
        # the count of the core's last choice or timing (its thread's; torch keeps one per
        # thread): the accessors below read that count's table, from whatever thread they run on
        self.threads = torch.get_num_threads()
        self.startup_threads = self.threads  # the count the start-up table was timed at (the core's, then)
        self.last: tuple[int, int, int] | None = None  # the last step's (batch, n, threads)
        self.streak = 0  # ... and how many steps in a row have had it, with no other pass between
        self.clock = 0  # greedy steps observed (observe_cost), at any batch size: how stale a shallow timing is
        self.retiming: tuple[int, int, int] | None = None  # (batch, shallow choice, steps left) of a re-timing run
        # (batch, n, timed) of the draft-count re-timing run under way; timed: this is its last step
        self.exploring: tuple[int, int, bool] | None = None
        # the work around each step (module doc): the recent gaps between one greedy step's timed
        # part and the next one's, by batch size, and the end of the last timed part, (batch, when)
        self.overhead: dict[int, deque[float]] = {b: Window(maxlen=OVERHEAD_STEPS) for b in costs}
        self.ended: tuple[int, float] | None = None
        self.now: Callable[[], float] = time.perf_counter  # the clock of those gaps (tests set their own)

    def table(self) -> Timings:
        """The timings of the thread count the core runs at (self.threads), begun from the start-up ones."""
        if (table := self.tables.get(self.threads)) is None:
            table = self.tables[self.threads] = Timings(
                recent={b: [Window([c], maxlen=RECENT_STEPS) for c in row] for b, row in self.costs.items()},
                shallow={
                    b: {d: Window([c], maxlen=RECENT_STEPS) for d, c in sorted(row.items()) if d < self.max_drafts}
                    for b, row in self.start_shallow.items()
                    if b in self.costs
                },
                last_seen={b: [0] * (self.max_drafts + 1) for b in self.costs},
                shallow_seen={  # a table begun later waits a whole period too
                    b: dict.fromkeys((d for d in row if d < self.max_drafts), self.clock)
                    for b, row in self.start_shallow.items()
                    if b in self.costs
                },
            )
        return table

    @property
    def recent(self) -> dict[int, list[deque[float]]]:
        """recent[batch][n]: the last timings of steps verifying n drafts (at this thread count)."""
        return self.table().recent

    @recent.setter
    def recent(self, value: dict[int, list[deque[float]]]) -> None:
        self.table().recent = value

    @property
    def shallow(self) -> dict[int, dict[int, deque[float]]]:
        """shallow[batch][d]: the last timings of shallow steps of depth d (at this thread count)."""
        return self.table().shallow

    @shallow.setter
    def shallow(self, value: dict[int, dict[int, deque[float]]]) -> None:
        self.table().shallow = value

    @property
    def last_seen(self) -> dict[int, list[int]]:
        """last_seen[batch][n]: the step count when n was last timed (at this thread count)."""
        return self.table().last_seen

    @property
    def shallow_seen(self) -> dict[int, dict[int, int]]:
        """shallow_seen[batch][d]: the clock when shallow d was last timed or re-timed (at this thread count)."""
        return self.table().shallow_seen

    def cost(self, batch: int) -> list[float]:
        """Current seconds per step at n = 0 .. max_drafts for a measured batch size: medians of
        recent steps. At a thread count other than the start-up one, a draft count not yet timed
        there costs its start-up timing times the median ratio of those timed there to theirs
        (the module's doc)."""
        table = self.table()
        row = [median(window) for window in table.recent[batch]]
        if self.threads == self.startup_threads or not (timed := table.timed.get(batch)) or len(timed) == len(row):
            return row
        start = self.costs[batch]
        factor = statistics.median(row[n] / start[n] for n in timed)
        return [c if n in timed else start[n] * factor for n, c in enumerate(row)]

    def around(self, batch: int) -> float:
        """Seconds of work around each step at a measured batch size, outside its timed part:
        the median of the recent gaps between consecutive greedy steps (0 until one is seen)."""
        gaps = self.overhead.get(batch)
        return median(gaps) if gaps else 0.0

    def _bucket(self, batch: int) -> int:
        return self.batches[min(bisect.bisect_left(self.batches, batch), len(self.batches) - 1)]

    def rates(self) -> list[float]:
        """a_j: the rate at which the first j drafts are all accepted."""
        out, prev = [], 1.0
        for j in range(self.max_drafts):
            prev = (self.accepted[j] + PRIOR_STEPS * PRIOR_CONDITIONAL * prev) / (self.offered[j] + PRIOR_STEPS)
            out.append(prev)
        return out

    def choose(
        self,
        batch: int,
        depth: int | None = None,
        threads: int | None = None,
        keys: int | None = None,
        speculating: int | None = None,
        left: int | None = None,
    ) -> int:
        """Drafts to verify in a pass over `batch` rows, or a shallow choice. depth: the most
        modules any of the rows keeps (below max_drafts after a shallow choice): such a batch
        may only go shallower. threads: the intra-op thread count the step will run at, whose
        table decides (default: this thread's count now; a choice made during a prefill, which
        may run at another count, passes the step's). keys: the step's key length, the largest
        position of its rows, at which the choices' costs are compared (module doc).
        speculating: how many of the rows draft (default: all); the others emit one token
        whatever the step verifies, so only this share of the rows gains by drafts (module doc).
        left: the most tokens any of the rows may still emit (their budgets), which puts off a
        shallow step's re-timing to the rows' last steps (module doc); None: not known."""
        self.keys = keys
        self.left = left
        self.share = 1.0 if speculating is None else min(max(speculating, 0), batch) / batch
        choice = self._choose(batch, depth, threads)
        self.made[batch, choice] += 1
        return choice

    def _choose(self, batch: int, depth: int | None, threads: int | None) -> int:
        if not self.batches or self.max_drafts == 0:
            return self.max_drafts
        self.threads = torch.get_num_threads() if threads is None else threads
        b = self._bucket(batch)  # the nearest measured batch size at or above
        if (run := self._retiming(b, depth)) is not None:
            return run
        if depth is not None and depth < self.max_drafts:
            return self._shallower(b, depth)
        self.steps[b] += 1
        self.until_explore[b] -= 1
        if self.until_explore[b] < EXPLORE_RUN:  # a run: its steps before the last warm the graph,
            seen = self.last_seen[b]  # untimed, and leave last_seen as it was, so all re-time one n
            n = min(self.choices, key=lambda n: seen[n])
            last = self.until_explore[b] == 0
            self.exploring = (b, n, last)
            if last:  # the next interval is twice the last
                self.explore_every[b] = min(2 * self.explore_every[b], MAX_EXPLORE_EVERY)
                self.until_explore[b] = self.explore_every[b]
            return n
        self.exploring = None
        best = self.best(b, self.share)
        if best != self.chosen.setdefault(b, best):  # the choice moved: re-time the others soon again
            self.chosen[b] = best
            self.explore_every[b] = EXPLORE_EVERY
            self.until_explore[b] = min(self.until_explore[b], EXPLORE_EVERY)
            self.shallow_every[b] = SHALLOW_RETIME_EVERY
        stale = self._stale_shallow(b, best)
        return best if stale is None else stale

    def _retiming(self, b: int, depth: int | None) -> int | None:
        """The next step of a shallow re-timing run at b, if one is under way there on rows of
        its depth (the ones it began on); any other step ends the run."""
        if self.retiming is None:
            return None
        rb, choice, left = self.retiming
        if rb != b or left <= 0 or depth != shallow_depth(choice):
            self.retiming = None
            return None
        self.retiming = (rb, choice, left - 1) if left > 1 else None
        return choice

    def _stale_shallow(self, b: int, best: int, depth: int | None = None) -> int | None:
        """A shallow choice at b (not `best`; shallower than `depth`, the rows' modules, if given)
        whose timing is shallow_every[b] steps old: the least recently timed one, whose re-timing
        run starts now; else None. One that the rows could still take after `best` (a shallower
        one) waits for their last RETIME_TAIL tokens, up to a period more (module doc)."""
        seen = self.shallow_seen.get(b, {})
        stale = [
            d
            for d, at in seen.items()
            if self.clock - at >= self.shallow_every[b] and shallow(d) != best and (depth is None or d < depth)
        ]
        if not stale:
            return None
        d = min(stale, key=lambda d: seen[d])
        after = shallow_depth(best)
        later = d < (self.max_drafts if after is None else after)  # the rows can still go there after `best`
        if (
            later
            and self.left is not None
            and self.left > RETIME_TAIL
            and self.clock - seen[d] < 2 * self.shallow_every[b]
        ):
            return None
        seen[d] = self.clock  # once per period, even if its rows end before a warm step is timed
        self.table().retimed.add((b, d))
        self.shallow_every[b] = min(2 * self.shallow_every[b], SHALLOW_RETIME_STEPS)
        if d > 0:  # PLAIN needs no run: its rows stop speculating, and each of their steps is timed
            self.retiming = (b, shallow(d), SHALLOW_RETIME_RUN - 1)
        return shallow(d)

    def best(self, b: int, share: float = 1.0) -> int:
        """The draft count with the most expected tokens per second at measured batch size b, or
        a shallow choice (PLAIN among them) that beats it by its margin; share: of the rows that
        draft (choose's `speculating`)."""
        around = self.around(b)
        cost = [c + around + self._key_cost(b, n) for n, c in enumerate(self.cost(b))]
        expected = self._expected(share)
        n = max(self.choices, key=lambda n: (expected[n] / cost[n], -n))
        held = self.chosen.get(b, n)
        if held in self.choices and n != held and expected[n] / cost[n] < MOVE_MARGIN * expected[held] / cost[held]:
            n = held  # within the margin of the count that runs: noise, not a reason to move
        return self._or_shallower(b, n, expected[n] / cost[n], range(self.max_drafts), expected)

    def _shallower(self, b: int, depth: int) -> int:
        """The choice for a batch whose rows keep at most `depth` modules: that depth, or a
        shallower one that beats it by the margin."""
        row = self.shallow.get(b, {})
        if depth not in row:  # not timed at b: keep it
            return shallow(depth)
        expected = self._expected(self.share)
        rate = expected[depth] / self._shallow_cost(b, depth)
        choice = self._or_shallower(b, shallow(depth), rate, range(depth), expected)
        stale = self._stale_shallow(b, choice, depth)
        return choice if stale is None else stale

    def _shallow_cost(self, b: int, d: int) -> float:
        """Seconds of a step of shallow(d) at b, with the work around it, at the key length being chosen for."""
        return median(self.shallow[b][d]) + self.around(b) + self._key_cost(b, shallow(d))

    def _or_shallower(self, b: int, choice: int, rate: float, depths: range, expected: list[float]) -> int:
        """`choice`, expected to emit `rate` tokens per second, or the shallow depth among `depths`
        (timed at b) whose rate beats it by the most, where that is more than its margin."""
        best, score = choice, rate
        for d in reversed(depths):  # deeper first: a tie keeps more modules
            if d in self.shallow.get(b, {}):
                margin = PLAIN_MARGIN if d == 0 else SHALLOW_MARGIN
                if (s := expected[d] / self._shallow_cost(b, d) / margin) > score:
                    best, score = shallow(d), s
        return best

    def _slope(self, b: int, n: int) -> float:
        """Seconds per key position a step of choice n at b grows by: its own, where its timings
        show it, else the one shared by all choices (module doc)."""
        table = self.table()
        own = table.own_key.get(b, {})
        return own[n] if n in own else table.per_key.get(b, 0.0)

    def _key_cost(self, b: int, n: int) -> float:
        """Seconds a step of choice n at b costs at the key length being chosen for (self.keys)
        beyond its cost at the timing position (module doc)."""
        return 0.0 if self.keys is None else self._slope(b, n) * (self.keys - self.position)

    def _at_position(self, batch: int, n: int, keys: int | None, seconds: float) -> float:
        """A warm timing of choice n at `keys` positions, brought to the timing position with the
        cost per key position known now; it also joins the timings that cost is estimated from."""
        if keys is None:
            return seconds
        table = self.table()
        samples = table.keyed.setdefault(batch, deque(maxlen=KEY_STEPS))
        samples.append((n, keys, seconds))
        table.key_clock[batch] = (seen := table.key_clock.get(batch, 0) + 1)
        if seen % KEY_EVERY == 0:
            cheapest = min([*self.costs[batch], *self.start_shallow.get(batch, {}).values()])  # at start-up
            cap = cheapest / (2 * self.position) if self.position > 0 else float("inf")
            table.per_key[batch] = min(per_key_cost(samples), cap)
            table.own_key[batch] = {c: min(slope, cap) for c, slope in per_key_costs(samples).items()}
        return seconds - self._slope(batch, n) * (keys - self.position)

    def _expected(self, share: float = 1.0) -> list[float]:
        """Tokens per row a pass verifying n = 0 .. max_drafts drafts is expected to emit (kept
        until `observe` changes the rates: a step reads it two or three times), where `share` of
        the rows draft: the others emit one token whatever the pass verifies."""
        if self._expected_tokens is None:
            expected = [1.0]
            for a in self.rates():
                expected.append(expected[-1] + a)
            self._expected_tokens = expected
        if share >= 1.0:
            return self._expected_tokens
        return [1.0 + share * (e - 1.0) for e in self._expected_tokens]

    def expected_tokens(self, n: int) -> float:
        """Tokens a row of a pass verifying n drafts is expected to emit: 1 + a_1 + .. + a_n."""
        expected = self._expected()
        return expected[min(n, len(expected) - 1)]

    def began(self, batch: int) -> None:
        """A step's timed part begins: the gap since the last greedy step's timed part ended,
        with no other pass between, is the work around a step at this batch size."""
        if self.ended is not None and self.ended[0] == batch and batch in self.overhead:
            self.overhead[batch].append(self.now() - self.ended[1])
        self.ended = None

    def observe_cost(self, batch: int, n: int, seconds: float, keys: int | None = None) -> None:
        """A greedy step's duration (n: a draft count, or a shallow choice that ran, PLAIN for a
        step that drafted nothing); only exact measured batch sizes count (a smaller batch costs
        less), and only warm steps (see the module's doc). keys: the step's key length, the
        largest position of its rows before it."""
        self.ended = (batch, self.now())
        self.threads = torch.get_num_threads()
        self.clock += 1
        shape = (batch, n, self.threads)
        self.streak = self.streak + 1 if self.last == shape else 1
        self.last = shape
        exploring = self.exploring  # set by choose() for each step of a re-timing run
        if self.streak < WARM_STEP:
            return
        if (d := shallow_depth(n)) is not None:
            if d in self.shallow.get(batch, {}):
                if (batch, d) in (retimed := self.table().retimed):  # its re-timing is its cost (module doc)
                    retimed.discard((batch, d))
                    self.shallow[batch][d].clear()
                self.shallow[batch][d].append(self._at_position(batch, n, keys, seconds))
                self.shallow_seen[batch][d] = self.clock
        elif batch in self.recent and n in self.choices:
            window = self.recent[batch][n]
            if exploring is not None and exploring[:2] == (batch, n):
                if not exploring[2]:
                    return  # a re-timing run's step before its last: still cold
                if n != self.chosen.get(batch):  # one not running: its re-timing is its cost (module doc)
                    window.clear()
            window.append(self._at_position(batch, n, keys, seconds))
            self.last_seen[batch][n] = self.steps[batch]
            self.table().timed.setdefault(batch, set()).add(n)

    def interrupted(self) -> None:
        """Another pass ran (a prefill, a /predict pass): the next steps are cold, not timed, and
        the gap before the next one is not the work around a step."""
        self.last, self.streak, self.ended = None, 0, None

    def describe(self) -> dict[str, object]:
        """What the policy does now, for /info."""
        out: dict[str, object] = {
            "acceptance": [round(a, 3) for a in self.rates()],
            "drafts_by_batch": {b: _describe(self.best(b)) for b in self.batches},
            "step_ms": {b: [round(c * 1e3, 3) for c in self.cost(b)] for b in self.batches},
            "around_step_ms": {b: round(self.around(b) * 1e3, 3) for b in self.batches},
        }
        if per_key := self.table().per_key:  # what a key position adds to a step, where estimated
            out["step_us_per_key"] = {b: round(c * 1e6, 3) for b, c in sorted(per_key.items())}
        if own_key := self.table().own_key:  # ... by choice, where its own timings show it
            out["step_us_per_key_by_choice"] = {
                b: {str(_describe(n)): round(c * 1e6, 3) for n, c in sorted(row.items())}
                for b, row in sorted(own_key.items())
                if row
            }
        if any(self.shallow.values()):  # by depth: 0 drafts nothing, d: d modules draft, d verified
            out["shallow_step_ms"] = {
                b: {d: round(median(c) * 1e3, 3) for d, c in row.items()} for b, row in self.shallow.items()
            }
        return out

    def observe(self, offered: list[int], emitted: list[int]) -> None:
        """One step's rows: drafts offered (max_accept) and tokens emitted (accepted + 1)."""
        if any(offered):
            self._expected_tokens = None
        for m, e in zip(offered, emitted, strict=True):
            for j in range(m):
                self.offered[j] += 1
                self.accepted[j] += j < e - 1


def _key_sums(samples: Iterable[tuple[int, int, float]]) -> dict[int, tuple[float, float]]:
    """Per choice, the sums (sxy, sxx) of its medians by key bucket about its own mean, for the
    choices timed in two buckets or more (with KEY_BUCKET_STEPS timings each)."""
    by: dict[int, dict[int, list[tuple[int, float]]]] = {}
    for n, keys, seconds in samples:
        by.setdefault(n, {}).setdefault(keys // KEY_BUCKET, []).append((keys, seconds))
    sums = {}
    for n, buckets in by.items():
        points = [
            (statistics.fmean(k for k, _ in timings), statistics.median(s for _, s in timings))
            for timings in buckets.values()
            if len(timings) >= KEY_BUCKET_STEPS
        ]
        if len(points) < 2:
            continue
        mx, my = statistics.fmean(x for x, _ in points), statistics.fmean(y for _, y in points)
        sums[n] = (sum((x - mx) * (y - my) for x, y in points), sum((x - mx) ** 2 for x, _ in points))
    return sums


def per_key_cost(samples: Iterable[tuple[int, int, float]]) -> float:
    """Seconds a step's cost grows by per key position, from (choice, key length, seconds)
    timings: the slope shared by all choices of their medians by key bucket, each choice's
    buckets about its own mean (one choice runs at other lengths than another); 0 where no
    choice was timed in two buckets, and never below 0."""
    sums = _key_sums(samples).values()
    sxy, sxx = sum(xy for xy, _ in sums), sum(xx for _, xx in sums)
    return max(0.0, sxy / sxx) if sxx > 0 else 0.0


def per_key_costs(samples: Iterable[tuple[int, int, float]]) -> dict[int, float]:
    """The same slope for each choice from its own timings alone, for the choices timed in two
    key buckets or more; never below 0."""
    return {n: max(0.0, xy / xx) if xx > 0 else 0.0 for n, (xy, xx) in _key_sums(samples).items()}


def _describe(choice: int) -> int | str:
    d = shallow_depth(choice)
    return choice if d is None else "plain" if d == 0 else f"shallow {d}"


def time_steps(
    step: Callable[[int, int], None],
    batches: list[int],
    max_drafts: int,
    reps: int = 8,
    counts: list[int] | None = None,
    depths: list[int] | None = None,
    warm_steps: int | None = None,
) -> tuple[dict[int, list[float]], dict[int, dict[int, float]]]:
    """Seconds of step(batch, n_drafts) for every batch size and n = 0 .. max_drafts, and of
    step(batch, shallow(d)) for every batch size and each of `depths` (0: PLAIN), as
    {batch: {d: seconds}} (else {}).

    With `counts`, only those draft counts are run; any other n costs what the next count
    above it does (a compiled step pads its tokens to that width).

    Each shape is run once to warm it, then `reps` rounds time every shape in turn, so a burst
    of interference hits all shapes alike rather than a few; in each round a shape runs
    warm_steps (default STARTUP_WARM_STEPS) times in a row and then once timed, warm (the
    module's doc); the median of a shape's rounds is its cost. A row is then made
    non-decreasing in n (feeding more tokens never costs less) and capped at (n+1) x the
    plain step (one pass never costs more than n+1 plain ones).
    """
    timed = sorted(set(counts)) if counts is not None else list(range(max_drafts + 1))
    shapes = [(b, n) for b in batches for n in [shallow(d) for d in depths or []] + timed]
    for b, n in shapes:
        step(b, n)
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(reps):
        for b, n in shapes:
            for _ in range(STARTUP_WARM_STEPS if warm_steps is None else warm_steps):  # the shape before was another
                step(b, n)
            t0 = time.perf_counter()
            step(b, n)
            times[b, n].append(time.perf_counter() - t0)
    costs: dict[int, list[float]] = {}
    for b in batches:
        row: list[float] = []
        for n in range(max_drafts + 1):
            mid = statistics.median(times[b, next(m for m in timed if m >= n)])
            row.append(mid if not row else min(max(mid, row[-1]), (n + 1) * row[0]))
        costs[b] = row
    shallow_costs = {b: {d: statistics.median(times[b, shallow(d)]) for d in depths} for b in batches} if depths else {}
    return costs, shallow_costs


def timing_position(model: MTPTransformer) -> int:
    """The position the start-up table times steps at: TIMING_POSITION, less for a short context."""
    return max(0, min(TIMING_POSITION, model.cfg.max_seq_len - model.cfg.k))


def time_verify_steps(
    model: MTPTransformer, max_batch_size: int, compiled: CompiledDecoder | None = None, warm_steps: int | None = None
) -> tuple[dict[int, list[float]], dict[int, dict[int, float]]]:
    """Seconds of a greedy decode step at batch sizes 1, 2, 4, .. max_batch_size and 0 .. k-1
    drafts, on random tokens at position 64 (the inference thread, before any sequence holds a
    cache row). With `compiled`, the steps that will run: compiled ones where it has the shape,
    at the draft counts it compiled. With sequential heads, also the shallow steps at each batch
    size: the plain step (no modules), and d = 1 .. k-2 modules verifying d drafts (time_steps'
    second result; else {}). warm_steps: the untimed steps of a shape before each timed one;
    by default STARTUP_WARM_STEPS for compiled steps, and 1 for eager ones, which share one
    copy of the weights, so that a change of shape leaves little of a step cold."""
    k, vocab, dev = model.cfg.k, model.cfg.vocab_size, model.head.proj.weight.device
    sizes = sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
    counts = None
    widths = (compiled.greedy_widths or compiled.widths) if compiled is not None else None
    if compiled is not None and widths is not None:
        counts = [w - 1 for w in widths]  # batches past the compiled sizes run eager steps, timed as such
    pos0 = timing_position(model)
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

    def step(b: int, choice: int) -> None:
        if compiled is not None and (threads := compiled.thread_counts(b)):
            torch.set_num_threads(max(threads))  # a count the step was compiled at
        depth = shallow_depth(choice)
        if depth == 0:  # what a batch of rows that do not speculate runs: trunk and head 1 alone
            plain_step(b)
            return
        n = choice if depth is None else depth  # drafts verified; a shallow step's modules make as many
        cur, drafts, pos, max_accept, sampling, drafting = inputs.get((b, n)) or build(b, n)
        if compiled is not None and compiled.covers(b, n + 1, greedy=True, n_drafts=depth):  # what greedy batches run
            compiled.greedy_step(cur, drafts if n else None, pos, max_accept, want_drafts=True, n_drafts=depth)
        else:
            forward = compiled if compiled is not None and compiled.covers(b, n + 1) else None
            out = forward_step(model, cur, drafts if n else None, pos, compiled=forward, n_drafts=depth)
            accept_drafts(out.head1, drafts, None, max_accept, sampling, drafting, out.drafts, k - 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain_step(b: int) -> None:
        if (b, PLAIN) not in inputs:
            cur, _, pos, _, sampling, _ = inputs.get((b, 0)) or build(b, 0)
            zero = torch.zeros(b, dtype=torch.long, device=dev)
            inputs[b, PLAIN] = (cur, cur.new_zeros(b, 0), pos, zero, sampling, zero.bool())
        cur, no_drafts, pos, zero, sampling, no_rows = inputs[b, PLAIN]
        if compiled is not None and compiled.covers(b, 1, greedy=True, n_drafts=0):  # the fused plain step
            compiled.greedy_step(cur, None, pos, zero, want_drafts=False)
        else:
            forward = compiled if compiled is not None and compiled.covers(b, 1) else None
            out = forward_step(model, cur, None, pos, want_drafts=False, compiled=forward)
            accept_drafts(out.head1, no_drafts, None, zero, sampling, no_rows, None, k - 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    depths = list(range(k - 1)) if isinstance(model.head, SequentialHeads) else None
    with torch.inference_mode():
        if warm_steps is None:
            warm_steps = STARTUP_WARM_STEPS if compiled is not None else 1
        costs, shallow_costs = time_steps(step, sizes, k - 1, counts=counts, depths=depths, warm_steps=warm_steps)
    log.info(
        "verify-step cost (ms) by batch size and drafts: %s; shallow steps by depth (0: plain): %s",
        {b: [round(c * 1e3, 2) for c in row] for b, row in costs.items()},
        {b: {d: round(c * 1e3, 2) for d, c in row.items()} for b, row in shallow_costs.items()},
    )
    return costs, shallow_costs
