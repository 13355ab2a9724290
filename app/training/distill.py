"""Self-distillation of the drafting heads (heads 2..k), as in Medusa-2.

Speculative decoding accepts a draft when it agrees with what head 1 will say, so the best
target for head j at position t is head 1's own distribution at position t + j - 1 of the
same sequence, not the corpus token. This trains only the rows of the MTP projection that
belong to heads 2..k, on sequences the model itself generated (greedy and sampled) from
prompts in the training split; head 1 — and so every greedy output and the bits per byte —
is unchanged.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.decoding.generate import generate
from app.decoding.sampling import SamplingParams
from app.model.checkpoint import REPORT_FILE, load_checkpoint, save_checkpoint
from app.model.model import MTPTransformer
from app.training.data import read_corpus, split_text

log = logging.getLogger(__name__)


def self_generated(
    model: MTPTransformer, prompts: list[list[int]], new_tokens: int, seed: int, sampled_every: int, batch: int = 32
) -> list[list[int]]:
    """prompt + continuation for every prompt: greedy, except every `sampled_every`-th (temperature 1)."""
    seqs: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        params = [
            SamplingParams(do_sample=True, seed=seed + i + j)
            if sampled_every and (i + j) % sampled_every == sampled_every - 1
            else SamplingParams()
            for j in range(len(chunk))
        ]
        out = generate(model, chunk, new_tokens, params, speculative=True)
        seqs.extend(p + t for p, t in zip(chunk, out.tokens, strict=True))
    return seqs


@torch.no_grad()
def features_and_targets(model: MTPTransformer, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk states h [N, T, C] and head 1's log-probabilities [N, T, V] on each sequence."""
    T = max(len(s) for s in seqs)
    idx = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    hs, lps = [], []
    for i in range(0, len(seqs), 16):
        h = model.trunk(idx[i : i + 16])  # [b, T, C]
        hs.append(h)
        lps.append(torch.log_softmax(model.head(h)[:, :, 0].float(), dim=-1))
    return torch.cat(hs), torch.cat(lps)


def distill_heads(
    checkpoint: str,
    corpus: str,
    out: str | None = None,
    prompts: int = 256,
    prompt_tokens: int = 24,
    new_tokens: int = 192,
    steps: int = 400,
    batch_positions: int = 2048,
    lr: float = 2e-3,
    sampled_every: int = 2,
    seed: int = 0,
    save_dtype: str = "float16",
) -> dict[str, Any]:
    """Distil heads 2..k of a checkpoint into itself (or into `out`); returns the report section."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, tok = load_checkpoint(checkpoint)
    k, V = model.cfg.k, model.cfg.vocab_size
    if k < 2:
        raise ValueError("the model has a single head: nothing to distil")
    if model.cfg.head_type != "linear":
        raise ValueError(f"distill-heads trains linear heads 2..k; this model's heads are {model.cfg.head_type}")
    train_ids = tok.encode(split_text(read_corpus(corpus))[0])
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(train_ids) - prompt_tokens) for _ in range(prompts)]
    seqs = self_generated(model, [train_ids[s : s + prompt_tokens] for s in starts], new_tokens, seed, sampled_every)
    h, lp1 = features_and_targets(model, seqs)  # [N, T, C], [N, T, V]
    lengths = torch.tensor([len(s) for s in seqs])
    N = h.shape[0]
    # head j (index j-1) at position t learns head 1's distribution at t + j - 1
    pairs = [(n, t) for n in range(N) for t in range(int(lengths[n]) - (k - 1))]
    pos = torch.tensor(pairs)  # [P, 2]
    weight = model.head.proj.weight.detach()[V:].clone().requires_grad_(True)  # [(k-1) V, C]
    bias = model.head.proj.bias.detach()[V:].clone().requires_grad_(True) if model.head.proj.bias is not None else None
    params = [weight] + ([bias] if bias is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())
        pick = pos[torch.randint(0, len(pos), (batch_positions,), generator=gen)]
        x = h[pick[:, 0], pick[:, 1]]  # [b, C]
        logits = F.linear(x, weight, bias).view(-1, k - 1, V)  # [b, k-1, V]
        loss = torch.zeros(())
        for j in range(k - 1):  # head j+2 vs head 1 at t + j + 1
            target = lp1[pick[:, 0], pick[:, 1] + j + 1].exp()  # [b, V]
            loss = loss + F.cross_entropy(logits[:, j], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item() / (k - 1), 4)})
            log.info("distill step %d loss %.4f", step, loss.item() / (k - 1))
    with torch.no_grad():
        model.head.proj.weight[V:] = weight
        if bias is not None and model.head.proj.bias is not None:
            model.head.proj.bias[V:] = bias
    section = {
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "positions": len(pos),
        "steps": steps,
        "lr": lr,
        "sampled_every": sampled_every,
        "seed": seed,
        "history": history,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    report_path = Path(checkpoint) / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["head_distillation"] = section
    save_checkpoint(out or checkpoint, model, tok, report=report, dtype=save_dtype)
    return section
