"""Multi-token scoring: the k heads' distributions at the end of each prompt, in one padded pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from app.model.model import MTPTransformer, SequentialHeads, shift_left


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

    Linear heads give each position's marginal from the prompt alone. Sequential heads are a
    chain: position j + 1 conditions on the greedy tokens of positions 1..j, and a candidate's
    token j + 1 on the candidate's own tokens 1..j, so its total is the chain probability
    log p(c_1 .. c_m | prompt) under the modules.
    """
    device = model.head.proj.weight.device
    idx, lengths = pad_right(prompts, device)
    h_all = model.trunk(idx)  # [B, T, C]
    rows = torch.arange(len(prompts), device=device)
    sequential = isinstance(model.head, SequentialHeads)
    if sequential:
        logp = _chain_logprobs(model, h_all, idx, lengths, None)  # [B, k, V]
    else:
        logp = torch.log_softmax(model.head(h_all[rows, lengths - 1]).float(), dim=-1)  # [B, k, V]
    top_lp, top_ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)  # [B, k, n]
    cands = candidates or [[] for _ in prompts]
    flat = [(b, cand) for b, cs in enumerate(cands) for cand in cs]
    cand_logp = logp[[b for b, _ in flat]]  # [N, k, V]: the heads' distributions for each candidate
    if sequential and flat and max(len(c) for _, c in flat) > 1:
        cand_logp = _candidate_chains(model, h_all, idx, lengths, flat)
    cand_scores: list[list[list[float]]] = [[] for _ in prompts]
    for i, (b, cand) in enumerate(flat):
        heads = torch.arange(len(cand), device=device)
        cand_scores[b].append(cand_logp[i, heads, torch.tensor(cand, device=device)].tolist())
    return Scores(
        top_ids=top_ids.tolist(),
        top_probs=top_lp.exp().tolist(),
        top_logprobs=top_lp.tolist(),
        greedy=logp.argmax(-1).tolist(),
        candidates=cand_scores,
    )


def _chain_logprobs(model: MTPTransformer, h: Tensor, idx: Tensor, lengths: Tensor, own: Tensor | None) -> Tensor:
    """Sequential heads' log-probabilities [N, k, V] after each row's prompt (idx [N, T], right-
    padded, lengths [N]; h [N, T, C] the trunk's states): depth j runs, uncached, over the prompt
    followed by the continuation's first j tokens: own [N, k] when given, else the greedy ones."""
    N, T = idx.shape
    rows, last = torch.arange(N, device=idx.device), lengths - 1
    seq = torch.cat([idx, idx.new_zeros(N, model.cfg.k)], dim=1)  # [N, T + k]
    logp = [torch.log_softmax(model.head.proj(h[rows, last]).float(), dim=-1)]  # head 1: [N, V]
    for j in range(1, model.cfg.k):
        seq[rows, last + j] = own[:, j - 1] if own is not None else logp[-1].argmax(-1)  # token j at L - 1 + j
        h = model.mtp_state(j, h, seq[:, j : j + T])  # [N, T, C]: position t reads token t + j
        logp.append(torch.log_softmax(model.head.proj(h[rows, last]).float(), dim=-1))
    return torch.stack(logp, dim=1)  # [N, k, V]


def _candidate_chains(
    model: MTPTransformer, h: Tensor, idx: Tensor, lengths: Tensor, flat: list[tuple[int, list[int]]]
) -> Tensor:
    """Sequential heads' log-probabilities [N, W + 1, V] along each candidate (flat: its prompt's
    row in idx and its tokens; W + 1 the longest): depth j's distribution after the prompt and
    the candidate's first j tokens, as _chain_logprobs gives with own tokens.

    Depth j at position t reads token t + j, so of a prompt of length L only the last j
    positions see the candidate: the ones before are the same for every candidate of the prompt.
    Each depth runs once over each prompt (cache rows N.., the prompt's row), those rows' keys
    and values are copied to each candidate's row, and the candidates run only their last W
    positions on them (a window where the first W - j positions give the prompt's own values)."""
    device = idx.device
    B, T = idx.shape
    N, W = len(flat), max(len(c) for _, c in flat) - 1
    owner = torch.tensor([b for b, _ in flat], device=device)  # [N]
    length = lengths[owner]  # [N]
    full = torch.zeros(N, T + W + model.cfg.k, dtype=torch.long, device=device)  # prompt, candidate, padding
    full[:, :T] = idx[owner]
    for i, (b, cand) in enumerate(flat):
        full[i, int(lengths[b]) : int(lengths[b]) + len(cand)] = torch.tensor(cand, device=device)
    start = (length - W).clamp(min=0)  # [N]: each window's first position (past a short prompt's end: unread)
    window = start[:, None] + torch.arange(W, device=device)  # [N, W]
    out = length - 1 - start  # [N]: the prompt's last position, in the window
    rows = torch.arange(N, device=device)
    logp = [torch.log_softmax(model.head.proj(h[owner, length - 1]).float(), dim=-1)]  # head 1: [N, V]
    shared, own = h, h[owner[:, None], window.clamp(max=T - 1)]  # [B, T, C], [N, W, C]
    positions = torch.arange(T, device=device).expand(B, T)
    with model.module_caches(N + B, T + W) as caches:
        for j in range(1, W + 1):
            shared = model.mtp_state(j, shared, shift_left(idx, j), positions, row0=N)  # [B, T, C]
            caches[j - 1].gather(owner + N, T)  # each candidate's row starts as its prompt's
            own = model.mtp_state(j, own, full.gather(1, window + j), window)  # [N, W, C]
            logp.append(torch.log_softmax(model.head.proj(own[rows, out]).float(), dim=-1))
    return torch.stack(logp, dim=1)  # [N, W + 1, V]
