"""What keeping the KV cache in bfloat16 costs the model and gives its compiled steps.

    python -m bench.kv_dtype [--checkpoint DIR] [--corpus FILE] [--batches 1,16]
                             [--positions 32,128,240] [--rounds 5] [--prompts 24] [--out FILE]

Quality, on the held-out 10% of the corpus: head 1's bits per byte with every key and value
read back from the cache (a cached prefill of 255-token windows, 16 rows a pass), at a float32
and at a bfloat16 cache; and the greedy tokens of `--prompts` held-out prompts (32 tokens, 200
new, eager plain decoding) at each, how many are the same and where the first differs.

Speed: the compiled greedy step (CompiledDecoder, as the engine compiles it, with Inductor's
autotuning) at each batch size, at width 1 (a plain step whose modules draft) and width k,
over a float32 and over a bfloat16 cache: rounds alternate which goes first (bench.batch_step),
at rows a few positions apart below each position given. Figures: median ms per step, and
bfloat16 / float32; `same_tokens` whether both caches' steps emitted the same tokens.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

from app import config
from app.decoding.generate import generate
from app.model.checkpoint import load_checkpoint
from app.model.model import MTPTransformer
from app.training.data import read_corpus, split_text
from bench.batch_step import _step, compiled_decoders, step_table, time_alternating
from bench.decoding import heldout_prompts, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WINDOW = 255  # tokens per scored window (the default model's context is 256)


def cached_bits_per_byte(model: MTPTransformer, ids: list[int], n_bytes: int, kv: torch.dtype) -> float:
    """Head 1's bits per byte over `ids`, each window prefilled through a cache of dtype kv."""
    windows = [ids[i : i + WINDOW + 1] for i in range(0, len(ids) - WINDOW - 1, WINDOW)]
    nll, tokens = 0.0, 0
    for s in range(0, len(windows), 16):
        chunk = torch.tensor(windows[s : s + 16])  # [B, WINDOW + 1]
        x, y = chunk[:, :-1], chunk[:, 1:]
        model.setup_caches(len(chunk), kv)
        pos = torch.arange(WINDOW).expand(len(chunk), WINDOW)
        logits = model.head(model.trunk(x, pos, kv_len=WINDOW), heads=slice(0, 1))[:, :, 0].float()  # [B, T, V]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        tokens += y.numel()
    model.reset_caches()
    return nll / math.log(2) / (tokens * n_bytes / len(ids))  # the scored tokens' share of the bytes


@torch.inference_mode()
def bench_kv_dtype(
    checkpoint: str, corpus: str, batches: list[int], positions: list[int], rounds: int, prompts: int
) -> dict[str, Any]:
    model, tok = load_checkpoint(checkpoint)
    text = split_text(read_corpus(corpus))[1]
    ids = tok.encode(text)
    n_bytes = len(text.encode())
    quality: dict[str, Any] = {"bits_per_byte": {}}
    for name, kv in DTYPES.items():
        quality["bits_per_byte"][name] = round(cached_bits_per_byte(model, ids, n_bytes, kv), 5)
    heldout = heldout_prompts(corpus, tok, prompts, 32, seed=1)
    greedy = {}
    for name, kv in DTYPES.items():
        model.kv_dtype = kv
        greedy[name] = [generate(model, [p], 200, speculative=False).tokens[0] for p in heldout]
    model.kv_dtype = None
    pairs = list(zip(greedy["float32"], greedy["bfloat16"], strict=True))
    quality["greedy_200_identical"] = sum(a == b for a, b in pairs)
    quality["greedy_prompts"] = len(pairs)
    quality["greedy_first_difference"] = sorted(
        next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y) for a, b in pairs if a != b
    )

    k, most = model.cfg.k, model.cfg.max_seq_len - model.cfg.k
    positions = [min(p, most) for p in positions]
    widths = sorted({1, k})

    def keeping(dtype: torch.dtype) -> Callable[[], None]:  # each decoder allocates its caches in it
        return lambda: setattr(model, "kv_dtype", dtype)

    decoders, compile_s = compiled_decoders(model, batches, widths, True, {n: keeping(d) for n, d in DTYPES.items()})
    model.kv_dtype = None
    cells = [(p, w, b) for p in positions for w in widths for b in batches]
    times, tokens = time_alternating(decoders, cells, lambda dec, c: _step(dec, c[2], c[1], c[0]), rounds, 30)
    steps = step_table(times, cells, "bfloat16", "float32", per_row=False)
    return {
        "benchmark": "kv_cache_dtype",
        "checkpoint": checkpoint,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "quality": quality,
        "compile_s": compile_s,
        "same_tokens": all(tokens["float32"][c] == tokens["bfloat16"][c] for c in cells),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_dtype", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--positions", default="32,128,240", help="the highest row position of each step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts decoded greedily at each dtype")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = bench_kv_dtype(
        args.checkpoint,
        args.corpus,
        [int(b) for b in args.batches.split(",")],
        [int(p) for p in args.positions.split(",")],
        args.rounds,
        args.prompts,
    )
    write_json(out, args.out)


if __name__ == "__main__":
    main()
