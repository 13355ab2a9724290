"""Per-row sampling parameters and logits processing (penalties and bias, temperature, top-k, top-p).

Every row of a batch carries its own parameters and its own torch.Generator, so a
request's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # locally typical sampling (Meister et al.): 1.0 = off; sampled rows only
    do_sample: bool = False  # False = greedy (temperature, top_k, top_p ignored)
    seed: int | None = None
    # logits processors, applied before the above, to greedy rows too (OpenAI's and vLLM's meanings):
    frequency_penalty: float = 0.0  # minus this times the count of the token in the generated text
    presence_penalty: float = 0.0  # minus this if the token is in the generated text
    repetition_penalty: float = 1.0  # tokens of the prompt or generated text: logit / r if > 0, else * r
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        neutral = self.frequency_penalty == 0.0 and self.presence_penalty == 0.0 and self.repetition_penalty == 1.0
        return not neutral or bool(self.logit_bias)


@dataclass
class Penalties:
    """Per-row logits processors and the token counts they read; only for batches that use them."""

    frequency: Tensor  # [B]
    presence: Tensor  # [B]
    repetition: Tensor  # [B]
    bias: Tensor  # [B, V] added to the logits
    counts: Tensor  # [B, V] float: each token's count in the row's generated text so far
    prompt: Tensor  # [B, V] bool: tokens of the row's prompt

    @classmethod
    def build(cls, params: list[SamplingParams], counts: Tensor, prompt: Tensor) -> Penalties:
        device, V = counts.device, counts.shape[-1]
        bias = torch.zeros(len(params), V, device=device)
        entries = [(b, token, value) for b, p in enumerate(params) for token, value in p.logit_bias]
        if entries:  # one indexed write: element by element, 16 rows of 512 entries took 41 ms
            rows, tokens, values = zip(*entries, strict=True)
            index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
            bias.index_put_(index, torch.tensor(values, dtype=bias.dtype, device=device))
        return cls(
            frequency=torch.tensor([p.frequency_penalty for p in params], device=device),
            presence=torch.tensor([p.presence_penalty for p in params], device=device),
            repetition=torch.tensor([p.repetition_penalty for p in params], device=device),
            bias=bias,
            counts=counts,
            prompt=prompt,
        )

    def apply(self, logits: Tensor, fed_drafts: Tensor | None = None) -> Tensor:
        """Processed logits [B, N, V] (float32). Position n of a verify pass follows the first n
        drafts the pass fed (fed_drafts [B, N-1]), so its counts include them: accepting a draft then means
        what it would in plain decoding, and speculation stays exact."""
        B, N, V = logits.shape
        counts = self.counts[:, None, :].expand(B, N, V)
        if fed_drafts is not None and fed_drafts.shape[1] and N > 1:
            seen_drafts = F.one_hot(fed_drafts[:, : N - 1], V).cumsum(dim=1).to(counts.dtype)  # [B, N-1, V]
            counts = counts + torch.cat([counts.new_zeros(B, 1, V), seen_drafts], dim=1)
        # a penalty that is positive but below float32's range (5e-324 is valid JSON) would be 0
        r = self.repetition.clamp(min=torch.finfo(torch.float32).tiny)[:, None, None]
        repeated = (counts > 0) | self.prompt[:, None, :]
        x = torch.where(repeated, torch.where(logits > 0, logits / r, logits * r), logits)
        x = x - self.frequency[:, None, None] * counts - self.presence[:, None, None] * (counts > 0).float()
        return x + self.bias[:, None, :]


def penalty_state(prompts: list[list[int]], V: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(counts, prompt mask) [B, V] for new rows: nothing generated yet, and their prompts' tokens."""
    prompt = torch.zeros(len(prompts), V, dtype=torch.bool, device=device)
    for b, ids in enumerate(prompts):
        prompt[b, torch.tensor(ids, device=device)] = True
    return torch.zeros(len(prompts), V, device=device), prompt


