"""Training data: load text sources, tokenize online, pack into fixed-size rows, resume exactly.

Pipeline, per data-parallel rank and per loader worker ("reader"):

    sources (local files / save_to_disk folder / hub id)  ->  this reader's disjoint share of documents
    -> mixed by `data_probs` (seeded)  ->  chunks of documents  ->  batched tokenization (BOS + doc + EOS)
    -> one token stream  ->  batches of `batch_size` rows of `seq_len` tokens (+ `cu_seqlens` when varlen)

Each worker builds whole batches, so `StatefulDataLoader` runs with `batch_size=None`.

Sharding: worker `w` of rank `r` is reader `g = r * num_workers + w` of `n = world_size * num_workers`. A
map-style (local, non-streaming) source gives reader `g` the documents `g, g + n, g + 2n, ...`, visited in an
order shuffled with (seed, epoch, g); a streaming source is split with `datasets.distributed.split_dataset_by_node`
(whole files per reader when their number is a multiple of `n`, else every n-th example).

Exact resume: a reader's position is a few integers per source (epoch, position; for streaming sources the
`datasets` state at the start of the current record batch). Before a chunk of documents is read, that position
is snapshotted; the loader state is (snapshot of the chunk holding the next token, tokens of it already used).
Resuming re-reads and re-tokenizes that one chunk and drops the used tokens, so every following batch equals
the uninterrupted run's. Streaming sources are read without a shuffle buffer (a buffer's content would be lost
on resume); `datasets`' `set_epoch` reshuffles their file order every epoch.

Epochs: a source that runs out starts its next epoch (reshuffled) and logs it; the loader never ends.
`data_epoch(loader)` gives the epoch for logging.

Local data is converted once into `datasets`' Arrow cache (with its progress bar, on rank 0 first) and then
read with random access; for a local corpus too large to copy, `--training.streaming` reads the files as they
are. Hub datasets are always streamed (offline: read from the local `datasets` cache if it is there).
txt files: documents are separated by blank lines.

Rows: every row's text column must be a string (JSON, parquet and arrow data must be UTF-8); a row without
text (null, the field missing, a JSON `null` line) or with another type is an error naming the source, found
at the start for local non-streaming data (the whole column is checked) and when the row is read otherwise.
Empty and whitespace-only strings are skipped. A library's failure to read a file (a JSON syntax error, a
truncated parquet or gzip file, bytes that are not UTF-8) is a DataError naming the file.

Folders: the data files are those with a known suffix below it, except hidden and private ones (.cache,
_SUCCESS) and `datasets`' metadata files (dataset_info.json, state.json, ...); a folder mixing .json and
.jsonl files is refused (a stray metadata .json would be read as data), as is one mixing formats.

Errors about the data or these options raise `DataError`, whose message is one line for the user.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import atexit
import logging
import multiprocessing
import signal
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import numpy as np
import pyarrow
import torch
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader

from lmlab.config import Training
from lmlab.errors import UserError

logger = logging.getLogger(__name__)

# Local formats: file suffix -> `datasets` packaged builder. Compressed variants (.gz, .zst, ...) work too.
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".arrow": "arrow"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# A datasets.save_to_disk folder holds dataset_dict.json (a DatasetDict) or both of the others (a Dataset).
SAVED_DICT, SAVED_STATE, SAVED_INFO = "dataset_dict.json", "state.json", "dataset_info.json"
# Metadata files the `datasets` library writes or downloads beside data: never data themselves.
METADATA_FILES = {SAVED_DICT, SAVED_STATE, SAVED_INFO, "dataset_infos.json"}
DEFAULT_TEXT_COLUMNS = ("text", "content")
CHUNK_DOCS = 256  # documents tokenized per call: big enough to amortize, small enough to re-read on resume
MIX_BLOCK = 4096  # source choices drawn per RNG block when mixing
CHECK_ROWS = 100_000  # rows scanned at start for a non-empty document
STATE_VERSION = 1
LOCAL_HINT = (
    "pass a local file or folder (parquet / jsonl / json / txt / arrow, or a datasets.save_to_disk folder) "
    "to --training.dataset"
)


class DataError(UserError, ValueError):
    """A problem with the training data or its options. The message is one line meant for the user."""

    def __init__(self, message: str) -> None:
        # Raised in a loader worker, torch re-raises DataError(its report + the traceback) in the main
        # process; that traceback ends with our line, which is all the user needs.
        lines = message.strip().splitlines()
        if len(lines) > 1 and lines[-1].startswith(f"{__name__}.DataError: "):
            message = lines[-1].removeprefix(f"{__name__}.DataError: ")
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------------
# Opening sources
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    name: str  # as the user wrote it, for messages
    data: datasets.Dataset | datasets.IterableDataset  # only the text column
    column: str
    from_txt: bool  # undecodable bytes of txt files were replaced by U+FFFD: count them
    locate: Callable[[], str | None] | None = None  # after a read failed: the local file at fault, if one is


def load_sources(training: Training, rank: int = 0) -> list[Source]:
    """Open every source of --training.dataset (a comma list). Rank 0 goes first, alone, so it builds the
    `datasets` cache (showing datasets' progress bars); the other ranks then load that cache silently."""
    specs = [s.strip() for s in training.dataset.split(",") if s.strip()]
    if not specs:
        raise DataError("--training.dataset is empty")
    n = len(specs)
    names = _per_source(training.dataset_name, n, "dataset_name")
    splits = _per_source(training.dataset_split, n, "dataset_split")
    dirs = _per_source(training.data_dir, n, "data_dir")
    # One source: data_files is its own comma list of files. Several: one entry per source.
    files = [training.data_files] if n == 1 else _per_source(training.data_files, n, "data_files")
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist and rank != 0:
        torch.distributed.barrier()
    with _progress_bars_disabled() if rank != 0 else contextlib.nullcontext():
        sources = [load_source(*args, training) for args in zip(specs, names, splits, dirs, files)]
    if dist and rank == 0:
        torch.distributed.barrier()
    return sources


def load_source(spec: str, name: str | None, split: str | None, data_dir: str | None, data_files: str | None,
                training: Training) -> Source:
    """Open one source (reading only what a check needs) and find its text column."""
    path = Path(spec).expanduser()
    locate = None
    if path.exists():
        data, from_txt, locate = _load_local(path, split or "train", data_dir, data_files, training.streaming)
    elif _looks_like_path(spec):
        raise DataError(f"--training.dataset {spec}: no such file or folder")
    else:
        data, from_txt = _load_hub(spec, name, split or "train", data_dir, data_files), False
    columns = data.column_names
    if columns is None:  # streaming json: the columns are known only after the first row
        with _reading(spec, locate):
            columns = list(next(iter(data), None) or {})
    column = _text_column(spec, columns, training.text_column)
    if isinstance(data, datasets.Dataset) and len(data) == 0:
        raise DataError(f"{spec}: the dataset is empty")
    data = data.select_columns([column])
    _check_text_column(spec, data, column)
    # Fail here in one line rather than later in a loader worker. A real corpus has text in its first rows;
    # the scan is bounded so that a huge source of blanks cannot stall the start.
    with _reading(spec, locate):
        for text in _first_texts(data, column, CHECK_ROWS):
            _check_text(spec, column, text)
            if _keep(text):
                return Source(spec, data, column, from_txt, locate)
    raise DataError(f"{spec}: no non-empty documents in column {column!r}")


def _check_text_column(spec: str, data: datasets.Dataset | datasets.IterableDataset, column: str) -> None:
    """The column's type, where known, is text; a map-style source's column has no nulls anywhere."""
    feature = (data.features or {}).get(column)
    if feature is not None and not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{spec}: column {column!r} holds {feature}, not text: every row's {column!r} must be a string")
    if isinstance(data, datasets.Dataset):
        try:  # pyarrow's JSON reader keeps bytes that are not UTF-8; they would fail in a loader worker
            data.data.column(column).validate(full=True)
        except pyarrow.ArrowInvalid as exc:
            raise DataError(f"{spec}: column {column!r} is not UTF-8 text ({exc}); convert the data to UTF-8") from None
        nulls = data.data.column(column).null_count
        if nulls:
            raise DataError(f"{spec}: {nulls} of {len(data)} rows have no {column!r} (null, the field missing, or a "
                            f"JSON null line); every row needs text: drop those rows or choose --training.text_column")


def _check_text(source: str, column: str, text: Any) -> None:
    if text is None:
        raise DataError(f"{source}: a row has no {column!r} (null, the field missing, or a JSON null line); "
                        "every row needs text")
    if not isinstance(text, str):
        raise DataError(f"{source}: a row's {column!r} is a {type(text).__name__}, not a string; every row needs text")


@contextlib.contextmanager
def _reading(source: str, locate: Callable[[], str | None] | None) -> Iterator[None]:
    """Reading a source's rows: a library's failure becomes a DataError naming the file at fault (found by
    `locate`), else the source, and the failure's cause."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{locate and locate() or source}: cannot be read: {_root_cause(exc)}") from None


def _per_source(value: str | None, n: int, option: str) -> list[str | None]:
    """A comma list aligned with the n datasets (a single value applies to all)."""
    if value is None:
        return [None] * n
    items = [v.strip() or None for v in value.split(",")]
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise DataError(f"--training.{option} has {len(items)} entries but --training.dataset has {n}")
    return items


@contextlib.contextmanager
def _progress_bars_disabled() -> Iterator[None]:
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or _format_of(Path(spec)) is not None


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _load_local(path: Path, split: str, data_dir: str | None, data_files: str | None,
                streaming: bool) -> tuple[datasets.Dataset | datasets.IterableDataset, bool, Callable[[], str | None] | None]:
    """The data, whether it comes from txt files, and what finds the file at fault after a read failed (if
    anything can)."""
    if _saved_to_disk(path):
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: a datasets.save_to_disk folder that cannot be loaded: {_root_cause(exc)}") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{path}: no split {split!r} (--training.dataset_split); splits are {', '.join(data)}")
            data = data[split]
        if streaming:
            data = data.to_iterable_dataset(num_shards=max(1, len(data.cache_files)))
        return data, False, None
    builder, files = _local_files(path, data_dir, data_files)
    # txt: documents are separated by blank lines (a document per line would lose every newline), and
    # undecodable bytes become U+FFFD instead of stopping the run.
    kwargs = {"sample_by": "paragraph", "encoding_errors": "replace"} if builder == "text" else {}
    try:
        data = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    except Exception as exc:  # a corrupt or malformed file
        raise DataError(f"{_culprit(builder, files, kwargs) or path}: cannot be read as {builder}: "
                        f"{_root_cause(exc)}") from None
    return data, builder == "text", functools.partial(_culprit, builder, files, kwargs)


def _saved_to_disk(path: Path) -> bool:
    """A datasets.save_to_disk folder: a DatasetDict's dataset_dict.json, or a Dataset's state, info and arrow
    files (the metadata alone may come with downloaded data)."""
    return path.is_dir() and ((path / SAVED_DICT).is_file() or (path / SAVED_STATE).is_file()
                              and (path / SAVED_INFO).is_file() and any(path.glob("*.arrow")))


def _culprit(builder: str, files: list[str], kwargs: dict[str, Any]) -> str | None:
    """The first of `files` that fails to read on its own (None if each reads alone, e.g. mismatched columns).
    Run only after a failure: it reads the files in order up to the bad one."""
    if len(files) == 1:
        return files[0]
    for file in files:
        try:
            for _ in datasets.load_dataset(builder, data_files=[file], split="train", streaming=True, **kwargs).iter(4096):
                pass
        except Exception:
            return file
    return None


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a library's chain of causes (datasets raises "An error occurred while generating
    the dataset" from pyarrow's "JSON parse error: ... in row 816"), on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    if isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 ({text}); convert the file to UTF-8 (iconv -f <its encoding> -t utf-8)"
    return text[:400] or type(exc).__name__


def _local_files(root: Path, data_dir: str | None, data_files: str | None) -> tuple[str, list[str]]:
    """The `datasets` builder and the data files of a local file or folder."""
    if data_dir:
        root = root / data_dir
        if not root.is_dir():
            raise DataError(f"--training.data_dir: no folder {root}")
    if root.is_file():
        files = [root]
    elif data_files:  # glob patterns relative to the folder
        files = sorted({p for pat in data_files.split(",") for p in root.glob(pat.strip()) if p.is_file()})
    else:  # every data file below the folder, skipping hidden and private ones (.cache, _SUCCESS, ...)
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and _format_of(p) and p.name not in METADATA_FILES
            and not any(q.startswith((".", "_")) for q in p.relative_to(root).parts)
        )
        suffixes = {p.name: p.suffixes[-1].lower() for p in files if _format_of(p) == "json"}
        if {".json", ".jsonl"} <= set(suffixes.values()):
            odd = sorted(name for name, suffix in suffixes.items() if suffix == ".json")
            raise DataError(f"{root}: mixes .jsonl data with .json files ({', '.join(odd[:3])}"
                            f"{', ...' if len(odd) > 3 else ''}), which may be metadata; choose the data with "
                            "--training.data_files '*.jsonl'")
    if not files:
        raise DataError(f"{root}: no data files ({', '.join(FORMATS)}, optionally compressed)")
    files = [p for p in files if not _blank(p)]  # datasets fails on some empty files; they hold nothing
    if not files:
        raise DataError(f"{root}: the data is empty (zero-byte or blank files)")
    builders = {_format_of(p) for p in files}
    if None in builders:
        unknown = next(p for p in files if _format_of(p) is None)
        raise DataError(f"{unknown}: unknown data format (expected one of {', '.join(FORMATS)})")
    if len(builders) > 1:
        raise DataError(f"{root}: mixes formats {sorted(builders)}; pick one with --training.data_files")
    builder = builders.pop()
    if builder == "text":
        for p in files:
            _check_not_binary(p)
    return builder, [str(p) for p in files]


def _blank(path: Path) -> bool:
    """Zero bytes, or a small uncompressed file of whitespace only."""
    size = path.stat().st_size
    return size == 0 or size < 4096 and path.suffix.lower() not in COMPRESSION and not path.read_bytes().strip()


def _check_not_binary(path: Path) -> None:
    """A txt file with NUL bytes is binary (git's test); other undecodable bytes are replaced and counted."""
    if path.suffix.lower() in COMPRESSION:
        return
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise DataError(f"{path}: looks like a binary file, not text")


def _load_hub(dataset: str, name: str | None, split: str, data_dir: str | None,
              data_files: str | None) -> datasets.Dataset | datasets.IterableDataset:
    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    files = [f.strip() for f in data_files.split(",")] if data_files else None
    try:
        # Streaming: a pre-training corpus (fineweb-edu is terabytes) is read as needed, never downloaded
        # whole. Offline, only a dataset already in the local cache can load, and it is read from there.
        return datasets.load_dataset(dataset, name, split=split, data_dir=data_dir, data_files=files,
                                     streaming=not offline)
    except Exception as exc:
        if offline:
            why = "is not a local path, and the Hugging Face Hub is offline (HF_HUB_OFFLINE)"
        elif isinstance(exc, datasets.exceptions.DatasetNotFoundError):
            why = "is neither a local path nor a dataset on the Hugging Face Hub"
        elif isinstance(exc, (ConnectionError, OSError)) or "connect" in str(exc).lower():
            why = "is not a local path, and the Hugging Face Hub cannot be reached"
        else:  # e.g. a wrong dataset_name: datasets' own message says what exists
            raise DataError(f"--training.dataset {dataset}: {_first_line(exc)}") from None
        raise DataError(f"--training.dataset {dataset} {why}; {LOCAL_HINT}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _text_column(name: str, columns: list[str], wanted: str | None) -> str:
    if wanted:
        if wanted in columns:
            return wanted
        raise DataError(f"{name}: no column {wanted!r} (--training.text_column); columns are: {', '.join(columns)}")
    for column in DEFAULT_TEXT_COLUMNS:
        if column in columns:
            return column
    raise DataError(f"{name}: no 'text' or 'content' column; columns are: {', '.join(columns) or '(none)'}; "
                    "choose one with --training.text_column")


def _first_texts(data: datasets.Dataset | datasets.IterableDataset, column: str, limit: int) -> Iterator[Any]:
    if isinstance(data, datasets.IterableDataset):
        for _, row in zip(range(limit), data):
            yield row[column]
    else:
        for start in range(0, min(len(data), limit), 1000):
            yield from data[start : min(start + 1000, limit)][column]


def _keep(text: str) -> bool:
    """Empty and whitespace-only documents are skipped."""
    return bool(text) and not text.isspace()


# ---------------------------------------------------------------------------------------------------------
# Reading: one reader per (source, rank x worker); the sources mixed into one document stream
# ---------------------------------------------------------------------------------------------------------
class _Reader:
    """One reader's share of one source, read in order, epoch after epoch. `position()` is small and
    `seek(position)` makes the reader return the same documents again."""

    def __init__(self, source: Source, reader: int, readers: int, seed: int) -> None:
        self.source, self.reader, self.readers, self.seed = source, reader, readers, seed
        self.epoch = 0
        self.undecodable = 0  # documents with U+FFFD in this epoch (txt sources)

    def read(self, n: int) -> list[Any]:
        raise NotImplementedError

    def available(self) -> int:
        """Documents left in this epoch (an upper bound if unknown)."""
        raise NotImplementedError

    def _note(self, texts: list[Any]) -> list[Any]:
        if self.source.from_txt:
            bad = sum(1 for t in texts if isinstance(t, str) and "\ufffd" in t)
            if bad and not self.undecodable:
                logger.warning("data: %s has undecodable bytes (replaced by U+FFFD); counted per epoch",
                               self.source.name)
            self.undecodable += bad
        return texts

    def _next_epoch(self) -> None:
        if self.undecodable:
            logger.warning("data: %s epoch %d: %d documents (reader %d) had undecodable bytes",
                           self.source.name, self.epoch, self.undecodable, self.reader)
        self.epoch += 1
        self.undecodable = 0
        logger.info("data: %s (reader %d of %d) starts epoch %d", self.source.name, self.reader, self.readers,
                    self.epoch)


class _MapReader(_Reader):
    """Documents g, g+n, g+2n, ... of a map-style source, in an order reshuffled every epoch."""

    def __init__(self, source: Source, reader: int, readers: int, seed: int) -> None:
        super().__init__(source, reader, readers, seed)
        self.indices = np.arange(reader, len(source.data), readers)
        self.pos = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, shuffled indices)

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def seek(self, position: dict[str, Any]) -> None:
        self.epoch, self.pos = position["epoch"], position["pos"]

    def available(self) -> int:
        return len(self.indices) - self.pos

    def _shuffled(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch, self.reader])
            self._order = (self.epoch, self.indices[rng.permutation(len(self.indices))])
        return self._order[1]

    def read(self, n: int) -> list[Any]:
        texts: list[Any] = []
        while len(texts) < n:
            take = self._shuffled()[self.pos : self.pos + n - len(texts)]
            texts += self.source.data[take.tolist()][self.source.column]
            self.pos += len(take)
            if self.pos == len(self.indices):
                self._next_epoch()
                self.pos = 0
        return self._note(texts)


class _StreamReader(_Reader):
    """A streaming source's share for one reader, resumable at any document."""

    BATCH = 256  # rows per record batch read from `datasets`

    def __init__(self, source: Source, reader: int, readers: int, seed: int) -> None:
        super().__init__(source, reader, readers, seed)
        self.data = split_dataset_by_node(source.data, rank=reader, world_size=readers)
        self._batch_state: dict | None = None  # datasets' state before the current record batch (None: start)
        self._batch: list[Any] = []
        self._idx = 0  # documents of the current batch already returned
        self._it: Iterator[dict] | None = None

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "hf": self._batch_state, "idx": self._idx}

    def seek(self, position: dict[str, Any]) -> None:
        self.epoch = position["epoch"]
        self._start(position["hf"])
        if position["idx"]:
            self._next_batch()
            self._idx = position["idx"]

    def available(self) -> int:
        return 2**62  # unknown until the end is reached

    def _start(self, hf_state: dict | None) -> None:
        self.data.set_epoch(self.epoch)
        if hf_state is not None:
            self.data.load_state_dict(hf_state)
        # .iter() reads record batches, without datasets' own split across torch workers (done above).
        self._it = iter(self.data.iter(batch_size=self.BATCH))
        self._batch_state, self._batch, self._idx = hf_state, [], 0

    def _next_batch(self) -> bool:
        assert self._it is not None
        state = self.data.state_dict() if self._batch else self._batch_state
        with _reading(self.source.name, self.source.locate):
            batch = next(self._it, None)
        if batch is None:
            return False
        for text in batch[self.source.column]:
            _check_text(self.source.name, self.source.column, text)
        self._batch_state, self._batch, self._idx = state, batch[self.source.column], 0
        return True

    def read(self, n: int) -> list[Any]:
        if self._it is None:
            self._start(None)
        texts: list[Any] = []
        while len(texts) < n:
            if self._idx == len(self._batch) and not self._next_batch():
                if self._batch_state is None and not self._batch:
                    raise DataError(f"{self.source.name}: reader {self.reader} of {self.readers} got no documents; "
                                    "use fewer --training.num_workers or ranks")
                self._next_epoch()
                self._start(None)
                continue
            take = self._batch[self._idx : self._idx + n - len(texts)]
            texts += take
            self._idx += len(take)
        return self._note(texts)


