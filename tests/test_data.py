"""Data pipeline: sources, token cache (reuse, atomicity, staleness), 90/10 split and batch sampling."""

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import corpora, data
from llmjax.data import batch_for_step, device_batch_for_step, prepare_data
from llmjax.errors import UserError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------------ sources


def test_text_file_char_dataset(text_file, cache):
    ds = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert ds.tokenizer.vocab_size == len(set(TEXT)) == ds.meta["vocab_size"]
    assert isinstance(ds.train_tokens, np.memmap) and ds.train_tokens.dtype == np.uint16
    assert ds.tokenizer.decode(np.concatenate([ds.train_tokens, ds.val_tokens])) == TEXT
    assert ds.cache_dir.parent == cache
    assert ds.meta["num_chars"] == len(TEXT)


def test_split_is_first_90_last_10(text_file, cache):
    ds = prepare_data(f"text:{text_file}", "byte", cache_dir=cache)
    n = len(TEXT.encode())
    assert len(ds.train_tokens) == int(n * 0.9)
    assert len(ds.val_tokens) == n - int(n * 0.9)
    assert ds.meta["num_tokens"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert ds.tokenizer.decode(ds.val_tokens) == TEXT[int(n * 0.9) :]


def test_folder_is_sorted_recursive_and_skips_binary_and_hidden(tmp_path, cache):
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b" / "two.txt").write_text("two\n" * 50)
    (root / "a.txt").write_text("one" * 50)  # No trailing newline: one is inserted between files.
    (root / "c.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "d.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / ".git" / "config").write_text("hidden\n")
    ds = prepare_data(f"text:{root}", "char", cache_dir=cache)
    text = ds.tokenizer.decode(np.concatenate([ds.train_tokens, ds.val_tokens]))
    assert text == "one" * 50 + "\n" + "two\n" * 50


def test_bpe_dataset_round_trips(text_file, cache):
    ds = prepare_data(f"text:{text_file}", "bpe", vocab_size=300, cache_dir=cache)
    assert ds.tokenizer.vocab_size == 300
    assert ds.tokenizer.decode(np.concatenate([ds.train_tokens, ds.val_tokens])) == TEXT
    assert len(ds.train_tokens) + len(ds.val_tokens) < 0.9 * len(TEXT)


def test_hf_local_data_files_use_validation_split(tmp_path, cache):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    (folder / "train.txt").write_text(TEXT)
    (folder / "validation.txt").write_text("held out text\n" * 10)
    ds = prepare_data(f"hf:{folder}", "char", cache_dir=cache)
    assert ds.tokenizer.decode(ds.train_tokens) == TEXT
    assert ds.tokenizer.decode(ds.val_tokens) == "held out text\n" * 10
    assert ds.meta["split"] == "dataset's own validation split"


def test_hf_save_to_disk_folder_and_text_field(tmp_path, cache):
    import datasets

    rows = [f"story number {i}" for i in range(100)]
    datasets.Dataset.from_dict({"story": rows, "id": list(range(100))}).save_to_disk(str(tmp_path / "saved"))
    ds = prepare_data(f"hf:{tmp_path / 'saved'}", "byte", cache_dir=cache, text_field="story")
    assert ds.tokenizer.decode(np.concatenate([ds.train_tokens, ds.val_tokens])) == "".join(r + "\n" for r in rows)
    with pytest.raises(UserError, match=r"no column 'text'.*--text_field"):
        prepare_data(f"hf:{tmp_path / 'saved'}", "byte", cache_dir=cache)


def test_pystdlib_corpus_is_deterministic_and_sized():
    chunks = list(corpora.pystdlib_texts())
    text = "".join(chunks)
    assert 4_000_000 < len(text) <= corpora.PYSTDLIB_MAX_CHARS
    assert "".join(corpora.pystdlib_texts()) == text
    assert text.startswith("# file: __future__.py\n")
    headers = [c.split("\n", 1)[0] for c in chunks]
    assert headers == sorted(headers)
    folders = {part for h in headers for part in h.removeprefix("# file: ").split("/")[:-1]}
    assert not folders & {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    assert "asyncio" in folders
    assert len(set(text)) < 128


def test_pystdlib_dataset_loads(cache):
    ds = prepare_data("pystdlib", "byte", cache_dir=cache)
    assert len(ds.train_tokens) > 3_500_000 and len(ds.val_tokens) > 350_000
    assert "def " in ds.tokenizer.decode(ds.val_tokens[:5000])


# --------------------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_without_retokenizing(text_file, cache, monkeypatch):
    first = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    mtime = (first.cache_dir / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized a cached dataset")

    monkeypatch.setattr(data, "_write_cache", fail)
    second = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert second.cache_dir == first.cache_dir
    assert (second.cache_dir / "train.bin").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    assert second.meta == first.meta


def test_different_settings_get_different_caches(text_file, cache):
    char = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    byte = prepare_data(f"text:{text_file}", "byte", cache_dir=cache)
    assert char.cache_dir != byte.cache_dir
    assert char.cache_dir.name.startswith("corpus.txt-char-")


def test_failed_build_leaves_no_cache(text_file, cache, monkeypatch):
    calls = []

    def encode_then_crash(tokenizer, chunks, path, dtype, content):
        calls.append(path)
        path.write_bytes(b"\x00" * 10)  # Some output already written when the "crash" happens.
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_encode_to_file", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert calls and list(cache.iterdir()) == []
    monkeypatch.undo()
    assert len(prepare_data(f"text:{text_file}", "char", cache_dir=cache).train_tokens) == int(len(TEXT) * 0.9)


def test_changed_source_is_rebuilt(text_file, cache):
    prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    text_file.write_text(TEXT + "NEW TEXT\n")
    ds = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert ds.tokenizer.decode(ds.val_tokens).endswith("NEW TEXT\n")
    assert len(list(cache.iterdir())) == 1


def test_corrupt_cache_is_rebuilt(text_file, cache):
    ds = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    with open(ds.cache_dir / "train.bin", "r+b") as f:
        f.truncate(100)
    rebuilt = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert len(rebuilt.train_tokens) == int(len(TEXT) * 0.9)
    (rebuilt.cache_dir / "meta.json").write_text("{not json")
    again = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert json.loads((again.cache_dir / "meta.json").read_text())["num_chars"] == len(TEXT)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("text:/no/such/file.txt", "does not exist: pass --data=text:PATH"),
        ("ftp:foo", r"unknown data source 'ftp:foo'.*text:PATH"),
        ("shakespeare", "unknown data source"),
        ("text:", "empty path"),
        ("hf:", "empty dataset name"),
    ],
)
def test_bad_sources_are_user_errors(source, message, cache):
    with pytest.raises(UserError, match=message):
        prepare_data(source, "char", cache_dir=cache)


def test_bare_existing_path_suggests_text_scheme(text_file, cache):
    with pytest.raises(UserError, match="did you mean --data=text:"):
        prepare_data(str(text_file), "char", cache_dir=cache)


def test_bad_tokenizer_and_empty_corpus_are_user_errors(tmp_path, text_file, cache):
    with pytest.raises(UserError, match="unknown tokenizer 'sentencepiece'"):
        prepare_data(f"text:{text_file}", "sentencepiece", cache_dir=cache)
    with pytest.raises(UserError, match="needs a vocabulary size"):
        prepare_data(f"text:{text_file}", "bpe", cache_dir=cache)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for kind in ("char", "byte"):
        with pytest.raises(UserError, match="empty"):
            prepare_data(f"text:{empty}", kind, cache_dir=cache)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="not UTF-8 text"):
        prepare_data(f"text:{binary}", "char", cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ batches

TOKENS = np.arange(1000, dtype=np.uint16)
ARGS = {"batch_size": 8, "block_size": 16}


def test_batch_shapes_and_shift():
    x_BT, y_BT = batch_for_step(TOKENS, seed=0, step=0, **ARGS)
    assert x_BT.shape == y_BT.shape == (8, 16) and x_BT.dtype == y_BT.dtype == np.int32
    np.testing.assert_array_equal(x_BT[:, 1:], y_BT[:, :-1])
    np.testing.assert_array_equal(y_BT, x_BT + 1)  # TOKENS[i] == i, so each row is a contiguous crop.


def test_batch_is_pure_function_of_seed_and_step():
    a = batch_for_step(TOKENS, seed=3, step=7, **ARGS)
    b = batch_for_step(TOKENS, seed=3, step=7, **ARGS)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], batch_for_step(TOKENS, seed=3, step=8, **ARGS)[0])
    assert not np.array_equal(a[0], batch_for_step(TOKENS, seed=4, step=7, **ARGS)[0])


