"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with exact round trips and
incremental (streaming) decoding that never emits half of a multi-byte character."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from app.model.chat import DEFAULT as DEFAULT_CHAT_TEMPLATE

EOT = "<|endoftext|>"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class Tokenizer:
    """Text <-> token ids; every id also maps to its exact byte string."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        # user text that spells "<|endoftext|>" stays text: only the model emits the real token
        self.hf.encode_special_tokens = True
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        self.eot_id: int = eot
        self.vocab_size: int = hf.get_vocab_size()
        table = _unicode_to_byte()
        special = {eot}
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            piece = hf.id_to_token(i)
            if piece is None:
                raise ValueError(f"tokenizer has no token with id {i}")
            if i in special:
                self._bytes.append(piece.encode())
            else:
                self._bytes.append(bytes(table[c] for c in piece))
        self.special_ids = frozenset(special)
        self.chat_template = DEFAULT_CHAT_TEMPLATE  # the checkpoint's, when it has one (load_tokenizer)

    def cover(self, vocab_size: int) -> None:
        """Give ids up to vocab_size (a model's padded vocabulary) an empty text, so any id the model
        emits decodes."""
        self._bytes.extend(b"" for _ in range(len(self._bytes), vocab_size))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def id_to_text(self, token_id: int) -> str:
        """A single token's text, for display (a partial UTF-8 sequence shows as U+FFFD)."""
        return self._bytes[token_id].decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Feeds token ids one at a time; returns only complete UTF-8 text.

    A token ending inside a multi-byte character yields '' until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
