"""Shared fixtures for the model tests: one small byte-level BPE tokenizer."""

import pytest

from app.model.tokenizer import Tokenizer

TRAINING_TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "naïve café, 東京, こんにちは. " * 5


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TRAINING_TEXT], vocab_size=300)