def test_batch_covers_the_whole_split():
    starts = np.concatenate([batch_for_step(TOKENS, seed=0, step=s, **ARGS)[0][:, 0] for s in range(300)])
    assert starts.min() == 0 and starts.max() == len(TOKENS) - 17


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_slices_concatenate_to_global_batch(process_count):
    x_global, y_global = batch_for_step(TOKENS, seed=1, step=5, **ARGS)
    parts = [
        batch_for_step(TOKENS, seed=1, step=5, process_index=p, process_count=process_count, **ARGS)
        for p in range(process_count)
    ]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), x_global)
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), y_global)


def test_batch_from_memmap_dataset(text_file, cache):
    ds = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    x_BT, y_BT = batch_for_step(ds.train_tokens, seed=0, step=0, batch_size=4, block_size=32)
    for x_T, y_T in zip(x_BT, y_BT, strict=True):
        assert ds.tokenizer.decode(x_T)[1:] + ds.tokenizer.decode(y_T)[-1] == ds.tokenizer.decode(y_T)
        assert ds.tokenizer.decode(x_T) in TEXT


def test_bad_batch_args_are_user_errors():
    with pytest.raises(UserError, match="fewer than block_size"):
        batch_for_step(TOKENS[:16], seed=0, step=0, **ARGS)
    with pytest.raises(UserError, match="divisible by the process count"):
        batch_for_step(TOKENS, seed=0, step=0, process_index=0, process_count=3, **ARGS)
    with pytest.raises(UserError, match="non-negative --seed"):
        batch_for_step(TOKENS, seed=-1, step=0, **ARGS)


