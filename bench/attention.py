"""Eager decode steps at key counts never run before, against the same steps run again.

    python -m bench.attention [--device cuda] [--new-tokens 200] [--out FILE]

An eager cached step attends the keys up to its position, so each step of a generation runs a
shape (key count) that the step before did not. Any per-shape set-up in the attention kernels
(cuDNN's attention builds a plan per shape, for one) is paid once per new key count, and shows
as a first generation slower than a second one over the same positions. The first GPU run saw
eager plain decoding go from 19 tok/s on its first prompt to 350-430 on the next ones
(docs/benchmarks.md, benchmark 9); this tells a per-shape cost from other warm-up.

For each scaled_dot_product_attention backend set ("default"; on CUDA also "no_cudnn": flash,
memory-efficient and math), in that order so that the default meets key counts the other set
already ran: ms per token of plain greedy generate() at batch 1 from one prompt, twice over the
same positions. A per-shape cost shows as first / second well above 1 for its backend set alone.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from app import config
from app.decoding.generate import generate
from app.model.checkpoint import load_checkpoint, resolve_device, resolve_dtype
from bench.decoding import heldout_prompts, write_json


@contextlib.contextmanager
def backends(name: str) -> Iterator[None]:
    if name == "default":
        yield
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def _ms_per_token(model: Any, prompt: list[int], new_tokens: int) -> float:
    sync = torch.cuda.synchronize if model.head.proj.weight.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = generate(model, [prompt], new_tokens, speculative=False)
    sync()
    return (time.perf_counter() - t0) / len(out.tokens[0]) * 1e3


def bench_attention(checkpoint: str, corpus: str, device: str, new_tokens: int) -> dict[str, Any]:
    dev = resolve_device(device)
    model, tok = load_checkpoint(checkpoint, device=dev, dtype=resolve_dtype("auto", dev))
    prompts = heldout_prompts(corpus, tok, 3, 16, seed=2)
    new_tokens = min(new_tokens, model.cfg.max_seq_len - 16)
    names = ["no_cudnn", "default"] if dev.type == "cuda" else ["default"]
    with torch.inference_mode():
        generate(model, [prompts[0]], 4, speculative=False)  # the kernels' and allocator's first use
        runs: dict[str, dict[str, float]] = {}
        for i, name in enumerate(names, start=1):
            with backends(name):
                first = _ms_per_token(model, prompts[i], new_tokens)
                second = _ms_per_token(model, prompts[i], new_tokens)
            runs[name] = {
                "first_ms_per_token": round(first, 3),
                "second_ms_per_token": round(second, 3),
                "first_over_second": round(first / second, 2),
            }
    return {
        "benchmark": "eager_attention_shapes",
        "checkpoint": checkpoint,
        "device": dev.type,
        "dtype": str(model.head.proj.weight.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "new_tokens": new_tokens,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (in the servers' dtype)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_attention(a.checkpoint, a.corpus, a.device, a.new_tokens), a.out)


if __name__ == "__main__":
    main()
