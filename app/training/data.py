"""Corpus loading, the train/validation split, and random MTP training windows."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from app.training.loss import IGNORE

VAL_FRACTION = 0.1  # the last 10% of the corpus is held out


def read_corpus(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8")


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Train on the first (1 - val_fraction) of the text; hold out the rest."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


class TokenStream:
    """One long token sequence; windows of T + k tokens give inputs and k shifted targets."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def sample(
        self, batch: int, seq_len: int, k: int, gen: torch.Generator, teacher_forced: bool = False
    ) -> tuple[Tensor, Tensor]:
        """x [B, T] and targets [B, T, k] where targets[:, t, j] = token t + j + 1 (see mtp_targets)."""
        span = seq_len + k
        if len(self.ids) < span + 1:
            raise ValueError(f"corpus has {len(self.ids)} tokens, a window needs {span + 1}")
        starts = torch.randint(0, len(self.ids) - span, (batch,), generator=gen)
        windows = torch.stack([self.ids[s : s + span] for s in starts.tolist()])  # [B, T + k]
        return windows[:, :seq_len], mtp_targets(windows, seq_len, k, teacher_forced)


def mtp_targets(windows: Tensor, seq_len: int, k: int, teacher_forced: bool = False) -> Tensor:
    """targets[:, t, j] = windows[:, t + j + 1]: [B, T, k].

    teacher_forced (sequential heads): head j + 1 at position t reads input token t + j, which for
    the last j positions lies past the T input tokens, so those targets are IGNORE (DeepSeek-V3
    shortens depth j's sequence by j)."""
    targets = torch.stack([windows[:, j + 1 : j + 1 + seq_len] for j in range(k)], dim=-1)
    if teacher_forced:
        for j in range(1, k):
            targets[:, seq_len - j :, j] = IGNORE
    return targets
