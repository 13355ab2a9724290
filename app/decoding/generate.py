"""The decoding ladder: prefill -> forward_step -> (accept_drafts) -> generate.

Pure functions over tensors and a model with KV caches; the engine drives the same steps
for its continuous batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from app.decoding.predict import pad_right
from app.decoding.sampling import BatchSampling, SamplingParams, count_emitted, make_generator, penalty_state
from app.decoding.sequential import draft_sequential, prefill_window
from app.decoding.speculative import Drafted, Drafter, StepResult, accept_drafts, draft_next
from app.model.model import MTPTransformer, SequentialHeads

if TYPE_CHECKING:
    from app.decoding.compiled import CompiledDecoder


@dataclass
class Prefilled:
    """A prefill's output: the last position's logits, every position's state (for
    prompt_logprobs), and (sequential heads) how to draft from it."""

    logits: Tensor  # [B, k, V] linear heads; [B, 1, V] (head 1) sequential heads
    hidden: Tensor  # [B, T, C] the trunk's states at every (right-padded) prompt position
    drafter: Drafter | None = None  # sequential heads: the modules over the prompts and the first token
    n_drafts: int = 0  # sequential heads: k - 1, the drafts' width even when none are made


def prefill(model: MTPTransformer, prompts: list[list[int]], row0: int = 0, n_drafts: int | None = None) -> Prefilled:
    """Run prompts (right-padded) into KV-cache rows row0.. ; the last position's logits.

    With sequential heads the modules' caches are filled for the prompts' positions when the
    first drafts are made (first_tokens), since module j at position t reads token t + j."""
    device = model.head.proj.weight.device
    idx, lengths = pad_right(prompts, device)
    B, T = idx.shape
    pos = torch.arange(T, device=device).expand(B, T)
    h = model.trunk(idx, pos, kv_len=T, row0=row0)  # [B, T, C]
    last = h[torch.arange(B, device=device), lengths - 1]  # [B, C]
    if not isinstance(model.head, SequentialHeads):
        return Prefilled(model.head(last), h)  # only the last position
    zero = torch.zeros(B, dtype=torch.long, device=device)

    def drafter(n_acc: Tensor, tokens: Tensor, sampling: BatchSampling, drafting: Tensor) -> Drafted:
        window = prefill_window(idx, lengths, tokens[:, 0])  # positions 1..T, the first token at L
        return draft_sequential(model, h, window, zero, lengths - 1, None, sampling, drafting, n_drafts, row0)

    return Prefilled(model.head(last, heads=slice(0, 1)), h, drafter, model.cfg.k - 1)


PROMPT_SCORE_CHUNK = 256  # positions per head-1 projection: bounds the [n, V] logits it holds at once


def prompt_logprobs(
    model: MTPTransformer, hidden: Tensor, prompts: list[list[int]], rows: list[int]
) -> list[list[float]]:
    """Head 1's log p(prompt[t] | prompt[:t]) for t = 1..L-1 of each prompt in rows, from a
    prefill's states `hidden` [B, T, C] (Prefilled.hidden). The prompts are right-padded, so the
    state at a real position has seen only the tokens up to it. The first token has no score."""
    if not rows:
        return []
    states = torch.cat([hidden[b, : len(prompts[b]) - 1] for b in rows])  # [N, C]
    targets = torch.tensor([t for b in rows for t in prompts[b][1:]], dtype=torch.long, device=hidden.device)  # [N]
    parts = []
    for s in range(0, len(targets), PROMPT_SCORE_CHUNK):
        logits = model.head(states[s : s + PROMPT_SCORE_CHUNK], heads=slice(0, 1))[:, 0].float()  # [n, V]
        chosen = logits.gather(-1, targets[s : s + PROMPT_SCORE_CHUNK, None])[:, 0]  # [n]
        parts.append(chosen - logits.logsumexp(-1))
    flat: list[float] = torch.cat(parts).tolist() if parts else []
    out, start = [], 0
    for b in rows:
        n = len(prompts[b]) - 1
        out.append(flat[start : start + n])
        start += n
    return out


@dataclass
class StepLogits:
    """A forward step's output: head 1 at every verified position, and the drafter of the next drafts."""

    head1: Tensor  # [B, T, 1, V]
    drafts: Drafter | None  # heads 2..k at the kept offsets, or the sequential modules


