"""Benchmarks 1 and 2: self-speculative vs plain greedy decoding, and ours vs transformers' generate().

Each prints its figures and the ratios measured side by side in one run (runs interleaved,
so that machine noise hits both sides alike) as JSON.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import Generation, generate
from app.model.checkpoint import load_checkpoint
from app.model.model import MTPTransformer
from app.training.data import read_corpus, split_text

log = logging.getLogger(__name__)


def heldout_prompts(corpus: str, tok: Any, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """n prompts of prompt_tokens tokens from random offsets of the held-out 10% of the corpus."""
    ids = tok.encode(split_text(read_corpus(corpus))[1])
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - prompt_tokens) for _ in range(n)]
    return [ids[s : s + prompt_tokens] for s in starts]


@dataclass
class Timed:
    seconds: float
    gen: Generation


def timed_generate(
    model: MTPTransformer,
    prompts: list[list[int]],
    n: int,
    speculative: bool,
    compiled: CompiledDecoder | None = None,
    draft_tokens: int | None = None,
) -> Timed:
    if model.head.proj.weight.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    g = generate(model, prompts, n, speculative=speculative, compiled=compiled, draft_tokens=draft_tokens)
    if model.head.proj.weight.is_cuda:
        torch.cuda.synchronize()
    return Timed(time.perf_counter() - t0, g)


def bench_speculative(
    checkpoint: str,
    corpus: str,
    n_prompts: int = 10,
    prompt_tokens: int = 32,
    new_tokens: int = 200,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    compile: bool = True,
    autotune: bool = False,
    draft_sweep: bool = False,
) -> dict[str, Any]:
    """Speculative vs plain greedy at batch 1: tokens/s ratio, tokens per forward, acceptance per head.

    With compile, both are also run with torch.compile'd decode steps (CompiledDecoder), each
    prompt through all four paths in turn, and the compiled outputs are checked too. With
    draft_sweep, speculative decoding also runs with 1 .. k-2 drafts per pass (`draft_tokens`),
    each prompt through every draft count in turn, against the same run's plain decoding.
    """
    model, tok = load_checkpoint(checkpoint, device=device, dtype=dtype)
    k = model.cfg.k
    prompts = heldout_prompts(corpus, tok, n_prompts, prompt_tokens, seed)
    timed_generate(model, prompts[:1], 16, True)  # warm-up both paths
    timed_generate(model, prompts[:1], 16, False)
    dec = None
    compile_s = 0.0
    if compile:
        t0 = time.perf_counter()
        dec = CompiledDecoder(model, 1, autotune=autotune)
        timed_generate(model, prompts[:1], 16, True, dec)  # compiles the T = k and T = 1 graphs
        timed_generate(model, prompts[:1], 16, False, dec)
        compile_s = time.perf_counter() - t0
    sweep = list(range(1, k - 1)) if draft_sweep else []
    for d in sweep:  # warm (and compile) each T = d + 1 step
        timed_generate(model, prompts[:1], 16, True, None, d)
        if dec is not None:
            timed_generate(model, prompts[:1], 16, True, dec, d)
    sweep_s: dict[int, list[float]] = {d: [0.0, 0.0] for d in sweep}  # eager, compiled seconds
    sweep_tpf: dict[int, list[int]] = {d: [0, 0] for d in sweep}  # tokens, forwards
    cplain_s = cspec_s = 0.0
    compiled_identical = True
    plain_s = spec_s = 0.0
    tokens = forwards = verify = accepted = nbytes = 0
    by_pos = [0] * (k - 1)
    identical = True
    per_prompt = []
    for p in prompts:
        a = timed_generate(model, [p], new_tokens, False)
        b = timed_generate(model, [p], new_tokens, True)
        same = a.gen.tokens == b.gen.tokens
        identical &= same
        if dec is not None:
            ca = timed_generate(model, [p], new_tokens, False, dec)
            cb = timed_generate(model, [p], new_tokens, True, dec)
            cplain_s += ca.seconds
            cspec_s += cb.seconds
            compiled_identical &= ca.gen.tokens == a.gen.tokens and cb.gen.tokens == a.gen.tokens
        for d in sweep:
            e = timed_generate(model, [p], new_tokens, True, None, d)
            identical &= e.gen.tokens == a.gen.tokens
            sweep_s[d][0] += e.seconds
            sweep_tpf[d][0] += len(e.gen.tokens[0])
            sweep_tpf[d][1] += e.gen.stats.forward_passes
            if dec is not None:
                c = timed_generate(model, [p], new_tokens, True, dec, d)
                compiled_identical &= c.gen.tokens == a.gen.tokens
                sweep_s[d][1] += c.seconds
        plain_s += a.seconds
        spec_s += b.seconds
        n = len(b.gen.tokens[0])
        tokens += n
        nbytes += sum(len(tok.token_bytes(t)) for t in b.gen.tokens[0])
        forwards += b.gen.stats.forward_passes
        verify += b.gen.stats.verify_steps
        accepted += b.gen.stats.accepted
        by_pos = [x + y for x, y in zip(by_pos, b.gen.stats.accepted_by_position, strict=True)]
        per_prompt.append(
            {
                "plain_tok_s": round(n / a.seconds, 1),
                "spec_tok_s": round(n / b.seconds, 1),
                "tokens_per_forward": round(n / b.gen.stats.forward_passes, 2),
                "identical": same,
            }
        )
    return {
        "benchmark": "speculative_vs_plain_greedy",
        "checkpoint": checkpoint,
        "head_type": model.cfg.head_type,
        "k": k,
        "device": device,
        "dtype": dtype,
        "batch_size": 1,
        "prompts": n_prompts,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "speculative_tokens_per_s": round(tokens / spec_s, 1),
        "speedup": round(plain_s / spec_s, 3),
        # text bytes, to compare checkpoints with different tokenizers
        "bytes_per_token": round(nbytes / tokens, 3),
        "plain_bytes_per_s": round(nbytes / plain_s, 1),
        "speculative_bytes_per_s": round(nbytes / spec_s, 1),
        "tokens_per_forward": round(tokens / forwards, 3),
        "bytes_per_forward": round(nbytes / forwards, 3),
        "mean_accepted_length": round((accepted + verify) / verify, 3) if verify else 1.0,
        "acceptance_by_head": {f"head_{i + 2}": round(c / verify, 3) for i, c in enumerate(by_pos)} if verify else {},
        "identical_outputs": identical,
        **(
            {
                "compiled": {
                    "compile_seconds": round(compile_s, 1),
                    "autotune": autotune,
                    "plain_tokens_per_s": round(tokens / cplain_s, 1),
                    "speculative_tokens_per_s": round(tokens / cspec_s, 1),
                    "plain_bytes_per_s": round(nbytes / cplain_s, 1),
                    "speculative_bytes_per_s": round(nbytes / cspec_s, 1),
                    "speedup": round(cplain_s / cspec_s, 3),
                    "speculative_vs_eager_plain": round(plain_s / cspec_s, 3),
                    "identical_to_eager_plain": compiled_identical,
                }
            }
            if dec is not None
            else {}
        ),
        **({"by_draft_tokens": _sweep_table(sweep_s, sweep_tpf, plain_s, cplain_s)} if sweep else {}),
        "per_prompt": per_prompt,
    }


def _sweep_table(
    sweep_s: dict[int, list[float]], sweep_tpf: dict[int, list[int]], plain_s: float, cplain_s: float
) -> dict[str, dict[str, float]]:
    """Per draft count: tokens per forward and the speedup over the same run's plain decoding."""
    rows: dict[str, dict[str, float]] = {}
    for d, (eager_s, comp_s) in sweep_s.items():
        tok, fwd = sweep_tpf[d]
        rows[str(d)] = {"tokens_per_forward": round(tok / fwd, 3), "speedup": round(plain_s / eager_s, 3)}
        if comp_s:
            rows[str(d)]["compiled_speedup"] = round(cplain_s / comp_s, 3)
    return rows


