"""A compiled batch-1 decode step through Dynamo with its graph's guards kept, through Dynamo
with none kept, and called directly (the default), in one run.

    python -m bench.guards [--checkpoint DIR] [--rounds 20] [--calls 200] [--position 100] [--no-autotune] [--out FILE]

Three CompiledDecoders of the same model and shapes: "guards", built with `guards=True` (the
skip_guard_eval_unsafe stance alone, which still checks every tensor the graph reads);
"dynamo", without guards (`no_guards`) but called through torch.compile's wrapper
(`direct=False`); "direct", the default, which calls each graph's compiled code directly once
it is built (`dynamo_code`). For each fused greedy step at batch 1 that the engine runs (a
plain step; with sequential heads also a step whose one module drafts and which verifies one
draft; with linear heads a step verifying one draft), each round times `calls` steps of each
decoder in turn, rotating which goes first, at a fixed position; the first 20 calls of each
turn are not timed. Prints the median microseconds per step of each, their ratios, and
checks that all give the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from app import config
from app.decoding.compiled import CompiledDecoder
from app.model.checkpoint import load_checkpoint
from bench.decoding import write_json

WARM_CALLS = 20  # untimed calls at the start of each turn: the other decoder's graphs ran last


def _steps(dec: CompiledDecoder, width: int, position: int) -> tuple[Any, ...]:
    """The arguments of one fused greedy step at batch 1 verifying width - 1 drafts."""
    cur = torch.zeros(1, dtype=torch.long)
    drafts = torch.zeros(1, width - 1, dtype=torch.long) if width > 1 else None
    pos = torch.full((1,), position)
    made = width - 1 if not dec.linear else None
    return cur, drafts, pos, torch.full((1,), width - 1), True, None, made, position


def _turn(dec: CompiledDecoder, args: tuple[Any, ...], calls: int) -> tuple[list[float], list[int]]:
    dec.attach()
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        res = dec.greedy_step(*args)
        if i >= WARM_CALLS:
            times.append(time.perf_counter() - t0)
    return times, res.tokens.flatten().tolist()


def bench_guards(checkpoint: str, rounds: int, calls: int, position: int, autotune: bool = True) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint, device=torch.device("cpu"))
    model.eval()
    position = min(position, model.cfg.max_seq_len - model.cfg.k)
    sequential = model.cfg.head_type == "sequential"
    widths = [1, 2] if model.cfg.k > 1 else [1]
    shallow = [w - 1 for w in widths] if sequential else []
    t0 = time.perf_counter()
    decoders = {}
    for name, guards, direct in (("guards", True, False), ("dynamo", False, False), ("direct", False, True)):
        dec = CompiledDecoder(
            model,
            1,
            autotune=autotune,
            batch_sizes=[1],
            greedy_widths=widths,
            shallow_depths=shallow,
            guards=guards,
            direct=direct,
        )
        with torch.inference_mode():
            for _ in dec.warm():
                pass
        decoders[name] = dec
    out: dict[str, Any] = {
        "benchmark": "compiled_step_guards",
        "checkpoint": checkpoint,
        "head_type": model.cfg.head_type,
        "position": position,
        "rounds": rounds,
        "calls_timed_per_turn": calls - WARM_CALLS,
        "threads": torch.get_num_threads(),
        "autotune": autotune,
        "compile_s": round(time.perf_counter() - t0, 1),
        "steps": {},
    }
    with torch.inference_mode():
        for width in widths:
            times: dict[str, list[float]] = {name: [] for name in decoders}
            tokens: dict[str, list[int]] = {}
            for r in range(rounds):
                names = list(decoders)
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    dec = decoders[name]
                    got, tokens[name] = _turn(dec, _steps(dec, width, position), calls)
                    times[name] += got
            med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            label = "plain" if width == 1 else ("one_module_one_draft" if sequential else "one_draft")
            out["steps"][label] = {
                "width": width,
                "us_median": {name: round(v, 1) for name, v in med.items()},
                "dynamo_over_guards": round(med["dynamo"] / med["guards"], 3),
                "direct_over_dynamo": round(med["direct"] / med["dynamo"], 3),
                "same_tokens": tokens["guards"] == tokens["dynamo"] == tokens["direct"],
            }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="steps per turn, the first 20 untimed")
    parser.add_argument("--position", type=int, default=100)
    parser.add_argument("--no-autotune", action="store_true", help="MKL matmuls instead of the C++ GEMM template")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = bench_guards(args.checkpoint, args.rounds, args.calls, args.position, autotune=not args.no_autotune)
    write_json(out, args.out)


if __name__ == "__main__":
    main()
