"""Why the service keeps all tensor work on one thread: greedy decoding on a worker thread,
timed while it is the only thread that has run torch ops, then again after one parallel op
on a second thread (which leaves a second OpenMP thread team behind, for good)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from app.decoding.generate import generate
from app.model.checkpoint import load_checkpoint
from app.model.model import MTPTransformer


def _tokens_per_s(model: MTPTransformer, prompts: list[list[int]], new_tokens: int, speculative: bool) -> float:
    generate(model, prompts[:1], 8, speculative=speculative)  # warm
    t0 = time.perf_counter()
    for p in prompts:
        generate(model, [p], new_tokens, speculative=speculative)
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def bench_threads(checkpoint: str, n_prompts: int = 8, new_tokens: int = 64) -> dict[str, Any]:
    worker = ThreadPoolExecutor(max_workers=1)
    model, _ = worker.submit(load_checkpoint, checkpoint).result()  # only the worker has run torch ops
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (32,), generator=g).tolist() for _ in range(n_prompts)]

    def rates() -> dict[str, float]:
        with torch.inference_mode():
            return {
                mode: round(_tokens_per_s(model, prompts, new_tokens, mode == "speculative"), 1)
                for mode in ("plain", "speculative")
            }

    one = worker.submit(rates).result()
    x = torch.randn(1024, 1024)
    _ = x @ x  # one parallel op on this (the main) thread: a second OpenMP team now exists
    two = worker.submit(rates).result()
    worker.shutdown()
    return {
        "benchmark": "torch_on_one_thread",
        "checkpoint": checkpoint,
        "threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)),
        "tokens_per_s_one_thread_used_torch": one,
        "tokens_per_s_after_an_op_on_a_second_thread": two,
        "slowdown": {m: round(one[m] / two[m], 2) for m in one},
    }
