"""Drafting with sequential (DeepSeek-V3) MTP modules, batched and ragged.

After a verify pass that kept offsets 0..n_acc at positions pos..P-1 (P = pos + n_acc + 1 holds
the bonus token), drafts come from the modules one after another at position P-1: module 1 on
(trunk state, embedding of the bonus) predicts token P+1 = draft 1, module 2 on (module 1's
state, draft 1) predicts P+2 = draft 2, and so on.

Module j's cache entry at position t reads token t + j, so it is right only once that token is
known. Each call therefore runs module j over the window pos-j+1 .. pos+T-1 (T the verify
pass's width, padded; the same tokens pos+1.. for every depth): the positions whose token the
verify pass has just settled, overwriting what a rejected draft wrote there, and the position
P-1 that drafts. Entries left by the window's padding and by this call's drafts lie at or after
the next window's start and are rewritten by it before any query reads them; so at drafting, a
module attends exactly what teacher-forced training showed it: the true tokens, then the chain's
drafts. The window's first position needs depth j-1's state there, which the previous call
computed: `states` carries depth j's state at position P - j (j = 1..k-2) from call to call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from app.decoding.sampling import BatchSampling
from app.decoding.speculative import Drafted, draft_next
from app.model.model import MTPTransformer, shift_left


def draft_sequential(
    model: MTPTransformer,
    h: Tensor,
    tokens: Tensor,
    pos: Tensor,
    n_acc: Tensor,
    states: Tensor | None,
    sampling: BatchSampling,
    drafting: Tensor,
    n_drafts: int | None = None,
    row0: int = 0,
) -> Drafted:
    """Drafts for the next step, and the modules' caches brought up to date.

    h [B, T, C]: the trunk's states at positions pos [B] .. pos+T-1 (the verify pass); tokens
    [B, T]: the tokens at positions pos+1 .. pos+T, true up to offset n_acc [B] (the accepted
    drafts, then the bonus), padding after; states [B, k-2, C] from the previous call (None:
    zeros, for a prefill). Makes n_drafts (default k-1) drafts, drawn only for `drafting` rows that
    sample; returns drafts [B, k-1] and q [B, k-1, V] zero-padded past n_drafts.
    """
    k = model.cfg.k
    B = h.shape[0]
    q_all: Tensor | None = None

    def pick(j: int, logits: Tensor) -> Tensor:
        nonlocal q_all
        d, q = draft_next(logits[:, None], sampling, drafting)  # [B, 1], [B, 1, V] | None
        if q is not None:
            if q_all is None:
                q_all = q.new_zeros(B, k - 1, q.shape[-1])
            q_all[:, j - 1] = q[:, 0]
        return d[:, 0]

    drafts, new_states = module_chain(model, h, tokens, pos, n_acc, states, pick, n_drafts, row0=row0)
    return Drafted(drafts, q_all, new_states)


def module_chain(
    model: MTPTransformer,
    h: Tensor,
    tokens: Tensor,
    pos: Tensor,
    n_acc: Tensor,
    states: Tensor | None,
    pick: Callable[[int, Tensor], Tensor],
    n_drafts: int | None = None,
    kv_len: int | None = None,
    row0: int = 0,
) -> tuple[Tensor, Tensor]:
    """The modules' chain over their windows (draft_sequential's arguments): module j's logits
    [B, V] at position P-1 go to pick(j, logits) -> draft j [B]. Returns (drafts [B, k-1]
    zero-padded past n_drafts, the new carried states [B, k-2, C]). kv_len: the keys each
    module attends (default: up to the window's last position; a compiled step passes its
    own bound, which the graph's shapes allow for)."""
    k = model.cfg.k
    n = k - 1 if n_drafts is None else min(n_drafts, k - 1)
    B, T, C = h.shape
    device = h.device
    rows = torch.arange(B, device=device)
    slack = model.cfg.max_seq_len + k - 2  # the cache's last slot: no real position's query reads it
    if states is None:
        states = h.new_zeros(B, max(k - 2, 0), C)
    new_states = torch.zeros_like(states)
    drafts = torch.zeros(B, k - 1, dtype=torch.long, device=device)
    seq = torch.cat([tokens, tokens.new_zeros(B, n)], dim=1)  # [B, T + n]: tokens at pos+1.., draft j at n_acc + j
    h_prev = h  # depth j-1's states over module j's window
    for j in range(1, n + 1):
        if j > 1:  # module j's window starts one position earlier than module j-1's
            h_prev = torch.cat([states[:, j - 2, None].to(h_prev.dtype), h_prev], dim=1)  # [B, T+j-1, C]
        W = T + j - 1
        input_pos = (pos - (j - 1))[:, None] + torch.arange(W, device=device)[None, :]  # [B, W]
        input_pos = torch.where(input_pos < 0, slack, input_pos)  # before the sequence's start: a slack slot
        h_j = model.mtp_state(j, h_prev, seq[:, :W], input_pos, kv_len, row0)  # [B, W, C]
        if j <= k - 2:
            new_states[:, j - 1] = h_j[rows, n_acc]  # depth j at position P - j
        d = pick(j, model.head.proj(h_j[rows, n_acc + j - 1]))  # [B] from logits at P-1: token P + j
        drafts[:, j - 1] = d
        seq[rows, n_acc + j] = d
        h_prev = h_j
    return drafts, new_states


def prefill_window(prompt_ids: Tensor, lengths: Tensor, first: Tensor) -> Tensor:
    """A prefill as draft_sequential's window: the tokens at positions 1.. of right-padded prompts
    [B, T] (lengths [B]) with the first generated token [B] at each row's position L."""
    window = shift_left(prompt_ids, 1)  # [B, T]
    window[torch.arange(len(lengths), device=window.device), lengths - 1] = first
    return window