def step_inputs(cur: Tensor, drafts: Tensor | None, pos: Tensor) -> tuple[Tensor, Tensor]:
    """What a step feeds: tokens [cur] or [cur, drafts] and their positions pos.., both [B, T]."""
    idx = cur[:, None] if drafts is None or drafts.shape[1] == 0 else torch.cat([cur[:, None], drafts], dim=1)
    return idx, pos[:, None] + torch.arange(idx.shape[1], device=pos.device)[None, :]


def forward_step(
    model: MTPTransformer,
    cur: Tensor,
    drafts: Tensor | None,
    pos: Tensor,
    row0: int = 0,
    want_drafts: bool = True,
    compiled: CompiledDecoder | None = None,
    states: Tensor | None = None,
    n_drafts: int | None = None,
) -> StepLogits:
    """Step 1: one forward over [cur, drafts] at positions pos.. .

    With drafts None (or empty) this is plain one-token decoding (T = 1). Head 1 runs at every
    position; heads 2..k only where the next drafts come from, and not at all without
    want_drafts — a plain step costs the trunk plus one vocabulary projection. With
    `compiled` (rows from 0 only) the trunk and head 1 run as one compiled graph.
    Sequential heads draft n_drafts (default k - 1) tokens with their modules, given the
    previous step's carried `states` (StepResult.states).
    """
    idx, input_pos = step_inputs(cur, drafts, pos)  # [B, T]
    if compiled is not None:
        assert row0 == 0
        head1, h = compiled(idx, input_pos)
    else:
        h = model.trunk(idx, input_pos, row0=row0)  # [B, T, C]
        head1 = model.head(h, heads=slice(0, 1))  # [B, T, 1, V]
    if not want_drafts or model.cfg.k == 1:
        return StepLogits(head1, None)
    if isinstance(model.head, SequentialHeads):

        def draft_modules(n_acc: Tensor, tokens: Tensor, sampling: BatchSampling, drafting: Tensor) -> Drafted:
            return draft_sequential(model, h, tokens, pos, n_acc, states, sampling, drafting, n_drafts, row0)

        return StepLogits(head1, draft_modules)
    rows = torch.arange(h.shape[0], device=h.device)

    def draft_heads(n_acc: Tensor, tokens: Tensor, sampling: BatchSampling, drafting: Tensor) -> Drafted:
        head_logits = model.head(h[rows, n_acc], heads=slice(1, None))  # [B, k-1, V]
        return Drafted(*draft_next(head_logits, sampling, drafting), None)

    return StepLogits(head1, draft_heads)


def draft_count(k: int, draft_tokens: int | None) -> int:
    """Drafts verified per pass: heads 2..k propose k - 1; draft_tokens may take fewer.

    The later heads are right less often, while each verified token adds to the pass's cost, so
    on some devices and batch sizes verifying fewer drafts is faster (`mtp bench speculative
    --draft-sweep`, `mtp bench engine`). Any cap keeps greedy output identical and sampling exact."""
    if draft_tokens is not None and draft_tokens < 0:
        raise ValueError("draft_tokens must be >= 0")
    return k - 1 if draft_tokens is None else min(draft_tokens, k - 1)


def first_tokens(prefilled: Prefilled, sampling: BatchSampling, want_drafts: Tensor) -> StepResult:
    """The first generated token (and first drafts) from a prefill's last-position logits."""
    logits = prefilled.logits  # [B, k or 1, V]
    B = logits.shape[0]
    no_drafts = logits.new_zeros(B, 0, dtype=torch.long)
    zero = torch.zeros(B, dtype=torch.long, device=logits.device)
    return accept_drafts(
        logits[:, None], no_drafts, None, zero, sampling, want_drafts, prefilled.drafter, prefilled.n_drafts
    )


@dataclass
class GenerationStats:
    forward_passes: int = 0
    verify_steps: int = 0  # forward passes that carried drafts
    drafted: int = 0
    accepted: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    prefill_s: float = 0.0  # the prefill pass, to the first tokens (and their drafts) in hand

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify pass (accepted drafts + the bonus)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 1.0


@dataclass
class Generation:
    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished_by_eos: list[bool]
    stats: GenerationStats


