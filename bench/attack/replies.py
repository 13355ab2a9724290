"""Attacks by the size of what one request asks for: a reply that takes the event loop long to
write, and /predict candidates that take the inference thread long to score."""

from __future__ import annotations

import json
import threading
import time

import httpx

from bench.attack.batch import stream_times
from bench.attack.inputs import polled_health
from bench.attack.lab import Result, ms, wait_idle


def chat_logprobs_reply(
    url: str, n: int = 32, top: int = 20, tokens: int = 200, rounds: int = 2, threshold_s: float = 0.1
) -> Result:
    """The event loop writes every reply: a chat reply whose `n` choices list the `top` most likely
    tokens at each of `tokens` tokens is 130,000 log-probability entries, which as pydantic models
    held the loop for up to 2.4 s while other clients' requests waited (2026-12-06, a throwaway
    run). A client probes /health every 10 ms while the same request runs with and without
    log-probabilities, `rounds` times each in alternation. The defect: a probe during the request
    with log-probabilities waits longer than `threshold_s`."""
    wait_idle(url)
    # the chat template's turn ends at a blank line: its tokens are kept out so that each choice runs to max_tokens
    turn_end = httpx.post(f"{url}/tokenize", json={"inputs": "\n\n"}, timeout=10).json()["tokens"]
    bias = {str(t["id"]): -100 for t in turn_end}
    asks = {"without": {}, "with": {"logprobs": True, "top_logprobs": top}}
    worst: dict[str, list[float]] = {label: [] for label in asks}
    sizes: dict[str, int] = {}
    statuses = []
    errors: set[str] = set()
    for _ in range(rounds):
        for label, extra in asks.items():
            body = {
                "messages": [{"role": "user", "content": "Speak."}],
                "n": n,
                "max_tokens": tokens,
                "temperature": 1.0,
                "seed": 1,
                "logit_bias": bias,
                **extra,
            }
            sent: list[float] = []
            with polled_health(url, every_s=0.01, settle_s=0.1, sent=sent) as latencies:
                t0 = time.perf_counter()
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
                t1 = time.perf_counter()
            statuses.append(r.status_code)
            if r.status_code != 200:
                errors.add(r.text[:200])
            sizes[label] = len(r.content)
            probes = zip(sent, latencies, strict=False)  # the last probe may be sent and not yet answered
            during = [lat for at, lat in probes if t0 <= at <= t1 or t0 <= at + lat <= t1]
            worst[label].append(max(during, default=0.0))
            wait_idle(url)
    lp, plain = max(worst["with"]), max(worst["without"])
    return Result(
        "chat-logprobs-reply",
        f"/health probed every 10 ms during a chat request of n = {n}, {tokens} tokens, with top_logprobs {top} "
        f"({sizes.get('with', 0) / 1e6:.1f} MB reply) and without ({sizes.get('without', 0) / 1e3:.0f} kB), "
        f"{rounds} rounds each; the slowest probe's answer",
        f"slowest probe {ms(lp)} with log-probabilities (rounds {', '.join(ms(x) for x in worst['with'])}) against "
        f"{ms(plain)} without (rounds {', '.join(ms(x) for x in worst['without'])}); defect above "
        f"{ms(threshold_s)}; statuses {sorted(set(statuses))} {sorted(errors)}",
        lp > threshold_s or any(s != 200 for s in statuses),
        {"worst_probe_s": worst, "reply_bytes": sizes, "statuses": statuses},
    )


def predict_candidates(
    url: str, inputs: int = 32, candidates: int = 32, victim_tokens: int = 60, factor: float = 10.0
) -> Result:
    """With sequential heads a /predict candidate is scored by running the modules, uncached, over
    its input's whole prompt: `inputs` near-context inputs with `candidates` candidates each were
    `inputs` x `candidates` such chains in one request, within every limit before
    MTP_MAX_CANDIDATE_TOKENS. A victim stream (no speculation) sent just after the request times
    its whole reply, against the same stream alone; then the same beside the largest request the
    budget lets through (as many of those inputs as it holds). The defect: the victim beside
    either request takes over `factor` times as long as alone, or a request gets a 5xx."""
    wait_idle(url)
    info = httpx.get(f"{url}/info", timeout=10).json()
    if info["model"].get("head_type") != "sequential":
        return Result("predict-candidates", "-", f"the checkpoint's heads are {info['model'].get('head_type')}", None)
    ids = [1 + (i * 7) % 250 for i in range(min(250, info["max_seq_len"] - 8))]
    cands = [[(c * 5 + j) % 250 + 1 for j in range(2)] for c in range(candidates)]
    budget = info["limits"].get("max_candidate_tokens")  # absent before the budget
    allowed = max(1, min(inputs, budget // (len(ids) * candidates))) if budget else inputs
    alone = stream_times(url, victim_tokens)[0]
    rows = []
    for count in dict.fromkeys((inputs, allowed)):
        body = json.dumps({"input_ids": [ids] * count, "candidates": cands}).encode()
        answer: list[tuple[int, float]] = []

        def send(body: bytes = body, answer: list[tuple[int, float]] = answer) -> None:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"}, timeout=600)
            answer.append((r.status_code, time.monotonic() - t0))

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        time.sleep(0.05)  # the request is in
        victim = stream_times(url, victim_tokens)[0]
        thread.join(timeout=600)
        status, seconds = answer[0] if answer else (0, float("nan"))
        rows.append({"inputs": count, "status": status, "seconds": seconds, "victim_s": victim})
        wait_idle(url)
    worst = max(r["victim_s"] for r in rows)
    said = "; ".join(
        f"{r['inputs']} inputs: {r['status']} in {r['seconds']:.2f} s, the victim {r['victim_s']:.2f} s" for r in rows
    )
    return Result(
        "predict-candidates",
        f"/predict of inputs of {len(ids)} token ids with {candidates} candidates each, {inputs} inputs and the most "
        f"the candidate budget ({budget}) allows, each with a greedy /generate_stream of {victim_tokens} tokens (no "
        "speculation) sent 50 ms after it; the request's answer and the victim's time to its last token",
        f"{said}; alone {alone:.2f} s (defect above {factor:g}x)",
        worst > factor * alone or any(r["status"] >= 500 or r["status"] == 0 for r in rows),
        {"rows": rows, "victim_alone_s": alone, "candidate_budget": budget},
    )
