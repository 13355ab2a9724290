"""The engine without HTTP: /generate's continuous batch at 1 and S concurrent streams, with
the adaptive draft count (app/engine/drafts.py), with every pass verifying k - 1 drafts, with
requests that do not speculate (`speculative: false`: plain prefills and steps, what the
adaptive policy is there to beat), and with sequential heads also the adaptive count without
shallow steps (plain steps only). The modes are interleaved over several repeats, each repeat
in another order (this machine's speed drifts), and medians reported, with each mode's decode
passes as they ran: the tokens each made, and their mean time (the engine's forward metrics).

With `offline`, each repeat also times generate() at batch 1 in the same process, on the
engine's own steps (its compiled decoder, on its thread) and the same prompts as the one
stream, at each draft count the engine can run: the model's own speed, against which the
engine's single stream is set twice, the best count's and the count the policy picked at batch 1
(its overhead apart from its choice). The single stream is then also run with final-only
requests (GenerateJob.final_only: the tokens handed over once, at the end), as a POST /generate
without streaming gets them; the streamed one hands each step's tokens to the event loop."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections import Counter
from typing import Any

from app.decoding.generate import generate
from app.engine.drafts import DraftPolicy
from app.engine.engine import Engine, EngineConfig, inference_thread
from app.engine.types import ErrorEvent, GenerateJob, TokenEvent
from app.metrics import Metrics
from app.model.checkpoint import load_checkpoint
from bench.decoding import heldout_prompts


async def _rate(
    engine: Engine,
    prompts: list[list[int]],
    streams: int,
    sequences: int,
    new_tokens: int,
    final_only: bool = False,
    speculative: bool | None = None,
) -> float:
    """Tokens/s of `streams` concurrent clients, each generating sequences back to back."""
    tokens = 0

    async def client(i: int) -> None:
        nonlocal tokens
        for r in range(sequences // streams):
            prompt = prompts[(r * streams + i) % len(prompts)]
            request = GenerateJob(prompt, max_new_tokens=new_tokens, final_only=final_only, speculative=speculative)
            async for event in engine.generate(request):
                if isinstance(event, TokenEvent):
                    tokens += len(event.token_ids)
                elif isinstance(event, ErrorEvent):  # a rate over failed requests is no figure
                    raise RuntimeError(f"the engine failed a request: {event.error}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(streams)))
    return tokens / (time.perf_counter() - t0)


def _sequences(streams: int) -> int:
    return max(12, 3 * streams)


async def _offline_rate(engine: Engine, prompts: list[list[int]], drafts: int, new_tokens: int) -> float:
    """Tokens/s of generate() at batch 1 through the prompts the single stream gets, with `drafts`
    drafts per verify pass (0: plain; sequential heads: also the modules run), on the engine's
    steps and thread, between its requests (its cache rows are free then)."""

    model, compiled = engine.model, engine.core.batch.compiled

    def run() -> float:
        tokens, t0 = 0, time.perf_counter()
        for p in prompts[: _sequences(1)]:
            g = generate(model, [p], new_tokens, speculative=drafts > 0, draft_tokens=drafts, compiled=compiled)
            tokens += len(g.tokens[0])
        rate = tokens / (time.perf_counter() - t0)
        if compiled is None:  # eager generate() made caches for one row: the engine's again
            model.setup_caches(engine.cfg.max_batch_size)
        return rate

    return await engine.call(run)


def _offline_counts(engine: Engine) -> list[int]:
    """The draft counts a batch-1 step of the engine can verify: its compiled greedy widths, else all."""
    compiled = engine.core.batch.compiled
    widths = (compiled.greedy_widths or compiled.widths) if compiled is not None else None
    return [w - 1 for w in widths] if widths else list(range(engine.model.cfg.k))


def _by_first(counts: Counter[tuple[Any, int]]) -> dict[str, dict[str, int]]:
    """{(a, b): n} as {str(a): {str(b): n}}, sorted."""
    out: dict[str, dict[str, int]] = {}
    for (a, b), n in sorted(counts.items()):
        out.setdefault(str(a), {})[str(b)] = n
    return out


def _thread_counts(engine: Engine) -> dict[str, Any]:
    """The thread policy's decode passes by batch bucket and thread count, and its re-timings
    started by drift (app/engine/threads.py); nothing where it does not run (one core, CUDA)."""
    threads = engine.core.passes.threads
    if threads is None:
        return {}
    decode = Counter({(size, n): c for ((kind, size), n), c in threads.passes.items() if kind == "decode"})
    return {"decode_passes_by_batch_and_threads": _by_first(decode), "drift_retimings": threads.early}


def _decode_totals(metrics: Metrics) -> tuple[float, float, float]:
    """(count, seconds) of the decode passes the engine's metrics hold so far, and the tokens
    generated (a request that stops at EOS makes fewer than it asked for)."""
    registry, kind = metrics.registry, {"kind": "decode"}
    count = registry.get_sample_value("mtp_forward_duration_seconds_count", kind) or 0.0
    seconds = registry.get_sample_value("mtp_forward_duration_seconds_sum", kind) or 0.0
    return count, seconds, registry.get_sample_value("mtp_generated_tokens_total") or 0.0


def _passes(phases: list[tuple[float, float, float]]) -> dict[str, float]:
    """A mode's decode passes over its phases of (passes, seconds, tokens after each request's
    first, which its prefill makes): the tokens each pass made, all its rows together, and the
    mean pass, in ms."""
    passes, seconds, tokens = (sum(x) for x in zip(*phases, strict=True))
    return {
        "tokens_per_pass": round(tokens / passes, 3) if passes else 0.0,
        "mean_ms": round(seconds * 1e3 / passes, 3) if passes else 0.0,
    }


def _choice_drafts(choice: int | str) -> int:
    """The offline draft count of the policy's batch-1 choice: "plain" 0, "shallow d" d, n n."""
    if isinstance(choice, int):
        return choice
    return 0 if choice == "plain" else int(choice.split()[-1])


