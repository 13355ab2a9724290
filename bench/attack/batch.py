"""Attacks through the batch: requests whose settings cost the inference thread work at every step
or change of batch, which every other sequence in the batch waits out."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator

import httpx

from bench.attack.lab import Result, ms, wait_idle


def _churn(url: str, body: bytes, stop: threading.Event, statuses: list[int], timeout: float = 60) -> None:
    """Send one completion after another until `stop`: each joins the batch and leaves it."""
    with httpx.Client(base_url=url, timeout=timeout, headers={"content-type": "application/json"}) as http:
        while not stop.is_set():
            try:
                statuses.append(http.post("/v1/completions", content=body).status_code)
            except httpx.HTTPError:
                statuses.append(0)


@contextlib.contextmanager
def _attacking(url: str, body: bytes, clients: int, statuses: list[int], timeout: float) -> Iterator[None]:
    """`clients` threads sending `body` one after another (`_churn`) for as long as the block runs."""
    stop = threading.Event()
    threads = [
        threading.Thread(target=_churn, args=(url, body, stop, statuses, timeout), daemon=True) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=timeout)


def stream_pace(url: str, max_tokens: int) -> float:
    """Seconds per token of a greedy /generate_stream without speculation (one token a step, each
    its own event) from its first token to its last: the pace its reader sees."""
    return stream_times(url, max_tokens)[1]


def stream_times(url: str, max_tokens: int) -> tuple[float, float]:
    """A greedy /generate_stream without speculation (a token a step, each its own event): seconds
    from sending it to its last token, and seconds per token from its first token to its last."""
    body = {"inputs": "JULIET:", "parameters": {"max_new_tokens": max_tokens, "speculative": False}}
    times: list[float] = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and "token" in json.loads(line[6:]):
                times.append(time.monotonic())
    if len(times) < 2:
        raise RuntimeError(f"the victim stream gave {len(times)} tokens")
    return times[-1] - t0, (times[-1] - times[0]) / (len(times) - 1)


def logit_bias_bulk(
    url: str,
    attackers: int = 15,
    attack_tokens: int = 4,
    victim_tokens: int = 120,
    rounds: int = 3,
    threshold_s: float = 0.015,
) -> Result:
    """A full logit_bias (an entry for each token of the vocabulary) costs its batch mates less: it was
    written into the batch's bias one element at a time on the inference thread at each change of
    batch (16 rows of 512 entries: 45 ms), and is now one indexed write (12 ms; both throwaway timings
    on the 2-core host, 2026-12-04).

    A victim stream without a bias or speculation (a token a step) measures its pace, seconds per
    token, while `attackers` clients keep joining and leaving its batch with short completions, in
    alternating phases: each attacker's logit_bias has one entry (the control: the batch is
    penalized and its bias built, of one entry a row) or one for every token. The defect: the full
    maps' phases' mean pace exceeds the control's by more than `threshold_s` a token."""
    wait_idle(url)
    vocab = httpx.get(f"{url}/info", timeout=10).json()["vocab_size"]
    maps = {"one entry": {"0": 0.01}, f"{vocab} entries": {str(t): 0.01 for t in range(vocab)}}
    paces: dict[str, list[float]] = {label: [] for label in maps}
    statuses: list[int] = []
    for _ in range(rounds):
        for label, bias in maps.items():
            body = {"prompt": "ROMEO:", "max_tokens": attack_tokens, "temperature": 0, "logit_bias": bias}
            with _attacking(url, json.dumps(body).encode(), attackers, statuses, timeout=60):
                time.sleep(1.0)  # the attackers' first requests are in the batch
                paces[label].append(stream_pace(url, victim_tokens))
            wait_idle(url)
    (control, c_paces), (full, f_paces) = paces.items()
    c_mean, f_mean = statistics.mean(c_paces), statistics.mean(f_paces)
    failed = sum(s != 200 for s in statuses)
    return Result(
        "logit-bias-bulk",
        f"a greedy /generate_stream of {victim_tokens} tokens, one a step (no speculation), beside {attackers} "
        f"clients sending /v1/completions of {attack_tokens} tokens one after another, with a logit_bias of one "
        f"entry (control) or of all {vocab} tokens, {rounds} phases each; the stream's time per token",
        f"{ms(f_mean)} a token with {full} against {ms(c_mean)} with {control} (+{ms(f_mean - c_mean)}; "
        f"defect above +{ms(threshold_s)}); phases {', '.join(ms(x) for x in f_paces)} against "
        f"{', '.join(ms(x) for x in c_paces)}; {len(statuses)} attacker requests, {failed} not 200",
        f_mean - c_mean > threshold_s,
        {"pace_s": paces, "attacker_requests": len(statuses), "attacker_failures": failed},
    )


def prefill_burst(
    url: str, attackers: int = 2, prompts: int = 32, victim_tokens: int = 100, rounds: int = 2, factor: float = 10.0
) -> Result:
    """Prompts are work for the inference thread before any decode step: a stream's next step waits
    for the prefill pass of every request admitted before it. `attackers` clients send, one after
    another, completions of `prompts` prompts of nearly the context's length and `max_tokens` 1
    (nothing but prefill). A victim stream without speculation (a token a step) measures its pace
    alone and under the attack, `rounds` times each. Before a prefill pass had a token budget
    (`MTP_MAX_PREFILL_TOKENS`), the whole burst was one pass. The defect: the pace under attack is
    more than `factor` times the pace alone."""
    wait_idle(url)
    context = httpx.get(f"{url}/info", timeout=10).json()["max_seq_len"]
    ids = [1 + (i * 7) % 250 for i in range(min(250, context - 6))]
    body = json.dumps({"prompt": [ids] * prompts, "max_tokens": 1}).encode()
    paces: dict[str, list[float]] = {"alone": [], "attacked": []}
    statuses: list[int] = []
    for _ in range(rounds):
        paces["alone"].append(stream_pace(url, victim_tokens))
        with _attacking(url, body, attackers, statuses, timeout=300):
            time.sleep(0.5)  # the first bursts are queued
            paces["attacked"].append(stream_pace(url, victim_tokens))
        wait_idle(url)
    alone, attacked = statistics.median(paces["alone"]), statistics.median(paces["attacked"])
    failed = sum(s != 200 for s in statuses)
    return Result(
        "prefill-burst",
        f"{attackers} clients sending /v1/completions of {prompts} prompts of {len(ids)} token ids and max_tokens 1, "
        f"one after another, beside a greedy /generate_stream of {victim_tokens} tokens (no speculation); its time "
        f"per token alone and attacked, {rounds} rounds",
        f"{ms(attacked)} a token attacked against {ms(alone)} alone ({attacked / alone:.0f}x; defect above "
        f"{factor:g}x); rounds {', '.join(ms(x) for x in paces['attacked'])} against "
        f"{', '.join(ms(x) for x in paces['alone'])}; {len(statuses)} attacker requests, {failed} not 200",
        attacked > factor * alone,
        {"pace_s": paces, "attacker_requests": len(statuses), "attacker_failures": failed},
    )
