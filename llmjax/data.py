"""Token caches and batch sampling.

`prepare_data(source, tokenizer, ...)` tokenizes a corpus once and caches it under
`<cache_root>/<key>/` (cache_root defaults to ~/.cache/llmjax/data; key = readable slug + hash of the normalized
source, tokenizer kind, vocab size, text field and cache format):

    train.bin, val.bin   raw token ids, uint16 when vocab_size <= 65536 else uint32 (read back as np.memmap)
    meta.json            source, fingerprints, tokenizer kind, vocab_size, dtype, token/char counts, split rule
    tokenizer.json       the fitted tokenizer (+ tokenizer.model for bpe), so a sampler can decode

Later calls with the same arguments memory-map the files without reading the corpus. The split is nanoGPT's: the
first 90% of the token stream is train, the last 10% val -- unless an `hf:` dataset has its own `validation` split.

Atomicity: a cache is built in a temporary sibling folder and renamed into place only when complete, so a crash
leaves no half-written cache under the key (a SIGKILL may leave an ignorable `.tmp-*` folder). Staleness: the
source's cheap fingerprint (file names, sizes, mtimes; the name for hub datasets) is stored in meta.json; when it
no longer matches, or the cache is unreadable or inconsistent (bad meta, wrong file sizes, foreign format version),
the cache is rebuilt (with a logged warning for the corrupt case) rather than failing, since it is derived data.

Sampling: `batch_for_step` is a pure function of (seed, step) -- nanoGPT's random crops with a counter-based RNG --
so resuming at step s replays the exact batches, and each process of a multi-host run can take its own rows of the
same global batch. `device_batch_for_step` does the same on device with jax.random for jitted/scanned loops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.corpora import Corpus, normalize_source, resolve_source
from llmjax.errors import UserError
from llmjax.tokenizers import BPE_SAMPLE_CHARS, Tokenizer, check_tokenizer_args, fit_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
TRAIN_FRACTION = 0.9
META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A tokenized corpus: read-only memory-mapped 1-D token arrays plus what is needed to decode them.

    eq=False: datasets compare by identity (field-wise == on arrays is ambiguous).
    """

    train_tokens: np.memmap
    val_tokens: np.memmap
    tokenizer: Tokenizer
    meta: dict[str, Any]
    cache_dir: Path


def default_cache_root() -> Path:
    """Where token caches live unless `cache_dir` is given."""
    return Path("~/.cache/llmjax/data").expanduser()


def prepare_data(
    source: str,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    text_field: str = "text",
) -> Dataset:
    """Tokenize `source` once (cached), and return its train/val token memmaps and tokenizer.

    source: `text:PATH`, `hf:NAME[:CONFIG]` or `pystdlib` (see llmjax.corpora). tokenizer: char, byte or bpe
    (bpe needs vocab_size). cache_dir: the cache root (the dataset lands in a keyed subfolder of it).
    text_field: the column holding text, for hf: sources. Bad arguments raise UserError before any work.
    """
    check_tokenizer_args(tokenizer, vocab_size)
    if not text_field:
        raise UserError("empty --text_field: pass the name of the dataset column that holds the text")
    corpus = resolve_source(source, text_field=text_field)
    root = default_cache_root() if cache_dir is None else Path(cache_dir).expanduser()
    final = root / cache_key(source, tokenizer, vocab_size, text_field)
    dataset = _open_cache(final, corpus.fingerprint)
    if dataset is not None:
        return dataset
    _build_cache(corpus, tokenizer, vocab_size, text_field, final)
    dataset = _open_cache(final, corpus.fingerprint)
    if dataset is None:  # Only if another process replaced it mid-call with something unreadable.
        raise UserError(f"token cache {final} was unreadable right after building it: delete it and retry")
    return dataset


