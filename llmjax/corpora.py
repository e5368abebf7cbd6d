"""Text sources: turn a `--data` source string into re-iterable streams of text chunks.

Three schemes, all resolved here so that `data.py` only ever sees a `Corpus`:

* `text:PATH` -- a UTF-8 text file, or a folder: every non-hidden file under it (recursively, sorted by
  relative path so the corpus is deterministic), skipping binary files (a NUL byte in the first 64 KiB) and files
  that do not start as valid UTF-8. Files are joined with a newline when one does not already end with one.
* `hf:NAME[:CONFIG]` -- a Hugging Face dataset. NAME is a hub id (`datasets.load_dataset(NAME, CONFIG)`), a local
  folder of data files (`load_dataset` infers the builder from extensions; `train.txt` / `validation.txt` name the
  splits), or a folder written by `Dataset.save_to_disk` (`datasets.load_from_disk`). Rows of `text_field` are joined
  with newlines. The dataset's `validation` split is used if it has one, else `data.py` carves 90/10 from `train`.
* `pystdlib` -- the default, network-free corpus: this interpreter's own standard-library `.py` sources (see
  `pystdlib_files`).
* a named corpus (`tinyshakespeare`, see `NAMED`) -- downloaded once into `~/.cache/llmjax/corpora/` and checked
  against its SHA-256; offline, put the file there yourself.

A `Corpus` streams chunks instead of holding one giant string, so a corpus never has to fit in memory twice; its
`fingerprint` is cheap (file names, sizes, mtimes -- no reads) so a cache hit costs no tokenization and no network.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmjax.errors import UserError

SOURCE_HELP = "use --data=text:PATH, --data=hf:NAME[:CONFIG], --data=pystdlib or --data=tinyshakespeare"

# Text files are read in chunks of this many characters so a huge file never sits in memory whole.
READ_CHUNK_CHARS = 1 << 24
# Bytes sniffed at the start of a file to decide whether it is text.
SNIFF_BYTES = 1 << 16
# Rows of a Hugging Face dataset joined per yielded chunk.
HF_ROWS_PER_CHUNK = 1000

# pystdlib: ~5 MB of Python -- enough that a tiny char-level GPT does not memorise it in minutes.
PYSTDLIB_MAX_CHARS = 5_000_000
# Files with more than this fraction of non-ASCII characters are left out (keeps the char vocab small and stable).
PYSTDLIB_MAX_NON_ASCII_FRACTION = 1e-3
# Folders (at any depth) that are test suites, demos, vendored data, bundled wheels or build artefacts.
PYSTDLIB_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "encodings",
        "lib-dynload",
    }
)
# Files whose content depends on how this interpreter was built, not on the Python version.
PYSTDLIB_EXCLUDED_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True)
class Splits:
    """The text of a loaded source.

    `train_chunks()` / `val_chunks()` return fresh iterators each call (the cache builder reads the corpus twice:
    once to fit the tokenizer, once to encode). `val_chunks` is None when the source has no validation split of its
    own.
    """

    train_chunks: Callable[[], Iterator[str]]
    val_chunks: Callable[[], Iterator[str]] | None


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A checked source that has not been read yet.

    `fingerprint` identifies the content cheaply (a cached dataset whose fingerprint differs is rebuilt); `load()`
    does the expensive part (e.g. downloading a Hugging Face dataset), so a cache hit never touches the network.
    """

    source: str
    fingerprint: str
    load: Callable[[], Splits]


def resolve_source(source: str, *, text_field: str = "text") -> Corpus:
    """Parse a source string and check it exists (no corpus text is read yet; a named corpus may be downloaded)."""
    if source == "pystdlib":
        return _pystdlib_corpus()
    if source in NAMED:
        return _text_corpus(str(fetch_named(source)))
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "text":
        return _text_corpus(rest)
    if sep and scheme == "hf":
        return _hf_corpus(rest, text_field)
    hint = f" (did you mean --data=text:{source}?)" if source and os.path.exists(source) else ""
    raise UserError(f"unknown data source {source!r}{hint}: {SOURCE_HELP}")


