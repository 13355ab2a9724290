"""The MTP loss: a weighted mean of the k heads' cross-entropies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # target id for positions with no token j steps ahead


def per_head_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy per head: logits [B, T, k, V], targets [B, T, k] -> [k]."""
    B, T, k, V = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(B, T, k)
    valid = (targets != IGNORE).float()
    return (ce * valid).sum(dim=(0, 1)) / valid.sum(dim=(0, 1)).clamp(min=1.0)


def mtp_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(weighted mean loss, per-head losses [k]); weights [k] need not sum to 1."""
    heads = per_head_losses(logits, targets)
    return (heads * weights).sum() / weights.sum(), heads.detach()


def head_weights(spec: str | None, k: int, mtp_weight: float | None = None) -> Tensor:
    """The k heads' loss weights [k]: spec '1,0.5,0.5,0.5' parsed; else, with mtp_weight λ,
    DeepSeek-V3's 1, λ/(k-1), .., λ/(k-1) (L_main + λ/(k-1) Σ L_j, as mtp_loss's weighted mean:
    divided by 1 + λ); else equal weights."""
    if spec is not None and mtp_weight is not None:
        raise ValueError("give head weights or an MTP weight (λ), not both")
    if mtp_weight is not None:
        if not (math.isfinite(mtp_weight) and mtp_weight >= 0):
            raise ValueError(f"the MTP weight λ must be a non-negative number, got {mtp_weight!r}")
        return torch.tensor([1.0] + [mtp_weight / max(k - 1, 1)] * (k - 1))
    if spec is None:
        return torch.ones(k)
    values = [float(v) for v in spec.split(",")]
    if len(values) != k or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"head weights need {k} non-negative values with a positive sum, got {spec!r}")
    return torch.tensor(values)
