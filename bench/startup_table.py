"""The draft policy's start-up table, each shape timed as its Nth step in a row.

    python -m bench.startup_table --warm-steps 1 4 30 --rounds 2

Builds the engine's decode steps as `mtp serve` does (compiled at the default shapes, the
Inductor cache shared with the servers; --no-compile: eager), then makes the start-up table
(app/engine/drafts.py, time_verify_steps) once per number of warm-up steps (the untimed steps
of a shape before its timed one; compiled: STARTUP_WARM_STEPS = 4 now, 1 before), the values in turn
in each round. A compiled graph stays cold for several steps after another ran, so the fewer
the warm-up steps, the more each cost reads above what the shape costs while it runs; a
large value (30) stands for the steady cost. Prints JSON: per value and round, the costs (ms)
at batch sizes 1 and 2 by draft count and by shallow depth, and the seconds the table took.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch

from app.config import DEFAULT_CHECKPOINT
from app.engine.compile import build_compiled
from app.engine.config import EngineConfig
from app.engine.drafts import STARTUP_WARM_STEPS, time_verify_steps
from app.model.checkpoint import load_checkpoint
from bench.decoding import write_json

BATCHES = (1, 2)  # the batch sizes reported (all are timed, as at start-up)


def startup_tables(
    checkpoint: str, warm_steps: list[int], rounds: int, compile: bool = True, max_batch_size: int | None = None
) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint)
    cfg = EngineConfig(compile=compile)
    if max_batch_size is not None:
        cfg = dataclasses.replace(cfg, max_batch_size=max_batch_size)
    compiled = build_compiled(model, cfg) if compile else None  # as the engine builds them
    if compiled is None:
        model.setup_caches(cfg.max_batch_size)
    runs: dict[str, list[dict[str, Any]]] = {str(n): [] for n in warm_steps}
    for _ in range(rounds):
        for n in warm_steps:
            t0 = time.perf_counter()
            costs, shallow = time_verify_steps(model, cfg.max_batch_size, compiled, warm_steps=n)
            seconds = time.perf_counter() - t0
            runs[str(n)].append(
                {
                    "step_ms_by_drafts": {b: [round(c * 1e3, 3) for c in costs[b]] for b in BATCHES if b in costs},
                    "shallow_step_ms_by_depth": {
                        b: {d: round(c * 1e3, 3) for d, c in shallow[b].items()} for b in BATCHES if b in shallow
                    },
                    "seconds": round(seconds, 2),
                }
            )
    return {
        "benchmark": "startup_table",
        "checkpoint": checkpoint,
        "compiled": compile,
        "threads": torch.get_num_threads(),
        "warm_steps_in_use": STARTUP_WARM_STEPS if compile else 1,
        "rounds": rounds,
        "by_warm_steps": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--warm-steps", type=int, nargs="+", default=[1, 4, 30])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager steps (seconds to start, not minutes)")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(startup_tables(a.checkpoint, a.warm_steps, a.rounds, compile=not a.no_compile), a.out)


if __name__ == "__main__":
    main()
