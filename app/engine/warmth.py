"""Which decode steps the draft and thread policies may time: warm ones only.

Each compiled step shape (batch, width, drafts made, thread count) is a graph of its own, with
its own copy of the weights (Inductor freezes them into each graph). After steps of another
shape, a graph is cold for several steps, not one: `mtp bench step --autotune` times the
1st, 2nd, .. 6th batch-1 step after 31 of another width (`steps_after_31_others` in
docs/bench/step-switch.json; docs/benchmarks.md, benchmark 5, run 6). Timing the second step
after a switch as if it were warm made every choice but the running one look dearer than it
runs, so a policy stayed with whatever it ran: the thread policy, having moved to one thread
under contention, could keep it on a quiet machine. A step is therefore timed only after
WARM_AFTER steps of its shape in a row, and a policy's re-timing is a run of EXPLORE_RUN
steps, the last EXPLORE_RUN - WARM_AFTER of them timed. Which steps share a shape is the
caller's: a decode step's graph (batch, drafts verified, fused or not) and thread count.
"""

from __future__ import annotations

from collections.abc import Hashable

WARM_AFTER = 4  # steps of one shape in a row before the next counts as warm
EXPLORE_RUN = WARM_AFTER + 2  # steps of a re-timing run: warm-up, then two timed


class Warmth:
    """Tracks the run of same-shape steps; `step(shape)` says whether this step is warm."""

    def __init__(self) -> None:
        self.shape: Hashable | None = None
        self.run = 0  # steps of self.shape in a row, this one included

    def step(self, shape: Hashable) -> bool:
        """Record a step of `shape`: True if WARM_AFTER steps of it came right before."""
        if shape == self.shape:
            self.run += 1
        else:
            self.shape, self.run = shape, 1
        return self.run > WARM_AFTER
