"""Held-out evaluation: per-head loss and top-1 accuracy, and head-1 bits per byte."""

from __future__ import annotations

import math
from typing import Any

import torch

from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from app.training.loss import IGNORE


@torch.no_grad()
def evaluate_ids(
    model: MTPTransformer, ids: list[int], max_windows: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """Non-overlapping windows of max_seq_len; every token after the first is scored once by head 1.

    Returns summed head-1 nats, per-head mean loss and top-1 accuracy (head j scores
    the token j steps ahead wherever it lies inside the same window). Sequential heads are
    teacher-forced: head j reads the true tokens before its target, as when every earlier draft
    was accepted, so its top-1 is its acceptance rate given a correct prefix.
    """
    cfg = model.cfg
    T, k = cfg.max_seq_len, cfg.k
    data = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, max(len(data) - 1, 0), T))
    if max_windows is not None:
        starts = starts[:max_windows]
    device = model.head.proj.weight.device
    loss_sum = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        x = torch.full((len(chunk), T), 0, dtype=torch.long)
        tgt = torch.full((len(chunk), T, k), IGNORE, dtype=torch.long)
        for row, s in enumerate(chunk):
            window = data[s : s + T + 1]
            n = len(window) - 1
            x[row, :n] = window[:n]
            for j in range(k):  # head j+1 at position t targets window[t + j + 1]
                m = max(n - j, 0)
                tgt[row, :m, j] = window[j + 1 : j + 1 + m]
        logits = model(x.to(device)).float()  # [B, T, k, V]
        tgt = tgt.to(device)
        valid = tgt != IGNORE
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # [B, T, k]
        hit = (logits.argmax(-1) == tgt) & valid
        loss_sum += (nll * valid).sum(dim=(0, 1)).double().cpu()
        correct += hit.sum(dim=(0, 1)).double().cpu()
        count += valid.sum(dim=(0, 1)).double().cpu()
    model.train(was_training)
    count = count.clamp(min=1)
    return {
        "head1_nats": float(loss_sum[0]),
        "tokens_scored": int(count[0]),
        "loss": [float(v) for v in loss_sum / count],
        "top1": [float(v) for v in correct / count],
    }


def evaluate_text(
    model: MTPTransformer, tokenizer: Tokenizer, text: str, max_windows: int | None = None
) -> dict[str, Any]:
    """Bits per byte = total head-1 nats / total UTF-8 bytes / ln 2.

    The text is preceded by the end-of-text token so that its first token is scored too.
    """
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    stats = evaluate_ids(model, ids, max_windows=max_windows)
    n_bytes = sum(len(tokenizer.token_bytes(i)) for i in ids[1 : stats["tokens_scored"] + 1])
    stats["bytes"] = n_bytes
    stats["bits_per_byte"] = stats["head1_nats"] / max(n_bytes, 1) / math.log(2)
    return stats
