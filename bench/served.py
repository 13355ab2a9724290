"""Served /generate speed against the model's own, and against an older commit's server.

    python -m bench.served [--baseline GIT_REF] [--rounds 2] [--pairs 3] [--streams 16] [--new-tokens 200]
    python -m bench.served --settings dtype=bfloat16 --baseline-settings dtype=float32

With --settings, this checkout's servers (and the offline runs set against them) get those
settings; with --baseline-settings and no --baseline, the baseline is this checkout's server
under those settings instead of an older commit's: a setting measured against the default, in
the same alternating phases.

Phases, one torch process busy at a time (two would fight over the cores):
  1. offline: generate() in this process on the prompts the servers get, greedy, batch 1, at
     every draft count 0 .. k-1 eager (unless --skip-eager-offline), and with the service's
     compiled step at the counts its policy can pick; the fastest count is "the model's own
     speed" at batch 1;
  2. servers in alternating phases A, B, A, B ... (this checkout, then GIT_REF's code checked
     out in a temporary worktree), each measuring one sequential stream and `streams`
     concurrent ones (POST /generate, greedy, default speculation; the sequential stream both
     streamed and as JSON replies, the concurrent ones streamed). In every server's phases the
     sequential stream runs `pairs` times, each time right after a compiled offline timing made
     while the server idles, so both servers run the same schedule: this checkout's served /
     offline is the median of its pairs, each pair's two figures taken within seconds of each
     other (this machine's speed drifts between minutes).
Each sequential run also says where a request's time went (`per_request`, from the server's
metrics before and after it): its prefill, its decode passes and how many, and the rest of its
wall time, outside any pass, split three ways: the client and the wire (outside the server's
middleware), the queue (submission to the prefill pass) and the server's remainder (the route,
the core loop between passes, the events' delivery); the offline timings split theirs the same way
(`per_request_by_drafts`: the prefill pass, and the rest). `time_split` sets the two side by
side at the run's best count, medians over this checkout's pairs: which part of a request
the served one loses its time in.
Each pair is also set against one draft count's offline figure, the count fastest over the
whole run (`_vs_offline_run_best`): a pair's best count is the fastest of a few noisy timings,
and the fastest of several noisy figures reads high on average. A baseline's pairs get both
ratios too, against the same offline runs.
Every ratio is computed from figures of this one run; a server's figure is the median of its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import torch

from app import config
from app.config import Settings
from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import generate
from app.engine.compile import cache_dir, compile_shapes
from app.engine.config import EngineConfig
from app.model.checkpoint import load_checkpoint, load_tokenizer, resolve_device, resolve_dtype, resolve_kv_dtype
from bench.decoding import heldout_prompts, write_json
from bench.server import (
    ROOT,
    baseline_tree,
    choices_by_batch,
    forward_totals,
    measured,
    per_request,
    policies,
    progress,
    running,
)
from bench.service import generate_load

SETTLE_S = 0.5  # between the two processes' turns: the last one's OpenMP threads stop spinning


class Offline:
    """generate() in this process at batch 1, greedy, on one checkpoint: eager at every draft
    count 0 .. k-1, or with the service's compiled step (CompiledDecoder at the engine's default
    shapes, caches and autotuning, so Inductor's cache is shared with the servers) at the draft
    counts the service's policy can pick. Built once; timed as often as asked."""

    def __init__(
        self,
        checkpoint: str,
        device: str,
        compiled: bool = False,
        dtype: str = "auto",
        gemm_backends: str | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        dev = resolve_device(device)
        self.model, _ = load_checkpoint(checkpoint, device=dev, dtype=resolve_dtype(dtype, dev))  # as served
        weights = self.model.head.proj.weight.dtype
        self.model.kv_dtype = resolve_kv_dtype(kv_cache_dtype, weights, dev, compiled=compiled)  # as the engine's
        self.counts = list(range(self.model.cfg.k))
        self.dec = None
        if compiled:
            cfg = EngineConfig()
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir(cfg))
            _, widths, greedy, _ = compile_shapes(cfg, self.model)
            autotune = cfg.compile_autotune and dev.type == "cpu"
            self.dec = CompiledDecoder(
                self.model,
                cfg.max_batch_size,
                autotune,
                batch_sizes=[1],
                widths=widths,
                greedy_widths=greedy,
                cpp_wrapper=cfg.compile_cpp_wrapper,
                gemm_backends=gemm_backends or cfg.compile_gemm_backends,
            )
            self.counts = [w - 1 for w in (greedy or widths)]
        self._warm = False

    def rate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        """Tokens/s over the prompts at each draft count, and the best. The counts take turns
        prompt by prompt, in an order that rotates from one prompt to the next: this machine's
        speed drifts by tens of per cent within a minute, and timed one after another, the count
        that ran in a fast moment would pass for the fastest, which biases the best upwards."""
        tokens = dict.fromkeys(self.counts, 0)
        seconds = dict.fromkeys(self.counts, 0.0)
        prefill = dict.fromkeys(self.counts, 0.0)  # of those seconds, the prefill passes'
        passes = dict.fromkeys(self.counts, 0)
        with torch.inference_mode():
            if not self._warm:  # the first call at each count compiles or loads its graphs
                for n in self.counts:
                    generate(self.model, prompts[:1], 8, speculative=n > 0, draft_tokens=n, compiled=self.dec)
            for i, p in enumerate(prompts):
                for n in self.counts[i % len(self.counts) :] + self.counts[: i % len(self.counts)]:
                    t0 = time.perf_counter()
                    g = generate(self.model, [p], new_tokens, speculative=n > 0, draft_tokens=n, compiled=self.dec)
                    seconds[n] += time.perf_counter() - t0
                    tokens[n] += len(g.tokens[0])
                    prefill[n] += g.stats.prefill_s
                    passes[n] += g.stats.forward_passes
        self._warm = True
        rates = {n: tokens[n] / seconds[n] for n in self.counts}
        best = max(rates, key=lambda n: rates[n])
        each = len(prompts)
        return {
            "tokens_per_s_by_drafts": {n: round(r, 1) for n, r in rates.items()},
            "best_drafts": best,
            "tokens_per_s": round(rates[best], 1),
            # a request's time at each count, as the servers' per_request splits theirs: the
            # prefill pass, and everything after it (the decode passes and the loop between them)
            "per_request_by_drafts": {
                n: {
                    "wall_ms": round(seconds[n] / each * 1e3, 3),
                    "prefill_ms": round(prefill[n] / each * 1e3, 3),
                    "after_prefill_ms": round((seconds[n] - prefill[n]) / each * 1e3, 3),
                    "decode_passes": round(passes[n] / each - 1, 1),
                }
                for n in self.counts
            },
        }