def bench_vs_transformers(
    hf_dir: str,
    ours_dir: str,
    batch_sizes: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 16,
    new_tokens: int = 64,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
    compile: bool = True,
    autotune: bool = False,
) -> dict[str, Any]:
    """Plain (and speculative) greedy decoding vs transformers' generate() on the same GPT-2 weights.

    With compile, our plain decoding also runs with torch.compile'd steps (CompiledDecoder);
    transformers runs its default generate() (eager, dynamic cache)."""
    from transformers import GPT2LMHeadModel

    hf: Any = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="sdpa")
    hf = hf.to(device).eval()
    ours, _ = load_checkpoint(ours_dir, device=device, dtype="float32")
    vocab = ours.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    results = []
    for bsz in batch_sizes:
        prompts = torch.randint(0, vocab, (bsz, prompt_tokens), generator=gen)
        plist = prompts.tolist()

        def run_hf(prompts: torch.Tensor = prompts) -> list[list[int]]:
            with torch.inference_mode():
                out = hf.generate(
                    prompts.to(device),
                    attention_mask=torch.ones_like(prompts).to(device),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[:, prompt_tokens:].tolist()

        run_hf()  # warm-up
        generate(ours, plist, 8, speculative=False)
        dec = None
        if compile:
            dec = CompiledDecoder(ours, bsz, autotune=autotune)
            generate(ours, plist, 8, speculative=False, compiled=dec)  # compiles the T = 1 graph
        t_hf, t_plain, t_spec, t_comp = [], [], [], []
        same_plain = same_spec = same_comp = True
        spec_tpf = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = run_hf()
            t_hf.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain = generate(ours, plist, new_tokens, speculative=False)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            spec = generate(ours, plist, new_tokens, speculative=True)
            t_spec.append(time.perf_counter() - t0)
            same_plain &= plain.tokens == ref
            same_spec &= spec.tokens == ref
            if dec is not None:
                t0 = time.perf_counter()
                comp = generate(ours, plist, new_tokens, speculative=False, compiled=dec)
                t_comp.append(time.perf_counter() - t0)
                same_comp &= comp.tokens == ref
            spec_tpf.append(new_tokens / max(spec.stats.forward_passes, 1))
        n = bsz * new_tokens
        med = statistics.median
        results.append(
            {
                "batch_size": bsz,
                "transformers_tokens_per_s": round(n / med(t_hf), 1),
                "plain_tokens_per_s": round(n / med(t_plain), 1),
                "speculative_tokens_per_s": round(n / med(t_spec), 1),
                "plain_vs_transformers": round(med(t_hf) / med(t_plain), 3),
                "speculative_vs_transformers": round(med(t_hf) / med(t_spec), 3),
                "speculative_tokens_per_forward": round(statistics.mean(spec_tpf), 2),
                "identical_greedy_plain": same_plain,
                "identical_greedy_speculative": same_spec,
                **(
                    {
                        "compiled_plain_tokens_per_s": round(n / med(t_comp), 1),
                        "compiled_plain_vs_transformers": round(med(t_hf) / med(t_comp), 3),
                        "identical_greedy_compiled": same_comp,
                    }
                    if t_comp
                    else {}
                ),
            }
        )
        ours.reset_caches()
    return {
        "benchmark": "ours_vs_transformers_generate",
        "hf_checkpoint": hf_dir,
        "device": device,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "autotune": autotune,
        "results": results,
    }


def write_json(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