def test_device_batch_jit_scan_and_determinism():
    tokens = jnp.asarray(TOKENS)
    key = jax.random.key(0)
    sample = jax.jit(partial(device_batch_for_step, batch_size=8, block_size=16))
    x_BT, y_BT = sample(tokens, key, 3)
    assert x_BT.shape == (8, 16) and x_BT.dtype == jnp.int32
    np.testing.assert_array_equal(y_BT, x_BT + 1)
    np.testing.assert_array_equal(sample(tokens, key, 3)[0], x_BT)
    assert not np.array_equal(sample(tokens, key, 4)[0], x_BT)

    def body(carry, step):
        x, _ = device_batch_for_step(tokens, key, step, 8, 16)
        return carry + x.sum(), x

    _, xs_SBT = jax.lax.scan(body, jnp.int32(0), jnp.arange(5))
    np.testing.assert_array_equal(xs_SBT[3], x_BT)
    with pytest.raises(UserError, match="fewer than block_size"):
        device_batch_for_step(tokens[:10], key, 0, 8, 16)


def test_cache_files_are_world_readable(text_file, cache):
    ds = prepare_data(f"text:{text_file}", "char", cache_dir=cache)
    assert os.stat(ds.cache_dir).st_mode & 0o755 == 0o755


# ------------------------------------------------------------------------------------------------ named corpora


def _named(tmp_path, monkeypatch, text: bytes, sha: str | None = None) -> tuple:
    """A named corpus served from a local file:// URL (urllib's download path, no network), cached under tmp."""
    import hashlib

    served = tmp_path / "served.txt"
    served.write_bytes(text)
    spec = corpora.NamedCorpus(url=served.as_uri(), sha256=sha or hashlib.sha256(text).hexdigest(),
                               filename="tiny.txt")
    monkeypatch.setitem(corpora.NAMED, "tiny", spec)
    monkeypatch.setattr(corpora, "named_cache_root", lambda: tmp_path / "cache")
    return spec, tmp_path / "cache" / "tiny.txt"


def test_named_corpus_downloads_once_and_checks_its_digest(tmp_path, monkeypatch) -> None:
    _, cached = _named(tmp_path, monkeypatch, b"to be or not to be\n" * 50)
    corpus = corpora.resolve_source("tiny")
    assert cached.read_bytes() == b"to be or not to be\n" * 50
    assert "".join(corpus.load().train_chunks()) == "to be or not to be\n" * 50
    (tmp_path / "served.txt").unlink()  # a second use must not download again
    assert corpora.resolve_source("tiny").fingerprint == corpus.fingerprint
    cached.write_bytes(b"tampered")
    with pytest.raises(UserError, match="SHA-256 .* delete it to download again"):
        corpora.resolve_source("tiny")


def test_named_corpus_offline_says_where_to_put_the_file(tmp_path, monkeypatch) -> None:
    _, cached = _named(tmp_path, monkeypatch, b"x")
    (tmp_path / "served.txt").unlink()
    with pytest.raises(UserError, match=f"offline, save that file as {cached}"):
        corpora.resolve_source("tiny")
    assert not cached.exists() and not list(cached.parent.iterdir())  # no partial download left behind


def test_tinyshakespeare_is_a_known_source() -> None:
    assert corpora.NAMED["tinyshakespeare"].url.endswith("tinyshakespeare/input.txt")
    with pytest.raises(UserError, match="--data=tinyshakespeare"):
        corpora.resolve_source("shakespeare")
