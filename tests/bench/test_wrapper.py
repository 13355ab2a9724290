"""`python -m bench.wrapper`: Inductor's Python and C++ wrappers timed against each other in one process."""

import shutil
from pathlib import Path

import pytest
import torch

from app.model.checkpoint import save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from bench.wrapper import bench_wrapper
from tests.bench.conftest import TEXT

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)


def test_both_wrappers_give_the_same_tokens_and_each_round_is_a_ratio(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = Tokenizer.train([TEXT], 257)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, num_heads=4, d_ff=64, k=2, max_seq_len=128)
    ckpt = save_checkpoint(tmp_path / "ckpt", MTPTransformer(cfg).eval(), tok)
    out = bench_wrapper(str(ckpt), str(corpus), rounds=2, n_prompts=2, new_tokens=8, autotune=False)
    assert out["same_greedy_tokens"] is True
    runs = out["tokens_per_s_runs"]
    assert set(runs) == {"python", "cpp"} and set(runs["cpp"]) == {0, 1}  # drafts 0 .. k - 1
    for n, ratios in out["cpp_over_python_by_round"].items():
        assert len(ratios) == 2
        for p, c, ratio in zip(runs["python"][n], runs["cpp"][n], ratios, strict=True):
            assert p > 0 and c > 0 and ratio == round(c / p, 3)
