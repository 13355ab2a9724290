"""Where a decode step's time goes on this device: one forward at T = 1, 2, 4 and k fed tokens
(batch 1, KV cache at position 100), eager and compiled (CompiledDecoder); the compiled T = 1
step warm and right after steps of another shape; the engine's greedy steps at batch 1 (a plain
step as the forward step with eager acceptance and as one fused graph, and with sequential
heads a shallow step and a step of every module); and the model's Linear shapes at M = 1 and
M = 4 rows."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import forward_step
from app.decoding.sampling import BatchSampling, SamplingParams
from app.decoding.speculative import accept_drafts
from app.model.checkpoint import load_checkpoint
from app.model.model import Block


def _ms(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def _linear_ms(w: torch.Tensor, b: torch.Tensor | None, m: int) -> float:
    x = torch.randn(m, w.shape[1], device=w.device, dtype=w.dtype)
    return _ms(lambda: F.linear(x, w, b))


def _switching_ms(
    plain: Callable[[], object], verify: Callable[[], object], rounds: int = 50, after: int = 6
) -> dict[str, Any]:
    """A compiled T = 1 step right after a step of another shape (each compiled shape is a graph
    with its own frozen weights, which the other graph's run pushed out of the CPU's caches):
    after one T = k step, and after 31 of them (as a policy's rare re-timing runs), against
    after another T = 1 step (warm); and `steps_after_31_others`, the 1st .. after-th T = 1
    steps in a row after 31 of the other, which shows how many steps a graph takes to be warm
    again. Medians over the rounds."""
    out: dict[str, list[float]] = {"warm": [], "after_1_other": []}
    curve: list[list[float]] = [[] for _ in range(after)]  # the 1st .. after-th step after 31 others
    for _ in range(rounds):
        for case, before in (("warm", [plain] * 31), ("after_1_other", [plain] * 30 + [verify])):
            for fn in before:
                fn()
            t0 = time.perf_counter()
            plain()
            out[case].append(time.perf_counter() - t0)
        for _ in range(31):
            verify()
        for times in curve:
            t0 = time.perf_counter()
            plain()
            times.append(time.perf_counter() - t0)
    ms = {case: round(statistics.median(ts) * 1e3, 3) for case, ts in out.items()}
    steps = [round(statistics.median(ts) * 1e3, 3) for ts in curve]
    return {**ms, "after_31_others": steps[0], "steps_after_31_others": steps}


def _greedy_steps_ms(steps: dict[str, Callable[[], object]], rounds: int = 7, n: int = 50) -> dict[str, float]:
    """Each step's median ms over `rounds` rounds that time every step in turn (n calls each,
    after 5 untimed ones: a step right after another graph is cold), so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(5):
                fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: round(statistics.median(ts) * 1e3, 3) for name, ts in times.items()}


