"""Multi-token scoring: the k heads' distributions at the end of each prompt, in one padded pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.model.model import MTPTransformer


@dataclass
class Scores:
    top_ids: list[list[list[int]]]  # [B][k][n]
    top_probs: list[list[list[float]]]  # [B][k][n]
    top_logprobs: list[list[list[float]]]  # [B][k][n]
    greedy: list[list[int]]  # [B][k] argmax of each head
    candidates: list[list[list[float]]]  # [B][c][len] log-probability of each candidate token


def pad_right(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with 0 into [B, T_max], and each row's length [B]."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    return idx, lengths


@torch.inference_mode()
def score_next(
    model: MTPTransformer,
    prompts: list[list[int]],
    top_n: int,
    candidates: list[list[list[int]]] | None = None,
) -> Scores:
    """Top-n tokens of every head after each prompt, and candidate continuations' log-probabilities.

    Prompts are right-padded: causal attention never lets a real position see a pad, so each
    row's last real position gives exactly its unbatched distribution. Candidate token j is
    scored by head j + 1 (the head that predicts j + 1 steps ahead).
    """
    device = model.head.proj.weight.device
    idx, lengths = pad_right(prompts, device)
    h = model.trunk(idx)[torch.arange(len(prompts), device=device), lengths - 1]  # [B, C]
    logp = torch.log_softmax(model.head(h).float(), dim=-1)  # [B, k, V]
    top_lp, top_ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)  # [B, k, n]
    cand_scores: list[list[list[float]]] = []
    for b, cands in enumerate(candidates or [[] for _ in prompts]):
        rows = []
        for cand in cands:
            heads = torch.arange(len(cand), device=device)
            rows.append(logp[b, heads, torch.tensor(cand, device=device)].tolist())
        cand_scores.append(rows)
    return Scores(
        top_ids=top_ids.tolist(),
        top_probs=top_lp.exp().tolist(),
        top_logprobs=top_lp.tolist(),
        greedy=logp.argmax(-1).tolist(),
        candidates=cand_scores,
    )
