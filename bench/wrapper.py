"""Inductor's wrapper code in Python against its C++ wrapper: generate() at batch 1 on compiled steps.

    python -m bench.wrapper [--rounds 4] [--prompts 8] [--new-tokens 200] [--out FILE]

Two CompiledDecoders of one model in one process, the same shapes as the service's batch-1
steps (greedy widths 1, 2, 3: the plain step, one module drafting one token, every module),
autotuned on CPU as the service's are; one with Inductor's Python wrapper (cpp_wrapper=False),
one with its C++ wrapper (the default). Each round times greedy generate() over the held-out
prompts at every draft count on one decoder, then on the other, so this machine's drift hits
both alike. Prints whether both give the same greedy tokens, tokens/s per round and the per-round ratios
C++ / Python, all from this run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from app import config
from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import generate
from app.model.checkpoint import load_checkpoint
from bench.decoding import heldout_prompts, write_json
from bench.server import progress

WRAPPERS = {"python": False, "cpp": True}


@torch.inference_mode()
def bench_wrapper(
    checkpoint: str, corpus: str, rounds: int, n_prompts: int, new_tokens: int, autotune: bool = True
) -> dict[str, Any]:
    model, tok = load_checkpoint(checkpoint)
    prompts = heldout_prompts(corpus, tok, n_prompts, 32, seed=1)
    counts = list(range(model.cfg.k))  # drafts per step: 0 (plain) .. k - 1
    widths = [n + 1 for n in counts]
    decoders: dict[str, CompiledDecoder] = {}
    compile_s: dict[str, float] = {}
    for name, cpp in WRAPPERS.items():
        t0 = time.perf_counter()
        dec = CompiledDecoder(model, 1, autotune, batch_sizes=[1], widths=widths, greedy_widths=widths, cpp_wrapper=cpp)
        for n in counts:  # compiles (or loads from Inductor's cache) each width's graph
            generate(model, prompts[:1], 4, speculative=n > 0, draft_tokens=n, compiled=dec)
        compile_s[name] = round(time.perf_counter() - t0, 1)
        decoders[name] = dec
    # the two wrappers run the same kernels: the same greedy tokens at every draft count
    same = all(
        len(
            {
                tuple(generate(model, prompts[:1], 32, speculative=n > 0, draft_tokens=n, compiled=dec).tokens[0])
                for dec in decoders.values()
            }
        )
        == 1
        for n in counts
    )
    runs: dict[str, dict[int, list[float]]] = {name: {n: [] for n in counts} for name in WRAPPERS}
    for r in range(rounds):
        for name, dec in decoders.items():
            for n in counts:
                tokens, t0 = 0, time.perf_counter()
                for p in prompts:
                    g = generate(model, [p], new_tokens, speculative=n > 0, draft_tokens=n, compiled=dec)
                    tokens += len(g.tokens[0])
                runs[name][n].append(round(tokens / (time.perf_counter() - t0), 1))
        last = {name: {n: v[-1] for n, v in by.items()} for name, by in runs.items()}
        progress("bench.wrapper", f"round {r + 1}", last)
    ratios = {n: [round(c / p, 3) for p, c in zip(runs["python"][n], runs["cpp"][n], strict=True)] for n in counts}
    return {
        "benchmark": "inductor_wrapper",
        "checkpoint": checkpoint,
        "prompts": n_prompts,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "autotune": autotune,
        "torch_threads": torch.get_num_threads(),
        "compile_s": compile_s,
        "same_greedy_tokens": same,
        "tokens_per_s_runs": runs,
        "tokens_per_s_median": {
            name: {n: round(statistics.median(v), 1) for n, v in by.items()} for name, by in runs.items()
        },
        "cpp_over_python_by_round": ratios,
        "cpp_over_python_median": {n: round(statistics.median(v), 3) for n, v in ratios.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--no-autotune", action="store_true", help="compile without autotuning the matmuls")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    result = bench_wrapper(a.checkpoint, a.corpus, a.rounds, a.prompts, a.new_tokens, not a.no_autotune)
    write_json(result, a.out)


if __name__ == "__main__":
    main()