def served_phase(
    root: Path,
    checkpoint: str,
    device: str,
    texts: list[str],
    streams: int,
    new_tokens: int,
    settings: Mapping[str, object] | None = None,
    offline: Offline | None = None,
    prompts: list[list[int]] | None = None,
    pairs: int = 1,
) -> dict[str, Any]:
    """One server of root's code on the checkpoint, default settings (plus `settings`; the tests
    turn compile off): `pairs` times one sequential stream through the texts, streamed (SSE) and
    then as JSON replies, then `streams` concurrent streamed ones.

    offline: each pair starts with generate() in this process on `prompts` (the texts' token
    ids) while the server idles, so that the served figure is set against the model's speed of
    the same minute: this machine's speed drifts by tens of per cent between minutes."""
    base = {
        "log_level": "WARNING",
        "device": device,
        "max_queue_size": 1024,
        "max_new_tokens": max(256, new_tokens),
        **(settings or {}),
    }
    runs: list[dict[str, Any]] = []
    with running(checkpoint, base, root=root, ready_timeout=1800) as srv:  # a cold compile: minutes
        check_compiled(httpx.get(f"{srv.url}/info", timeout=30).json())
        for _ in range(pairs):
            run: dict[str, Any] = {}
            if offline is not None and prompts is not None:
                time.sleep(SETTLE_S)
                run["offline"] = measured(lambda: offline.rate(prompts, new_tokens))
                time.sleep(SETTLE_S)
            pid = srv.proc.pid
            for key, stream in (("1_stream", True), ("1_stream_json", False)):
                before = forward_totals(srv.url)
                load = lambda s=stream: asyncio.run(generate_load(srv.url, texts, 1, new_tokens, len(texts), stream=s))
                r = run[key] = measured(load, pid)
                wall = r["tokens"] / r["tokens_per_s"]  # the load's own clock
                r["per_request"] = per_request(before, forward_totals(srv.url), wall, r["sequences"])
            run["policies"] = policies(srv.url)
            runs.append(run)
        many = measured(lambda: asyncio.run(generate_load(srv.url, texts, streams, new_tokens, 2)), srv.proc.pid)
        many["policies"] = choices_by_batch(srv.url)
    out: dict[str, Any] = {key: _merged([r[key] for r in runs]) for key in ("1_stream", "1_stream_json")}
    out[f"{streams}_streams"] = many
    if offline is not None:
        out["pairs"] = runs
    return out


