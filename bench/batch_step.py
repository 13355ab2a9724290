"""The compiled greedy decode step at each batch size, with each way a compiled CPU step attends.

    python -m bench.batch_step [--checkpoint DIR] [--batches 1,2,4,8,16] [--positions 64,200]
                               [--rounds 3] [--no-autotune] [--out FILE]

The engine's decode steps on CPU are the fused greedy graphs of app/decoding/compiled.py, at
batch sizes 1, 2, 4 .. max_batch_size. For each attention form of app/model/model.py
(COMPILED_CPU_ATTENTION: "explicit", the default, and "sdpa"), one CompiledDecoder compiles the
greedy step at every batch size, at width 1 (a plain step) and width k (verifying k - 1 drafts,
making the next ones); then each round times every step of one form, then of the other (the
order alternates from round to round), at rows whose positions sit a few apart below each
position given. Figures: the median ms per step over the rounds, per row, and sdpa / explicit.
Both forms get the same inputs, and `same_tokens` says whether their steps emitted the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from app import config
from app.decoding.compiled import CompiledDecoder
from app.model import model as model_module
from app.model.checkpoint import load_checkpoint
from bench.decoding import write_json

FORMS = ("explicit", "sdpa")


def step_inputs(b: int, w: int, position: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """A step's inputs: b rows at positions a few apart, at or below `position`."""
    gen = torch.Generator().manual_seed(b * 1000 + w * 100 + position)
    cur = torch.randint(0, vocab, (b,), generator=gen)
    drafts = torch.randint(0, vocab, (b, w - 1), generator=gen)
    pos = (position - 3 * torch.arange(b)).clamp(min=0)
    return cur, drafts, pos, torch.full((b,), w - 1, dtype=torch.long)


def _step(dec: CompiledDecoder, b: int, w: int, position: int) -> Callable[[], Any]:
    cur, drafts, pos, max_accept = step_inputs(b, w, position, dec.model.cfg.vocab_size)
    return lambda: dec.greedy_step(cur, drafts if w > 1 else None, pos, max_accept, want_drafts=dec.k > 1)


Cell = TypeVar("Cell", bound=Hashable)


def compiled_decoders(
    model: Any, batches: list[int], widths: list[int], autotune: bool, variants: dict[str, Callable[[], None]]
) -> tuple[dict[str, CompiledDecoder], dict[str, float]]:
    """One CompiledDecoder per variant, its set-up called before the decoder is built and its
    greedy step compiled (on a first call) at every batch size and width; and the seconds each
    variant's compiling took."""
    decoders: dict[str, CompiledDecoder] = {}
    compile_s: dict[str, float] = {}
    for name, setup in variants.items():
        setup()
        dec = decoders[name] = CompiledDecoder(
            model, max(batches), autotune=autotune, batch_sizes=batches, widths=widths, greedy_widths=widths
        )
        t0 = time.perf_counter()
        for b in batches:
            for w in widths:
                _step(dec, b, w, 0)()
        compile_s[name] = round(time.perf_counter() - t0, 1)
    return decoders, compile_s


def step_table(
    times: dict[str, dict[Any, list[float]]], cells: list[tuple[int, int, int]], num: str, den: str, per_row: bool
) -> dict[str, Any]:
    """By position, width and batch: each variant's median ms per step (and per row), and num / den."""
    table: dict[str, Any] = {}
    for p, w, b in cells:
        ms = {name: statistics.median(by_cell[(p, w, b)]) for name, by_cell in times.items()}
        row = table.setdefault(f"position {p}", {}).setdefault(f"width {w}", {})
        row[f"batch {b}"] = {
            **{f"{name}_ms": round(v, 3) for name, v in ms.items()},
            **({f"{name}_ms_per_row": round(v / b, 3) for name, v in ms.items()} if per_row else {}),
            f"{num}_over_{den}": round(ms[num] / ms[den], 3),
        }
    return table


def time_alternating(
    decoders: dict[str, CompiledDecoder],
    cells: list[Cell],
    step: Callable[[CompiledDecoder, Cell], Callable[[], Any]],
    rounds: int,
    calls: int,
    warm: int = 4,
) -> tuple[dict[str, dict[Cell, list[float]]], dict[str, dict[Cell, list[list[int]]]]]:
    """Each round times every cell's step on one decoder, then on the next (the order turns from
    round to round): a first call whose tokens are kept, `warm` more, then `calls` timed ones.
    Returns the ms per call of each round and the tokens of the last, by decoder and cell."""
    names = list(decoders)
    times: dict[str, dict[Cell, list[float]]] = {n: {c: [] for c in cells} for n in names}
    tokens: dict[str, dict[Cell, list[list[int]]]] = {n: {} for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            dec = decoders[name]
            dec.attach()  # the other decoders' set-up put their own caches on the model
            for cell in cells:
                fn = step(dec, cell)
                tokens[name][cell] = fn().tokens.tolist()
                for _ in range(warm):
                    fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name][cell].append((time.perf_counter() - t0) / calls * 1e3)
    return times, tokens


@torch.inference_mode()
def bench_batch_step(
    checkpoint: str,
    batches: list[int],
    positions: list[int],
    rounds: int = 3,
    autotune: bool = True,
    calls: int = 30,
) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint)
    k, most = model.cfg.k, model.cfg.max_seq_len - model.cfg.k
    positions = [min(p, most) for p in positions]
    widths = sorted({1, k})
    before = model_module.COMPILED_CPU_ATTENTION

    def form(name: str) -> Callable[[], None]:  # read when each graph is traced: on its first call
        return lambda: setattr(model_module, "COMPILED_CPU_ATTENTION", name)

    try:
        decoders, compile_s = compiled_decoders(model, batches, widths, autotune, {f: form(f) for f in FORMS})
    finally:
        model_module.COMPILED_CPU_ATTENTION = before
    cells = [(p, w, b) for p in positions for w in widths for b in batches]
    times, tokens = time_alternating(decoders, cells, lambda dec, c: _step(dec, c[2], c[1], c[0]), rounds, calls)
    table = step_table(times, cells, "sdpa", "explicit", per_row=True)
    return {
        "benchmark": "compiled_greedy_step_by_batch",
        "checkpoint": checkpoint,
        "threads": torch.get_num_threads(),
        "autotune": autotune,
        "rounds": rounds,
        "calls_per_round": calls,
        "compile_s": compile_s,
        "same_tokens": all(tokens["explicit"][c] == tokens["sdpa"][c] for c in cells),
        "steps": table,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--batches", default="1,2,4,8,16", help="batch sizes, comma-separated")
    parser.add_argument("--positions", default="64,200", help="the highest row position of each step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-autotune", dest="autotune", action="store_false", help="ATen GEMMs only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = bench_batch_step(
        args.checkpoint,
        [int(b) for b in args.batches.split(",")],
        [int(p) for p in args.positions.split(",")],
        rounds=args.rounds,
        autotune=args.autotune,
    )
    write_json(out, args.out)


if __name__ == "__main__":
    main()