def cache_key(source: str, tokenizer: str, vocab_size: int | None, text_field: str = "text") -> str:
    """`<slug>-<tokenizer>[vocab]-<hash>`: readable, and unique per (source, tokenizer settings, cache format)."""
    normalized = normalize_source(source)
    settings = {
        "format": CACHE_FORMAT_VERSION,
        "source": normalized,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "text_field": text_field if normalized.startswith("hf:") else None,
        "bpe_sample_chars": BPE_SAMPLE_CHARS if tokenizer == "bpe" else None,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(normalized.partition(":")[2] or normalized).name
    slug = re.sub(r"[^A-Za-z0-9._]+", "_", stem).strip("._")[:40] or "data"
    return f"{slug}-{tokenizer}{vocab_size or ''}-{digest}"


# -------------------------------------------------------------------------------------------------- cache: read


def _open_cache(directory: Path, fingerprint: str) -> Dataset | None:
    """The cached dataset, or None if absent, stale (source changed) or corrupt (logged; the caller rebuilds)."""
    meta_path = directory / META_FILE
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["format_version"] != CACHE_FORMAT_VERSION:
            raise ValueError(f"format version {meta['format_version']} != {CACHE_FORMAT_VERSION}")
        if meta["source_fingerprint"] != fingerprint:
            log.info("source of %s changed since it was cached; rebuilding", directory)
            return None
        dtype = np.dtype(meta["dtype"])
        train, val = (_open_tokens(directory / SPLIT_FILES[s], dtype, meta["num_tokens"][s]) for s in SPLIT_FILES)
        tokenizer = load_tokenizer(directory)
        if tokenizer.vocab_size != meta["vocab_size"]:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, meta says {meta['vocab_size']}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # UserError is a ValueError too.
        log.warning("token cache %s is corrupt (%s); rebuilding it", directory, e)
        return None
    return Dataset(train_tokens=train, val_tokens=val, tokenizer=tokenizer, meta=meta, cache_dir=directory)


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.memmap:
    size = path.stat().st_size
    if count <= 0 or size != count * dtype.itemsize:
        raise ValueError(f"{path.name} holds {size} bytes, expected {count} tokens of {dtype}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


# ------------------------------------------------------------------------------------------------- cache: write


def _build_cache(corpus: Corpus, tokenizer: str, vocab_size: int | None, text_field: str, final: Path) -> None:
    """Write the cache into a temporary sibling folder, then rename it to `final` (replacing any stale one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        _write_cache(corpus, tokenizer, vocab_size, text_field, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a cache is readable like any other cache folder.
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache into place; an existing (stale or concurrently built) one is moved aside first."""
    try:
        tmp.rename(final)
        return
    except OSError:
        if not final.exists():
            raise
    trash = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    final.rename(trash / "old")
    tmp.rename(final)
    shutil.rmtree(trash, ignore_errors=True)


def _write_cache(corpus: Corpus, kind: str, vocab_size: int | None, text_field: str, out: Path) -> None:
    """Fit the tokenizer, stream-encode the splits to .bin files, then write tokenizer and meta.json."""
    start = time.perf_counter()
    splits = corpus.load()

    def all_chunks() -> Iterator[str]:
        yield from splits.train_chunks()
        if splits.val_chunks is not None:
            yield from splits.val_chunks()

    # The char vocab must cover val as well; bpe trains on train text only (byte fallback covers the rest).
    tokenizer = fit_tokenizer(kind, all_chunks() if kind == "char" else splits.train_chunks(), vocab_size)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    content = hashlib.sha256()
    train_path, val_path = out / SPLIT_FILES["train"], out / SPLIT_FILES["val"]
    n_train, n_chars = _encode_to_file(tokenizer, splits.train_chunks(), train_path, dtype, content)
    if splits.val_chunks is None:
        split_rule = f"first {TRAIN_FRACTION:.0%} train, rest val"
        n_val = _move_tail(train_path, val_path, n_train, int(n_train * TRAIN_FRACTION), dtype)
        n_train -= n_val
    else:
        split_rule = "dataset's own validation split"
        n_val, n_val_chars = _encode_to_file(tokenizer, splits.val_chunks(), val_path, dtype, content)
        n_chars += n_val_chars
    if n_chars == 0:
        raise UserError(f"data source {corpus.source} is empty: point --data at a source with some text")
    if n_train == 0 or n_val == 0:
        raise UserError(
            f"data source {corpus.source} is too small ({n_train} train / {n_val} val tokens): use a bigger corpus"
        )
    tokenizer.save(out)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": corpus.source,
        "source_fingerprint": corpus.fingerprint,
        "content_sha256": content.hexdigest(),
        "text_field": text_field if corpus.source.startswith("hf:") else None,
        "tokenizer": kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "num_tokens": {"train": n_train, "val": n_val},
        "num_chars": n_chars,
        "split": split_rule,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info(
        "cached %s: %d train + %d val %s tokens (vocab %d) in %.1fs",
        corpus.source,
        n_train,
        n_val,
        kind,
        tokenizer.vocab_size,
        meta["build_seconds"],
    )


def _encode_to_file(
    tokenizer: Tokenizer, chunks: Iterator[str], path: Path, dtype: np.dtype, content: Any
) -> tuple[int, int]:
    """Append the encoding of each chunk to `path`, feeding the text to the `content` hash; (tokens, chars)."""
    n_tokens = n_chars = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            content.update(chunk.encode("utf-8"))
            ids = tokenizer.encode(chunk)
            f.write(ids.astype(dtype).tobytes())
            n_tokens += len(ids)
            n_chars += len(chunk)
    return n_tokens, n_chars


def _move_tail(src: Path, dst: Path, count: int, keep: int, dtype: np.dtype) -> int:
    """Move tokens [keep, count) of `src` into a new file `dst`, truncating `src`; returns how many moved."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fin.seek(keep * dtype.itemsize)
        shutil.copyfileobj(fin, fout)
    os.truncate(src, keep * dtype.itemsize)
    return count - keep


# ------------------------------------------------------------------------------------------------------ batches


def batch_for_step(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    batch_size: int,
    block_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The (x_BT, y_BT) int32 batch of `step`: random crops of `tokens`, y_BT = x_BT shifted left by one.

    A pure function of (seed, step): the global batch's crop offsets come from np.random.default_rng([seed, step]),
    so a resumed run replays its batches exactly. With process_count P, returns only rows
    [p*B/P, (p+1)*B/P) of that same global batch, so the union over processes does not depend on P.
    """
    _check_batch_args(len(tokens), batch_size, block_size)
    if seed < 0 or step < 0:
        raise UserError(f"seed={seed} and step={step} must be >= 0: pass a non-negative --seed")
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise UserError(
            f"batch_size={batch_size} must split evenly over process_count={process_count} "
            f"(process_index={process_index}): pass a --batch_size divisible by the process count"
        )
    starts_B = np.random.default_rng([seed, step]).integers(0, len(tokens) - block_size, size=batch_size)
    rows = batch_size // process_count
    local_starts_B = starts_B[process_index * rows : (process_index + 1) * rows]
    window_BT = np.asarray(tokens[local_starts_B[:, None] + np.arange(block_size + 1)], dtype=np.int32)
    return window_BT[:, :-1], window_BT[:, 1:]


def device_batch_for_step(
    tokens_device: jax.Array, key: jax.Array, step: int | jax.Array, batch_size: int, block_size: int
) -> tuple[jax.Array, jax.Array]:
    """On-device twin of `batch_for_step` (its own RNG stream: jax.random.fold_in(key, step), not numpy's).

    Jit-able and scan-able: `step` may be traced; batch_size and block_size must be static. Keeps the whole token
    array on device, so a tiny model's step is not bottlenecked by host->device copies and Python.
    """
    _check_batch_args(tokens_device.shape[0], batch_size, block_size)
    step_key = jax.random.fold_in(key, step)
    starts_B = jax.random.randint(step_key, (batch_size,), 0, tokens_device.shape[0] - block_size)
    window_BT = tokens_device[starts_B[:, None] + jnp.arange(block_size + 1)].astype(jnp.int32)
    return window_BT[:, :-1], window_BT[:, 1:]


def _check_batch_args(num_tokens: int, batch_size: int, block_size: int) -> None:
    if batch_size <= 0 or block_size <= 0:
        raise UserError(f"batch_size={batch_size} and block_size={block_size} must be positive: fix the flags")
    if num_tokens < block_size + 1:
        raise UserError(
            f"token split has {num_tokens} tokens, fewer than block_size+1={block_size + 1}: "
            "pass a smaller --block_size or use a bigger corpus"
        )
