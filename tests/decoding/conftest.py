"""Shared models for the decoding tests: random tiny models, briefly trained "peaked" models, and stubs.

Every model is float32 with dropout off and in eval mode, built here from a seed: no checkpoint.
"""

from collections.abc import Callable
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from app.model.config import ModelConfig
from app.model.model import MTPTransformer


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=16, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=3, dropout_rate=0.0, max_seq_len=48)
    return ModelConfig(**(base | overrides))


@cache
def _random_model(seed: int, scale: float, **overrides) -> MTPTransformer:
    torch.manual_seed(seed)
    model = MTPTransformer(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():  # the 0.02 init gives near-uniform logits; noise makes them O(1)
            p.add_(scale * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def random_model() -> Callable[..., MTPTransformer]:
    """random_model(seed=0, scale=0.15, **config overrides): an untrained model with O(1) logits."""

    def build(seed: int = 0, scale: float = 0.15, **overrides) -> MTPTransformer:
        return _random_model(seed, scale, **overrides)

    return build


# A repeating "language": one fixed random cycle of 37 tokens, read from a random offset. A few dozen
# Adam steps teach head 1 most of it and the further heads less, so self-speculative decoding
# accepts many drafts and still rejects some (more so on random prompts, which are off the cycle).
CYCLE = torch.randint(0, 16, (37,), generator=torch.Generator().manual_seed(7))


def _training_stream(vocab: int, length: int, gen: torch.Generator) -> Tensor:
    start = int(torch.randint(0, len(CYCLE), (1,), generator=gen))
    return CYCLE.roll(-start).repeat(length // len(CYCLE) + 1)[:length] % vocab


@cache
def _peaked_model(k: int, positional_encoding: str, steps: int, head_type: str) -> MTPTransformer:
    torch.manual_seed(1234)
    cfg = tiny_config(k=k, positional_encoding=positional_encoding, head_type=head_type)
    model = MTPTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(99)
    T = 24
    for _ in range(steps):
        batch = torch.stack([_training_stream(cfg.vocab_size, T + k, gen) for _ in range(16)])  # [B, T + k]
        x = batch[:, :T]
        targets = torch.stack([batch[:, j + 1 : j + 1 + T] for j in range(k)], dim=-1)  # [B, T, k]
        logits = model(x)  # [B, T, k, V]; sequential: teacher-forced, depth j's last j positions on padding
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def peaked_model() -> Callable[..., MTPTransformer]:
    """peaked_model(k, positional_encoding, steps=60, head_type="linear"): briefly trained, so that
    drafts are often right."""

    def build(
        k: int, positional_encoding: str = "sinusoidal", steps: int = 60, head_type: str = "linear"
    ) -> MTPTransformer:
        return _peaked_model(k, positional_encoding, steps, head_type)

    return build


class RuleHead(torch.nn.Module):
    """Stands in for the MTP head: reads (token, position) back from the stub's hidden state."""

    def __init__(self, cfg: ModelConfig, rule: Callable[[Tensor, Tensor, int], Tensor]) -> None:
        super().__init__()
        self.cfg, self.rule = cfg, rule
        self.proj = torch.nn.Linear(1, 1)  # decoding reads the device and dtype from here

    def forward(self, h: Tensor, heads: slice | None = None) -> Tensor:
        start, stop, _ = (heads or slice(None)).indices(self.cfg.k)
        idx, pos = h[..., 0].long(), h[..., 1].long()
        rules = [self.rule(idx, pos, j) % self.cfg.vocab_size for j in range(start + 1, stop + 1)]
        return F.one_hot(torch.stack(rules, dim=-1), self.cfg.vocab_size).float() * 10.0  # [..., heads, V]


class RuleStub(MTPTransformer):
    """A model whose logits are a crafted function of each input token and its position.

    Head j (1-based) at a position holding token x at position p puts all its mass on
    rule(x, p, j), ignoring the rest of the context and the KV cache. The rule fixes what
    head 1 emits and whether heads 2..k draft it: see the tests for "always accept" and
    "never accept" rules.
    """

    def __init__(self, cfg: ModelConfig, rule: Callable[[Tensor, Tensor, int], Tensor]) -> None:
        super().__init__(cfg)
        self.rule = rule
        self.head = RuleHead(cfg, rule)  # type: ignore[assignment]
        self.fed: list[int] = []  # tokens per row fed to each forward call

    def trunk(self, idx: Tensor, input_pos: Tensor | None = None, kv_len=None, row0=0) -> Tensor:
        B, T = idx.shape
        self.fed.append(T)
        pos = torch.arange(T).expand(B, T) if input_pos is None else input_pos  # [B, T]
        return torch.stack([idx.float(), pos.float()], dim=-1)  # [B, T, 2]: the "hidden state"


@pytest.fixture(scope="session")
def stub_model() -> Callable[..., RuleStub]:
    """stub_model(rule, k=4, vocab_size=12, max_seq_len=64): a RuleStub with a tiny (unused) body."""

    def build(rule: Callable[[Tensor, Tensor, int], Tensor], k: int = 4, vocab_size: int = 12, max_seq_len: int = 64):
        cfg = ModelConfig(
            vocab_size=vocab_size,
            d_model=8,
            n_layers=1,
            num_heads=2,
            d_ff=8,
            k=k,
            dropout_rate=0.0,
            max_seq_len=max_seq_len,
        )
        return RuleStub(cfg, rule).eval()

    return build


def random_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for length in lengths]


@pytest.fixture(scope="session")
def make_prompts() -> Callable[..., list[list[int]]]:
    """make_prompts(n, vocab, min_len, max_len, seed): random prompts of varied lengths."""
    return random_prompts


@pytest.fixture(scope="module")
def small_model(random_model) -> MTPTransformer:
    """Vocabulary 6, k = 3: spread enough to fill ~200 of the 216 cells of a 3-token joint, and
    heads that disagree, so about half the drafts are rejected (the chi-square tests)."""
    return random_model(seed=0, scale=0.25, vocab_size=6, k=3, d_model=16, d_ff=32, max_seq_len=16)
