"""Tokenizers: char-level, byte-level and SentencePiece BPE behind one small interface.

Every tokenizer has `kind`, `vocab_size`, `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str` and
`save(dir)`; `load_tokenizer(dir)` restores any of them, so a trained run's sampler can decode with exactly the
tokenizer the data was cached with. `fit_tokenizer` builds one from a stream of text chunks.

* char: vocab = sorted set of characters in the corpus (nanoGPT's shakespeare_char; tinyshakespeare -> 65). Exact
  round trip on in-vocab text; encoding an unseen character raises UserError.
* byte: the 256 UTF-8 byte values, no special tokens (documents are simply concatenated, as in the char case).
  Exact round trip on any text; decoding invalid UTF-8 (a model can emit it) yields U+FFFD replacement characters.
* bpe: SentencePiece BPE trained on the first BPE_SAMPLE_CHARS characters of the training text, with identity
  normalisation, no dummy prefix, whitespace kept verbatim, '\\n' as its own piece and byte fallback, so any text
  round-trips exactly except the rare literal U+2581 '▁' (SentencePiece's whitespace marker, decoded as ' ').
  id 0 is <unk> (unused thanks to byte fallback), ids 1..256 are the byte pieces; no BOS/EOS/PAD.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmjax.errors import UserError

TOKENIZER_KINDS = ("char", "byte", "bpe")
CONFIG_FILE = "tokenizer.json"
SPM_MODEL_FILE = "tokenizer.model"
# BPE is trained on this much text at most: training cost grows with the sample, quality saturates well before.
BPE_SAMPLE_CHARS = 4_000_000
# SentencePiece skips training sentences longer than this many bytes; we feed it lines, so only freak lines go.
BPE_MAX_SENTENCE_BYTES = 1 << 14
# Smallest BPE vocab: <unk> + 256 byte pieces + '\n' + a few merges.
BPE_MIN_VOCAB = 260


class Tokenizer(Protocol):
    """What the data pipeline and the sampler need from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


# --------------------------------------------------------------------------------------------------------- char


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per character; ids follow code-point order. `chars` is the vocabulary as a sorted string."""

    chars: str
    kind: str = "char"

    def __post_init__(self) -> None:
        if not self.chars or list(self.chars) != sorted(set(self.chars)):
            raise ValueError("CharTokenizer.chars must be a non-empty string of sorted, distinct characters")

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def _codepoints(self) -> np.ndarray:
        return _codepoints(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Characters -> ids by binary search over the sorted vocab's code points (vectorised, no Python loop)."""
        vocab = self._codepoints
        cps = _codepoints(text)
        ids = np.searchsorted(vocab, cps)
        unknown = vocab[np.minimum(ids, len(vocab) - 1)] != cps
        if unknown.any():
            bad = sorted({chr(c) for c in cps[unknown]})[:10]
            raise UserError(
                f"text has characters outside the char vocabulary: {bad!r}: "
                "use only characters of the training corpus, or a byte/bpe tokenizer"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) for this char tokenizer")
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le")

    def save(self, directory: str | os.PathLike) -> None:
        _write_config(directory, {"kind": self.kind, "chars": self.chars})


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


# --------------------------------------------------------------------------------------------------------- byte


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255."""

    kind: str = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("token ids must be in [0, 256) for the byte tokenizer")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        _write_config(directory, {"kind": self.kind})


# ---------------------------------------------------------------------------------------------------------- bpe


@dataclasses.dataclass(frozen=True)
class BpeTokenizer:
    """A SentencePiece BPE model, held as its serialized proto (so the dataclass stays immutable and picklable)."""

    model_proto: bytes
    kind: str = "bpe"
    _processor: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import sentencepiece as spm

        object.__setattr__(self, "_processor", spm.SentencePieceProcessor(model_proto=self.model_proto))

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        """Encode line by line (on several threads): lines are independent because '\\n' is its own piece."""
        lines = text.splitlines(keepends=True)
        pieces = self._processor.encode(lines, num_threads=os.cpu_count() or 1)
        return np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._processor.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike) -> None:
        _write_config(directory, {"kind": self.kind, "model_file": SPM_MODEL_FILE})
        (Path(directory) / SPM_MODEL_FILE).write_bytes(self.model_proto)


def train_bpe(chunks: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Train SentencePiece BPE on (at most BPE_SAMPLE_CHARS of) the text."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sample_lines(chunks, BPE_SAMPLE_CHARS),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            character_coverage=0.9999,
            max_sentence_length=BPE_MAX_SENTENCE_BYTES,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(
            f"SentencePiece could not train a {vocab_size}-token BPE on this corpus "
            f"({str(e).strip().splitlines()[-1]}): pass a smaller --vocab_size"
        ) from e
    return BpeTokenizer(model.getvalue())


def _sample_lines(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """The non-empty lines (without '\\n') of the first `max_chars` characters of the text."""
    budget = max_chars
    for chunk in chunks:
        chunk = chunk[:budget]
        budget -= len(chunk)
        yield from (line for line in chunk.split("\n") if line)
        if budget <= 0:
            return


# ------------------------------------------------------------------------------------------------ fit/save/load


def check_tokenizer_args(kind: str, vocab_size: int | None) -> None:
    """Validate tokenizer flags at the edge, before any corpus is read."""
    if kind not in TOKENIZER_KINDS:
        raise UserError(f"unknown tokenizer {kind!r}: pass --tokenizer=char, --tokenizer=byte or --tokenizer=bpe")
    if kind == "bpe":
        if vocab_size is None:
            raise UserError("the bpe tokenizer needs a vocabulary size: pass --vocab_size=N (e.g. 4096)")
        if not BPE_MIN_VOCAB <= vocab_size <= 1 << 20:
            raise UserError(
                f"vocab_size={vocab_size} is out of range for bpe: pass --vocab_size between "
                f"{BPE_MIN_VOCAB} and {1 << 20}"
            )
    elif vocab_size is not None:
        raise UserError(f"--vocab_size is only for --tokenizer=bpe ({kind} fixes its own vocabulary): drop it")


def fit_tokenizer(kind: str, chunks: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of `kind` from the corpus text (char: all of it; bpe: a bounded sample; byte: none)."""
    check_tokenizer_args(kind, vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        assert vocab_size is not None  # Guaranteed by check_tokenizer_args.
        return train_bpe(chunks, vocab_size)
    seen: set[str] = set()
    for chunk in chunks:
        seen.update(chunk)
    if not seen:
        raise UserError("the corpus is empty: point --data at a source with some text")
    return CharTokenizer("".join(sorted(seen)))


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Restore a tokenizer written by `tokenizer.save(directory)`."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        kind = config["kind"]
        if kind == "char":
            return CharTokenizer(config["chars"])
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BpeTokenizer((Path(directory) / config["model_file"]).read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"cannot load tokenizer from {directory} ({type(e).__name__}: {e}): "
            "point at a folder written by tokenizer.save() or delete it to rebuild"
        ) from e
    raise UserError(f"unknown tokenizer kind {kind!r} in {path}: it was written by a newer llmjax, rebuild it")


def _write_config(directory: str | os.PathLike, config: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False) + "\n", encoding="utf-8")
