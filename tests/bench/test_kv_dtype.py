"""The KV-cache dtype benchmark's quality figure (bench/kv_dtype.py): bits per byte through a
float32 cache are the uncached model's; through a bfloat16 one they move, but by rounding."""

import math

import torch

from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from bench.kv_dtype import WINDOW, cached_bits_per_byte


def test_bits_per_byte_through_the_cache_are_the_uncached_ones_and_a_bfloat16_cache_moves_them_by_rounding() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=2, dropout_rate=0.0, max_seq_len=256
    )
    model = MTPTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 40, (3 * WINDOW + 10,)).tolist()
    n_bytes = 2 * len(ids)  # two bytes a token
    with torch.inference_mode():
        x = torch.tensor([ids[i : i + WINDOW + 1] for i in range(0, len(ids) - WINDOW - 1, WINDOW)])
        logits = model(x[:, :-1])[:, :, 0].float()  # uncached: [B, T, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        want = nll / math.log(2) / (x[:, 1:].numel() * 2)
        f32 = cached_bits_per_byte(model, ids, n_bytes, torch.float32)
        bf16 = cached_bits_per_byte(model, ids, n_bytes, torch.bfloat16)
    assert abs(f32 - want) < 1e-5
    assert 0 < abs(bf16 - want) < 1e-2
