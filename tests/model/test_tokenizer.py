"""Tokenizer: exact round trips on arbitrary Unicode, and streaming decode of whole characters."""

import random

import pytest

from app.model.tokenizer import EOT, Tokenizer

FIXED_TEXTS = [
    "",
    " ",
    "hello world",
    "  two leading spaces, trailing tab\t",
    "line one\r\nline two\n\n",
    "control \x00\x01\x07\x1b[0m\x7f chars",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵",
    "CJK 東京都 こんにちは 한국어",
    "combining e\u0301 a\u0308 n\u0303 (not normalised)",
    "precomposed é vs decomposed e\u0301",
    "RTL שלום مرحبا",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ",
    "zero width\u200b\u200c\u200djoiners\ufeff",
    "private use \ue000 and noncharacter \uffff",
    f"an {EOT} inside text",
]


def random_text(rng: random.Random, max_len: int = 40) -> str:
    """Code points from every UTF-8 length class; no surrogates (not encodable) and no U+FFFD."""

    def code_point() -> int:
        r = rng.random()
        if r < 0.3:
            return rng.randrange(0x20, 0x7F)  # printable ASCII
        if r < 0.4:
            return rng.randrange(0x00, 0x20)  # C0 controls
        if r < 0.6:
            return rng.randrange(0x80, 0x800)  # 2-byte
        if r < 0.85:
            c = rng.randrange(0x800, 0x10000)  # 3-byte
            return 0x4E00 if 0xD800 <= c <= 0xDFFF or c == 0xFFFD else c
        return rng.randrange(0x10000, 0x110000)  # 4-byte

    return "".join(chr(code_point()) for _ in range(rng.randrange(max_len + 1)))


RANDOM_TEXTS = [random_text(random.Random(seed)) for seed in range(200)]


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.step(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", FIXED_TEXTS)
def test_decode_encode_round_trips_fixed_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_encode_round_trips_random_unicode(tokenizer):
    failures = [t for t in RANDOM_TEXTS if tokenizer.decode(tokenizer.encode(t)) != t]
    assert failures == []


def test_token_bytes_concatenate_to_the_utf8_encoding(tokenizer):
    for text in FIXED_TEXTS + RANDOM_TEXTS[:50]:
        ids = tokenizer.encode(text)
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("text", FIXED_TEXTS)
def test_stream_decoder_emits_the_text_without_replacement_chars(tokenizer, text):
    pieces = stream(tokenizer, tokenizer.encode(text))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_emits_random_unicode_without_replacement_chars(tokenizer):
    for text in RANDOM_TEXTS:
        pieces = stream(tokenizer, tokenizer.encode(text))
        assert "".join(pieces) == text, repr(text)
        assert not any("\ufffd" in p for p in pieces), repr(text)


@pytest.mark.parametrize("char", ["€", "鳥", "😀"])
def test_stream_decoder_holds_back_a_character_split_over_tokens(tokenizer, char):
    ids = tokenizer.encode(f"a{char}b")
    char_ids = tokenizer.encode(char)
    assert len(char_ids) == len(char.encode("utf-8")) > 1  # not in the training text: one token per byte
    pieces = stream(tokenizer, ids)
    assert pieces[0] == "a"
    assert pieces[1 : len(char_ids)] == [""] * (len(char_ids) - 1)
    assert pieces[len(char_ids)] == char
    assert "".join(pieces) == f"a{char}b"


def test_decode_of_a_truncated_character_shows_a_replacement_char(tokenizer):
    first_byte = tokenizer.encode("€")[0]
    assert tokenizer.decode([first_byte]) == "\ufffd"
    assert tokenizer.id_to_text(first_byte) == "\ufffd"


def test_eot_token_decodes_to_its_marker(tokenizer):
    assert tokenizer.decode([tokenizer.eot_id]) == EOT
    assert tokenizer.eot_id in tokenizer.special_ids


def test_saved_tokenizer_encodes_identically(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.eot_id == tokenizer.eot_id
    for text in FIXED_TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