def normalize_source(source: str) -> str:
    """The canonical spelling of a source, used for cache keys: `text:` paths become absolute."""
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "text":
        return f"text:{Path(rest).expanduser().resolve()}"
    return source


# ------------------------------------------------------------------------------------------------ named corpora


@dataclasses.dataclass(frozen=True)
class NamedCorpus:
    url: str
    sha256: str
    filename: str


NAMED = {
    # Karpathy's char-rnn tiny-shakespeare (nanoGPT's shakespeare_char): 1,115,394 bytes.
    "tinyshakespeare": NamedCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
    ),
}


def named_cache_root() -> Path:
    return Path("~/.cache/llmjax/corpora").expanduser()


def fetch_named(name: str, root: Path | None = None) -> Path:
    """The local path of corpus `name`, downloaded and checksummed on first use (atomically: a failed download
    leaves nothing behind)."""
    spec = NAMED[name]
    path = (root or named_cache_root()) / spec.filename
    if not path.exists():
        _download(spec.url, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != spec.sha256:
        raise UserError(f"{path} has SHA-256 {digest[:12]}…, not {name}'s {spec.sha256[:12]}…: delete it to "
                        f"download again, or put the file from {spec.url} there")
    return path


def _download(url: str, path: Path) -> None:
    import urllib.error
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            out.write(response.read())
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}): offline, save that file as {path}") from None
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------- text:


def _text_corpus(path_str: str) -> Corpus:
    if not path_str:
        raise UserError(f"empty path in --data=text:: {SOURCE_HELP}")
    path = Path(path_str).expanduser().resolve()
    if not path.exists():
        raise UserError(f"data path {path} does not exist: pass --data=text:PATH to an existing file or folder")
    if path.is_file():
        if not _looks_like_text(path):
            raise UserError(f"data file {path} is not UTF-8 text: pass --data=text:PATH to a text file or folder")
        files = [path]
    else:
        files = [f for f in _walk_files(path) if _looks_like_text(f)]
        if not files:
            raise UserError(f"data folder {path} contains no text files: pass --data=text:PATH to a folder of text")
    return Corpus(
        source=f"text:{path}",
        fingerprint=_stat_fingerprint(path, files),
        load=lambda: Splits(train_chunks=lambda: _read_files(files), val_chunks=None),
    )


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden regular file under `root`, sorted by relative path (symlinked folders are not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    return sorted((f for f in found if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def _looks_like_text(path: Path) -> bool:
    """True if the file's first 64 KiB hold no NUL byte and decode as UTF-8 (a split trailing character is fine)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _read_files(files: list[Path]) -> Iterator[str]:
    """Stream the files' text in chunks, adding a newline between files when one is missing."""
    for i, path in enumerate(files):
        last = ""
        with open(path, encoding="utf-8", newline="") as f:
            try:
                while chunk := f.read(READ_CHUNK_CHARS):
                    last = chunk
                    yield chunk
            except UnicodeDecodeError as e:
                raise UserError(f"data file {path} is not valid UTF-8 ({e.reason}): fix or remove the file") from e
        if i + 1 < len(files) and last and not last.endswith("\n"):
            yield "\n"


def _stat_fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of (relative path, size, mtime) of each file: changes when any file is edited, added or removed."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.relative_to(root).as_posix() if f != root else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------- hf:


def _hf_corpus(spec: str, text_field: str) -> Corpus:
    name, _, config = spec.partition(":")
    if not name:
        raise UserError(f"empty dataset name in --data=hf:{spec}: pass --data=hf:NAME[:CONFIG]")
    local = Path(name).expanduser()
    identity = _stat_fingerprint(local, _walk_files(local)) if local.is_dir() else f"hf:{spec}"
    return Corpus(
        source=f"hf:{spec}",
        fingerprint=hashlib.sha256(f"{identity}\0{text_field}".encode()).hexdigest(),
        load=lambda: _hf_splits(name, config or None, text_field),
    )


def _hf_splits(name: str, config: str | None, text_field: str) -> Splits:
    """Load the dataset and check it has a train split and the text column."""
    splits = _load_hf(name, config)
    if "train" not in splits:
        raise UserError(f"dataset {name!r} has no 'train' split (it has {sorted(splits)}): pick another dataset")
    for split in splits.values():
        if text_field not in split.column_names:
            raise UserError(
                f"dataset {name!r} has no column {text_field!r} (columns: {split.column_names}): "
                "pass --text_field=COLUMN"
            )
    train, val = splits["train"], splits.get("validation")
    return Splits(
        train_chunks=lambda: _hf_rows(train, text_field),
        val_chunks=None if val is None else lambda: _hf_rows(val, text_field),
    )


def _load_hf(name: str, config: str | None) -> dict[str, Any]:
    """Load a dataset as {split name: datasets.Dataset}; any loading failure becomes a UserError."""
    import datasets  # Imported here: it is slow to import and only this source needs it.

    local = Path(name).expanduser()
    saved_markers = ("dataset_dict.json", "state.json")
    try:
        if local.is_dir() and any((local / m).exists() for m in saved_markers):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(name, config)
    except Exception as e:  # Hub, network and format errors all mean "cannot load this source".
        raise UserError(
            f"cannot load Hugging Face dataset {name!r} (config {config!r}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- check the name, "
            "config and network, or use --data=text:PATH"
        ) from e
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _hf_rows(split: Any, text_field: str) -> Iterator[str]:
    """Stream a split's `text_field` rows, each followed by a newline."""
    for batch in split.iter(batch_size=HF_ROWS_PER_CHUNK):
        yield "".join(f"{row}\n" for row in batch[text_field])


# ------------------------------------------------------------------------------------------------------ pystdlib


def pystdlib_root() -> Path:
    """The standard-library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def pystdlib_files(root: Path | None = None) -> list[Path]:
    """Candidate stdlib `.py` files, sorted by relative path, minus tests, demos and build-specific files."""
    root = pystdlib_root() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = [d for d in dirnames if d not in PYSTDLIB_EXCLUDED_DIRS and not (top and d.startswith("config-"))]
        found.extend(
            Path(dirpath) / n for n in filenames if n.endswith(".py") and not n.startswith(PYSTDLIB_EXCLUDED_PREFIXES)
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def pystdlib_texts(root: Path | None = None) -> Iterator[str]:
    """The pystdlib corpus as one chunk per file: a `# file: REL/PATH.py` header line, then the file's source.

    Files that are not UTF-8 or are non-ASCII-heavy are skipped; files are taken in sorted order until the next
    one would push the total past PYSTDLIB_MAX_CHARS. Deterministic for a given Python version and build.
    """
    root = pystdlib_root() if root is None else root
    total = 0
    for path in pystdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not source.isascii() and _non_ascii_fraction(source) > PYSTDLIB_MAX_NON_ASCII_FRACTION:
            continue
        if not source.endswith("\n"):
            source += "\n"
        chunk = f"# file: {path.relative_to(root).as_posix()}\n{source}"
        if total + len(chunk) > PYSTDLIB_MAX_CHARS:
            return
        total += len(chunk)
        yield chunk


def _non_ascii_fraction(text: str) -> float:
    return sum(not c.isascii() for c in text) / max(len(text), 1)


def _pystdlib_corpus() -> Corpus:
    root = pystdlib_root()
    files = pystdlib_files(root)
    if not files:
        raise UserError(
            f"no Python standard-library sources found under {root}: "
            "use --data=text:PATH or --data=hf:NAME instead of pystdlib"
        )
    version = f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return Corpus(
        source="pystdlib",
        fingerprint=hashlib.sha256(f"{version}\0{_stat_fingerprint(root, files)}".encode()).hexdigest(),
        load=lambda: Splits(train_chunks=lambda: pystdlib_texts(root), val_chunks=None),
    )
