"""The engine's compiled greedy steps with each choice of GEMM kernels (MTP_COMPILE_GEMM_BACKENDS).

    python -m bench.gemm [--checkpoint DIR] [--batches 1,2,4,8,16] [--position 130] [--rounds 3]
                         [--backends CPP CPP,ATEN] [--out FILE]

For each value of --backends, one CompiledDecoder compiles (with autotune) the greedy steps the
engine runs at each batch size: the plain step (width 1, no drafts made), with sequential heads
the one-module shallow step (width 2), and the step verifying k - 1 drafts (width k). Each round
then times every step of one decoder, then of the next (the order turns from round to round), at
rows whose positions sit a few apart below --position, at the process's intra-op thread count.
Figures: the median ms per step over the rounds, and each decoder's against the first's.
Every decoder gets the same inputs, and `same_tokens` says whether their steps emitted the same tokens.

Where Inductor's cache already holds a decoder's graphs, they are loaded, with the kernels the
cache's autotuning chose back then; pointed at an empty TORCHINDUCTOR_CACHE_DIR, "CPP,ATEN" times
the C++ template against MKL for every matmul now (minutes per graph).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from app import config
from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import draft_count
from app.model.checkpoint import load_checkpoint
from bench.batch_step import step_inputs, time_alternating
from bench.decoding import write_json


def step_kinds(k: int, sequential: bool) -> list[tuple[str, int, int]]:
    """(name, width, drafts made) of the greedy steps the engine runs at a batch size."""
    kinds = [("plain", 1, 0)]
    if sequential and k > 2:
        kinds.append(("shallow 1", 2, 1))
    kinds.append((f"verify {k - 1}", k, draft_count(k, None)))
    return kinds


def _step(dec: CompiledDecoder, b: int, width: int, made: int, position: int) -> Callable[[], Any]:
    cur, drafts, pos, max_accept = step_inputs(b, width, position, dec.model.cfg.vocab_size)
    fed = drafts if width > 1 else None
    return lambda: dec.greedy_step(cur, fed, pos, max_accept, want_drafts=dec.k > 1, n_drafts=made)


@torch.inference_mode()
def bench_gemm(
    checkpoint: str,
    batches: list[int],
    position: int = 130,
    backends: tuple[str, ...] = ("CPP", "CPP,ATEN"),
    rounds: int = 3,
    calls: int = 50,
) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint)
    k, sequential = model.cfg.k, model.cfg.head_type == "sequential"
    position = min(position, model.cfg.max_seq_len - k)
    kinds = step_kinds(k, sequential)
    widths = sorted({w for _, w, _ in kinds})
    shallow = [made for name, _, made in kinds if name.startswith("shallow")] + [0] if sequential else []
    decoders: dict[str, CompiledDecoder] = {}
    compile_s: dict[str, float] = {}
    cells = [(name, width, made, b) for name, width, made in kinds for b in batches]
    for gemm in backends:
        dec = decoders[gemm] = CompiledDecoder(
            model,
            max(batches),
            autotune=True,
            batch_sizes=batches,
            widths=widths,
            greedy_widths=widths,
            shallow_depths=sorted(set(shallow)),
            gemm_backends=gemm,
        )
        t0 = time.perf_counter()
        for _, width, made, b in cells:
            _step(dec, b, width, made, position)()
        compile_s[gemm] = round(time.perf_counter() - t0, 1)
    times, tokens = time_alternating(
        decoders, cells, lambda dec, c: _step(dec, c[3], c[1], c[2], position), rounds, calls
    )
    first = backends[0]
    table: dict[str, Any] = {}
    for cell in cells:
        ms = {g: statistics.median(times[g][cell]) for g in backends}
        row = table.setdefault(cell[0], {})
        row[f"batch {cell[3]}"] = {
            **{f"{g}_ms": round(ms[g], 3) for g in backends},
            **{f"{g}_over_{first}": round(ms[g] / ms[first], 3) for g in backends[1:]},
        }
    return {
        "benchmark": "compiled_steps_by_gemm_backends",
        "checkpoint": checkpoint,
        "threads": torch.get_num_threads(),
        "position": position,
        "rounds": rounds,
        "calls_per_round": calls,
        "compile_s": compile_s,
        "same_tokens": all(tokens[g] == tokens[first] for g in backends),
        "steps": table,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--batches", default="1,2,4,8,16", help="batch sizes, comma-separated")
    parser.add_argument("--position", type=int, default=130, help="the highest row position of each step")
    parser.add_argument("--backends", nargs="+", default=["CPP", "CPP,ATEN"], help="max_autotune_gemm_backends values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = bench_gemm(
        args.checkpoint,
        [int(b) for b in args.batches.split(",")],
        args.position,
        tuple(args.backends),
        rounds=args.rounds,
    )
    write_json(out, args.out)


if __name__ == "__main__":
    main()
