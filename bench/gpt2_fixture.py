"""A GPT-2-shaped checkpoint for benchmark 2, made offline: transformers' GPT2LMHeadModel with
seeded random weights (GPT-2 small's shape by default), saved as safetensors, then imported
with `import_gpt2` so both sides run exactly the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from app.model.checkpoint import TOKENIZER_FILE
from app.model.gpt2 import import_gpt2


def make_gpt2_pair(
    out_dir: str, tokenizer_from: str, n_layer: int = 12, n_embd: int = 768, n_head: int = 12, k: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = Path(out_dir)
    hf_dir, ours_dir = root / "hf", root / "ours"
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).eval()
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(Path(tokenizer_from) / TOKENIZER_FILE, hf_dir / TOKENIZER_FILE)
    import_gpt2(hf_dir, ours_dir, k=k, seed=seed, max_seq_len=256)
    return hf_dir, ours_dir
