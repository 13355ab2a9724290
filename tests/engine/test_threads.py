"""The thread policy: each kind and size of pass runs at the thread count timed fastest now."""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator

import pytest
import torch

from app.engine import threads
from app.engine.threads import MAX_INTERVAL, MIN_INTERVAL, ThreadPolicy, size_bucket


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class Machine:
    """A made-up clock for the policy (its time.perf_counter) and passes that advance it by
    what they would cost at the thread count they run at: exact timings, no sleeps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: dict[int, float]) -> None:
        self.now = 0.0
        self.seconds = seconds
        monkeypatch.setattr(threads, "time", types.SimpleNamespace(perf_counter=lambda: self.now))

    def run(self) -> int:
        n = torch.get_num_threads()
        self.now += self.seconds[n]
        return n


def test_sizes_share_timings_by_power_of_two() -> None:
    assert [size_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


def test_the_faster_count_is_chosen_and_the_other_re_timed_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = ThreadPolicy(max_threads=2)
    # a team of two waiting on a descheduled member; exact timings (a real 0.5 ms sleep overshot
    # on a loaded CI host, and one dear one-thread pass cost a re-timing the test did not allow)
    slow_team = Machine(monkeypatch, {1: 0.0005, 2: 0.005})
    used = [policy.run(("decode", 1), slow_team.run) for _ in range(120)]
    assert used[:4] == [1, 1, 2, 2]  # each count is timed first, on its second (warm) pass
    assert used[10:].count(1) >= 105  # then one thread, once a second comparison agrees, but for re-timings of two
    assert 2 in used[20:]
    assert policy.describe() == {"decode/1": 1}


def test_the_first_choice_is_every_thread_unless_one_thread_wins_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first timing of each count is one warm pass, one after the other: a slow moment in
    either decides the first choice. A server once began at one thread on a quiet machine and
    stayed there for its first few hundred steps until a comparison moved it. The first choice
    is every thread, and one thread is chosen when a comparison at one moment confirms it."""
    machine = Machine(monkeypatch, {1: 0.0013, 2: 0.004})  # two threads' first warm pass is slow
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    used = [policy.run(key, machine.run) for _ in range(4)]
    machine.seconds = {1: 0.0013, 2: 0.001}  # and only it
    used += [policy.run(key, machine.run) for _ in range(60)]
    assert used[:4] == [1, 1, 2, 2]
    assert used[12:].count(1) <= 2 and policy.describe() == {"decode/1": 2}
    assert policy.timings()["moves"] == {"decode/1": {}}


def test_the_choice_follows_when_the_machine_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = ThreadPolicy(max_threads=2, max_interval=256)
    key = ("decode", 4)
    machine = Machine(monkeypatch, {1: 0.0005, 2: 0.003})
    for _ in range(40):
        policy.run(key, machine.run)
    assert policy.describe() == {"decode/4": 1}
    machine.seconds = {1: 0.003, 2: 0.0005}  # the neighbour has gone: two threads win again
    used = [policy.run(key, machine.run) for _ in range(2 * 256)]
    assert used[-32:].count(2) >= 30  # two threads again, but for a re-timing of one


