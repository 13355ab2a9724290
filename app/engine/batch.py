"""The continuous decode batch: row i of every tensor is cache row i of the model's KV cache.

Sequences join with `concatenate` (after their prefill wrote cache rows n..n+m-1) and leave
with `filter`, which compacts the surviving cache rows to 0..n'-1 (TGI's Batch filter/concatenate).

`filter` only drops the sequences; the tensor work it implies (one gather per cache and per
state tensor) is deferred to `compact`, which runs before the cache is next touched, so a
step that drops several sequences compacts once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import draft_count, forward_step
from app.decoding.sampling import BatchSampling, SamplingParams, count_emitted
from app.decoding.speculative import StepResult, accept_drafts
from app.engine.drafts import PLAIN, DraftPolicy, shallow_depth
from app.engine.types import GenerateItem
from app.model.model import MTPTransformer


@dataclass(eq=False)
class RunningSequence:
    item: GenerateItem
    generator: torch.Generator | None
    speculative: bool
    stop_ids: frozenset[int] = frozenset()  # EOS and the request's stop tokens, fixed at admission
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    last_token_at: float | None = None
    depth: int | None = None  # modules that still draft for it (None: all); a shallow step lowers it for good
    ended: bool = False  # finished, failed or cancelled: leaves the batch at the step boundary

    @property
    def remaining(self) -> int:
        return self.item.request.max_new_tokens - self.generated


class DecodeBatch:
    def __init__(
        self, model: MTPTransformer, draft_tokens: int | None = None, policy: DraftPolicy | None = None
    ) -> None:
        self.model = model
        self.k = model.cfg.k
        self.n_drafts = draft_count(self.k, draft_tokens)  # drafts verified per pass (at most)
        self.policy = policy  # picks fewer for all-greedy batches where that is faster
        self.compiled: CompiledDecoder | None = None  # runs the steps whose shape it compiled
        self.device = model.head.proj.weight.device
        self.seqs: list[RunningSequence] = []
        self.cur = torch.zeros(0, dtype=torch.long, device=self.device)  # [n] last token, not yet cached
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [n] position of cur
        self.positions: list[int] = []  # pos as a list: its largest sizes a compiled step's keys
        self.drafts = torch.zeros(0, self.k - 1, dtype=torch.long, device=self.device)  # [n, k-1]
        self.draft_probs: Tensor | None = None  # [n, k-1, V] when any row samples
        self.states: Tensor | None = None  # [n, k-2, C] sequential heads' carried states, when drafting
        self.penalty: tuple[Tensor, Tensor] | None = None  # [n, V] counts and prompt masks, when any row is penalized
        self.sampling = self._sampling()
        self.last_max_accept: list[int] = []  # drafts each row could accept in the last step
        self.last_emitted: list[int] = []  # tokens each row emitted in the last step
        self.last_drafts = 0  # drafts verified per row in the last step
        self.last_graph: tuple[int, int] = (0, 0)  # the last step's width and modules run: its graph at its batch size
        self.last_head1: Tensor | None = None  # head 1's logits at the last step's offsets [n, T, V]
        self._survivors: list[int] | None = None  # old rows of self.seqs, until compact() runs
        self._limits: tuple[list[int], Tensor] = ([], self.pos)  # the last max_accept built
        self.planned: tuple[int, int] | None = None  # (rows, choice): the next step's choice, made at a prefill

    def __len__(self) -> int:
        return len(self.seqs)

    def _sampling(self) -> BatchSampling:
        params: list[SamplingParams] = [s.item.request.sampling for s in self.seqs]
        if not any(p.penalized for p in params):
            self.penalty = None  # no row reads counts: stop keeping them
        return BatchSampling.from_params(params, [s.generator for s in self.seqs], self.device, self.penalty)

    def _row_depth(self, s: RunningSequence) -> int:
        return self.n_drafts if s.depth is None else s.depth

    def _depth(self) -> int:
        """The drafts the modules make this step: as many as any speculating row keeps (0: none speculates)."""
        return max((self._row_depth(s) for s in self.seqs if s.speculative), default=0)

    def concatenate(
        self,
        seqs: list[RunningSequence],
        first: StepResult,
        prompt_lengths: list[int],
        penalty: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Append freshly prefilled rows; first holds their first token and drafts; penalty: their
        (counts, prompt masks) before the first token, when any of them is penalized."""
        assert self._survivors is None, "compact() before prefilling new rows"
        n_new = len(seqs)
        if penalty is not None or self.penalty is not None:
            V = self.model.cfg.vocab_size
            old = self.penalty or (
                self.cur.new_zeros(len(self), V, dtype=torch.float),
                self.cur.new_zeros(len(self), V, dtype=torch.bool),
            )
            new = penalty or (old[0].new_zeros(n_new, V), old[1].new_zeros(n_new, V))
            counts = count_emitted(new[0], first.tokens, first.n_emitted)
            self.penalty = (torch.cat([old[0], counts]), torch.cat([old[1], new[1]]))
        self.seqs.extend(seqs)
        last = first.tokens[torch.arange(n_new, device=self.device), first.n_emitted - 1]
        self.cur = torch.cat([self.cur, last])
        self.pos = torch.cat([self.pos, torch.tensor(prompt_lengths, device=self.device)])
        self.positions += prompt_lengths
        self.drafts = torch.cat([self.drafts, first.drafts])
        self.draft_probs = _cat_optional(self.draft_probs, first.draft_probs, len(self) - n_new, n_new)
        self.states = _cat_optional(self.states, first.states, len(self) - n_new, n_new)
        self.sampling = self._sampling()

    def filter(self, keep: list[bool]) -> None:
        """Drop the sequences whose keep is False; their rows are compacted by the next `compact`."""
        if all(keep):
            return
        old = self._survivors if self._survivors is not None else list(range(len(self.seqs)))
        self._survivors = [row for row, kept in zip(old, keep, strict=True) if kept]
        self.seqs = [s for s, kept in zip(self.seqs, keep, strict=True) if kept]

    def compact(self) -> None:
        """Move the surviving rows' cache entries and state into rows 0..n-1 (worker thread).

        A survivor already below n stays where it is; the ones past n fill the rows that ended
        (`fill_order`). So a row that ends costs at most one row's copy, where shifting every
        later row down one place cost up to n - 1 of them (each row's keys and values in every
        attention layer): rows end one at a time when requests come and go."""
        if self._survivors is None:
            return
        kept, self._survivors = self._survivors, None
        by_row = dict(zip(kept, self.seqs, strict=True))
        survivors = fill_order(kept)
        self.seqs = [by_row[row] for row in survivors]
        idx = torch.tensor(survivors, dtype=torch.long, device=self.device)
        if survivors != list(range(len(survivors))):
            # positions < pos are cached; cur (at pos) and anything after it are not yet
            self.model.compact_cache_rows(idx, max(self.positions[i] for i in survivors))
        self.cur, self.pos, self.drafts = self.cur[idx], self.pos[idx], self.drafts[idx]
        self.positions = [self.positions[i] for i in survivors]
        if self.penalty is not None:
            self.penalty = (self.penalty[0][idx], self.penalty[1][idx])
        if self.draft_probs is not None:
            self.draft_probs = self.draft_probs[idx] if survivors else None
        if self.states is not None:
            self.states = self.states[idx] if survivors else None
        self.sampling = self._sampling()

    def _fused(self, seqs: list[RunningSequence] | None = None) -> bool:
        """Whether a step of `seqs` (default: the batch's rows) can run as a compiled fused greedy
        step: every row greedy with no penalty or bias, and no row asking for top log-probabilities
        (the fused step keeps no logits). Whether the step's shape was compiled is `covers`' to
        say: with sequential heads, the modules it runs are part of the shape (none for a plain batch)."""
        if seqs is None:
            greedy, penalized, seqs = self.sampling.all_greedy, self.sampling.penalties is not None, self.seqs
        else:
            params = [s.item.request.sampling for s in seqs]
            greedy, penalized = all(p.greedy for p in params), any(p.penalized for p in params)
        return (
            self.compiled is not None
            and greedy
            and not penalized
            and not any(s.item.request.top_logprobs for s in seqs)
        )

    def _decides(self, seqs: list[RunningSequence], greedy: list[bool], fused: bool) -> bool:
        """Whether the draft policy picks the drafts of a step of `seqs` (greedy: which of them
        are): some row speculates and every speculating row is greedy (sampled ones verify every
        draft); compiled, only among the fused steps' widths."""
        spec = [g for s, g in zip(seqs, greedy, strict=True) if s.speculative]
        return self.policy is not None and bool(spec) and all(spec) and (fused or self.compiled is None)

    def plan(self, seqs: list[RunningSequence], threads: int | None = None) -> int:
        """Before `seqs` are prefilled to join the batch: the draft policy's choice for the step
        after their prefill, made now for the batch they will make (and kept for that step), and
        applied to them as that step would: a PLAIN choice makes them plain, a shallow one keeps
        its modules. threads: the intra-op count that step is expected to run at (its timings
        decide; default: this thread's now). The modules their prefill must run to draft for
        them: 0 when none of them will draft (sequential heads; the pass over the prompt would
        be wasted)."""
        for s in seqs:  # greedy rows of one or two tokens: no step of theirs verifies a draft
            if s.item.request.max_new_tokens <= 2 and s.item.request.sampling.greedy:
                s.speculative = False  # (a sampled row's draft draws are part of its seeded stream)
        rows = self.seqs + seqs
        self.planned = None
        if not any(s.speculative for s in seqs):
            return 0  # the rows already running decide their next step, as before
        greedy = [s.item.request.sampling.greedy for s in rows]
        if self.policy is not None and self._decides(rows, greedy, self._fused(rows)):
            depth = max(self._row_depth(s) for s in rows if s.speculative)
            keys = max(self.positions + [len(s.item.request.prompt_ids) for s in seqs])
            left = max(s.remaining for s in rows)
            choice = self.policy.choose(len(rows), depth, threads, keys, sum(s.speculative for s in rows), left)
            self.planned = (len(rows), choice)
            self._apply(seqs, shallow_depth(choice))
        return max((self._row_depth(s) for s in seqs if s.speculative), default=0)

    def _apply(self, seqs: list[RunningSequence], shallow: int | None) -> None:
        """A shallow choice's effect on its rows, for good: PLAIN (0) stops their speculation,
        except where the request asked for it itself; depth d keeps the first d modules."""
        if shallow == 0:
            for s in seqs:
                s.speculative = s.speculative and s.item.request.speculative is True
        elif shallow is not None:
            for s in seqs:
                s.depth = min(self._row_depth(s), shallow)

    def step(self) -> StepResult:
        """One decode step for every row: a verify pass if any row speculates, else plain decoding.

        The per-row decisions (which rows speculate, how many drafts each may accept) are made
        on Python lists: at batch 1 a compiled step costs a few hundred microseconds, and each
        small tensor op beside it would cost several."""
        self.compact()
        k = self.k
        spec = [s.speculative for s in self.seqs]
        fused = self._fused()
        depth = self._depth()
        planned, self.planned = self.planned, None
        keys = max(self.positions)  # the step's key length: its costs are compared there (drafts.py)
        if planned is not None and planned[0] == len(self):  # chosen at the prefill of the rows that joined
            choice: int | None = planned[1]
        else:
            decide = self._decides(self.seqs, self.sampling.greedy_rows, fused)
            policy = self.policy if decide else None
            left = max(s.remaining for s in self.seqs)
            choice = (
                policy.choose(len(self), depth, keys=keys, speculating=sum(spec), left=left)
                if policy is not None
                else None
            )
        shallow = shallow_depth(choice) if choice is not None else None
        self._apply(self.seqs, shallow)
        if shallow == 0:  # PLAIN, cheaper than any drafting step: these rows stop speculating for good
            spec = [s.speculative for s in self.seqs]
            fused = self._fused()
            if any(spec):  # rows that asked: they draft as many as they may, and the step is not timed
                choice = None
        if shallow is not None:
            depth = self._depth()
        n_drafts = min(depth, choice) if choice is not None and shallow is None else depth
        limits = [max(0, min(s.remaining - 1, self._row_depth(s), n_drafts)) if s.speculative else 0 for s in self.seqs]
        max_accept = self._max_accept(limits)  # [n]
        use_drafts = any(spec) and n_drafts > 0
        verified = self.drafts[:, :n_drafts] if use_drafts else self.drafts[:, :0]
        q = self.draft_probs[:, :n_drafts] if self.draft_probs is not None else None
        # drafts are made whenever rows speculate, even on a step that verifies none (policy: 0),
        # so that the next step has real ones to verify: as many as the deepest row keeps
        make_drafts = any(spec) and depth > 0
        width = 1 + verified.shape[1]
        made = depth if make_drafts else 0  # modules run (linear heads: every head, always)
        compiled = self.compiled if self.compiled is not None and self.compiled.covers(len(self), width) else None
        if self.policy is not None:
            self.policy.began(len(self))
        t0 = time.perf_counter()  # the step's timed part: its forward call, as the start-up table times it
        if fused and self.compiled is not None and self.compiled.covers(len(self), width, greedy=True, n_drafts=made):
            # always drafting (one graph per shape, as compiled); no row speculates: unused
            res = self.compiled.greedy_step(
                self.cur,
                verified if use_drafts else None,
                self.pos,
                max_accept,
                k > 1,
                self.states,
                made,
                max(self.positions),
            )
            self.last_head1 = None
        else:
            step = forward_step(
                self.model,
                self.cur,
                verified if use_drafts else None,
                self.pos,
                want_drafts=make_drafts,
                states=self.states,
                n_drafts=made,
                compiled=compiled,
            )
            drafting = torch.tensor(spec, dtype=torch.bool, device=self.device)
            res = accept_drafts(step.head1, verified, q, max_accept, self.sampling, drafting, step.drafts, k - 1)
            self.last_head1 = step.head1[:, :, 0]  # [n, T, V]: for the top log-probabilities rows ask for
        emitted = res.n_emitted.tolist()  # waits for the device: the step is done
        if self.policy is not None:
            seconds = time.perf_counter() - t0
            if choice is not None and shallow is None:
                self.policy.observe_cost(len(self), n_drafts, seconds, keys)
            elif choice is not None and shallow:  # d modules made d drafts, and the step verified them
                self.policy.observe_cost(len(self), choice, seconds, keys)
            elif not use_drafts and not make_drafts and self.sampling.all_greedy and self.sampling.penalties is None:
                self.policy.observe_cost(len(self), PLAIN, seconds, keys)  # a plain step
        if res.last is not None and res.next_pos is not None:  # computed in the step's graph
            self.cur, self.pos = res.last, res.next_pos
        else:
            self.cur = res.tokens[torch.arange(len(self), device=self.device), res.n_emitted - 1]
            self.pos = self.pos + res.n_emitted
        self.drafts, self.draft_probs, self.states = res.drafts, res.draft_probs, res.states
        if self.penalty is not None and self.sampling.penalties is not None:
            self.penalty = (count_emitted(self.penalty[0], res.tokens, res.n_emitted), self.penalty[1])
            self.sampling.penalties.counts = self.penalty[0]
        self.last_max_accept = limits
        self.last_emitted = emitted
        self.positions = [p + n for p, n in zip(self.positions, emitted, strict=True)]
        self.last_drafts = n_drafts if use_drafts else 0
        self.last_graph = (width, made)
        if self.policy is not None:
            self.policy.observe(limits, emitted)
        for s, m, n in zip(self.seqs, limits, emitted, strict=True):
            if m:
                s.verify_steps += 1
                s.drafted += m
                s.accepted += n - 1
        return res

    def expected_tokens(self) -> float:
        """Tokens a row of the last step was expected to emit, at the draft policy's acceptance
        rates (1 without a policy): what the thread policy divides a step's time by, since each
        thread count's own draft table may pick another draft count (threads.py)."""
        return self.policy.expected_tokens(self.last_drafts) if self.policy is not None else 1.0

    def _max_accept(self, limits: list[int]) -> Tensor:
        """limits as a tensor [n]; the last one built again when they have not changed (a
        single stream's are the same step after step), since no step writes to it."""
        if limits != self._limits[0]:
            self._limits = (limits, torch.tensor(limits, device=self.device))
        return self._limits[1]


def fill_order(survivors: list[int]) -> list[int]:
    """The old row each of rows 0..n-1 takes after a compaction keeps `survivors` (ascending old
    rows, n of them): a survivor below n keeps its row, and the survivors from n on fill the
    rows below n that ended, in order. Every row that moves goes from n or past to below n, so
    no row is written before it is read (KVCache.compact copies in place)."""
    n = len(survivors)
    tail = iter(row for row in survivors if row >= n)
    kept = set(survivors)
    return [row if row in kept else next(tail) for row in range(n)]


def _cat_optional(old: Tensor | None, new: Tensor | None, n_old: int, n_new: int) -> Tensor | None:
    """Concatenate draft distributions where either side may be absent (all-greedy rows)."""
    if old is None and new is None:
        return None
    ref = old if old is not None else new
    assert ref is not None
    shape = ref.shape[1:]
    a = old if old is not None else ref.new_zeros(n_old, *shape)
    b = new if new is not None else ref.new_zeros(n_new, *shape)
    return torch.cat([a, b])
