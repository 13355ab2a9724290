"""Attacks through the batch: requests whose settings cost the inference thread work at every step
or change of batch, which every other sequence in the batch waits out."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

from bench.attack.lab import Result, ms, wait_idle


def _churn(url: str, body: bytes, stop: threading.Event, statuses: list[int]) -> None:
    """Send one short completion after another until `stop`: each joins the batch and leaves it."""
    with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as http:
        while not stop.is_set():
            try:
                statuses.append(http.post("/v1/completions", content=body).status_code)
            except httpx.HTTPError:
                statuses.append(0)


def _pace(url: str, max_tokens: int) -> float:
    """Seconds per token of a greedy /generate_stream without speculation (one token a step, each
    its own event) from its first token to its last: the pace its reader sees."""
    body = {"inputs": "JULIET:", "parameters": {"max_new_tokens": max_tokens, "speculative": False}}
    times: list[float] = []
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and "token" in json.loads(line[6:]):
                times.append(time.monotonic())
    if len(times) < 2:
        raise RuntimeError(f"the victim stream gave {len(times)} tokens")
    return (times[-1] - times[0]) / (len(times) - 1)


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
            encoded = json.dumps(body).encode()
            stop = threading.Event()
            threads = [
                threading.Thread(target=_churn, args=(url, encoded, stop, statuses), daemon=True)
                for _ in range(attackers)
            ]
            for t in threads:
                t.start()
            time.sleep(1.0)  # the attackers' first requests are in the batch
            try:
                paces[label].append(_pace(url, victim_tokens))
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=60)
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