def test_a_cold_first_pass_after_a_switch_does_not_hide_the_faster_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass at the other count is cold (another compiled graph, its weights out of the
    CPU's caches) and costs far more than the warm ones after it. Timing single passes, the
    other count always looked slower than it runs; a re-timing is a run whose first pass is
    not timed, so the choice still moves to the count that is faster once warm."""
    policy = ThreadPolicy(max_threads=2, max_interval=256)
    key = ("decode", 1)
    machine = Machine(monkeypatch, {1: 0.0005, 2: 0.003})
    for _ in range(40):
        policy.run(key, machine.run)
    assert policy.describe() == {"decode/1": 1}
    last = [1]

    def switching() -> int:
        n = torch.get_num_threads()
        machine.now += {1: 0.002, 2: 0.0005}[n] + (0.004 if n != last[0] else 0.0)  # cold after a switch
        last[0] = n
        return n

    used = [policy.run(key, switching) for _ in range(2 * 256)]
    assert used[-32:].count(2) >= 30


def test_on_a_steady_machine_the_other_count_is_re_timed_ever_more_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each re-timing runs passes at the slower count and then cold ones back; on a quiet
    machine the interval doubles up to MAX_INTERVAL passes, so they cost a fraction of a per cent."""
    machine = Machine(monkeypatch, {1: 0.0015, 2: 0.001})
    policy = ThreadPolicy(max_threads=2)
    used = [policy.run(("decode", 1), machine.run) for _ in range(4 * MAX_INTERVAL)]
    runs = [i for i in range(4, len(used)) if used[i] == 1 and used[i - 1] == 2]  # re-timing runs of one thread
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps == sorted(gaps) and gaps[-1] >= MAX_INTERVAL  # doubling, up to the longest interval
    assert used[4:].count(1) <= 2 * (MAX_INTERVAL.bit_length() - MIN_INTERVAL.bit_length() + 4)


def test_a_pass_of_another_graph_is_cold_and_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The draft policy moves a batch size to another draft count, another graph, for a short
    re-timing now and then; the first pass of a graph after another one is cold (twice a warm
    one here, and the second a little dear). Timed as warm, those passes lifted the chosen
    count's median past DRIFT and started re-timings at one thread on a quiet machine."""
    machine = Machine(monkeypatch, {1: 0.0015, 2: 0.001})
    last: list[object] = [None, 0]  # the graph run last, and passes of it in a row

    def run(graph: str) -> int:
        n = torch.get_num_threads()
        ran = (graph, n)
        last[1] = last[1] + 1 if last[0] == ran else 1  # type: ignore[operator]
        last[0] = ran
        machine.now += machine.seconds[n] * {1: 2.0, 2: 1.3}.get(last[1], 1.0)  # type: ignore[call-overload]
        return n

    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    used = []
    for i in range(4 * MAX_INTERVAL):
        graph = "3 drafts" if i % 32 in (30, 31) else "5 drafts"  # a draft-count re-timing every 32 steps
        used.append(policy.run(key, lambda graph=graph: run(graph), graph=lambda graph=graph: graph))  # type: ignore[misc]
    assert policy.describe() == {"decode/1": 2}
    assert used[4:].count(1) <= 2 * (MAX_INTERVAL.bit_length() - MIN_INTERVAL.bit_length() + 4)  # periodic ones only


def test_the_cold_passes_after_a_draft_re_timing_do_not_start_thread_re_timings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the draft policy switches graphs at the same thread count (a re-timing run of
    another draft count, then back), a few passes in a row can cost several times a warm one.
    Timed as they came, they lifted the chosen count's median past DRIFT, and each such run
    started a re-timing at one thread on a quiet machine. Only steady passes show drift now."""
    machine = Machine(monkeypatch, {1: 0.0015, 2: 0.001})
    last: list[object] = [None, 0]
    cold = {1: 4.0, 2: 3.5, 3: 2.7, 4: 2.3}  # the cost of the nth pass in a row of a graph, over a warm one

    def run(graph: str) -> int:
        n = torch.get_num_threads()
        ran = (graph, n)
        last[1] = last[1] + 1 if last[0] == ran else 1  # type: ignore[operator]
        last[0] = ran
        machine.now += machine.seconds[n] * cold.get(last[1], 1.0)  # type: ignore[call-overload]
        return n

    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    used = []
    for i in range(4 * MAX_INTERVAL):
        graph = "3 drafts" if i % 96 >= 90 else "5 drafts"  # a draft re-timing run of 6 every 96 steps
        used.append(policy.run(key, lambda graph=graph: run(graph), graph=lambda graph=graph: graph))  # type: ignore[misc]
    assert policy.describe() == {"decode/1": 2}
    assert policy.timings()["early_retimings"] == 0
    assert used[4:].count(1) <= 2 * (MAX_INTERVAL.bit_length() - MIN_INTERVAL.bit_length() + 4)  # periodic ones only


def test_counts_are_compared_per_expected_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread count has its own draft table (drafts.py), so the two counts may run
    different draft counts at one batch size: here one thread's steps verify 2 drafts and two
    threads' steps 5. The one-thread step is the cheaper one, and yields fewer tokens: per
    step one thread looked faster, per token two threads are. The policy compares the time
    per token a step is expected to yield."""
    machine = Machine(monkeypatch, {1: 0.0007, 2: 0.001})
    tokens = {1: 2.0, 2: 3.0}  # expected per step: 1 + the acceptance rates of the drafts verified
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    ran: list[int] = []

    def run() -> int:
        ran.append(machine.run())
        return ran[-1]

    graph, work = (lambda: ran[-1]), (lambda: tokens[ran[-1]])  # the graph and yield follow the count
    used = [policy.run(key, run, graph=graph, work=work) for _ in range(2 * MAX_INTERVAL)]
    assert policy.describe() == {"decode/1": 2}
    assert used[4:].count(1) <= 2 * (MAX_INTERVAL.bit_length() - MIN_INTERVAL.bit_length() + 4)  # re-timings only
    timings = policy.timings()  # what /info shows the choice was made from
    assert timings["cost_ms"] == {
        "decode/1": {"1": pytest.approx(0.7 / 2, abs=1e-4), "2": pytest.approx(1 / 3, abs=1e-4)}
    }
    assert timings["passes"] == {"decode/1": {"1": used.count(1), "2": used.count(2)}}
    assert timings["early_retimings"] == 0
    per_step = ThreadPolicy(max_threads=2)  # per step, as before
    ran.clear()
    for _ in range(64):
        per_step.run(key, run, graph=graph)
    assert per_step.describe() == {"decode/1": 1}


def test_a_neighbour_that_slows_the_chosen_count_is_followed_within_a_few_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other count was last timed in a noisy moment, and the interval has grown long: a
    neighbour's arrival would wait for the next periodic re-timing, thousands of passes later.
    The chosen count's own passes drifting up re-time the other count at the next pass instead,
    and two comparisons at that moment, one right after the other, move the choice."""
    machine = Machine(monkeypatch, {1: 0.004, 2: 0.001})  # one thread timed in a noisy moment
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    for _ in range(3 * MAX_INTERVAL // 2):  # two threads, the interval grown long
        policy.run(key, machine.run)
    assert policy.describe() == {"decode/1": 2} and policy.interval[key] >= MAX_INTERVAL // 2
    machine.seconds = {1: 0.0016, 2: 0.003}  # a busy process now shares a core with the team
    used = [policy.run(key, machine.run) for _ in range(40)]
    assert 1 in used[:8]  # the drift is seen once the median of the recent passes moves
    assert used[20:].count(2) <= 2  # then one thread, but for a re-timing
    assert policy.describe() == {"decode/1": 1}


def test_a_neighbour_is_followed_with_a_prefill_every_few_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With many streams a prefill comes between decode steps every few steps. It makes the
    next step cold (not timed) but does not restart its graph's count of steps towards steady:
    counted in a row, no step was ever steady and a neighbour was not seen until the periodic
    re-timing, thousands of steps later."""
    machine = Machine(monkeypatch, {1: 0.004, 2: 0.001})
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 16)

    def serve(steps: int) -> list[int]:
        used = []
        for i in range(steps):
            used.append(policy.run(key, machine.run))
            if i % 3 == 2:
                policy.run_like(("decode", 1), machine.run)  # a new stream's prefill
        return used

    serve(3 * MAX_INTERVAL // 2)
    assert policy.describe() == {"decode/16": 2} and policy.interval[key] >= MAX_INTERVAL // 2
    machine.seconds = {1: 0.0016, 2: 0.003}  # a busy process now shares a core with the team
    used = serve(200)
    assert 1 in used[:24]  # a re-timing within a few steps (it may be broken by a prefill, then repeated)
    assert policy.describe() == {"decode/16": 1} and used[-50:].count(1) >= 45


def test_a_slower_other_count_does_not_trigger_re_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the chosen count's own passes drifting up starts an early re-timing."""
    machine = Machine(monkeypatch, {1: 0.0015, 2: 0.001})
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    for _ in range(MAX_INTERVAL):
        policy.run(key, machine.run)
    machine.seconds = {1: 0.01, 2: 0.001}  # one thread alone got slower: nothing to follow
    used = [policy.run(key, machine.run) for _ in range(MAX_INTERVAL // 2)]
    assert used.count(1) <= 2


class ColdAfterSwitch(Machine):
    """Machine's passes, each of the first few after a switch of thread count dearer than a warm
    one (its graph's frozen weights out of the CPU's caches): the first twice, the second 1.5
    times, the third 1.2 times, about what `mtp bench step` shows at batch 1 (README)."""

    FACTORS = (2.0, 1.5, 1.2)

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: dict[int, float]) -> None:
        super().__init__(monkeypatch, seconds)
        self.last, self.since = 0, 0

    def run(self) -> int:
        n = torch.get_num_threads()
        self.since = self.since + 1 if n == self.last else 0
        self.last = n
        self.now += self.seconds[n] * self.factor(n)
        return n

    def factor(self, n: int) -> float:
        """A pass's cost over a warm one's, `since` passes after a switch, at n threads."""
        return self.FACTORS[self.since] if self.since < len(self.FACTORS) else 1.0


class TeamSlowAfterSwitch(ColdAfterSwitch):
    """The first two passes after a switch of thread count dearer for a team of two (2.2 times
    a warm pass) than for one thread (1.1 times)."""

    def factor(self, n: int) -> float:
        return (2.2 if n > 1 else 1.1) if self.since < 2 else 1.0


def test_a_team_slower_than_one_thread_only_after_switches_keeps_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads 1.7 times as fast as one once warm, but their pass right after a switch
    reads 2.2 times its warm cost and one thread's 1.1 times: each comparison at one moment
    puts one thread 14 % ahead. With a 10 % margin both ways the choice moved to one thread,
    and from there two threads never looked 10 % faster, so it stayed: served, a server ran
    1,134 of its first 1,279 batch-1 steps at one thread on a quiet machine (docs/benchmarks.md,
    benchmark 56). A move to fewer threads needs SWITCH_DOWN; a neighbour taking a core slows
    the team by several times, far past it."""
    machine = TeamSlowAfterSwitch(monkeypatch, {1: 0.0006, 2: 0.00035})
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    used = [policy.run(key, machine.run) for _ in range(4 * MAX_INTERVAL)]
    assert policy.describe() == {"decode/1": 2}
    assert policy.timings()["moves"] == {"decode/1": {}}
    assert used[4:].count(1) <= 2 * (MAX_INTERVAL.bit_length() - MIN_INTERVAL.bit_length() + 4)  # re-timings only


def test_a_count_faster_once_warm_wins_against_steps_as_far_from_a_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A neighbour leaves a server at one thread; then two threads are 1.44 times faster warm.
    A re-timing's timed step is the second after a switch. Set against the lower of the chosen
    count's warm steps and its first few after the run, two threads never looked 10 % faster,
    and a served single stream stayed at one thread for good (docs/benchmarks.md, benchmark 47).
    Set against the chosen count's second step after the run, as far from a switch, they win."""
    machine = ColdAfterSwitch(monkeypatch, {1: 0.0005, 2: 0.005})  # a busy neighbour: one thread
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    for _ in range(200):
        policy.run(key, machine.run)
    assert policy.describe() == {"decode/1": 1}
    machine.seconds = {1: 0.00039, 2: 0.00027}  # the neighbour has gone
    used = [policy.run(key, machine.run) for _ in range(2 * MAX_INTERVAL)]
    assert policy.describe() == {"decode/1": 2}
    assert used[-64:].count(2) >= 60


def test_counts_within_a_few_per_cent_do_not_trade_places_on_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each switch costs cold steps; the choice moves only to a count clearly faster than itself."""
    machine = Machine(monkeypatch, {1: 0.00104, 2: 0.001})
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    used = [policy.run(key, machine.run) for _ in range(64)]
    assert used[-16:] == [2] * 16
    machine.seconds = {1: 0.00097, 2: 0.001}  # one thread now 3 % faster: noise, not a reason to switch
    used = [policy.run(key, machine.run) for _ in range(2 * MAX_INTERVAL)]
    assert used.count(1) <= 16 and used[-16:] == [2] * 16  # re-timings only
    assert policy.timings()["moves"] == {"decode/1": {}}  # chosen once, never moved
    machine.seconds = {1: 0.0008, 2: 0.001}  # 20 % faster: not enough to give up a thread (SWITCH_DOWN)
    used = [policy.run(key, machine.run) for _ in range(2 * MAX_INTERVAL)]
    assert used[-16:] == [2] * 16 and policy.timings()["moves"] == {"decode/1": {}}
    machine.seconds = {1: 0.0006, 2: 0.001}  # 40 % faster: it moves
    used = [policy.run(key, machine.run) for _ in range(4 * MAX_INTERVAL)]
    assert used[-16:] == [1] * 16
    assert policy.timings()["moves"] == {"decode/1": {"1": 1}}  # /info counts each move, by the count moved to
    machine.seconds = {1: 0.001, 2: 0.0008}  # two threads 20 % faster: back to them (SWITCH_BELOW)
    used = [policy.run(key, machine.run) for _ in range(4 * MAX_INTERVAL)]
    assert used[-16:].count(2) >= 14 and policy.describe() == {"decode/1": 2}  # but for a re-timing of one
    assert policy.timings()["moves"] == {"decode/1": {"1": 1, "2": 1}}


def test_a_slow_spell_of_the_whole_host_does_not_move_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host slows by half for a few steps at a time, both counts alike. Set against the other
    count's timing from its last re-timing, long before, the chosen count's few slow steps made
    it look dearer, and the choice moved to the slower count until the next re-timing, over and
    over (docs/benchmarks.md, benchmark 36). The counts are compared only at one moment: the
    spell's re-timing finds the other count no faster, and the choice stays."""
    quiet = {1: 0.0013, 2: 0.001}
    machine = Machine(monkeypatch, dict(quiet))
    policy = ThreadPolicy(max_threads=2)
    key = ("decode", 1)
    used = []
    for i in range(4 * MAX_INTERVAL):
        spell = 100 <= i % 300 < 108  # eight steps at half speed every 300
        machine.seconds = {n: c * 2 for n, c in quiet.items()} if spell else quiet
        used.append(policy.run(key, machine.run))
    assert policy.describe() == {"decode/1": 2}
    assert policy.timings()["moves"] == {"decode/1": {}}
    assert used[4:].count(1) <= len(used) // 20  # re-timings (a few after each spell), not stretches at one thread


def test_untimed_passes_follow_the_batch_1_choice_not_the_last_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefills and /predict passes (run_like) run at the batch-1 decode steps' count, every
    thread until those have one, whatever count the last decode pass left on the thread."""
    machine = Machine(monkeypatch, {1: 0.0005, 2: 0.005})  # one thread wins (a busy neighbour)
    policy = ThreadPolicy(max_threads=2)
    big, one = ("decode", 16), ("decode", 1)
    used = [policy.run(big, machine.run) for _ in range(20)]
    assert used[-1] == 1 and policy.describe() == {"decode/16": 1}
    assert policy.run_like(one, machine.run) == 2  # batch 1 has no choice yet: every thread
    assert policy.run_like(one, machine.run) == 2
    assert policy.run(big, machine.run) == 1  # the decode steps keep their count
    for _ in range(20):
        policy.run(one, machine.run)
    assert policy.describe() == {"decode/1": 1, "decode/16": 1}
    torch.set_num_threads(2)  # as a re-timing at two threads leaves it
    assert policy.run_like(one, machine.run) == 1


def test_one_core_has_nothing_to_choose() -> None:
    policy = ThreadPolicy(max_threads=1)
    assert policy.run(("prefill", 32), lambda: torch.get_num_threads()) == 1
    assert policy.describe() == {}
