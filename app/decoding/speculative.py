"""Self-speculative (blockwise parallel) decoding with the MTP heads, batched.

State per row: `cur`, the last emitted token (not yet in the KV cache) at position `pos`, and
`drafts` [k-1], the proposals of heads 2..k for positions pos+1 .. pos+k-1. One verify pass
feeds [cur, drafts] at positions pos .. pos+k-1; head 1 at offset t checks draft t+1. The
longest agreeing prefix is kept plus one bonus token from head 1, and heads 2..k at the last
kept offset draft the next block, so drafting costs no extra forward pass. Sequential heads
draft with their modules instead, one module call per draft after the verify pass
(app/decoding/sequential.py); verification is the same.

Rows accept different numbers of tokens: outputs are padded [B, T] with per-row counts (as
vLLM's rejection sampler does), and `max_accept` caps each row (0 = plain decoding for that row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from app.decoding.sampling import BatchSampling, logits_to_probs, sample_rows


@dataclass
class StepResult:
    tokens: Tensor  # [B, T] emitted tokens, left-aligned; entries past n_emitted are padding
    n_emitted: Tensor  # [B] long, 1..T: accepted drafts + the bonus token
    logprobs: Tensor  # [B, T] head-1 log-probability (unprocessed softmax) of each emitted token
    drafts: Tensor  # [B, k-1] proposals for the next step
    draft_probs: Tensor | None  # [B, k-1, V] processed draft distributions q (None if all greedy)
    states: Tensor | None = None  # [B, k-2, C] sequential heads: what the next drafting call carries over
    last: Tensor | None = None  # [B] each row's last emitted token, where the step computed it (compiled)
    next_pos: Tensor | None = None  # [B] the position after it: pos + n_emitted, likewise


class Drafted(NamedTuple):
    drafts: Tensor  # [B, k-1]
    q: Tensor | None  # [B, k-1, V] processed draft distributions (None if all greedy)
    states: Tensor | None  # [B, k-2, C] sequential heads' carried states (None for the linear head)


# (kept offsets n_acc [B], emitted tokens [B, T], sampling, drafting [B]) -> the next drafts
Drafter = Callable[[Tensor, Tensor, BatchSampling, Tensor], Drafted]


def _leading_true(mask: Tensor) -> Tensor:
    """Length of the all-True prefix of each row: [B, N] bool -> [B] long."""
    return mask.long().cumprod(dim=-1).sum(dim=-1)


def accept_drafts(
    logits: Tensor,
    drafts: Tensor,
    draft_probs: Tensor | None,
    max_accept: Tensor,
    sampling: BatchSampling,
    want_drafts: Tensor,
    drafter: Drafter | None = None,
    n_drafts: int = 0,
) -> StepResult:
    """Steps 2-5 of a speculative step, given the verify pass's logits [B, T, k, V].

    drafts [B, T-1] were verified at offsets 1..T-1; draft_probs [B, T-1, V] are the distributions
    they were sampled from (needed for sampled rows). max_accept [B] caps accepted drafts.
    want_drafts [B] bool: rows that will verify drafts next step (others skip drafting draws,
    so a row's random stream does not depend on its batch).

    logits may carry head 1 only ([B, T, 1, V]); then drafter(n_acc, tokens, sampling, drafting)
    makes the next drafts (linear heads 2..k at the kept offsets, or the sequential modules from
    the bonus token on), or, when None, no drafts are made (n_drafts zero columns come back).
    """
    B, T, _k, _V = logits.shape
    device = logits.device
    n_verified = T - 1
    rows = torch.arange(B, device=device)
    p = logits_to_probs(logits[:, :, 0], sampling, fed_drafts=drafts)  # [B, T, V] head 1, processed

    # Step 2: which drafts agree. Greedy: draft == argmax. Sampled: u < p(d) / q(d).
    if n_verified > 0:
        p_draft = p[:, :n_verified].gather(-1, drafts[..., None])[..., 0]  # [B, T-1]
        agree = drafts == p[:, :n_verified].argmax(-1)
        if not sampling.all_greedy:
            assert draft_probs is not None
            q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0].clamp(min=1e-20)
            u = torch.zeros(B, n_verified)
            for b, gen in enumerate(sampling.generators):  # max_accept uniforms from the row's own generator
                m = min(int(max_accept[b]), n_verified)
                if m and not bool(sampling.greedy[b]):
                    u[b, :m] = torch.rand(m, generator=gen)
            agree = torch.where(sampling.greedy[:, None], agree, u.to(device) < p_draft / q_draft)
        n_acc = torch.minimum(_leading_true(agree), max_accept.clamp(max=n_verified))  # [B]
    else:
        n_acc = torch.zeros(B, dtype=torch.long, device=device)

    # Step 3: the bonus token from head 1 at offset n_acc; after a rejection, a sampled row
    # draws from norm(max(0, p - q)) so that the output keeps head 1's distribution exactly.
    p_bonus = p[rows, n_acc]  # [B, V]
    if n_verified > 0 and not sampling.all_greedy:
        assert draft_probs is not None
        rejected = (n_acc < max_accept.clamp(max=n_verified)) & ~sampling.greedy  # stopped by a rejection
        q_rej = draft_probs[rows, n_acc.clamp(max=n_verified - 1)]  # [B, V]
        residual = (p_bonus - q_rej).clamp(min=0.0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-20), p_bonus)
        p_bonus = torch.where(rejected[:, None], residual, p_bonus)
    bonus = sample_rows(p_bonus[:, None], sampling)[:, 0]  # [B]

    # Step 4: emitted tokens = accepted drafts + bonus, left-aligned and padded to T.
    offsets = torch.arange(T, device=device)[None, :]  # [1, T]
    padded = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1) if n_verified else drafts.new_zeros(B, 1)
    tokens = torch.where(offsets < n_acc[:, None], padded, bonus[:, None].expand(B, T))
    logprobs = torch.log_softmax(logits[:, :, 0].float(), dim=-1).gather(-1, tokens[..., None])[..., 0]

    # Step 5: heads 2..k at the last kept offset (or the sequential modules) draft the next block.
    if logits.shape[2] > 1:
        nxt = Drafted(*draft_next(logits[rows, n_acc, 1:], sampling, want_drafts), None)
    elif drafter is not None and bool(want_drafts.any()):
        nxt = drafter(n_acc, tokens, sampling, want_drafts)
    else:
        nxt = Drafted(torch.zeros(B, n_drafts, dtype=torch.long, device=device), None, None)
    return StepResult(tokens, n_acc + 1, logprobs, nxt.drafts, nxt.q, nxt.states)


def draft_next(head_logits: Tensor, sampling: BatchSampling, drafting: Tensor) -> tuple[Tensor, Tensor | None]:
    """Drafts from heads 2..k: head_logits [B, k-1, V] -> (drafts [B, k-1], q [B, k-1, V] | None)."""
    B, n, _ = head_logits.shape
    if n == 0:
        return head_logits.new_zeros(B, 0, dtype=torch.long), None
    q = logits_to_probs(head_logits, sampling)  # [B, k-1, V]
    drafts = q.argmax(-1)
    if sampling.all_greedy:
        return drafts, None
    for b, gen in enumerate(sampling.generators):
        if bool(drafting[b]) and not bool(sampling.greedy[b]):
            drafts[b] = torch.multinomial(q[b].cpu(), 1, generator=gen)[:, 0].to(drafts.device)
    return drafts, q