def top_logprobs(logits: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n most likely tokens at each position and their log-probabilities (the model's own
    softmax, as each emitted token's logprob is): logits [B, T, V] -> (ids, logprobs) [B, T, n]."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(n, dim=-1)
    return ids, values


def count_emitted(counts: Tensor, tokens: Tensor, n_emitted: Tensor) -> Tensor:
    """counts [B, V] plus the tokens each row emitted this step (tokens [B, T], the first n_emitted [B])."""
    T = tokens.shape[1]
    emitted = (torch.arange(T, device=tokens.device)[None, :] < n_emitted[:, None]).to(counts.dtype)  # [B, T]
    return counts.scatter_add(1, tokens, emitted)


@dataclass
class BatchSampling:
    """Sampling parameters for a batch as tensors: one entry per row."""

    temperature: Tensor  # [B] float; 1.0 for greedy rows (unused there)
    top_k: Tensor  # [B] long; 0 = off
    top_p: Tensor  # [B] float; 1.0 = off
    greedy: Tensor  # [B] bool
    typical_p: Tensor  # [B] float; 1.0 = off (and for greedy rows, whose argmax it could drop)
    generators: list[torch.Generator | None]  # one per row; None for greedy rows
    penalties: Penalties | None = None  # when any row has a penalty or a logit bias
    # `greedy` as Python bools, read once here: a decode step reads them without a tensor op
    greedy_rows: list[bool] = field(init=False)
    all_greedy: bool = field(init=False)

    def __post_init__(self) -> None:
        self.greedy_rows = [bool(g) for g in self.greedy.tolist()]
        self.all_greedy = all(self.greedy_rows)

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        device: torch.device,
        state: tuple[Tensor, Tensor] | None = None,
    ) -> BatchSampling:
        """state: the rows' (counts, prompt mask) [B, V], needed when any row is penalized."""
        penalized = any(p.penalized for p in params)
        assert state is not None or not penalized, "penalized rows need their token counts"
        return cls(
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            typical_p=torch.tensor([1.0 if p.greedy else p.typical_p for p in params], device=device),
            generators=generators,
            penalties=Penalties.build(params, *state) if penalized and state is not None else None,
        )


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: draws happen on the CPU so that a seed gives the same tokens on any device."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


F32_MAX = torch.finfo(torch.float32).max


def logits_to_probs(logits: Tensor, sampling: BatchSampling, fed_drafts: Tensor | None = None) -> Tensor:
    """Processed distributions [B, ..., V] in float32: penalties and bias, temperature, top-k, top-p.

    Greedy rows use temperature 1 (top-k / top-p, if given, keep the argmax); callers take their argmax.
    fed_drafts [B, N-1]: the drafts a verify pass fed after its first position (Penalties.apply).
    """
    shape = logits.shape
    B, V = shape[0], shape[-1]
    x = logits.float().reshape(B, -1, V)  # [B, N, V]
    if sampling.penalties is not None:
        x = sampling.penalties.apply(x, fed_drafts)
    x = x / sampling.temperature.clamp(min=1e-5)[:, None, None]
    # extreme penalties overflow to ±inf, and softmax would make NaN of a row holding +inf:
    # clamp to float32's range, the limit such a penalty tends to
    x = x.clamp(min=-F32_MAX, max=F32_MAX)
    if bool((sampling.top_k > 0).any()):
        k = torch.where(sampling.top_k > 0, sampling.top_k, V).clamp(max=V)  # [B]
        kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None, None].expand(B, x.shape[1], 1))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if bool((sampling.top_p < 1.0).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p[:, None, None]
        drop[..., 0] = False  # even a top_p that rounds to 0 in float32 keeps the most likely token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if bool((sampling.typical_p < 1.0).any()):
        probs = _typical(probs, sampling.typical_p)
    return probs.reshape(shape)


def _typical(probs: Tensor, mass: Tensor) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, fewest
    first, until their mass reaches typical_p (mass [B]); probs [B, N, V], renormalized."""
    logp = probs.clamp(min=1e-30).log()
    entropy = -(probs * logp).sum(-1, keepdim=True)  # [B, N, 1]
    order = (-logp - entropy).abs().argsort(dim=-1)  # most typical first
    sorted_p = probs.gather(-1, order)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= mass[:, None, None]  # the mass before it already suffices
    drop[..., 0] = False
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    return kept / kept.sum(-1, keepdim=True)


def sample_rows(probs: Tensor, sampling: BatchSampling) -> Tensor:
    """One token per row and position: probs [B, N, V] -> [B, N]. Greedy rows take the argmax."""
    tokens = probs.argmax(dim=-1)  # [B, N]
    for b, gen in enumerate(sampling.generators):
        if not bool(sampling.greedy[b]):
            tokens[b] = torch.multinomial(probs[b].cpu(), 1, generator=gen)[:, 0].to(tokens.device)
    return tokens
