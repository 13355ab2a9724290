"""`python -m bench.served`: what it exists to show holds on a tiny model. A real server's one
stream cannot beat the model's own speed in process: HTTP, JSON and the queue only add work."""

import argparse
import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from app.decoding.generate import generate
from app.model.checkpoint import load_checkpoint, load_tokenizer
from bench.decoding import heldout_prompts
from bench.served import (
    Offline,
    check_compiled,
    pair_ratios,
    parse_settings,
    run_best_count,
    served_phase,
    server_trees,
    time_split,
)
from bench.server import ROOT, host_times, steal_share, thread_cores, thread_times

NEW_TOKENS = 24
NOISE = 1.5  # a served figure above the in-process one by more than this is not timing noise


@pytest.fixture()
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Both sides at one intra-op thread: this process's torch and the server's (it inherits the variables)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_one_served_stream_is_no_faster_than_the_model_in_process(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, corpus = byte_checkpoint
    tok = load_tokenizer(ckpt)
    prompts = heldout_prompts(corpus, tok, 3, 16, seed=1)
    texts = [tok.decode(p) for p in prompts]
    assert [tok.encode(t) for t in texts] == prompts  # the server sees the same token ids

    offline = Offline(ckpt, "cpu")  # eager, every draft count, the best
    eager = {"compile": False, "torch_threads": 1}
    phase = served_phase(
        ROOT, ckpt, "cpu", texts, 1, NEW_TOKENS, settings=eager, offline=offline, prompts=prompts, pairs=2
    )

    # the figure counts exactly the tokens the server generated (greedy: the model's own tokens)
    model, _ = load_checkpoint(ckpt)
    with torch.inference_mode():
        want = sum(len(generate(model, [p], NEW_TOKENS).tokens[0]) for p in prompts)
    assert len(phase["pairs"]) == 2
    for pair in phase["pairs"]:  # each served run set against the offline one just before it
        for n, each in pair["offline"]["per_request_by_drafts"].items():  # offline's requests split alike
            assert each["prefill_ms"] > 0 and each["after_prefill_ms"] > 0, (n, each)
            assert each["prefill_ms"] + each["after_prefill_ms"] == pytest.approx(each["wall_ms"], abs=0.01)
            assert 1 <= each["decode_passes"] < NEW_TOKENS, (n, each)
        for served in (pair["1_stream"], pair["1_stream_json"]):  # streamed, then as JSON replies
            assert served["sequences"] == len(prompts) and served["errors"] == 0
            assert served["tokens"] == want
            assert 0 < served["tokens_per_s"] <= NOISE * pair["offline"]["tokens_per_s"], (served, pair["offline"])
            assert 0 <= served["steal_share"] < 1  # how much of the host's CPU others had meanwhile
            cores = served["server_cores"]  # the inference thread decoded: the busiest but the loop's
            assert cores["busiest_other"] > 0.1 and cores["event_loop"] >= 0 and cores["rest"] >= 0, cores
            each = served["per_request"]  # a request's time: its prefill, its decode passes, and the rest
            assert each["prefill_ms"] > 0 and each["decode_ms"] > 0 and each["outside_passes_ms"] > 0, each
            assert 1 <= each["decode_passes"] < NEW_TOKENS  # the prefill gives the first token
            parts = each["prefill_ms"] + each["decode_ms"] + each["outside_passes_ms"]
            assert parts == pytest.approx(each["wall_ms"], abs=0.01)
            # the rest: outside the server's middleware, queued for the prefill, and the server's remainder
            rest = (each["client_and_wire_ms"], each["queue_ms"], each["server_rest_ms"])
            assert sum(rest) == pytest.approx(each["outside_passes_ms"], abs=0.01), each
            # (the client part has no sign to check: the server's time for a request goes on past its
            # reply's last byte while the client sends the next one, and it read below zero once)
            assert each["queue_ms"] > 0 and each["server_rest_ms"] > 0, each
        assert {"drafts_at_batch_1", "threads_at_batch_1", "step_ms_at_batch_1"} <= set(pair["policies"])
    many = phase["1_streams"]  # the concurrent load (one stream here): its server's cores too
    chosen = many["policies"]  # its choices at every batch size, and the work around a step there
    assert set(chosen) == {"drafts_by_batch", "around_step_ms"} and "1" in chosen["drafts_by_batch"]
    assert many["errors"] == 0 and many["server_cores"]["busiest_other"] > 0.1 and 0 <= many["steal_share"] < 1
    for key in ("1_stream", "1_stream_json"):  # the phase's figure: both runs, the median rate
        assert phase[key]["tokens"] == 2 * want and len(phase[key]["tokens_per_s_runs"]) == 2
        assert phase[key]["per_request_runs"] == [pair[key]["per_request"] for pair in phase["pairs"]]
        runs = [pair[key]["latency_p50_ms"] for pair in phase["pairs"]]
        assert phase[key]["latency_p50_ms"] == pytest.approx(sum(runs) / 2, abs=0.1)  # the median of two
        ratios = pair_ratios([phase], key)
        assert len(ratios) == 2 and all(0 < r <= NOISE for r in ratios)


def test_served_pairs_are_also_set_against_the_runs_best_draft_count() -> None:
    """A pair's best count is the fastest of its few noisy timings: here count 1 wins two pairs
    by noise, while count 0 is the faster over the run. The run's best count is chosen once,
    and each pair's served figure is set against that count's timing in the pair."""
    offline = [{0: 1000.0, 1: 1100.0}, {0: 1000.0, 1: 900.0}, {0: 1000.0, 1: 1050.0}, {0: 1000.0, 1: 850.0}]
    pairs = [
        {"offline": {"tokens_per_s_by_drafts": o, "tokens_per_s": max(o.values())}, "1_stream": {"tokens_per_s": 900.0}}
        for o in offline
    ]
    phases = [{"pairs": pairs[:2]}, {"pairs": pairs[2:]}]
    assert run_best_count(phases) == 0
    assert pair_ratios(phases, "1_stream") == [0.818, 0.9, 0.857, 0.9]  # each against its pair's fastest
    assert pair_ratios(phases, "1_stream", 0) == [0.9] * 4


def test_steal_share_is_the_stolen_part_of_the_cpu_time_between_two_readings() -> None:
    before = [100, 0, 50, 800, 0, 0, 0, 50]  # user nice system idle iowait irq softirq steal
    after = [400, 0, 100, 1000, 0, 0, 0, 150]  # +300 +50 +200 idle, +100 stolen: 100 of 650
    assert steal_share(before, after) == round(100 / 650, 3)
    assert steal_share(None, after) is None and steal_share(before, before) is None
    now = host_times()  # Linux: the counters are there and only grow
    assert now is not None and len(now) >= 8
    time.sleep(0.05)
    later = host_times()
    assert later is not None and all(b >= a for a, b in zip(now, later, strict=False))


def test_thread_cores_splits_a_process_cpu_into_its_main_thread_and_the_busiest_other() -> None:
    pid = os.getpid()
    spinning, stopped, release = threading.Event(), threading.Event(), threading.Event()
    spun: list[float] = []

    def spin() -> None:
        spinning.set()
        while not stopped.is_set():
            pass
        spun.append(time.thread_time())  # all this thread's CPU: it is new
        release.wait()

    before, t0 = thread_times(pid), time.perf_counter()
    worker = threading.Thread(target=spin)
    worker.start()
    spinning.wait()
    time.sleep(0.5)  # the main thread sleeps, the worker spins (sharing the GIL with nothing)
    stopped.set()
    while not spun:
        time.sleep(0.001)
    after, wall = thread_times(pid), time.perf_counter() - t0  # while the worker is still there
    release.set()
    worker.join()
    cores = thread_cores(pid, before, after, wall)
    # the worker's share is what it measured of itself (a shared host may have lent it less than
    # a core: once 0.41), within the kernel's 10 ms ticks; the sleeping main thread's is about none
    assert cores["busiest_other"] == pytest.approx(spun[0] / wall, abs=0.1), (cores, spun[0] / wall)
    assert cores["busiest_other"] > 0.1 and cores["event_loop"] < 0.1, cores
    assert thread_cores(pid, None, before, 1.0) == {} and thread_times(2**30) is None


def test_a_server_whose_compiled_steps_failed_is_refused_not_measured() -> None:
    """The service falls back to eager steps when compiling fails and says so in /info; the
    benchmark stops there rather than report eager figures as compiled ones."""
    check_compiled({"compiled": None})  # compiling off (or a server from before /info said)
    check_compiled({})
    check_compiled({"compiled": {"batch_sizes": [1, 2, 4], "seconds": 12.5}})
    with pytest.raises(RuntimeError, match="KeyError: '_frozen_param69'"):
        check_compiled({"compiled": {"error": "InductorError: KeyError: '_frozen_param69'"}})


def test_settings_compared_are_fields_of_the_service_settings(byte_checkpoint: tuple[str, str]) -> None:
    """--settings / --baseline-settings: KEY=VALUE as a Settings field (the MTP_ variable's name
    works too); a typo is refused rather than passed as an environment variable nobody reads."""
    parser = argparse.ArgumentParser()
    assert parse_settings(parser, ["dtype=bfloat16", "MTP_STREAM_INTERVAL_MS=0"]) == {
        "dtype": "bfloat16",
        "stream_interval_ms": "0",
    }
    for bad in (["dtpye=bfloat16"], ["dtype"], ["=1"]):
        with pytest.raises(SystemExit):
            parse_settings(parser, bad)
    # the offline runs set against a server of another dtype load the model in that dtype
    model = Offline(byte_checkpoint[0], "cpu", dtype="bfloat16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_without_a_baseline_only_this_checkout_is_served() -> None:
    """No --baseline and no --baseline-settings (which parse to {}): one server, no second one
    of the same code whose "baseline" ratios would compare this checkout with itself."""
    assert server_trees(None, {}) == {"this": ROOT}
    assert server_trees(None, None) == {"this": ROOT}
    assert server_trees(None, {"dtype": "bfloat16"}) == {"this": ROOT, "baseline": ROOT}


def test_time_split_sets_each_part_of_a_served_request_against_offlines_at_one_count() -> None:
    """Medians over the pairs, part by part, against the offline requests at the count given
    (not each pair's fastest): served 10 ms more in the prefill and 20 ms more after it."""

    def pair(offline_prefill: float, served_prefill: float) -> dict[str, object]:
        offline = {
            0: {"wall_ms": 100.0, "prefill_ms": 10.0, "after_prefill_ms": 90.0, "decode_passes": 199.0},
            1: {
                "wall_ms": 80.0,
                "prefill_ms": offline_prefill,
                "after_prefill_ms": 80.0 - offline_prefill,
                "decode_passes": 120.0,
            },
        }
        served = {
            "wall_ms": 110.0,
            "prefill_ms": served_prefill,
            "decode_ms": 80.0 - served_prefill,
            "outside_passes_ms": 30.0,
            "decode_passes": 130.0,
            "client_and_wire_ms": 5.0,
            "queue_ms": served_prefill / 2,
            "server_rest_ms": 25.0 - served_prefill / 2,
        }
        return {"offline": {"per_request_by_drafts": offline}, "1_stream_json": {"per_request": served}}

    phases = [{"pairs": [pair(8.0, 18.0), pair(8.0, 18.0)]}, {"pairs": [pair(2.0, 40.0)]}]
    split = time_split(phases, "1_stream_json", 1)
    assert split["offline_drafts"] == 1
    assert split["offline_ms"] == {"wall_ms": 80.0, "prefill_ms": 8.0, "after_prefill_ms": 72.0}
    assert split["served_ms"]["prefill_ms"] == 18.0 and split["served_ms"]["after_prefill_ms"] == 92.0
    assert split["served_minus_offline_ms"] == {"wall_ms": 30.0, "prefill_ms": 10.0, "after_prefill_ms": 20.0}
    assert split["served_decode_passes"] == 130.0 and split["offline_decode_passes"] == 120.0
    rest = {part: split["served_ms"][part] for part in ("client_and_wire_ms", "queue_ms", "server_rest_ms")}
    assert rest == {"client_and_wire_ms": 5.0, "queue_ms": 9.0, "server_rest_ms": 16.0}  # the outside's parts
