"""Per-row sampling parameters and logits processing (temperature, top-k, top-p).

Every row of a batch carries its own parameters and its own torch.Generator, so a
request's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    do_sample: bool = False  # False = greedy (temperature, top_k, top_p ignored)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass
class BatchSampling:
    """Sampling parameters for a batch as tensors: one entry per row."""

    temperature: Tensor  # [B] float; 1.0 for greedy rows (unused there)
    top_k: Tensor  # [B] long; 0 = off
    top_p: Tensor  # [B] float; 1.0 = off
    greedy: Tensor  # [B] bool
    generators: list[torch.Generator | None]  # one per row; None for greedy rows

    @classmethod
    def from_params(
        cls, params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device
    ) -> BatchSampling:
        return cls(
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            generators=generators,
        )

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: draws happen on the CPU so that a seed gives the same tokens on any device."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def logits_to_probs(logits: Tensor, sampling: BatchSampling) -> Tensor:
    """Processed distributions [B, ..., V] in float32: temperature, then top-k, then top-p.

    Greedy rows use temperature 1 (top-k / top-p, if given, keep the argmax); callers take their argmax.
    """
    shape = logits.shape
    B, V = shape[0], shape[-1]
    x = logits.float().reshape(B, -1, V)  # [B, N, V]
    x = x / sampling.temperature.clamp(min=1e-5)[:, None, None]
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
    return probs.reshape(shape)


def sample_rows(probs: Tensor, sampling: BatchSampling) -> Tensor:
    """One token per row and position: probs [B, N, V] -> [B, N]. Greedy rows take the argmax."""
    tokens = probs.argmax(dim=-1)  # [B, N]
    for b, gen in enumerate(sampling.generators):
        if not bool(sampling.greedy[b]):
            tokens[b] = torch.multinomial(probs[b].cpu(), 1, generator=gen)[:, 0].to(tokens.device)
    return tokens