@torch.inference_mode()
def bench_step(
    checkpoint: str, device: str = "cpu", dtype: str = "float32", compile: bool = True, autotune: bool = False
) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint, device=device, dtype=dtype)
    # sequential heads: the plain greedy step and, with two modules or more, the one-module step
    shallow = list(range(min(2, model.cfg.k - 1))) if model.cfg.head_type == "sequential" else []
    # allocates the batch-1 caches either way
    dec = CompiledDecoder(model, 1, autotune=autotune, shallow_depths=shallow) if compile else None
    if dec is None:
        model.setup_caches(1)
    dev = model.head.proj.weight.device
    V = model.cfg.vocab_size
    model.trunk(torch.randint(0, V, (1, 100), device=dev), torch.arange(100, device=dev)[None])
    forward: dict[str, float] = {}
    cur = torch.randint(0, V, (1,), device=dev)
    pos = torch.tensor([100], device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    greedy = BatchSampling.from_params([SamplingParams()], [None], dev)
    want = torch.ones(1, dtype=torch.bool, device=dev)

    def plain() -> object:
        return forward_step(model, cur, None, pos, want_drafts=False).head1

    def verify(n_drafts: int) -> Callable[[], object]:
        drafts = torch.randint(0, V, (1, n_drafts), device=dev)

        def run() -> object:
            step = forward_step(model, cur, drafts, pos)
            tokens = torch.cat([drafts, cur[:, None]], dim=1)  # [1, T]: what an all-accepting pass emits
            return step.drafts(zero, tokens, greedy, want) if step.drafts is not None else step.head1

        return run

    forward["T=1 (plain step)"] = round(_ms(plain), 3)
    k = model.cfg.k
    for n in sorted({1, 3, k - 1} - {0}):
        forward[f"T={n + 1} (verify {n} drafts)"] = round(_ms(verify(n)), 3)
    compiled: dict[str, float] = {}
    switching: dict[str, Any] = {}
    fused: dict[str, float] = {}
    if dec is not None:
        steps = {}
        for t in sorted({1, k}):
            idx = torch.randint(0, V, (1, t), device=dev)
            input_pos = (pos[:, None] + torch.arange(t, device=dev)[None]).contiguous()
            steps[t] = functools.partial(dec, idx, input_pos)
            steps[t]()  # compile outside the timing
            compiled[f"T={t}"] = round(_ms(steps[t]), 3)
        if k > 1:
            switching = _switching_ms(steps[1], steps[k])
        compiled_dec, none = dec, cur.new_zeros(1, 0)

        def plain_unfused() -> object:  # what a plain batch ran before its fused graph
            head1 = forward_step(model, cur, None, pos, want_drafts=False, compiled=compiled_dec).head1
            return accept_drafts(head1, none, None, zero, greedy, ~want, None, k - 1)

        greedy_steps: dict[str, Callable[[], object]] = {
            "plain: compiled forward + eager acceptance": plain_unfused,
            "plain: one fused graph": lambda: compiled_dec.greedy_step(cur, None, pos, zero, want_drafts=False),
        }
        drafts = torch.randint(0, V, (1, k - 1), device=dev)
        if 1 in shallow:
            greedy_steps["one module, verifying 1 draft (shallow)"] = lambda: compiled_dec.greedy_step(
                cur, drafts[:, :1], pos, zero + 1, want_drafts=True, n_drafts=1
            )
        if k > 1:
            greedy_steps[f"every module or head, verifying {k - 1} drafts"] = lambda: compiled_dec.greedy_step(
                cur, drafts, pos, zero + k - 1, want_drafts=True
            )
        fused = _greedy_steps_ms(greedy_steps)
    shapes = {}
    block = model.blocks[0]
    assert isinstance(block, Block)
    layers: list[tuple[str, torch.nn.Linear]] = [
        ("qkv", block.attn.qkv),
        ("attn_out", block.attn.proj),
        ("ffn_in", block.ffn.fc),
        ("ffn_out", block.ffn.proj),
        ("mtp_head", model.head.proj),
    ]
    for name, lin in layers:
        w, b = lin.weight, lin.bias
        row = {}
        for m in (1, 4):
            row[f"M={m}_us"] = round(_linear_ms(w, b, m) * 1e3, 1)
        shapes[f"{name} {w.shape[1]}->{w.shape[0]}"] = row
    return {
        "benchmark": "decode_step_cost",
        "checkpoint": checkpoint,
        "device": device,
        "threads": torch.get_num_threads(),
        "forward_ms": forward,
        "verify_over_plain": round(forward[f"T={k} (verify {k - 1} drafts)"] / forward["T=1 (plain step)"], 3)
        if k > 1
        else None,
        **(
            {
                "autotune": autotune,
                "compiled_trunk_and_head1_ms": compiled,
                "compiled_verify_over_plain": round(compiled[f"T={k}"] / compiled["T=1"], 3),
                "compiled_T1_after_a_switch_ms": switching,
                "compiled_greedy_steps_ms": fused,
            }
            if compiled
            else {}
        ),
        "linear": shapes,
    }