class _DocStream:
    """The documents of all sources for one reader, mixed with the given probabilities."""

    def __init__(self, sources: list[Source], probs: list[float], reader: int, readers: int, seed: int) -> None:
        self.readers = [(_StreamReader if isinstance(s.data, datasets.IterableDataset) else _MapReader)(
            s, reader, readers, seed) for s in sources]
        self.probs, self.seed, self.reader = np.asarray(probs), seed, reader
        self.k = 0  # documents drawn so far
        self._block: tuple[int, np.ndarray] | None = None

    def position(self) -> dict[str, Any]:
        return {"k": self.k, "sources": [r.position() for r in self.readers]}

    def seek(self, position: dict[str, Any]) -> None:
        self.k = position["k"]
        for r, p in zip(self.readers, position["sources"]):
            r.seek(p)

    def _choices(self, n: int) -> np.ndarray:
        """The sources of documents k..k+n-1: a function of (seed, reader, k) alone, so a resumed run
        draws the same."""
        out: list[int] = []
        k = self.k
        while len(out) < n:
            block = k // MIX_BLOCK
            if self._block is None or self._block[0] != block:
                rng = np.random.default_rng([self.seed, self.reader, block])
                self._block = (block, rng.choice(len(self.probs), size=MIX_BLOCK, p=self.probs))
            take = self._block[1][k % MIX_BLOCK : k % MIX_BLOCK + n - len(out)]
            out += take.tolist()
            k += len(take)
        return np.asarray(out)

    def read(self, n: int) -> list[Any]:
        """The next documents' texts: n of them, or fewer so that no source crosses the end of an epoch
        inside one read (then a chunk's epochs are those of its start position)."""
        if len(self.readers) == 1:
            n = min(n, self.readers[0].available())
            self.k += n
            return self.readers[0].read(n)
        choices = self._choices(n)
        for i, r in enumerate(self.readers):
            picks = np.flatnonzero(choices == i)
            if len(picks) > r.available():
                choices = choices[: picks[r.available()]]
        self.k += len(choices)
        per_source = [iter(r.read(int((choices == i).sum()))) for i, r in enumerate(self.readers)]
        return [next(per_source[c]) for c in choices.tolist()]


