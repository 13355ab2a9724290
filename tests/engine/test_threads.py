"""The thread policy: each kind and size of pass runs at the thread count timed fastest now."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from app.engine.threads import MAX_INTERVAL, MIN_INTERVAL, ThreadPolicy, size_bucket
from app.engine.warmth import EXPLORE_RUN, WARM_AFTER


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pass_costing(seconds: dict[int, float]) -> object:
    """A stand-in pass whose duration depends on the threads it runs at, as under contention."""

    def run() -> int:
        n = torch.get_num_threads()
        time.sleep(seconds[n])
        return n

    return run


def test_sizes_share_timings_by_power_of_two() -> None:
    assert [size_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


def test_the_faster_count_is_chosen_and_the_other_re_timed_now_and_then() -> None:
    policy = ThreadPolicy(max_threads=2)
    slow_team = pass_costing({1: 0.0005, 2: 0.005})  # a team of two waiting on a descheduled member
    used = [policy.run(("decode", 1), slow_team) for _ in range(120)]  # type: ignore[arg-type]
    first = WARM_AFTER + 1  # each count is timed first, on its first warm pass
    assert used[: 2 * first] == [1] * first + [2] * first
    # then one thread, with one re-timing run of two threads (after MIN_INTERVAL passes)
    assert used[2 * first :].count(1) == 120 - 2 * first - EXPLORE_RUN
    assert 2 in used[2 * first + MIN_INTERVAL :]
    assert policy.describe() == {"decode/1": 1}


def test_the_choice_follows_when_the_machine_changes() -> None:
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 4)
    for _ in range(40):
        policy.run(key, pass_costing({1: 0.0005, 2: 0.003}))  # type: ignore[arg-type]
    assert policy.choose(key) == 1
    quiet = pass_costing({1: 0.003, 2: 0.0005})  # the neighbour has gone: two threads win again
    used = [policy.run(key, quiet) for _ in range(2 * MAX_INTERVAL)]  # type: ignore[arg-type]
    assert used[-32:].count(2) >= 32 - EXPLORE_RUN  # two threads again, but for a re-timing of one


def test_cold_passes_after_a_switch_do_not_hide_the_faster_count() -> None:
    """After a switch of count a pass is cold for several passes (another compiled graph, its
    weights out of the CPU's caches, a new team), dearer each pass less. Timing the second pass
    of a run of two (as before), two threads always looked slower than they run, and a policy
    that had moved to one thread under contention kept it on a quiet machine. Only passes after
    WARM_AFTER of the same count are timed, so the choice moves back to two threads."""
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    for _ in range(40):
        policy.run(key, pass_costing({1: 0.0005, 2: 0.003}))  # type: ignore[arg-type]
    assert policy.choose(key) == 1
    cold = [0.004, 0.002, 0.001, 0.0005]  # extra seconds of the 1st .. 4th pass after a switch
    last, run = [1], [WARM_AFTER + 1]

    def switching() -> int:
        n = torch.get_num_threads()
        run[0] = run[0] + 1 if n == last[0] else 1
        last[0] = n
        time.sleep({1: 0.002, 2: 0.0012}[n] + (cold[run[0] - 1] if run[0] <= len(cold) else 0.0))
        return n

    used = [policy.run(key, switching) for _ in range(2 * MAX_INTERVAL)]
    assert used[-32:].count(2) >= 32 - EXPLORE_RUN


def test_passes_of_another_graph_at_the_same_count_are_not_timed_cold() -> None:
    """The draft policy's re-timing runs change the step's graph (its draft count) at the same
    key and thread count; their cold passes do not count as this count's costs."""
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    graph = ["a"]
    run = [0]

    def step() -> int:
        run[0] += 1
        time.sleep(0.02 if run[0] <= WARM_AFTER else 0.0005)  # cold after a switch of graph
        return torch.get_num_threads()

    for _ in range(40):
        policy.run(key, step, graph=lambda: graph[0])
    graph[0], run[0] = "b", 0  # a run of another draft count
    for _ in range(EXPLORE_RUN):
        policy.run(key, step, graph=lambda: graph[0])
    assert max(max(times) for times in policy.recent[key].values()) < 0.01


def test_one_core_has_nothing_to_choose() -> None:
    policy = ThreadPolicy(max_threads=1)
    assert policy.run(("prefill", 32), lambda: torch.get_num_threads()) == 1
    assert policy.describe() == {}
