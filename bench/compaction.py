"""The cost of compacting the KV cache when rows of a running batch end: shifting every later
row down one place, against filling the ended rows with the last ones (the engine's order).

    python -m bench.compaction [--rows 16] [--position 200] [--repeats 30] [--out FILE]

When a request ends, DecodeBatch.compact moves the surviving rows' cached keys and values into
rows 0..n-1 before the next step (every attention layer, the MTP modules' too, up to the
longest survivor's position). For each case (which of `rows` rows end) this times
`compact_cache_rows` in both orders on the model's own caches, alternating, and prints the
median milliseconds and the rows each order copies.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from app import config
from app.engine.batch import fill_order
from app.model.checkpoint import load_checkpoint
from bench.decoding import write_json


def _cases(rows: int) -> dict[str, list[int]]:
    """Name -> the rows that end, from one row at the front, middle or back to several at once."""
    return {
        "first_ends": [0],
        "middle_ends": [rows // 2],
        "last_ends": [rows - 1],
        "first_quarter_ends": list(range(rows // 4)),
        "every_fourth_ends": list(range(0, rows, 4)),
    }


def bench_compaction(checkpoint: str, rows: int, position: int, repeats: int) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint, device=torch.device("cpu"))
    position = min(position, model.cfg.max_seq_len)
    model.setup_caches(max_batch=rows)
    for cache in model.kv_caches():  # real values, so the copies move real memory
        if cache is not None:
            cache.k_cache.normal_()
            cache.v_cache.normal_()
    out: dict[str, Any] = {
        "benchmark": "cache_compaction",
        "checkpoint": checkpoint,
        "rows": rows,
        "position": position,
        "attention_layers": sum(c is not None for c in model.kv_caches()),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cases": {},
    }
    for name, ended in _cases(rows).items():
        survivors = [r for r in range(rows) if r not in ended]
        orders = {"shift": survivors, "fill": fill_order(survivors)}
        times: dict[str, list[float]] = {k: [] for k in orders}
        with torch.inference_mode():
            for _ in range(repeats):
                for key, order in orders.items():  # alternating: both see the same moments
                    idx = torch.tensor(order)
                    t0 = time.perf_counter()
                    model.compact_cache_rows(idx, position)
                    times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        out["cases"][name] = {
            "ended": ended,
            "rows_copied": {k: sum(1 for i, r in enumerate(o) if i != r) for k, o in orders.items()},
            "ms_median": {k: round(v, 3) for k, v in med.items()},
            "shift_over_fill": round(med["shift"] / med["fill"], 2) if med["fill"] > 0 else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--position", type=int, default=200, help="the longest survivor's position")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    write_json(bench_compaction(args.checkpoint, args.rows, args.position, args.repeats), args.out)


if __name__ == "__main__":
    main()