# ---------------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ---------------------------------------------------------------------------------------------------------
def _encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Batched encoding without special tokens; the Rust tokenizer directly when there is one (fastest)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def special_tokens(tokenizer: Any) -> tuple[int | None, int]:
    """(BOS to prepend or None, EOS to append). BOS is used when the tokenizer has one distinct from EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which separates packed documents")
    bos = tokenizer.bos_token_id
    return (bos if bos is not None and bos != eos else None), eos


def pack_documents(docs: list[list[int]], bos: int | None, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] + doc + [EOS] for each doc, concatenated: (tokens int32, start offset of each document)."""
    extra = 1 + (bos is not None)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths + extra)
    starts = ends - lengths - extra
    out = np.empty(int(ends[-1]) if len(docs) else 0, dtype=np.int32)
    body = np.ones(len(out), dtype=bool)
    body[ends - 1] = False
    out[ends - 1] = eos
    if bos is not None:
        body[starts] = False
        out[starts] = bos
    out[body] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
    return out, starts


def segment_boundaries(doc_starts: np.ndarray, n: int, row_len: int, context_len: int) -> np.ndarray:
    """cu_seqlens over n flattened tokens: every row start, every document start, and a cut every
    `context_len` tokens inside a document (counted from its start). `doc_starts` is sorted and may begin
    below 0 (the document continued from the previous batch)."""
    cuts = [np.arange(0, n + 1, row_len), doc_starts[(doc_starts >= 0) & (doc_starts < n)]]
    ends = np.append(doc_starts[1:], n).clip(max=n)
    for start, end in zip(doc_starts.tolist(), ends.tolist()):
        if end - start > context_len:
            first = start + context_len * max(1, -(start // context_len))  # the first cut at or after 0
            cuts.append(np.arange(first, end, context_len))
    return np.unique(np.concatenate(cuts)).astype(np.int32)


class _TokenStream:
    """The packed token stream of one reader, with the position of its next token as a small dict."""

    def __init__(self, docs: _DocStream, encode: Callable[[list[str]], list[list[int]]], bos: int | None,
                 eos: int) -> None:
        self.docs, self.encode, self.bos, self.eos = docs, encode, bos, eos
        self.tokens = np.empty(0, dtype=np.int32)  # tokens[0] is the next token
        self.starts = np.empty(0, dtype=np.int64)  # document starts relative to tokens[0]; the first may be < 0
        self.chunks: deque[tuple[dict, int]] = deque()  # (stream position before the chunk, its token count)
        self.used = 0  # tokens of chunks[0] before tokens[0]

    def position(self) -> dict[str, Any]:
        if not self.chunks:
            return {"docs": self.docs.position(), "skip": 0}
        return {"docs": self.chunks[0][0], "skip": self.used}

    def seek(self, position: dict[str, Any]) -> None:
        self.docs.seek(position["docs"])
        self._fill(position["skip"])
        self._drop(position["skip"])

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n tokens and the starts (relative to them, sorted, maybe < 0) of their documents."""
        self._fill(n)
        tokens, starts = self.tokens[:n], self.starts[self.starts < n]
        self._drop(n)
        return tokens, starts

    def _fill(self, n: int) -> None:
        empty_since: int | None = None  # the epoch in which a run of chunks without text began
        while len(self.tokens) < n:
            position = self.docs.position()
            texts = [t for t in self.docs.read(CHUNK_DOCS) if _keep(t)]
            epoch = min(r.epoch for r in self.docs.readers)
            if texts:
                empty_since = None
            elif empty_since is None:
                empty_since = epoch
            elif epoch >= empty_since + 2:  # a whole pass over every source without text
                raise DataError(f"reader {self.docs.reader} (rank x worker) has only empty documents in its share; "
                                "use fewer --training.num_workers or ranks")
            new, new_starts = pack_documents(self.encode(texts), self.bos, self.eos)
            self.starts = np.concatenate([self.starts, new_starts + len(self.tokens)])
            self.tokens = np.concatenate([self.tokens, new])
            self.chunks.append((position, len(new)))

    def _drop(self, n: int) -> None:
        self.tokens, self.starts = self.tokens[n:], self.starts - n
        # Keep the start of the document the next token belongs to (varlen cuts count from it).
        self.starts = self.starts[max(0, int(np.searchsorted(self.starts, 0, side="right")) - 1):]
        self.used += n
        while self.chunks and self.used >= self.chunks[0][1]:
            self.used -= self.chunks[0][1]
            self.chunks.popleft()


class PackedDataset(torch.utils.data.IterableDataset):
    """Endless batches of packed token rows for one rank; every loader worker reads its own share."""

    def __init__(self, sources: list[Source], probs: list[float], tokenizer: Any, training: Training, *,
                 rank: int, world_size: int) -> None:
        super().__init__()
        self.sources, self.probs, self.tokenizer = sources, probs, tokenizer
        self.batch_size, self.seq_len = training.batch_size, training.seq_len
        self.varlen, self.context_len = training.varlen, training.context_len
        self.seed = 0 if training.seed is None else training.seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = training.num_workers  # 0: batches are made in the main process, as one reader
        self.workers = max(1, training.num_workers)
        self.bos, self.eos = special_tokens(tokenizer)
        for source in sources:
            if isinstance(source.data, datasets.Dataset) and len(source.data) < self.readers:
                raise DataError(f"{source.name}: {len(source.data)} documents cannot feed {self.readers} readers "
                                "(ranks x --training.num_workers); use fewer workers")
        self._resume: dict[str, Any] | None = None  # where to start (set by load_state_dict)
        self._stream: _TokenStream | None = None

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    def _reader(self) -> int:
        info = torch.utils.data.get_worker_info()
        return self.rank * self.workers + (info.id if info is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        position = self._stream.position() if self._stream else self._resume
        return {
            "lmlab_data": STATE_VERSION,
            "world_size": self.world_size,
            "workers": self.num_workers,
            "position": position,
            "epoch": _epoch(position) if position else 0,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """DataError unless `state` was written by a run with the same ranks and workers."""
        written = (state.get("lmlab_data"), state.get("world_size"), state.get("workers"))
        if written != (STATE_VERSION, self.world_size, self.num_workers):
            raise DataError(
                f"the checkpoint's data loader state is from {written[1]} ranks x {written[2]} workers and this run "
                f"has {self.world_size} x {self.num_workers}; resume with the same number of ranks and "
                "--training.num_workers (or leave the data state out of loading)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._resume, self._stream = state["position"], None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        docs = _DocStream(self.sources, self.probs, self._reader(), self.readers, self.seed)
        self._stream = _TokenStream(docs, _encoder(self.tokenizer), self.bos, self.eos)
        if self._resume is not None:
            self._stream.seek(self._resume)
        n = self.batch_size * self.seq_len
        while True:
            tokens, starts = self._stream.take(n)
            input_ids = torch.from_numpy(tokens.astype(np.int64)).view(self.batch_size, self.seq_len)
            batch = {"input_ids": input_ids, "labels": input_ids.clone()}
            if self.varlen:
                batch["cu_seqlens"] = torch.from_numpy(segment_boundaries(starts, n, self.seq_len, self.context_len))
            yield batch


def _epoch(position: dict[str, Any]) -> int:
    """The epoch of the next token: the highest epoch among the sources (map-style sources exactly,
    streaming ones as of the start of the current chunk)."""
    return max(source["epoch"] for source in position["docs"]["sources"])


def _mix_probs(training: Training, n: int) -> list[float]:
    if training.data_probs is None:
        return [1.0 / n] * n
    try:
        probs = [float(p) for p in training.data_probs.split(",")]
    except ValueError:
        raise DataError(f"--training.data_probs {training.data_probs!r}: expected comma-separated numbers") from None
    if len(probs) != n or any(p < 0 for p in probs) or sum(probs) <= 0:
        raise DataError(f"--training.data_probs needs {n} non-negative numbers (one per dataset), "
                        f"got {training.data_probs!r}")
    return [p / sum(probs) for p in probs]


class DataLoader(StatefulDataLoader):
    """A StatefulDataLoader over a PackedDataset that checks a state in the main process before loading it,
    so that a mismatch is a one-line DataError rather than an error inside a worker."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for state in _dataset_states(state_dict):
            self.dataset.check_state(state)
        super().load_state_dict(state_dict)


def build_dataloader(training: Training, tokenizer: Any, *, rank: int, world_size: int) -> DataLoader:
    """The training batches of one data-parallel rank: an endless StatefulDataLoader whose state_dict /
    load_state_dict resume exactly (with the same ranks and workers). Raises DataError."""
    sources = load_sources(training, rank)
    dataset = PackedDataset(sources, _mix_probs(training, len(sources)), tokenizer, training,
                            rank=rank, world_size=world_size)
    workers = training.num_workers
    if workers > 0:
        atexit.unregister(_kill_leftover_workers)  # registered once, and after multiprocessing's own handler
        atexit.register(_kill_leftover_workers)
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function on every construction
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return DataLoader(
            dataset,
            batch_size=None,  # workers yield whole batches
            num_workers=workers,
            prefetch_factor=training.prefetch_factor if workers > 0 else None,
            persistent_workers=training.persistent_workers and workers > 0,
            pin_memory=training.pin_memory,
            worker_init_fn=_ignore_stop_signals,
        )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGINT / SIGTERM (torch's own SIGTERM handler would kill them). A stop signal for
    the whole process group (torchrun's, a scheduler's) is the trainer's cue to save a checkpoint, which needs
    the workers alive; they end when the trainer closes the loader or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """Workers ignore SIGTERM, so multiprocessing's exit-time `terminate()` cannot end the workers of a loader
    still alive at exit (one kept by an exception's traceback, say) and its `join()` would wait forever.
    atexit runs this first (it was registered later), so kill them outright; they hold nothing to save."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


def data_epoch(loader: StatefulDataLoader) -> int:
    """The epoch of the data this rank is serving now (0 in the first pass; with several workers or
    sources, the highest), for logging."""
    return max((s["epoch"] for s in _dataset_states(loader.state_dict())), default=0)


def _dataset_states(state: Any) -> Iterator[dict[str, Any]]:
    """PackedDataset states nested anywhere in a StatefulDataLoader state (one per worker)."""
    if isinstance(state, dict):
        if "lmlab_data" in state:
            yield state
        else:
            for value in state.values():
                yield from _dataset_states(value)