@torch.inference_mode()
def generate(
    model: MTPTransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | list[SamplingParams] | None = None,
    speculative: bool = True,
    eos_id: int | None = None,
    compiled: CompiledDecoder | None = None,
    draft_tokens: int | None = None,
) -> Generation:
    """Generate for a static batch: plain or self-speculative decoding, greedy or sampled.

    Greedy speculative output equals plain greedy output; sampled output keeps head 1's
    distribution. Allocates the model's KV caches for len(prompts) rows, or uses those of
    `compiled` (a CompiledDecoder of the same model), which then runs the decode steps.
    draft_tokens caps the drafts verified per pass (default k - 1, all of heads 2..k).
    """
    cfg = model.cfg
    n_drafts = draft_count(cfg.k, draft_tokens)
    B = len(prompts)
    device = model.head.proj.weight.device
    plist = params if isinstance(params, list) else [params or SamplingParams()] * B
    gens = [None if p.greedy else make_generator(p.seed) for p in plist]
    penalty = penalty_state(prompts, cfg.vocab_size, device) if any(p.penalized for p in plist) else None
    sampling = BatchSampling.from_params(plist, gens, device, penalty)
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1 or max(lengths) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length + max_new_tokens must be within 1..{cfg.max_seq_len}")
    use_spec = speculative and n_drafts > 0
    if compiled is None:
        model.setup_caches(B)
    elif compiled.model is not model or compiled.max_batch < B:
        raise ValueError(f"the compiled decoder is for this model and at most {compiled.max_batch} rows")
    else:
        compiled.attach()

    out: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    done = [max_new_tokens == 0] * B
    eos_hit = [False] * B
    stats = GenerationStats(accepted_by_position=[0] * (cfg.k - 1))
    drafting = torch.full((B,), use_spec, device=device)

    t0 = time.perf_counter()
    res = first_tokens(prefill(model, prompts, n_drafts=n_drafts), sampling, drafting)
    if device.type == "cuda":  # the loop below reads the first tokens at once anyway
        torch.cuda.synchronize(device)
    stats.prefill_s = time.perf_counter() - t0
    stats.forward_passes += 1
    pos = torch.tensor(lengths, device=device)
    while True:
        if sampling.penalties is not None:  # the tokens just emitted count from the next step on
            sampling.penalties.counts = count_emitted(sampling.penalties.counts, res.tokens, res.n_emitted)
        # collect this step's tokens; a finished row emits nothing more
        for b in range(B):
            if done[b]:
                continue
            for t in range(int(res.n_emitted[b])):
                tok = int(res.tokens[b, t])
                out[b].append(tok)
                logps[b].append(float(res.logprobs[b, t]))
                if tok == eos_id:
                    eos_hit[b] = done[b] = True
                    break
                if len(out[b]) >= max_new_tokens:
                    done[b] = True
                    break
        if all(done):
            break
        cur = res.tokens[torch.arange(B, device=device), res.n_emitted - 1]  # [B] last emitted token
        remaining = torch.tensor([max_new_tokens - len(o) for o in out], device=device)
        # a row may accept at most remaining - 1 drafts (the bonus is the last token); finished rows: none
        max_accept = (remaining - 1).clamp(min=0, max=n_drafts) if use_spec else torch.zeros_like(remaining)
        max_accept = torch.where(torch.tensor(done, device=device), 0, max_accept)
        drafts = res.drafts[:, :n_drafts] if use_spec else None
        if compiled is not None and sampling.all_greedy and sampling.penalties is None:
            res = compiled.greedy_step(cur, drafts, pos, max_accept, states=res.states, n_drafts=n_drafts)
        else:
            step = forward_step(
                model, cur, drafts, pos, want_drafts=use_spec, compiled=compiled, states=res.states, n_drafts=n_drafts
            )
            verified = drafts if drafts is not None else cur.new_zeros(B, 0)
            q = res.draft_probs[:, :n_drafts] if res.draft_probs is not None else None
            res = accept_drafts(step.head1, verified, q, max_accept, sampling, drafting, step.drafts, cfg.k - 1)
        stats.forward_passes += 1
        _count(stats, res, max_accept, done)
        # pos advances by what each live row emitted; finished rows stay put
        live = ~torch.tensor(done, device=device)
        pos = pos + torch.where(live, res.n_emitted, 0)
    if compiled is None:
        model.reset_caches()
    return Generation(out, logps, eos_hit, stats)


def _count(stats: GenerationStats, res: StepResult, max_accept: Tensor, done: list[bool]) -> None:
    for b in range(len(done)):
        m = int(max_accept[b])
        if done[b] or m == 0:
            continue
        n = int(res.n_emitted[b]) - 1
        stats.verify_steps += 1
        stats.drafted += m
        stats.accepted += n
        for i in range(n):
            stats.accepted_by_position[i] += 1
