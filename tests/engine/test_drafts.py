"""DraftPolicy: the draft count with the most expected tokens per second of verify pass."""

import itertools
import random
import statistics
import time

import pytest
import torch

from app.engine.drafts import (
    EXPLORE_EVERY,
    EXPLORE_RUN,
    KEY_BUCKET,
    MAX_EXPLORE_EVERY,
    PLAIN,
    RECENT_STEPS,
    RETIME_TAIL,
    SHALLOW_RETIME_EVERY,
    SHALLOW_RETIME_RUN,
    SHALLOW_RETIME_STEPS,
    STARTUP_WARM_STEPS,
    WARM_STEP,
    DraftPolicy,
    Window,
    per_key_cost,
    per_key_costs,
    shallow,
    shallow_depth,
    time_steps,
)

FLAT = [1.0, 1.0, 1.0, 1.0, 1.0]  # batch 1: a pass costs the same whatever it carries
STEEP = [1.0, 1.2, 1.4, 1.6, 1.8]  # batch 16: every fed token adds a fifth of a plain step


def policy_with_rates(
    rates: list[float],
    costs: dict[int, list[float]],
    passes: int = 1000,
    shallow: dict[int, dict[int, float]] | None = None,
) -> DraftPolicy:
    """A policy that has seen `passes` verify passes where draft j was accepted at rate rates[j]
    (cumulative: the first j drafts all agreed)."""
    policy = DraftPolicy(len(rates), costs, shallow=shallow)
    for i in range(passes):
        accepted = sum(1 for r in rates if i < r * passes)  # the first `accepted` drafts agree
        policy.observe([len(rates)], [accepted + 1])
    return policy


def test_cheap_drafts_are_all_verified_and_costly_ones_are_cut() -> None:
    policy = policy_with_rates([0.73, 0.46, 0.38, 0.25], {1: FLAT, 16: STEEP})
    assert policy.rates() == pytest.approx([0.73, 0.46, 0.38, 0.25], abs=0.01)
    assert policy.choose(1) == 4  # flat cost: every draft that may be accepted is worth it
    # steep cost: 2.57 tokens for 1.6 (1.61 per unit) beats 2.19 for 1.4 (1.56) and 2.82 for 1.8 (1.57)
    assert policy.choose(16) == 3
    assert policy.choose(9) == 3  # the nearest measured batch size at or above
    assert policy.choose(64) == 3  # above the largest: the largest


def test_drafts_that_are_never_accepted_are_not_verified() -> None:
    policy = policy_with_rates([0.0, 0.0, 0.0, 0.0], {1: [1.0, 1.05, 1.1, 1.15, 1.2]})
    assert policy.choose(1) == 0


def test_positions_never_offered_follow_the_last_measured_one() -> None:
    policy = DraftPolicy(3, {1: FLAT[:4]})
    for _ in range(1000):
        policy.observe([1], [2])  # only the first draft is ever offered, and always accepted
    a1, a2, a3 = policy.rates()
    assert a1 == pytest.approx(1.0, abs=0.01)
    assert a2 == pytest.approx(0.7 * a1) and a3 == pytest.approx(0.49 * a1)


def test_a_step_is_expected_to_emit_one_token_plus_its_drafts_acceptance_rates() -> None:
    policy = DraftPolicy(3, {1: FLAT[:4]})
    for _ in range(1000):
        policy.observe([3], [3])  # two of three drafts accepted, every time
    a = policy.rates()
    assert [policy.expected_tokens(n) for n in range(4)] == pytest.approx([1.0, 1 + a[0], 1 + a[0] + a[1], 1 + sum(a)])
    assert policy.expected_tokens(2) == pytest.approx(3.0, abs=0.02)
    assert policy.expected_tokens(9) == policy.expected_tokens(3)  # more than it drafts: all it drafts


def test_expected_tokens_follow_each_new_observation() -> None:
    """Read between observations, the expected tokens move with the acceptance they see."""
    policy = DraftPolicy(2, {1: FLAT[:3]})
    for _ in range(200):
        policy.observe([2], [3])  # both drafts accepted
    high = policy.expected_tokens(2)
    policy.observe([0], [1])  # a row that verified nothing: the rates are as they were
    assert policy.expected_tokens(2) == high
    for _ in range(200):
        policy.observe([2], [1])  # none accepted
        assert policy.expected_tokens(2) < high
        high = policy.expected_tokens(2)
    assert high == pytest.approx(2.0, abs=0.1)


def test_a_windows_median_follows_every_change() -> None:
    """A Window keeps its median between reads; after any change (append past maxlen, clear,
    pop, extend, assignment...) it is the median of what the window holds."""
    rng = random.Random(3)
    window = Window([1.0], maxlen=5)
    for _ in range(500):
        op = rng.choice(["append", "appendleft", "extend", "pop", "popleft", "clear", "set", "del", "iadd", "remove"])
        x = rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])
        if op in ("pop", "popleft", "set", "del", "remove") and not window:
            continue
        if op in ("append", "appendleft"):
            getattr(window, op)(x)
        elif op == "extend":
            window.extend([x, x + 1])
        elif op in ("pop", "popleft", "clear"):
            getattr(window, op)()
        elif op == "set":
            window[rng.randrange(len(window))] = x
        elif op == "del":
            del window[0]
        elif op == "iadd":
            window += [x]
        else:
            window.remove(window[-1])
        if window:
            assert window.median() == statistics.median(window)
            assert window.median() == statistics.median(window)  # read again: kept


def test_time_steps_times_every_batch_size_and_draft_count() -> None:
    calls: list[tuple[int, int]] = []
    costs, plain = time_steps(lambda b, n: calls.append((b, n)), [1, 4], 2, reps=2)
    assert set(costs) == {1, 4} and all(len(row) == 3 for row in costs.values())
    # each shape once to warm it, then in each of the 2 rounds STARTUP_WARM_STEPS + 1 times in a row (the last timed)
    run = STARTUP_WARM_STEPS + 1
    assert sorted(set(calls)) == [(b, n) for b in (1, 4) for n in range(3)] and len(calls) == 6 + 2 * 6 * run
    assert plain == {}  # shallow and plain steps are timed only when asked for (sequential heads)


