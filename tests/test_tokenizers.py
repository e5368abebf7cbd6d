"""Tokenizers: exact round trips, vocabularies, save/load, and edge validation."""

import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.tokenizers import (
    BPE_MIN_VOCAB,
    ByteTokenizer,
    CharTokenizer,
    check_tokenizer_args,
    fit_tokenizer,
    load_tokenizer,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak.\n"
UNICODE = "tabs\there, é, 漢字, emoji 🙂, CRLF\r\n  indented   spaces\n"


def _code_corpus(n_lines: int = 3000) -> str:
    """A small, varied corpus (code-like and prose) large enough for a few hundred BPE merges."""
    lines = []
    for i in range(n_lines):
        lines.append(f"def function_{i % 97}(value_{i % 13}, other={i}):")
        lines.append(f"    return value_{i % 13} * {i % 7} + other  # the quick brown fox {i % 31}")
        lines.append("")
    return "\n".join(lines) + "\n"


def test_char_vocab_is_sorted_set_of_chars():
    tok = fit_tokenizer("char", ["hello ", "world\n"])
    assert tok.chars == "\n dehlorw"
    assert tok.vocab_size == 9
    np.testing.assert_array_equal(tok.encode("held"), [4, 3, 5, 2])


def test_char_round_trip_and_dtype():
    tok = fit_tokenizer("char", [TEXT, UNICODE])
    ids = tok.encode(TEXT + UNICODE)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXT + UNICODE),)
    assert tok.decode(ids) == TEXT + UNICODE
    assert tok.decode(list(ids)) == TEXT + UNICODE


def test_char_unknown_character_is_user_error():
    tok = fit_tokenizer("char", ["abc"])
    with pytest.raises(UserError, match="outside the char vocabulary"):
        tok.encode("abz")


def test_byte_round_trip_any_text():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert tok.vocab_size == 256
    assert ids.max() < 256 and len(ids) == len(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert tok.decode([0xFF]) == "\ufffd"  # Invalid UTF-8 from a model decodes without raising.


def test_bpe_round_trip_and_compresses():
    corpus = _code_corpus()
    tok = fit_tokenizer("bpe", [corpus[:50_000], corpus[50_000:]], vocab_size=400)
    assert tok.vocab_size == 400
    for text in (TEXT, UNICODE, corpus[:5000], "  leading spaces", ""):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(corpus)) < len(corpus) / 2


def test_bpe_vocab_too_large_for_corpus_is_user_error():
    with pytest.raises(UserError, match="smaller --vocab_size"):
        fit_tokenizer("bpe", ["tiny corpus\n"], vocab_size=5000)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CharTokenizer("\n abc"),
        ByteTokenizer,
        lambda: fit_tokenizer("bpe", [_code_corpus(500)], vocab_size=BPE_MIN_VOCAB + 40),
    ],
    ids=["char", "byte", "bpe"],
)
def test_save_load_round_trip(tmp_path, make):
    tok = make()
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.kind == tok.kind and loaded.vocab_size == tok.vocab_size
    text = "abc cab\n"
    np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
    assert loaded.decode(loaded.encode(text)) == text


def test_load_missing_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("kind", "vocab_size", "message"),
    [
        ("wordpiece", None, "unknown tokenizer 'wordpiece'"),
        ("bpe", None, "needs a vocabulary size"),
        ("bpe", 10, "out of range"),
        ("char", 100, "only for --tokenizer=bpe"),
    ],
)
def test_bad_tokenizer_args(kind, vocab_size, message):
    with pytest.raises(UserError, match=message):
        check_tokenizer_args(kind, vocab_size)


def test_empty_corpus_char_is_user_error():
    with pytest.raises(UserError, match="empty"):
        fit_tokenizer("char", ["", ""])