def check_compiled(info: Mapping[str, Any]) -> None:
    """Refuse a server whose compiled steps failed to build: it serves eager steps (by design,
    it stays up and reports the error in /info), and its figures would pass for compiled ones."""
    compiled = info.get("compiled")
    if isinstance(compiled, Mapping) and compiled.get("error"):
        raise RuntimeError(f"the server's compiled steps failed to build, it serves eager ones: {compiled['error']}")


def _merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one load as one figure: counts summed, tokens/s and each latency figure
    the median of the runs'."""
    rates = [r["tokens_per_s"] for r in results]
    latencies = {
        k: round(statistics.median(vals), 1) if (vals := [r[k] for r in results if r.get(k) is not None]) else None
        for k in results[0]
        if k.endswith("_ms")
    }
    return {
        **{k: v for k, v in results[0].items() if k not in ("steal_share", "server_cores", "per_request")},
        **latencies,
        "steal_share_runs": [r.get("steal_share") for r in results],
        "per_request_runs": [r.get("per_request") for r in results],
        "server_cores_runs": [r.get("server_cores") for r in results],
        "sequences": sum(r["sequences"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": round(statistics.median(rates), 1),
        "tokens_per_s_runs": rates,
    }


def server_trees(baseline: str | None, baseline_settings: Mapping[str, str] | None) -> dict[str, Path]:
    """The servers a run measures: this checkout's, and a baseline's only where one is asked
    for, an older commit's tree (baseline) or this checkout under other settings (a non-empty
    baseline_settings). With neither there is nothing to compare, and no second server runs."""
    if baseline:
        return {"this": ROOT, "baseline": baseline_tree(baseline)}
    return {"this": ROOT, "baseline": ROOT} if baseline_settings else {"this": ROOT}


def pair_ratios(phases: list[dict[str, Any]], key: str, count: int | None = None) -> list[float]:
    """Each pair's served figure over the offline figure timed just before it: the pair's best
    draft count, or `count`'s."""

    def offline(p: dict[str, Any]) -> float:
        run = p["offline"]
        return float(run["tokens_per_s"] if count is None else run["tokens_per_s_by_drafts"][count])

    return [round(p[key]["tokens_per_s"] / offline(p), 3) for phase in phases for p in phase["pairs"]]


def run_best_count(phases: list[dict[str, Any]]) -> int:
    """The draft count fastest offline over the whole run (the highest median over its pairs).
    Each pair's best count is the fastest of a few noisy timings, and the fastest of several
    noisy figures reads high on average: a count chosen once over every pair does not."""
    runs = [p["offline"]["tokens_per_s_by_drafts"] for phase in phases for p in phase["pairs"]]
    return max(runs[0], key=lambda n: statistics.median(r[n] for r in runs))


SERVED_PARTS = (
    "wall_ms",
    "prefill_ms",
    "decode_ms",
    "outside_passes_ms",
    "client_and_wire_ms",
    "queue_ms",
    "server_rest_ms",
)


def time_split(phases: list[dict[str, Any]], key: str, count: int) -> dict[str, Any]:
    """Where a served request's time goes against offline generate()'s at `count` drafts, part
    by part: medians over the pairs of the served requests' prefill pass and of the rest of
    their wall time (decode passes, the core between them, HTTP both ways and the client), and
    of the offline requests' prefill and the rest of theirs (decode passes and generate()'s
    loop), with the differences served - offline. A served request's `after_prefill_ms` is its
    wall time less its prefill pass: the HTTP before the prefill is in it too."""
    pairs = [p for phase in phases for p in phase["pairs"]]
    served = [p[key]["per_request"] for p in pairs]
    offline = [p["offline"]["per_request_by_drafts"][count] for p in pairs]

    def med(rows: list[dict[str, float]], part: str) -> float:
        return round(statistics.median(r[part] for r in rows), 3)

    out: dict[str, Any] = {
        "offline_drafts": count,
        "served_ms": {part: med(served, part) for part in SERVED_PARTS if all(part in r for r in served)},
        "offline_ms": {part: med(offline, part) for part in ("wall_ms", "prefill_ms", "after_prefill_ms")},
        "served_decode_passes": med(served, "decode_passes"),
        "offline_decode_passes": med(offline, "decode_passes"),
    }
    after = [s["decode_ms"] + s["outside_passes_ms"] for s in served]
    out["served_ms"]["after_prefill_ms"] = round(statistics.median(after), 3)
    out["served_minus_offline_ms"] = {
        part: round(out["served_ms"][part] - out["offline_ms"][part], 3)
        for part in ("wall_ms", "prefill_ms", "after_prefill_ms")
    }
    return out


def bench_served(
    checkpoint: str,
    corpus: str,
    baseline: str | None,
    rounds: int,
    streams: int,
    new_tokens: int,
    prompts: int,
    device: str = "cpu",
    skip_eager: bool = False,
    pairs: int = 3,
    settings: Mapping[str, str] | None = None,
    baseline_settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """skip_eager: no offline eager run (the compiled one is what the targets compare with).
    settings: this checkout's servers' (and the offline runs'); baseline_settings: the
    baseline's, whose server is this checkout's when baseline is None."""
    tok = load_tokenizer(checkpoint)
    ids = heldout_prompts(corpus, tok, prompts, 32, seed=1)
    texts = [tok.decode(p) for p in ids]
    out: dict[str, Any] = {
        "benchmark": "served_generate",
        "checkpoint": checkpoint,
        "new_tokens": new_tokens,
        "prompts": prompts,
        "pairs": pairs,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "settings": dict(settings or {}),
    }
    dtype = (settings or {}).get("dtype", "auto")
    if not skip_eager:
        out["offline"] = progress(
            "bench.served", "offline eager", Offline(checkpoint, device, dtype=dtype).rate(ids, new_tokens)
        )
    gemm = (settings or {}).get("compile_gemm_backends")  # as this checkout's servers compile
    kv = (settings or {}).get("kv_cache_dtype") or Settings().kv_cache_dtype  # and keep their keys
    offline = Offline(checkpoint, device, compiled=True, dtype=dtype, gemm_backends=gemm, kv_cache_dtype=kv)
    out["offline_compiled_first"] = progress("bench.served", "offline compiled", offline.rate(ids, new_tokens))
    trees = server_trees(baseline, baseline_settings)
    compared = "baseline" in trees
    by_tree = {"this": settings, "baseline": baseline_settings}
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, root in trees.items():  # A, B, A, B: drift on this machine hits both alike
            # Both servers get the same runs in the same order: `pairs` sequential streams, each
            # after an offline timing (this checkout's pairs set its served figures against
            # them). A server's first run is often its slowest (its policies are young), so a
            # baseline timed once against this checkout's median of several would favour this one.
            phase = served_phase(
                root,
                checkpoint,
                device,
                texts,
                streams,
                new_tokens,
                settings=by_tree[name],
                offline=offline,
                prompts=ids,
                pairs=pairs,
            )
            phases[name].append(progress("bench.served", f"server {name}", phase))
    keys = ("1_stream", "1_stream_json", f"{streams}_streams")
    med = {
        name: {key: statistics.median(p[key]["tokens_per_s"] for p in runs) for key in keys}
        for name, runs in phases.items()
    }
    out["phases"] = phases
    out["tokens_per_s"] = med
    offline_runs = [p["offline"]["tokens_per_s"] for phase in phases["this"] for p in phase["pairs"]]
    out["offline_compiled"] = {"tokens_per_s": statistics.median(offline_runs), "tokens_per_s_runs": offline_runs}
    ratios: dict[str, Any] = {}
    count = run_best_count([phase for runs in phases.values() for phase in runs])
    ratios["offline_run_best_drafts"] = count
    for name, runs in phases.items():
        suffix = "" if name == "this" else f"_{name}"  # the baseline's pairs, set against the same offline runs
        for key in keys[:2]:
            each = pair_ratios(runs, key)
            ratios[f"{key}_vs_offline_compiled{suffix}"] = round(statistics.median(each), 3)
            ratios[f"{key}_vs_offline_compiled{suffix}_pairs"] = each
            at_count = pair_ratios(runs, key, count)
            ratios[f"{key}_vs_offline_run_best{suffix}"] = round(statistics.median(at_count), 3)
            ratios[f"{key}_vs_offline_run_best{suffix}_pairs"] = at_count
    out["time_split"] = {key: time_split(phases["this"], key, count) for key in keys[:2]}
    if not skip_eager:
        ratios["1_stream_vs_offline"] = round(med["this"]["1_stream"] / out["offline"]["tokens_per_s"], 3)
    if compared:
        out["baseline"] = baseline or "this checkout"
        out["baseline_settings"] = dict(baseline_settings or {})
        for key in keys:
            ratios[f"{key}_vs_baseline"] = round(med["this"][key] / med["baseline"][key], 2)
    out["ratios"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--baseline", help="a git ref whose server to compare against (e.g. a0fa624)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of server phases")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument(
        "--pairs", type=int, default=3, help="offline-then-served pairs per round of this checkout's server"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the offline run and the servers")
    parser.add_argument("--skip-eager-offline", action="store_true", help="time offline generate() compiled only")
    parser.add_argument(
        "--settings", action="append", default=[], metavar="KEY=VALUE", help="a setting of this checkout's servers"
    )
    parser.add_argument(
        "--baseline-settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the baseline's servers (without --baseline: this checkout's, so the two differ in settings)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    result = bench_served(
        a.checkpoint,
        a.corpus,
        a.baseline,
        a.rounds,
        a.streams,
        a.new_tokens,
        a.prompts,
        a.device,
        a.skip_eager_offline,
        a.pairs,
        parse_settings(parser, a.settings),
        parse_settings(parser, a.baseline_settings),
    )
    write_json(result, a.out)


def parse_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments as Settings fields (lower case, as the MTP_* variables without the prefix)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower().removeprefix("mtp_")
        if not sep or key not in Settings.model_fields:
            parser.error(f"a setting is KEY=VALUE with KEY a field of app.config.Settings, not {item!r}")
        out[key] = value.strip()
    return out


if __name__ == "__main__":
    main()