async def _run(
    checkpoint: str,
    corpus: str,
    streams: int,
    new_tokens: int,
    repeats: int,
    settings: dict[str, Any],
    offline: bool = False,
) -> dict[str, Any]:
    worker = inference_thread()  # as in the service: the model lives on the engine's thread
    model, tok = await asyncio.get_running_loop().run_in_executor(worker, load_checkpoint, checkpoint)
    prompts = heldout_prompts(corpus, tok, 64, 32, seed=1)
    cfg = EngineConfig(**{"max_batch_size": max(streams, 1), "max_queue_size": 1024, **settings})
    metrics = Metrics(k=model.cfg.k)
    engine = Engine(model, tok.eot_id, cfg, metrics, executor=worker)
    await engine.start()  # warms up and times the verify step for the draft policy
    policy = engine.core.batch.policy
    # mode: (draft policy, the requests' `speculative`); "fixed": no policy, every pass k - 1 drafts
    modes: dict[str, tuple[DraftPolicy | None, bool | None]] = {"adaptive": (policy, None), "fixed": (None, None)}
    if policy is not None and any(d > 0 for row in policy.shallow.values() for d in row):
        # the same start-up table, without the shallow steps that keep 1 .. k-2 modules
        plain = {b: {0: row[0][0]} for b, row in policy.shallow.items() if 0 in row}
        no_shallow = DraftPolicy(policy.max_drafts, policy.costs, policy.choices, plain, policy.position)
        modes["no_shallow"] = (no_shallow, None)
    modes["plain"] = (policy, False)
    rates: dict[str, dict[int, list[float]]] = {m: {1: [], streams: []} for m in modes}
    decode: dict[str, dict[int, list[tuple[float, float, float]]]] = {m: {1: [], streams: []} for m in modes}
    counts = _offline_counts(engine) if offline else []
    off: dict[int, list[float]] = {n: [] for n in counts}
    final_only: list[float] = []  # the adaptive single stream, final-only requests (with offline)
    names = list(modes)
    try:
        for r in range(repeats):
            for mode in names[r % len(names) :] + names[: r % len(names)]:  # each repeat another first
                used, speculative = modes[mode]
                await engine.call(functools.partial(setattr, engine.core.batch, "policy", used))
                for s in (1, streams):
                    before = _decode_totals(metrics)
                    rate = await _rate(engine, prompts, s, _sequences(s), new_tokens, speculative=speculative)
                    rates[mode][s].append(rate)
                    passes, seconds, made = (b - a for a, b in zip(before, _decode_totals(metrics), strict=True))
                    decode[mode][s].append((passes, seconds, made - _sequences(s)))  # each first: its prefill's
            await engine.call(functools.partial(setattr, engine.core.batch, "policy", policy))
            if offline:
                final_only.append(await _rate(engine, prompts, 1, _sequences(1), new_tokens, final_only=True))
            for n in counts:
                off[n].append(await _offline_rate(engine, prompts, n, new_tokens))
    finally:
        await engine.shutdown()
    med = {m: {s: statistics.median(v) for s, v in by.items()} for m, by in rates.items()}
    described: dict[str, Any] = policy.describe() if policy else {}
    drafts_by_batch: dict[int, int | str] = described.get("drafts_by_batch", {})
    result: dict[str, Any] = {
        "benchmark": "engine_generate",
        "checkpoint": checkpoint,
        "streams": streams,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "tokens_per_s_median": {m: {str(s): round(v, 1) for s, v in by.items()} for m, by in med.items()},
        "tokens_per_s_runs": {m: {str(s): [round(x, 1) for x in v] for s, v in by.items()} for m, by in rates.items()},
        "decode_passes": {m: {str(s): _passes(v) for s, v in by.items()} for m, by in decode.items()},
        "ratios": {
            f"adaptive_vs_fixed_{streams}_streams": round(med["adaptive"][streams] / med["fixed"][streams], 3),
            "adaptive_vs_fixed_1_stream": round(med["adaptive"][1] / med["fixed"][1], 3),
            f"adaptive_vs_plain_{streams}_streams": round(med["adaptive"][streams] / med["plain"][streams], 3),
            "adaptive_vs_plain_1_stream": round(med["adaptive"][1] / med["plain"][1], 3),
            f"adaptive_{streams}_vs_1_stream": round(med["adaptive"][streams] / med["adaptive"][1], 2),
            f"fixed_{streams}_vs_1_stream": round(med["fixed"][streams] / med["fixed"][1], 2),
            **(
                {
                    f"adaptive_vs_no_shallow_{s}": round(med["adaptive"][n] / med["no_shallow"][n], 3)
                    for s, n in (("1_stream", 1), (f"{streams}_streams", streams))
                }
                if "no_shallow" in med
                else {}
            ),
        },
        "drafts_by_batch_size": {str(b): n for b, n in drafts_by_batch.items()},
        "shallow_step_ms_by_batch": described.get("shallow_step_ms", {}),
        "step_us_per_key_position_by_batch": described.get("step_us_per_key", {}),
        "step_us_per_key_by_choice_by_batch": described.get("step_us_per_key_by_choice", {}),
        "acceptance_by_position": [round(a, 3) for a in policy.rates()] if policy else [],
        # what ran, all modes and repeats together: the adaptive policy's choices by batch size
        # (a shallow choice as -1 - depth), and the decode passes by thread count
        "adaptive_choices_by_batch": _by_first(policy.made) if policy else {},
        **_thread_counts(engine),
        "step_ms_by_batch_and_drafts": {str(b): [round(c * 1e3, 2) for c in row] for b, row in policy.costs.items()}
        if policy
        else {},
    }
    if offline:
        off_med = {n: statistics.median(v) for n, v in off.items()}
        best = max(off_med, key=lambda n: off_med[n])
        result["offline_1_stream"] = {
            "tokens_per_s_median_by_drafts": {str(n): round(v, 1) for n, v in off_med.items()},
            "tokens_per_s_runs_by_drafts": {str(n): [round(x, 1) for x in v] for n, v in off.items()},
            "best_drafts": best,
        }
        result["final_only_1_stream"] = {
            "tokens_per_s_median": round(statistics.median(final_only), 1),
            "tokens_per_s_runs": [round(x, 1) for x in final_only],
        }
        ratios = result["ratios"]
        ones = {"adaptive_1_stream": med["adaptive"][1], "final_only_1_stream": statistics.median(final_only)}
        for name, rate in ones.items():
            ratios[f"{name}_vs_offline_best"] = round(rate / off_med[best], 3)
        if policy is not None and (at := _choice_drafts(drafts_by_batch[policy.batches[0]])) in off_med:
            result["offline_1_stream"]["policy_choice_drafts"] = at  # at batch 1, as the run ended
            for name, rate in ones.items():
                ratios[f"{name}_vs_offline_at_policy_choice"] = round(rate / off_med[at], 3)
    return result


def bench_engine(
    checkpoint: str,
    corpus: str,
    streams: int = 16,
    new_tokens: int = 64,
    repeats: int = 4,
    settings: dict[str, Any] | None = None,
    offline: bool = False,
) -> dict[str, Any]:
    """settings: EngineConfig fields over the defaults (the tests turn compiling off);
    offline: also generate() at batch 1 on the engine's steps (the module's doc)."""
    return asyncio.run(_run(checkpoint, corpus, streams, new_tokens, repeats, settings or {}, offline))