def test_time_steps_never_lets_more_drafts_cost_less(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    seconds = {0: 2.0, 1: 1.0, 2: 3.0}  # noisy timings: one draft looks cheaper than none

    def step(b: int, n: int) -> None:
        clock[0] += seconds[n]

    monkeypatch.setattr("app.engine.drafts.time.perf_counter", lambda: clock[0])
    assert time_steps(step, [1], 2, reps=2)[0][1] == [2.0, 2.0, 3.0]


def test_a_noisy_startup_table_is_corrected_by_the_steps_that_run() -> None:
    """Start-up timing under a noisy neighbour made drafts look 50x dearer: the policy starts with
    none, re-times other draft counts while serving, and ends up verifying all of them."""
    true_cost = [1.0, 1.05, 1.1]
    policy = DraftPolicy(2, {1: [1.0, 50.0, 50.0]})
    assert policy.choose(1) == 0
    for _ in range(400):
        n = policy.choose(1)
        policy.observe_cost(1, n, true_cost[n])
        policy.observe([n], [n + 1])  # every draft offered is accepted
    assert policy.best(1) == 2
    assert policy.describe()["drafts_by_batch"] == {1: 2}


def test_step_timings_only_count_at_measured_batch_sizes() -> None:
    policy = DraftPolicy(1, {1: [1.0, 1.0], 4: [1.0, 1.0]})
    for _ in range(4):
        policy.observe_cost(3, 1, 100.0)  # 3 rows cost less than the 4 measured: not comparable
    assert policy.cost(4) == [1.0, 1.0]


def test_time_steps_times_each_shape_warm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled graph stays cold for a few steps after another ran (benchmark 5, run 6): the
    start-up costs are of warm steps, not of a shape's second step in a row."""
    clock = [0.0]
    warm = {0: 1.0, 1: 1.5, 2: 2.0, shallow(1): 1.25}
    cold = [3.0, 1.9, 1.5, 1.2]  # 1st, 2nd, .. step of a shape after another, times its warm cost
    last: list[tuple[int, int] | None] = [None]
    in_a_row = [0]

    def step(b: int, n: int) -> None:
        in_a_row[0] = in_a_row[0] + 1 if last[0] == (b, n) else 0
        last[0] = (b, n)
        clock[0] += warm[n] * (cold[in_a_row[0]] if in_a_row[0] < len(cold) else 1.0)

    monkeypatch.setattr("app.engine.drafts.time.perf_counter", lambda: clock[0])
    costs, by_depth = time_steps(step, [1], 2, reps=3, depths=[1])
    assert costs[1] == [1.0, 1.5, 2.0]
    assert by_depth[1] == {1: 1.25}


def test_time_steps_takes_medians_and_caps_outliers() -> None:
    calls = {"n": 0}

    def step(b: int, n: int) -> None:
        calls["n"] += 1
        first_round_timed_n1 = 3 + 2 * (STARTUP_WARM_STEPS + 1)  # after 3 warm-ups and n = 0's run
        time.sleep(0.03 if calls["n"] == first_round_timed_n1 else 0.001)  # one burst, in that step
        if n == 2:
            time.sleep(0.02)  # a shape that is always slow, past (n+1) x the plain step

    costs, _ = time_steps(step, [1], 2, reps=5)
    assert costs[1][0] < 0.01 and costs[1][1] < 0.01  # the burst is not anyone's median
    assert costs[1][2] == pytest.approx(3 * costs[1][0])  # capped at three plain steps


def test_plain_steps_are_chosen_where_they_beat_every_draft_count_by_the_margin() -> None:
    """Sequential heads: a drafting step runs the modules even at n = 0, so a plain step can be
    cheaper. Batch 1 (overhead-bound) keeps drafting; batch 16 (compute-bound) goes plain, and
    stays plain unless the best draft count beats it by 1 / PLAIN_MARGIN: drafting rows pay
    what the timed step leaves out (the modules' prefill, cold graphs, re-timing runs)."""
    costs = {1: [1.0, 1.0, 1.0], 16: [1.0, 1.6, 2.2]}
    policy = policy_with_rates([0.6, 0.4], costs, shallow={1: {0: 0.9}, 16: {0: 0.5}})
    assert policy.choose(1) == 2  # 2.0 tokens per unit against 1.11 plain
    assert policy.choose(16) == PLAIN  # 2.0 plain against 1.0 at best drafting
    assert policy.describe()["drafts_by_batch"] == {1: 2, 16: "plain"}
    assert policy.describe()["shallow_step_ms"] == {1: {0: 900.0}, 16: {0: 500.0}}
    for _ in range(16):
        policy.observe_cost(16, PLAIN, 0.95)  # plain steps measured dearer: 1.05 still beats 1.0
    assert policy.choose(16) == PLAIN
    for _ in range(16):
        policy.observe_cost(16, PLAIN, 1.2)  # 0.83 per unit, 0.92 with its margin: drafting's 1.0 wins
    assert policy.choose(16) != PLAIN


def test_exploration_never_picks_plain() -> None:
    policy = DraftPolicy(2, {4: [1.0, 1.0, 1.0]}, shallow={4: {0: 0.01}})
    picks = [policy.choose(4) for _ in range(200)]
    # runs of EXPLORE_RUN re-time a draft count, ending after 32 steps and then twice as many as before each time
    first, second = EXPLORE_EVERY, 3 * EXPLORE_EVERY
    runs = [*range(first - EXPLORE_RUN + 1, first + 1), *range(second - EXPLORE_RUN + 1, second + 1)]
    assert [i for i, n in enumerate(picks, 1) if n != PLAIN] == runs
    assert DraftPolicy(2, {4: [1.0, 1.0, 1.0]}).describe().keys() == {
        "acceptance",
        "drafts_by_batch",
        "step_ms",
        "around_step_ms",
    }


def test_re_timings_thin_out_while_the_choice_holds_and_come_back_when_it_moves() -> None:
    """Each re-timing run costs steps at another draft count and cold graphs, so while the
    choice holds the interval doubles, up to MAX_EXPLORE_EVERY; when the choice moves, the
    next run comes within EXPLORE_EVERY steps."""
    cost = STEEP[:3]
    policy = policy_with_rates([0.9, 0.8], {1: cost})
    runs, explored = [], False
    for i in range(1, 4001):
        n = policy.choose(1)
        policy.observe_cost(1, n, cost[n])
        if n != 2 and not explored:
            runs.append(i)
        explored = n != 2
    assert runs[:5] == [end - EXPLORE_RUN + 1 for end in (32, 96, 224, 480, 992)]
    assert all(b - a == MAX_EXPLORE_EVERY for a, b in itertools.pairwise(runs[5:]))
    assert len(runs) <= 8  # a fixed interval of 32 would have made 125
    for _ in range(20_000):  # drafts stop being accepted: fewer drafts emit more per second
        policy.observe([2], [1])
    assert policy.choose(1) == 0  # the choice moves
    for i in range(1, EXPLORE_EVERY + 1):
        n = policy.choose(1)
        policy.observe_cost(1, n, cost[n])
        if policy.exploring is not None:
            break
    assert policy.exploring is not None and i < EXPLORE_EVERY


def test_time_steps_times_plain_and_shallow_steps_beside_the_draft_counts() -> None:
    calls: list[tuple[int, int]] = []
    costs, by_depth = time_steps(lambda b, n: calls.append((b, n)), [1, 4], 2, reps=2, depths=[0, 1])
    assert set(costs) == {1, 4} and all(set(row) == {0, 1} for row in by_depth.values()) and set(by_depth) == {1, 4}
    one = shallow(1)  # the first module drafts, and the step verifies its draft
    assert sorted(set(calls)) == sorted((b, n) for b in (1, 4) for n in (PLAIN, one, 0, 1, 2))
    first_round = [(b, n) for b in (1, 4) for n in (PLAIN, one, 0, 1, 2)]  # interleaved, each shape in a run
    run = STARTUP_WARM_STEPS + 1
    for i in range(run):
        assert calls[10 + i : 10 + 10 * run : run] == first_round


def test_a_shallow_step_is_chosen_where_it_beats_every_draft_count_by_the_margin() -> None:
    """Sequential heads, k = 3: one module drafting one token can beat two modules drafting two
    (batch 1, overhead-bound), though the second draft adds expected tokens. It must win by
    SHALLOW_MARGIN (its rows lose their second module for good), and plain by PLAIN_MARGIN."""
    costs = {1: [1.0, 1.0, 1.0], 4: [1.0, 1.0, 1.0]}
    # 1.6 tokens for 0.7 (2.29 per unit) against 1.96 for 1.0 (1.96): shallow 1 by 1.17x
    policy = policy_with_rates([0.6, 0.36], costs, shallow={1: {0: 0.9, 1: 0.7}, 4: {0: 0.9, 1: 0.8}})
    assert policy.choose(1) == shallow(1)
    assert policy.choose(4) == 2  # 1.6 / 0.8 = 2.0 is within 1.05 of 1.96: keep both modules
    assert policy.describe()["drafts_by_batch"] == {1: "shallow 1", 4: 2}
    assert policy.describe()["shallow_step_ms"] == {1: {0: 900.0, 1: 700.0}, 4: {0: 900.0, 1: 800.0}}
    for _ in range(16):
        policy.observe_cost(1, shallow(1), 0.9)  # shallow steps measured dearer: 1.78 per unit
        policy.observe_cost(1, shallow(1), 0.9)
    assert policy.choose(1) == 2


def test_a_shallow_batch_only_goes_shallower() -> None:
    """Rows that keep one module cannot verify two drafts again: their batch chooses between
    that depth and plain, and plain must win by its margin; it is never re-timed at a draft count."""
    policy = policy_with_rates([0.6, 0.36], {1: [0.1, 0.1, 0.1]}, shallow={1: {0: 0.9, 1: 1.0}})
    assert policy.choose(1) == 2  # the full step is far cheaper, but these rows cannot take it
    assert {policy.choose(1, depth=1) for _ in range(100)} == {shallow(1)}  # 1.6 per unit against 1.11 plain
    for _ in range(16):
        policy.observe_cost(1, PLAIN, 0.5)
        policy.observe_cost(1, PLAIN, 0.5)  # plain: 2.0 per unit, beats 1.6 by more than 1.1
    assert policy.choose(1, depth=1) == PLAIN
    assert DraftPolicy(2, {1: [1.0] * 3}).choose(1, depth=1) == shallow(1)  # not timed shallow: kept as is


def test_rows_that_do_not_draft_gain_nothing_from_a_drafting_step() -> None:
    """A step's drafts add tokens only to the rows that draft: one such row among sixteen
    plain ones made the whole batch run one-module steps, at twice a plain step's cost, for
    one row's drafts. The policy weighs each choice's extra tokens by the share of rows that draft."""
    # a_1 = 0.8, a_2 = 0.6: 1.8 tokens per row for one module's step (cost 2.0), 1 for plain (1.5)
    policy = policy_with_rates([0.8, 0.6], {16: [3.0, 3.0, 3.0]}, shallow={16: {0: 1.5, 1: 2.0}})
    assert policy.choose(16) == shallow(1)  # every row drafts: 1.8 / 2.0 / 1.05 = 0.86 beats 1 / 1.5 / 1.1 = 0.61
    assert policy.choose(16, speculating=16) == shallow(1)
    assert policy.choose(16, speculating=1) == PLAIN  # 1.05 / 2.0 / 1.05 = 0.50 against 0.61
    assert policy.choose(16, depth=1) == shallow(1)  # a batch kept at one module: 0.9 against 0.61
    assert policy.choose(16, depth=1, speculating=2) == PLAIN  # 1.1 / 2.0 = 0.55
    assert policy.choose(16, speculating=0) == PLAIN


def test_only_warm_steps_are_timed() -> None:
    """The first step after a change of batch size, draft count or thread count is cold (another
    compiled graph, its weights out of the CPU's caches): it is not timed. A re-timing is a
    run of EXPLORE_RUN steps of the same count, so its last, warm, step corrects the table."""
    policy = DraftPolicy(2, {1: [1.0, 1.0, 1.0]})
    policy.observe(*[[2] * 100, [3] * 100])  # every draft accepted: 2 drafts are worth their cost
    true_cost, cold = [1.0, 1.0, 1.0], 3.0
    last = None
    for _ in range(400):
        n = policy.choose(1)
        policy.observe_cost(1, n, true_cost[n] + (cold if n != last else 0.0))
        last = n
    assert policy.cost(1) == [1.0, 1.0, 1.0]  # never a cold step's 4.0
    assert policy.best(1) == 2


def test_a_step_after_a_prefill_or_predict_pass_is_not_timed() -> None:
    """Another pass between two steps of the same shape (a new request's prefill) brings its own
    weights and activations into the CPU's caches: the step after it is cold too."""
    policy = DraftPolicy(2, {1: [1.0, 1.0, 1.0]})
    for _ in range(20):
        policy.observe_cost(1, 2, 1.0)
    policy.interrupted()
    for _ in range(RECENT_STEPS):  # one request's prefill before each step: every one is cold
        policy.observe_cost(1, 2, 3.0)
        policy.interrupted()
    assert policy.cost(1)[2] == 1.0
    for _ in range(WARM_STEP - 1):  # cold after the last prefill, for several steps
        policy.observe_cost(1, 2, 3.0)
    policy.observe_cost(1, 2, 1.2)  # warm again: timed
    assert list(policy.recent[1][2])[-2:] == [1.0, 1.2]


def test_a_graph_cold_for_several_steps_does_not_keep_the_count_that_ran_first() -> None:
    """A compiled step stays cold for a few steps after a switch (2x, then 1.5x, 1.2x a warm
    one), so a re-timing's second step reads 1.5x dear. Taken as it was, that kept the first
    choice (1 draft, from a start-up table that timed 2 drafts dear) for good; timed at the
    end of its run, warm, the policy moves to 2 drafts, which emit more tokens per second, and
    stays there."""
    policy = policy_with_rates([0.6, 0.36], {1: [1.0, 1.0, 1.3]})  # expected tokens 1, 1.6, 1.96
    true_cost, after_switch = [1.0, 1.0, 1.1], [2.0, 1.5, 1.2]
    assert policy.choose(1) == 1
    last, run = None, 0
    for _ in range(2000):
        n = policy.choose(1)
        run = run + 1 if n == last else 0
        policy.observe_cost(1, n, true_cost[n] * (after_switch[run] if run < len(after_switch) else 1.0))
        last = n
    assert policy.best(1) == 2
    assert policy.cost(1) == pytest.approx(true_cost, rel=0.02)


def test_a_count_that_ran_slowly_for_a_while_is_won_back_by_its_next_re_timing() -> None:
    """The first seconds of serving ran slowly: steps at 5 drafts, the start-up table's choice,
    took 1.3x their cost, and the choice moved to 3. Those steps stayed in 5's window, and one
    re-timing per interval (the interval doubling while 3 held) could not outvote them: 3 held
    for good where 5 emit 5 % more per second (the engine's batch 1 on the previous default,
    docs/benchmarks.md, benchmark 25). A re-timing, warm at the end of its run, now replaces the
    count's timings. A graph's cold stretch after a switch is modelled too, longer for one that
    sat idle long."""
    rates = [0.773, 0.522, 0.421, 0.306, 0.239]  # expected tokens: 3 drafts 2.72, 5 drafts 3.26
    true_cost = [0.63, 0.66, 0.79, 0.79, 0.89, 0.89]  # ms; 5 drafts emit 1.05x the tokens/s of 3
    policy = DraftPolicy(5, {1: true_cost}, choices=[0, 1, 3, 5])
    for i in range(1000):  # the acceptance measured
        policy.observe([5], [1 + sum(1 for r in rates if i < r * 1000)])
    long_idle, short_idle = [2.0, 1.55, 1.26, 1.12, 1.06, 1.03], [1.3, 1.1]
    ran_at: dict[int, int] = {}
    last, run, idle = None, 0, 0
    counts = []
    for step in range(8000):
        n = policy.choose(1)
        if n != last:
            idle, run = step - ran_at.get(n, -1000), 0
        else:
            run += 1
        cold = long_idle if idle > 20 else short_idle
        slow = 1.3 if step < 40 and n == 5 else 1.0  # the first seconds
        policy.observe_cost(1, n, true_cost[n] * slow * (cold[run] if run < len(cold) else 1.0))
        ran_at[n], last = step, n
        counts.append(n)
    assert 3 in counts[:100]  # the slow start moved the choice
    assert policy.best(1) == 5
    assert counts[-4000:].count(5) > 0.98 * 4000


def test_a_re_timing_of_the_running_count_keeps_its_timings() -> None:
    """With one choice, every re-timing run lands on the count that runs: its window is its
    own steps, not one re-timing."""
    policy = DraftPolicy(2, {1: [1.0, 1.0, 1.0]}, choices=[2])
    for i in range(3 * EXPLORE_EVERY):
        policy.observe_cost(1, policy.choose(1), 1.0 + 0.01 * (i % 2))
    assert len(policy.recent[1][2]) == RECENT_STEPS


def test_counts_within_noise_of_each_other_do_not_trade_places() -> None:
    """Each move of the choice brings re-timing runs back every EXPLORE_EVERY steps. 3 and 5
    drafts promising tokens per second 1 % apart, timed with up to 4 % of noise, moved 52
    times in 6,000 steps without MOVE_MARGIN, and 12 with it (a re-timing is one step, so a
    lucky one still moves it); one that promises 8 % more still wins."""
    rng = random.Random(0)
    rates = [0.773, 0.522, 0.421, 0.306, 0.239]  # expected tokens: 3 drafts 2.72, 5 drafts 3.26
    true_cost = [0.63, 0.66, 0.79, 0.79, 0.94, 0.94]  # 5 drafts: 1.01x the tokens/s of 3

    def serve(policy: DraftPolicy, steps: int) -> list[int]:
        counts = []
        for _ in range(steps):
            n = policy.choose(1)
            policy.observe_cost(1, n, true_cost[n] * rng.uniform(0.96, 1.04))
            counts.append(n)
        return counts

    policy = DraftPolicy(5, {1: true_cost}, choices=[0, 1, 3, 5])
    for i in range(1000):
        policy.observe([5], [1 + sum(1 for r in rates if i < r * 1000)])
    counts = serve(policy, 6000)
    held = [n for n in counts if n in (3, 5)]
    moves = sum(a != b for a, b in itertools.pairwise(held))
    assert moves <= 20
    true_cost[4] = true_cost[5] = 0.88  # 5 drafts now promise 1.08x: it wins
    assert serve(policy, 3000)[-1000:].count(5) > 0.95 * 1000


def test_each_thread_count_keeps_its_own_timings() -> None:
    """Steps at one intra-op thread count (the thread policy's, threads.py) never enter the
    timings of another: a stretch of one-thread steps, dearer for the draft count that runs,
    leaves the choice at the other count as its own steps make it. The tables read are those
    of the count of the core's last choice or timing, or of the count a choice names: one made
    during a prefill (at batch 1's count) for a step that will run at another count."""
    before = torch.get_num_threads()
    policy = policy_with_rates([0.6, 0.36], {1: [1.0, 1.0, 1.0]})
    try:
        torch.set_num_threads(2)
        for _ in range(32):
            policy.observe_cost(1, 2, 0.5)  # at two threads, verifying two drafts is cheap
        assert policy.best(1) == 2
        torch.set_num_threads(1)
        policy.observe_cost(1, 0, 1.0)  # the first step at one thread (cold: not timed)
        assert policy.cost(1) == [1.0, 1.0, 1.0]  # its table begins from the start-up timings
        for _ in range(32):
            for _ in range(WARM_STEP):  # at one thread, far dearer (the last of each row is warm)
                policy.observe_cost(1, 2, 3.0)
            for _ in range(WARM_STEP):
                policy.observe_cost(1, 0, 1.0)
        # 1 draft, not timed at one thread: its start-up cost times the median ratio of 0 and 2 (1x, 3x)
        assert policy.cost(1) == [1.0, 2.0, 3.0] and policy.best(1) == 0
        torch.set_num_threads(2)
        policy.choose(1)  # the core's next choice, at two threads again
        assert policy.cost(1) == [1.0, 1.0, 0.5] and policy.best(1) == 2
        assert policy.choose(1, threads=1) == 0  # for a step at one thread, while two run
        assert policy.choose(1) == 2
    finally:
        torch.set_num_threads(before)


def test_a_one_thread_re_timing_does_not_move_the_choice_to_counts_never_timed_at_one_thread() -> None:
    """The thread policy now and then runs two steps at one thread, where every step costs
    about twice as much. The draft count running then is timed at one thread; the others had
    only their start-up timings, made at two. Read as they were, those made the running count
    look twice as dear as the others and moved the choice at each such re-timing (and each move
    brought the draft re-timings back every EXPLORE_EVERY steps)."""
    before = torch.get_num_threads()
    rates = [0.773, 0.522, 0.421, 0.306, 0.239]
    start = [0.63, 0.66, 0.79, 0.79, 0.89, 0.89]  # 5 drafts promise 1.13x the tokens/s of 3
    try:
        torch.set_num_threads(2)
        policy = DraftPolicy(5, {1: start}, choices=[0, 1, 3, 5])  # start-up at two threads
        for i in range(1000):
            policy.observe([5], [1 + sum(1 for r in rates if i < r * 1000)])
        for _ in range(20):
            policy.observe_cost(1, policy.choose(1), 0.89)  # steps at 5 drafts, as timed at start-up
        assert policy.chosen[1] == 5
        torch.set_num_threads(1)  # a re-timing at one thread: two steps of the running count, the first cold
        for _ in range(2):
            policy.observe_cost(1, policy.choose(1), 2 * 0.89)
        assert policy.best(1) == 5 and policy.chosen[1] == 5
        torch.set_num_threads(2)
        assert policy.choose(1) == 5
    finally:
        torch.set_num_threads(before)


def serve_one_by_one(
    policy: DraftPolicy,
    true_cost: dict[int, float],
    requests: int,
    steps: int = 100,
    after_prefill: tuple[float, ...] = (),
    around: float = 0.0,
    budgets: bool = False,
) -> list[int]:
    """Batch-1 requests one after another, `steps` greedy steps each, as DecodeBatch drives the
    policy: each request's prefill is another pass; a row starts with every module; a shallow
    choice keeps it at that depth, PLAIN ends its drafting (its steps are then timed as plain
    ones without a choice). true_cost: the seconds of each choice, warm; after_prefill: how many
    times that the 1st, 2nd, .. step after a prefill costs, whatever its choice; around: the
    seconds of work around each step, outside its timed part, on the policy's clock (this
    harness's); budgets: each choice is told the tokens the request may still emit (one a
    step, `steps` in all), as DecodeBatch tells it. Returns the choice each request settled on
    (that of its last step)."""
    clock = [0.0]
    policy.now = lambda: clock[0]
    settled = []
    for _ in range(requests):
        policy.interrupted()
        depth: int | None = None
        choice = 0
        for i in range(steps):
            if choice != PLAIN:
                choice = policy.choose(1, depth, left=steps - i if budgets else None)
                if (d := shallow_depth(choice)) is not None and d > 0:
                    depth = d
            cold = after_prefill[i] if i < len(after_prefill) else 1.0
            policy.began(1)
            clock[0] += true_cost[choice] * cold
            policy.observe_cost(1, choice, true_cost[choice] * cold)
            clock[0] += around
        settled.append(choice)
    return settled


def test_steps_cold_from_a_prefill_do_not_end_speculation() -> None:
    """One stream, sequential heads: one module verifying one draft emits the most tokens per
    second warm (1.6 / 0.4 against plain's 1 / 0.3 and two drafts' 1.96 / 0.7), as timed at
    start-up. Every step stays dear for a few steps after a request's prefill. Timed from its
    second step, the first request's drafting step read twice its cost, moved the median past
    plain's, and every request went plain, for good: plain runs whole requests and is timed
    warm, the drafting step only ever after a prefill. Timed from its WARM_STEP-th, each
    request keeps the one-module step, but for plain's re-timings (one request each)."""
    true_cost = {PLAIN: 0.3, shallow(1): 0.4, 0: 0.6, 1: 0.65, 2: 0.7}
    after_prefill = (2.6, 2.0, 1.6, 1.3, 1.1)  # times a warm step, 1st to 5th after the prefill
    policy = policy_with_rates([0.6, 0.36], {1: [0.6, 0.65, 0.7]}, shallow={1: {0: 0.3, 1: 0.4}})
    settled = serve_one_by_one(policy, true_cost, 20, steps=150, after_prefill=after_prefill)
    assert settled.count(shallow(1)) == 18 and set(settled) == {shallow(1), PLAIN}
    assert all(c == shallow(1) for c, prev in zip(settled[1:], settled, strict=False) if prev == PLAIN)
    assert policy.describe()["shallow_step_ms"] == {1: {0: 300.0, 1: 400.0}}


def test_a_shallow_step_timed_dear_at_start_up_is_re_timed_while_serving() -> None:
    """A noisy start-up timed the plain batch-1 step at 4x its cost: it would never be chosen,
    so never timed again. After SHALLOW_RETIME_EVERY greedy steps the stalest shallow step runs
    on the rest of the request then running; its warm steps correct its cost, and later
    requests take it."""
    true_cost = {PLAIN: 0.5, shallow(1): 0.9, 0: 1.0, 1: 1.1, 2: 1.2}
    policy = policy_with_rates([0.6, 0.36], {1: [1.0, 1.1, 1.2]}, shallow={1: {0: 2.0, 1: 0.9}})
    first = serve_one_by_one(policy, true_cost, SHALLOW_RETIME_EVERY // 100)  # up to the one in which 512 steps pass
    assert set(first) == {shallow(1)}  # 1.6 / 0.9 beats plain's 1 / 2.0 as timed at start-up
    later = serve_one_by_one(policy, true_cost, 10)
    assert later == [PLAIN] * 10  # re-timed at 0.5: 2.0 per unit beats 1.78 by more than PLAIN_MARGIN
    assert policy.describe()["shallow_step_ms"] == {1: {0: 500.0, 1: 900.0}}


def test_re_timing_a_shallow_step_that_is_as_dear_as_timed_costs_one_request_per_period() -> None:
    """The start-up table was right: each re-timing run puts the rest of one request on the
    dearer plain step, and the requests after it go back. The period starts at
    SHALLOW_RETIME_EVERY greedy steps and doubles while the choice holds, up to
    SHALLOW_RETIME_STEPS. (Here the choices are not told the requests' budgets: the re-timing
    starts at the first step past its period.)"""
    true_cost = {PLAIN: 2.0, shallow(1): 0.9, 0: 1.0, 1: 1.1, 2: 1.2}
    policy = policy_with_rates([0.6, 0.36], {1: [1.0, 1.1, 1.2]}, shallow={1: {0: 2.0, 1: 0.9}})
    settled = serve_one_by_one(policy, true_cost, 3 * SHALLOW_RETIME_STEPS // 100 + 5)
    retimed = [i for i, c in enumerate(settled) if c == PLAIN]  # requests of 100 steps
    gaps = [b - a for a, b in itertools.pairwise(retimed)]
    assert retimed[0] == SHALLOW_RETIME_EVERY // 100 and gaps == sorted(gaps)
    assert gaps[-2:] == [SHALLOW_RETIME_STEPS // 100 + 1] * 2  # 41 requests of 100 steps: a period of 4,096
    assert all(c == shallow(1) for c, prev in zip(settled[1:], settled, strict=False) if prev == PLAIN)


def test_a_shallow_re_timing_waits_for_the_last_steps_of_its_rows() -> None:
    """As above, but each choice knows how many tokens the request may still emit: a re-timing
    puts only the last RETIME_TAIL steps of one request per period on the dearer plain step,
    not the rest of the request it falls in (half of one on average, at one stream)."""
    true_cost = {PLAIN: 2.0, shallow(1): 0.9, 0: 1.0, 1: 1.1, 2: 1.2}
    policy = policy_with_rates([0.6, 0.36], {1: [1.0, 1.1, 1.2]}, shallow={1: {0: 2.0, 1: 0.9}})
    settled = serve_one_by_one(policy, true_cost, 3 * SHALLOW_RETIME_STEPS // 100 + 5, budgets=True)
    retimed = [i for i, c in enumerate(settled) if c == PLAIN]
    assert len(retimed) >= 4 and retimed[0] <= SHALLOW_RETIME_EVERY // 100 + 1
    plain_steps = policy.made[1, PLAIN]  # a PLAIN choice is made once: its rows then run plain
    assert plain_steps == len(retimed)
    # every plain step of the run: from the re-timing's choice to the end of its request
    assert policy.clock - sum(n for (b, c), n in policy.made.items() if c != PLAIN) <= RETIME_TAIL * len(retimed)


def test_a_stretch_of_dear_steps_does_not_keep_a_worse_choice_for_thousands_of_steps() -> None:
    """One stream keeps one module (1.6 / 0.4 against plain's 1 / 0.3). A neighbour makes
    every step 1.5 times dearer for two requests: the running one-module step is timed dear
    and the next request goes plain, timed dear too, then both drafts, re-timed warm. The
    one-module step's window kept its dear timings; re-timed once per SHALLOW_RETIME_STEPS and
    joining that window, it held the requests on a worse choice for thousands of steps. A move
    of the choice brings the re-timing period back to SHALLOW_RETIME_EVERY, and a re-timing
    replaces the window, so within a few requests they keep one module again."""
    true_cost = {PLAIN: 0.3, shallow(1): 0.4, 0: 0.6, 1: 0.65, 2: 0.7}
    dear = {choice: 1.5 * seconds for choice, seconds in true_cost.items()}
    policy = policy_with_rates([0.6, 0.36], {1: [0.6, 0.65, 0.7]}, shallow={1: {0: 0.3, 1: 0.4}})
    assert serve_one_by_one(policy, true_cost, 3, steps=150) == [shallow(1)] * 3
    assert serve_one_by_one(policy, dear, 2, steps=150) != [shallow(1)] * 2
    after = serve_one_by_one(policy, true_cost, 20, steps=150)
    assert after[-10:].count(shallow(1)) >= 9
    assert policy.describe()["shallow_step_ms"] == {1: {0: 300.0, 1: 400.0}}


def test_a_shallow_re_timing_is_the_median_of_several_warm_steps_not_one() -> None:
    """Start-up timed the one-module step dear, so one stream runs plain. Its re-timing replaces
    its timings; the first step it times (the WARM_STEP-th after the prefill) reads 1.3 times
    its cost, the later ones what it costs. Taken alone, that one timing kept plain (1.6 / 0.52
    against plain's 1 / 0.3 and its margin), and the next re-timing came a doubled period later;
    the run's five warm steps give the median, and the requests after it keep one module."""
    true_cost = {PLAIN: 0.3, shallow(1): 0.4, 0: 0.6, 1: 0.65, 2: 0.7}
    after_prefill = (1.0,) * (WARM_STEP - 1) + (1.3,)  # the first step a re-timing run times
    policy = policy_with_rates([0.6, 0.36], {1: [0.6, 0.65, 0.7]}, shallow={1: {0: 0.3, 1: 0.9}})
    first = serve_one_by_one(policy, true_cost, SHALLOW_RETIME_EVERY // 100 + 1, after_prefill=after_prefill)
    assert set(first) == {PLAIN}
    later = serve_one_by_one(policy, true_cost, 5, after_prefill=after_prefill)
    assert later == [shallow(1)] * 5
    assert policy.describe()["shallow_step_ms"] == {1: {0: 300.0, 1: 400.0}}


def test_the_work_around_each_step_counts_against_steps_that_emit_fewer_tokens() -> None:
    """One stream: a plain step takes 0.25 and the one-module step 0.45 (1.6 tokens), as timed.
    On the steps alone plain wins (1 / 0.25 * 1.1 = 4.4 tokens per unit, its margin counted,
    against 1.6 / 0.45 / 1.05 = 3.39). But the core does 0.4 of work around every step, outside
    its timed part (the thread policy, the tokens' delivery, the loop), which a step emitting
    more tokens pays less often: 1 / 0.65 * 1.1 = 1.69 against 1.6 / 0.85 / 1.05 = 1.79.
    Measured as the gaps between steps and counted, requests keep one module; uncounted, they
    go plain."""
    true_cost = {PLAIN: 0.25, shallow(1): 0.45, 0: 0.8, 1: 0.85, 2: 0.9}
    counted = policy_with_rates([0.6, 0.36], {1: [0.8, 0.85, 0.9]}, shallow={1: {0: 0.25, 1: 0.45}})
    settled = serve_one_by_one(counted, true_cost, 20, around=0.4)
    assert settled[0] == PLAIN  # its first step, before any gap was seen
    assert settled[1:].count(shallow(1)) >= 17  # the rest: plain's re-timings, one request each
    assert counted.describe()["around_step_ms"] == {1: 400.0}
    on_steps_alone = policy_with_rates([0.6, 0.36], {1: [0.8, 0.85, 0.9]}, shallow={1: {0: 0.25, 1: 0.45}})
    assert serve_one_by_one(on_steps_alone, true_cost, 20) == [PLAIN] * 20


def test_a_thread_counts_table_begun_later_waits_a_whole_period_before_re_timing() -> None:
    """Each intra-op thread count has its own table: one begun after 5,000 steps at another
    count re-times its shallow steps SHALLOW_RETIME_STEPS steps later, not at once."""
    before = torch.get_num_threads()
    policy = policy_with_rates([0.6, 0.36], {1: [1.0, 1.0, 1.0]}, shallow={1: {0: 5.0, 1: 10.0}})
    try:
        torch.set_num_threads(2)
        for _ in range(5000):
            policy.observe_cost(1, 2, 1.0)
        assert policy.choose(1) == PLAIN  # stale at this count: re-timed now
        torch.set_num_threads(1)
        assert policy.choose(1) == 2  # a new table: its timings are as fresh as its start
        for _ in range(SHALLOW_RETIME_STEPS):
            policy.observe_cost(1, 2, 1.0)
        assert policy.choose(1) == PLAIN
    finally:
        torch.set_num_threads(before)


def serve_waves(
    policy: DraftPolicy,
    base: dict[int, float],
    per_key: float | dict[int, float],
    waves: int,
    steps: int = 200,
    prompt: int = 40,
) -> list[int]:
    """Waves of 16 rows that start and end together, as DecodeBatch drives the policy: the
    choice for their first step is made before their prefill (another pass), at the prompt's
    length; a shallow choice keeps its depth, PLAIN ends drafting (plain steps are then timed
    without a choice). A step of `choice` at key length L costs base[choice] + per_key * L
    (per_key[choice] where it is given by choice). Returns how many steps of each wave drafted
    with fewer modules than all (shallow ones)."""
    slope = per_key if isinstance(per_key, dict) else dict.fromkeys(base, per_key)
    clock = [0.0]
    policy.now = lambda: clock[0]
    shallow_steps = []
    for _ in range(waves):
        policy.interrupted()
        choice = policy.choose(16, None, keys=prompt)
        depth = shallow_depth(choice)
        count = 0
        for i in range(steps):
            keys = prompt + i
            if i and depth != 0:
                choice = policy.choose(16, depth, keys=keys)
                depth = shallow_depth(choice)
            count += depth is not None and depth > 0
            policy.began(16)
            clock[0] += (seconds := base[choice] + slope[choice] * keys)
            policy.observe_cost(16, choice, seconds, keys)
        shallow_steps.append(count)
    return shallow_steps


def test_steps_timed_at_other_key_lengths_are_compared_at_one_length() -> None:
    """16 rows in waves that start and end together: plain steps cost 2.0 plus 0.005 per key
    position, the one-module step 4.5 plus the same (1.7 tokens), so plain wins at any length.
    A re-timing of the one-module step runs at the start of a wave (keys ~45) and is set
    against plain's window, timed at the end of the last wave (keys ~240): taken as they were,
    1.7 / 4.73 beat 1 / 3.2 by more than PLAIN_MARGIN, and the rows kept one module for the
    whole wave. Compared at one length, the rows go back to plain after the re-timing's run."""
    base = {PLAIN: 2.0, shallow(1): 4.5, 0: 5.0, 1: 5.5, 2: 6.0}
    startup = {16: [base[n] + 0.005 * 64 for n in range(3)]}  # timed at position 64
    policy = policy_with_rates([0.7, 0.49], startup, shallow={16: {0: 2.32, 1: 4.82}})
    shallow_steps = serve_waves(policy, base, 0.005, 20)
    assert 2 <= sum(1 for n in shallow_steps if n) <= 4  # periods of 512 steps, then 1024, 2048
    assert set(shallow_steps) == {0, SHALLOW_RETIME_RUN}
    assert policy.table().per_key == {16: pytest.approx(0.005, rel=1e-3)}


def test_each_choice_grows_with_the_keys_by_its_own_slope() -> None:
    """A step verifying a draft with a module attends the keys in more layers and more query
    positions than a plain one, so its cost may grow by more per key position: here four times
    the plain step's. One slope shared by all choices, fitted mostly to plain timings, reads
    the one-module step's timings at short keys dearer than they were at the timing position,
    and its cost at long keys too low. With each choice's own slope, 16 rows
    in waves run the one-module step while it wins (at 40 keys 1.7 / 2.92 against plain's
    1 / 2.08 with its margin, 1.1 / 2.08) and go plain where it stops winning, at about 100 key
    positions, once enough timings have given the slopes (the first waves: a slope of 0)."""
    slopes = {PLAIN: 0.002, shallow(1): 0.008, 0: 0.008, 1: 0.008, 2: 0.008}
    base = {PLAIN: 2.0, shallow(1): 2.6, 0: 5.0, 1: 5.5, 2: 6.0}
    startup = {16: [base[n] + slopes[n] * 64 for n in range(3)]}  # timed at position 64
    start_shallow = {16: {d: base[shallow(d)] + slopes[shallow(d)] * 64 for d in (0, 1)}}
    policy = policy_with_rates([0.7, 0.49], startup, shallow=start_shallow)
    shallow_steps = serve_waves(policy, base, slopes, 20)
    # break-even: 1.7 / (2.6 + 0.008 L) = 1.1 / (2 + 0.002 L) at L = 100, 60 steps past the prompt's 40
    assert all(55 <= n <= 65 for n in shallow_steps[3:])
    own = policy.table().own_key[16]
    assert own[PLAIN] == pytest.approx(0.002, rel=0.1) and own[shallow(1)] == pytest.approx(0.008, rel=0.1)
    by_choice = policy.describe()["step_us_per_key_by_choice"][16]  # in /info, by the choice's name
    assert by_choice["plain"] == pytest.approx(2000, rel=0.1) and by_choice["shallow 1"] == pytest.approx(8000, rel=0.1)
    assert per_key_costs([(PLAIN, keys, 2.0 + 0.002 * keys) for keys in range(40, 200)]) == {
        PLAIN: pytest.approx(0.002)
    }
    assert per_key_costs([(PLAIN, 40, 1.0)] * 5) == {}  # one bucket: no slope of its own


def test_the_cost_of_a_key_position_is_the_slope_each_choice_shows_at_its_own_lengths() -> None:
    """The cheap choice runs at long keys, the dear one at short ones: set together, their
    timings would fall as keys grow. Each choice's timings about its own mean give the slope
    they share; a choice timed within one bucket, or a bucket of fewer than three timings, adds
    nothing, and a slope below zero (noise) is none."""
    rng = random.Random(0)
    cheap = [(PLAIN, keys, 2.0 + 0.005 * keys + rng.gauss(0, 0.01)) for keys in range(160, 300)]
    dear = [(shallow(1), keys, 4.5 + 0.005 * keys + rng.gauss(0, 0.01)) for keys in range(40, 100)]
    one_bucket = [(0, 40, 9.0)] * 5 + [(1, 0, 1.0), (1, 5 * KEY_BUCKET, 99.0)]
    assert per_key_cost(cheap + dear + one_bucket) == pytest.approx(0.005, rel=0.05)
    assert per_key_cost(dear) == pytest.approx(0.005, rel=0.05)
    assert per_key_cost(one_bucket) == 0.0
    assert per_key_cost([(PLAIN, keys, 3.0 - 0.001 * keys) for keys in range(40, 200)]) == 0.0


def test_the_cost_of_a_key_position_is_at_most_half_the_cheapest_start_up_step_over_its_position() -> None:
    """However steep a stretch of noisy timings makes it, the cost of the key positions below
    the start-up table's position is at most half its cheapest step (here the plain one), so
    no choice's cost at a short length falls below half its timing."""
    policy = policy_with_rates([0.6, 0.36], {16: [4.0, 4.5, 5.0]}, shallow={16: {0: 2.0}})
    for keys in range(300):
        policy.observe_cost(16, PLAIN, 2.0 + 0.5 * keys, keys)  # 0.5 s a position: absurd
    assert policy.table().per_key == {16: 2.0 / (2 * 64)}
