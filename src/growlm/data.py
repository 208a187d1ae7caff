"""Training data: documents from text/JSONL/parquet/Arrow, token shards, packed deterministic batches.

Pipeline::

    file --iter_documents--> documents --tokenize_file--> CACHE/<key>.u16 (memmap, EOS after each document)
    prepared DATA folder (growlm data prepare, growlm.prepare) --open_split--> DATA/train/*.u16 (memmap)
    sources (weighted lists of files or prepared folders) --Batches--> fixed-length (x, y) batches, resumable

The per-file cache suits small data: shards are named by a hash of (file content, tokenizer fingerprint,
reader kind, format version), so a changed file or tokenizer never reuses stale tokens, and are written
atomically (temp file + rename), so a killed run never leaves a shard that looks complete. A prepared
folder holds the same tokens, made ahead by many workers: both paths encode with :func:`encode_batches`,
so the same files give the same token stream, and the same stream gives the same batches.

Batch order is a pure function of the seed and two kinds of counters: the global row index picks
each row's source (mixture), and each source's cursor (sequences consumed so far) picks the next
sequence from the per-epoch permutation of that source (:func:`permute`, computed index by index for a
large source, so memory never grows with the corpus). ``Batches.state_dict()`` is therefore just those
counters, and resuming from it reproduces the exact same subsequent batches, on any number of ranks
(every rank simulates the whole global batch and gathers only its rows ``rank::world_size``).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from growlm import distributed
from growlm.corpus import iter_text_chunks, regular_file
from growlm.errors import GrowlmError, one_line
from growlm.files import atomic_file
from growlm.hashing import canonical_json, sha256_file
from growlm.shards import is_prepared, open_split

SHARD_VERSION = 1
STATE_VERSION = 1

# Text is read in chunks of this many characters; documents are encoded in batches of about
# _BATCH_CHARS characters (one Rust call, parallel across documents) and written out at once, so
# memory stays bounded by these, not by the file.
_CHUNK_CHARS = 1 << 20
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 8192
_ROW_BATCH = 1024  # parquet rows per read
# A run of text with no space or newline longer than this is cut anyway (bounded memory beats
# keeping a token that straddles the cut whole; real text never gets here).
_MAX_CARRY = 4 * _CHUNK_CHARS
_CUT_CHARS = (" ", "\n")


# ----------------------------------------------------------------------------------------------
# documents


def check_data_file(p: Path) -> None:
    """A data path must be a non-empty regular file or a folder (a datasets save_to_disk folder, or a
    prepared DATA folder, checked by :func:`data_kind`); a FIFO or device would block the reader, so it is
    refused here."""
    if p.is_dir():
        return
    if regular_file(p, "data file").st_size == 0:
        raise GrowlmError(f"data file is empty: {p}")


def data_kind(p: Path) -> str:
    """How ``p`` is read: 'text', 'jsonl', 'parquet', 'arrow' (one stream file), 'arrow-dir' (a save_to_disk
    folder) or 'prepared' (a folder made by ``growlm data prepare``: tokens, not documents)."""
    if p.is_dir():
        if is_prepared(p):
            return "prepared"
        if (p / "dataset_dict.json").is_file():
            raise GrowlmError(f"{p} is a datasets DatasetDict folder; point at one split folder inside it (e.g. {p / 'train'})")
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
            return "arrow-dir"
        raise GrowlmError(f"{p} is a folder but not a datasets save_to_disk folder (no dataset_info.json or state.json) "
                          f"nor a prepared data folder (no manifest.json)")
    suffix = p.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}.get(suffix, "text")


def arrow_files(d: Path) -> list[Path]:
    """The data files of a save_to_disk folder, in the order state.json lists them (else by name)."""
    names: list[str] = []
    state = d / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise GrowlmError(f"cannot read {state}: {one_line(e)}") from None
    files = [d / n for n in names] if names else sorted(d.glob("*.arrow"))
    if not files:
        raise GrowlmError(f"datasets folder {d} has no .arrow data files")
    for f in files:
        check_data_file(f)
    return files


def _cut_pieces(chunks: Iterable[str], cut_chars: Sequence[str]) -> Iterator[str]:
    """Chunks of text re-cut just after one of ``cut_chars``; a run of more than ``_MAX_CARRY`` characters
    without one is cut anyway, so memory stays bounded by the chunk size whatever the text."""
    carry = ""
    for chunk in chunks:
        buf = carry + chunk
        cut = max((buf.rfind(c) for c in cut_chars), default=-1) + 1
        if cut == 0 and len(buf) > _MAX_CARRY:
            cut = len(buf)
        if cut:
            yield buf[:cut]
        carry = buf[cut:]
    if carry:
        yield carry


def text_pieces(p: Path, cut_chars: Sequence[str] = _CUT_CHARS, what: str = "corpus file",
                chunk_chars: int | None = None) -> Iterator[str]:
    """The text of ``p`` in pieces of about ``chunk_chars`` (default ``_CHUNK_CHARS``) characters,
    each cut just after one of ``cut_chars`` (space, newline).

    When no multi-character token contains a cut character, encoding the pieces one by one gives
    the same ids as encoding the whole file. A run of more than ``_MAX_CARRY`` characters without
    one is cut anyway, so memory stays bounded by the chunk size whatever the text.
    """
    return _cut_pieces(iter_text_chunks(p, chunk_chars=chunk_chars or _CHUNK_CHARS, what=what), cut_chars)


def _range_chunks(p: Path, start: int, end: int) -> Iterator[str]:
    """The UTF-8 text of bytes ``[start, end)`` of ``p`` in chunks of at most ``_CHUNK_CHARS`` characters; bad
    UTF-8 is named with its offset in the whole file. The bounds fall just after an ASCII byte, so on
    character boundaries (prepare cuts there)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        f = open(p, "rb")  # noqa: SIM115 (closed by the with below; open errors need their own message)
    except OSError as e:
        raise GrowlmError(f"cannot read data file {p}: {e.strerror or e}") from None
    with f:
        f.seek(start)
        pos = start
        while pos < end:
            block = f.read(min(_CHUNK_CHARS, end - pos))
            final = not block or pos + len(block) >= end
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final)
            except UnicodeDecodeError as e:
                raise GrowlmError(f"data file {p} is not UTF-8: invalid byte 0x{e.object[e.start]:02x} at byte offset "
                                  f"{pos - pending + e.start}") from None
            if text:
                yield text
            if not block:  # the file shrank under us: prepare's stat check refuses that on the next run
                return
            pos += len(block)


def _line_number(p: Path, offset: int) -> int:
    """The 1-based line holding byte ``offset`` of ``p`` (counted only for an error message)."""
    lines, left = 1, offset
    with open(p, "rb") as f:
        while left > 0 and (block := f.read(min(left, _CHUNK_CHARS))):
            lines += block.count(b"\n")
            left -= len(block)
    return lines


def _jsonl_documents(p: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The documents of the lines in bytes ``[start, end)`` of a JSONL file (``start`` begins a line)."""
    offset = start
    with open(p, "rb") as f:
        f.seek(start)
        for raw in f:
            if end is not None and offset >= end:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GrowlmError(
                    f"{p} is not UTF-8: invalid byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                    f"(line {_line_number(p, offset)})"
                ) from None
            where = offset
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise GrowlmError(f"bad JSON on line {_line_number(p, where)} of {p}: {one_line(e)}") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise GrowlmError(f'line {_line_number(p, where)} of {p} has no "text" field')
            if not isinstance(obj["text"], str):
                raise GrowlmError(f'"text" on line {_line_number(p, where)} of {p} is {type(obj["text"]).__name__}, '
                                  f'not a string')
            yield obj["text"]


def _text_column(schema: pa.Schema, where: Path) -> int:
    i = schema.get_field_index("text")
    if i < 0:
        raise GrowlmError(f"{where} has no 'text' column (columns: {', '.join(schema.names) or 'none'})")
    if not (pa.types.is_string(schema.field(i).type) or pa.types.is_large_string(schema.field(i).type)):
        raise GrowlmError(f"'text' column of {where} holds {schema.field(i).type}, not strings")
    return i


def _column_texts(column: pa.Array) -> Iterator[str]:
    # Null rows carry no text: skipped rather than turned into empty documents.
    return (t for t in column.to_pylist() if t is not None)


def _parquet_documents(p: Path, row_groups: Sequence[int] | None = None) -> Iterator[str]:
    """The ``text`` column of a parquet file (of the given row groups only, when given)."""
    try:
        pf = pq.ParquetFile(p)
        _text_column(pf.schema_arrow, p)
        groups = list(row_groups) if row_groups is not None else None
        for batch in pf.iter_batches(batch_size=_ROW_BATCH, columns=["text"], row_groups=groups):
            yield from _column_texts(batch.column(0))
    except (pa.ArrowException, OSError) as e:
        raise GrowlmError(f"cannot read parquet file {p}: {one_line(e)}") from None


def _arrow_documents(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                reader = pa.ipc.open_stream(src)
                i = _text_column(reader.schema, f)
                for batch in reader:
                    yield from _column_texts(batch.column(i))
        except (pa.ArrowException, OSError) as e:
            raise GrowlmError(f"cannot read Arrow stream file {f}: {one_line(e)}") from None


def iter_documents(path: str | Path) -> Iterator[str]:
    """Stream the documents of a data file in bounded memory.

    ``.jsonl``: the ``text`` field of each non-blank line; ``.parquet``: the ``text`` column, read in
    row batches; ``.arrow`` or a ``datasets`` ``save_to_disk`` folder: the ``text`` column of its
    Arrow stream files; anything else is UTF-8 text, which is ONE document yielded in pieces cut
    after whitespace (their concatenation is the file). Raises :class:`GrowlmError` naming the file
    for a missing or empty file, a missing ``text`` field or column, a bad JSON line (with its
    number) or invalid UTF-8 (with its byte offset); errors surface when the bad part is reached.
    """
    p = Path(path)
    check_data_file(p)
    kind = data_kind(p)
    if kind == "prepared":
        raise GrowlmError(f"{p} is a prepared data folder (token shards, not documents); name the text it was "
                          f"prepared from here")
    if kind == "text":
        return text_pieces(p)
    if kind == "jsonl":
        return _jsonl_documents(p)
    if kind == "parquet":
        return _parquet_documents(p)
    return _arrow_documents(arrow_files(p) if kind == "arrow-dir" else [p])


def part_documents(path: str | Path, kind: str, *, start: int = 0, end: int | None = None,
                   row_groups: Sequence[int] | None = None) -> Iterator[str]:
    """The documents of one part of a data file, read as :func:`iter_documents` reads the whole (``growlm data
    prepare`` gives each task a part). ``kind`` "text": the pieces of bytes ``[start, end)`` (one document's,
    cut after whitespace); "jsonl": the lines in bytes ``[start, end)``; "parquet": the rows of ``row_groups``;
    "arrow": one Arrow stream file. A part's bounds fall where prepare cut: after a space or newline (text),
    at a line start (JSONL).
    """
    p = Path(path)
    if kind == "text":
        return _cut_pieces(_range_chunks(p, start, p.stat().st_size if end is None else end), _CUT_CHARS)
    if kind == "jsonl":
        return _jsonl_documents(p, start, end)
    if kind == "parquet":
        return _parquet_documents(p, row_groups)
    if kind == "arrow":
        return _arrow_documents([p])
    raise ValueError(f"no parts of kind {kind!r}")


# ----------------------------------------------------------------------------------------------
# token shards


def default_cache_dir() -> Path:
    """``$GROWLM_CACHE/shards``, else ``~/.cache/growlm/shards``."""
    root = os.environ.get("GROWLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "growlm") / "shards"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _content_sha256(p: Path, kind: str) -> str:
    if kind != "arrow-dir":
        return sha256_file(p)
    h = hashlib.sha256()
    for f in arrow_files(p):
        h.update(canonical_json([f.name, sha256_file(f)]))
    return h.hexdigest()


def shard_path(path: str | Path, tokenizer: Any, cache_dir: str | Path | None = None) -> Path:
    """Where the token shard of ``path`` under ``tokenizer`` lives (it may not exist yet)."""
    p = Path(path)
    check_data_file(p)
    kind = data_kind(p)
    key = hashlib.sha256(canonical_json({
        "format": "growlm-shard", "version": SHARD_VERSION, "kind": kind,
        "content": _content_sha256(p, kind), "tokenizer": tokenizer.fingerprint,
    })).hexdigest()
    dtype = token_dtype(tokenizer.vocab_size)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.u{dtype.itemsize * 8}"


def encode_batches(docs: Iterable[tuple[str, bool]], tokenizer: Any, dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode ``(text, eos_after)`` pairs in batches of about ``_BATCH_CHARS`` characters (one Rust call each);
    yields each batch's tokens, an EOS after every text with ``eos_after``, and the end offset of each text's
    tokens in them. The one encoder of both the per-file cache and ``growlm data prepare``: the same texts give
    the same tokens on either path."""
    eos = tokenizer.eos_id
    texts: list[str] = []
    eos_flags: list[bool] = []
    chars = 0

    def flush() -> tuple[np.ndarray, np.ndarray]:
        flat: list[int] = []
        ends = np.empty(len(texts), dtype=np.int64)
        for k, (ids, add) in enumerate(zip(tokenizer.encode_batch(texts), eos_flags, strict=True)):
            flat.extend(ids)
            if add:
                flat.append(eos)
            ends[k] = len(flat)
        texts.clear()
        eos_flags.clear()
        return np.asarray(flat, dtype=dtype), ends

    for text, add in docs:
        texts.append(text)
        eos_flags.append(add)
        chars += len(text)
        if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
            yield flush()
            chars = 0
    if texts:
        yield flush()


MAX_UNK_FRACTION = 0.5


def tokenize_file(path: str | Path, tokenizer: Any, cache_dir: str | Path | None = None) -> np.memmap:
    """The tokens of a data file as a read-only 1-D memmap, tokenizing it once into the shard cache.

    Documents (see :func:`iter_documents`) are encoded in batches and streamed to the shard with
    ``tokenizer.eos_id`` after each; a plain text file is one document, so only its end gets an EOS.
    The shard is named by :func:`shard_path` and written atomically: if anything fails midway, no
    shard is left behind. A later call with the same content and tokenizer just maps the shard.
    """
    p = Path(path)
    out = shard_path(p, tokenizer, cache_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    if not (out.is_file() and out.stat().st_size > 0 and out.stat().st_size % dtype.itemsize == 0):
        out.parent.mkdir(parents=True, exist_ok=True)
        n = n_unk = 0
        with atomic_file(out) as f:
            # a text file is one document (its pieces get no EOS, its end one); any other holds documents
            text = data_kind(p) == "text"
            docs = itertools.chain(((d, not text) for d in iter_documents(p)), [("", True)] if text else [])
            for arr, _ in encode_batches(docs, tokenizer, dtype):
                f.write(arr.tobytes())
                n += arr.size
                n_unk += int(np.count_nonzero(arr == tokenizer.unk_id))
            # Unknown characters become <unk> (the tokenizer's documented rule); a file that is mostly
            # <unk> would train on nothing, so it is refused before it reaches the cache.
            if n and n_unk / n > MAX_UNK_FRACTION:
                raise GrowlmError(f"{p}: {n_unk / n:.0%} of its tokens are <unk> (characters outside the tokenizer's "
                                  f"vocabulary); build the tokenizer with this file in its corpus")
    return np.memmap(out, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------------------------
# packing


def token_arrays(paths: Sequence[Path], tokenizer: Any, cache_dir: Path, split: str = "train") -> list[np.ndarray]:
    """The token stream of ``paths`` as memmapped arrays, in order: a data file's cached shard (tokenized on
    first use), a prepared folder's shards of ``split`` (checked against its manifest; data-parallel rank 0
    verifies their sha256 and the sources, the others read what it checked)."""
    arrays: list[np.ndarray] = []
    for p in paths:
        if is_prepared(p):
            arrays.extend(open_split(p, split, tokenizer, verify=distributed.world()[0] == 0, stamp_dir=cache_dir))
        else:
            arrays.append(tokenize_file(p, tokenizer, cache_dir))
    return arrays


class _Packed:
    """The concatenated tokens of some files or prepared folders, cut into non-overlapping sequences of
    ``seq_len`` tokens."""

    def __init__(self, paths: Sequence[Path], tokenizer: Any, cache_dir: Path, seq_len: int, what: str,
                 split: str = "train") -> None:
        self.shards = token_arrays(paths, tokenizer, cache_dir, split)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.seq_len = seq_len
        self.n_tokens = int(self.starts[-1])
        self.n_sequences = self.n_tokens // seq_len
        if self.n_sequences == 0:
            names = ", ".join(str(p) for p in paths)
            raise GrowlmError(
                f"{what} ({names}) has only {self.n_tokens} tokens; at least context+1 = {seq_len} are needed"
            )

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """int64 tensor [len(ids), seq_len] of the given sequences."""
        out = np.empty((len(ids), self.seq_len), dtype=np.int64)
        for r, i in enumerate(ids):
            start = int(i) * self.seq_len
            end = start + self.seq_len
            f = int(np.searchsorted(self.starts, start, side="right")) - 1
            # A sequence may run across file boundaries: copy it piece by piece.
            pos = 0
            while pos < self.seq_len:
                lo = start + pos - int(self.starts[f])
                take = min(end - start - pos, len(self.shards[f]) - lo)
                out[r, pos : pos + take] = self.shards[f][lo : lo + take]
                pos += take
                f += 1
        return torch.from_numpy(out)


def _split_xy(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# A source of at most this many sequences draws each epoch's order as numpy's permutation (held in memory,
# 32 MB at most, and the order of every run made before prepared data existed, so those resume as they were);
# a larger one computes it index by index with a keyed Feistel network (no memory at all).
MATERIALISE_MAX = 1 << 22
_FEISTEL_ROUNDS = 4


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, 4**half): a balanced Feistel network of ``half``-bit halves."""
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    with np.errstate(over="ignore"):
        for r in range(_FEISTEL_ROUNDS):
            k = np.uint64((key + (r + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1))
            left, right = right, left ^ (_mix64(right + k) & mask)
    return (left << np.uint64(half)) | right


def permute(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """Where ``positions`` (each in [0, n)) go under the permutation of [0, n) drawn from ``key``: the values
    ``perm[positions]`` of one fixed permutation ``perm``, a pure function of (n, key).

    Up to :data:`MATERIALISE_MAX` it is numpy's ``default_rng(key).permutation(n)``; above, a Feistel network
    over the next even power of two, cycle-walked into [0, n) (each step lands in [0, n) with probability
    above 1/4), so any index is computed in a few vector operations and nothing of size n is ever held.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if n <= MATERIALISE_MAX:
        return np.random.default_rng(key).permutation(n)[positions]
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    out = _feistel(positions.astype(np.uint64), half, key)
    while (outside := out >= np.uint64(n)).any():
        out[outside] = _feistel(out[outside], half, key)
    return out.astype(np.int64)


def _key(*parts: Any) -> int:
    """A 64-bit key derived from ``parts`` (stable across platforms and Python runs)."""
    return int.from_bytes(hashlib.sha256(canonical_json(list(parts))).digest()[:8], "little")


def _uniforms(key: int, counters: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per counter: splitmix64 of (key, counter), a pure function of both."""
    with np.errstate(over="ignore"):
        z = counters.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class Source:
    """Files (or prepared folders, their train split) whose concatenated tokens form one stream of the training
    mixture, with its weight."""

    paths: list[Path]
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]


def check_batch_split(batch_size: int, world_size: int) -> None:
    """The global batch is split evenly across data-parallel ranks, or it is an error."""
    if batch_size % world_size:
        raise GrowlmError(f"batch_size {batch_size} is not divisible by the world size {world_size}; "
                          f"the global batch is split evenly across ranks")


class Batches:
    """Fixed-length packed sequences from weighted sources, in a deterministic order from the seed.

    Each source's files are tokenized (cached shards) or its prepared folders mapped, concatenated, then cut
    into non-overlapping sequences of ``context + 1`` tokens. Row ``r`` of the global stream comes from source
    ``s`` with probability ∝ ``weight`` (drawn from a hash of (seed, r)); within a source, epoch ``e`` visits
    its sequences in a permutation seeded by (seed, source index, e) (:func:`permute`). With ``world_size`` W,
    rank k gets rows ``k::W`` of every global batch of ``batch_size`` rows. Memory holds no token and no
    per-sequence table of a large source: its shards are memmapped, its order computed index by index.
    """

    def __init__(self, sources: list[Source], tokenizer: Any, *, context: int, batch_size: int, seed: int,
                 cache_dir: Path, rank: int = 0, world_size: int = 1) -> None:
        if not sources:
            raise GrowlmError("no training data: the list of sources is empty")
        if context < 1 or batch_size < 1:
            raise GrowlmError(f"context and batch_size must be positive, got context={context}, batch_size={batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise GrowlmError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        check_batch_split(batch_size, world_size)
        for i, s in enumerate(sources):
            if not s.paths:
                raise GrowlmError(f"source {i} has no files")
            if not (math.isfinite(s.weight) and s.weight > 0):
                raise GrowlmError(f"source {i} ({', '.join(map(str, s.paths))}) has weight {s.weight}; weights must be positive")
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.sources = [
            _Packed(s.paths, tokenizer, Path(cache_dir), context + 1, f"source {i}") for i, s in enumerate(sources)
        ]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        with np.errstate(over="ignore"):
            total = weights.sum()
        if not np.isfinite(total):  # huge weights overflow the sum: scale them down first (only then, so
            weights = weights / weights.max()  # every other mixture draws exactly as before)
        self._cum = np.cumsum(weights / weights.sum())
        self._mix_key = _key("mix", seed)
        self._rows = 0  # global rows drawn so far (all ranks)
        self._cursors = [0] * len(self.sources)  # sequences consumed per source (all ranks)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)
        self.last_sequence_ids: list[tuple[int, int]] = []
        """(source index, sequence index) of each row of the last batch of this rank: equal ids, equal rows."""

    @property
    def n_sequences(self) -> int:
        """Number of distinct sequences over all sources."""
        return sum(s.n_sequences for s in self.sources)

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one GLOBAL batch (all ranks): ``batch_size * context``."""
        return self.batch_size * self.context

    @property
    def epochs(self) -> list[float]:
        """Passes made over each source so far (1.0 = every sequence seen once)."""
        return [c / s.n_sequences for c, s in zip(self._cursors, self.sources, strict=True)]

    def _order(self, source: int, cursors: np.ndarray) -> np.ndarray:
        """The sequence each of ``cursors`` (sequences consumed so far from ``source``) reads: epoch
        ``cursor // n`` visits the source in its own permutation, seeded by (seed, source, epoch)."""
        n = self.sources[source].n_sequences
        out = np.empty(len(cursors), dtype=np.int64)
        for epoch in np.unique(cursors // n).tolist():
            at = cursors // n == epoch
            cached = self._perms.get(source)
            if n <= MATERIALISE_MAX:  # today's order, drawn once per epoch and kept while the epoch lasts
                if cached is None or cached[0] != epoch:
                    cached = self._perms[source] = (epoch, permute(np.arange(n), n, _key("perm", self.seed, source, epoch)))
                out[at] = cached[1][cursors[at] % n]
            else:
                out[at] = permute(cursors[at] % n, n, _key("perm", self.seed, source, epoch))
        return out

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch: x, y int64 [batch_size // world_size, context]."""
        if len(self.sources) == 1:
            choice = np.zeros(self.batch_size, dtype=np.int64)
        else:
            u = _uniforms(self._mix_key, np.arange(self._rows, self._rows + self.batch_size))
            choice = np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.sources) - 1)
        # Every rank walks the whole global batch so that the cursors stay identical everywhere.
        seq = np.empty(self.batch_size, dtype=np.int64)
        for s in np.unique(choice).tolist():
            at = np.flatnonzero(choice == s)
            seq[at] = self._order(s, self._cursors[s] + np.arange(len(at)))
            self._cursors[s] += len(at)
        ids = list(zip(choice.tolist(), seq.tolist(), strict=True))
        self._rows += self.batch_size
        mine = ids[self.rank :: self.world_size]
        self.last_sequence_ids = mine
        rows = torch.empty((len(mine), self.context + 1), dtype=torch.int64)
        for s, packed in enumerate(self.sources):
            at = [r for r, (src, _) in enumerate(mine) if src == s]
            if at:
                rows[at] = packed.rows([mine[r][1] for r in at])
        return _split_xy(rows)

    def state_dict(self) -> dict:
        """The position in the stream, as JSON-serialisable counters (plus what they are valid for)."""
        return {
            "version": STATE_VERSION,
            "rows": self._rows,
            "cursors": list(self._cursors),
            "seed": self.seed,
            "context": self.context,
            "n_sequences": [s.n_sequences for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by :meth:`state_dict` (any batch size or world size).

        Raises :class:`GrowlmError` if the state was saved for other data, seed or context.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise GrowlmError(f"unsupported data state (version {state.get('version') if isinstance(state, dict) else None!r})")
        mine = self.state_dict()
        for k in ("seed", "context", "n_sequences"):
            if state.get(k) != mine[k]:
                raise GrowlmError(f"saved data state does not match the data: {k} was {state.get(k)}, now {mine[k]}")
        self._rows = int(state["rows"])
        self._cursors = [int(c) for c in state["cursors"]]
        self.last_sequence_ids = []


def validation_batches(paths: Sequence[str | Path], tokenizer: Any, *, context: int, batch_size: int,
                       cache_dir: Path, max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: the files' sequences of ``context + 1`` tokens, in order, non-overlapping (a
    prepared folder gives its valid split).

    Only full batches are kept (so every batch weighs the same in a mean), except that data too small
    for one full batch gives a single smaller batch. ``max_batches`` keeps only the first ones.
    """
    if not paths:
        raise GrowlmError("no validation files given")
    if context < 1 or batch_size < 1:
        raise GrowlmError(f"context and batch_size must be positive, got context={context}, batch_size={batch_size}")
    packed = _Packed([Path(p) for p in paths], tokenizer, Path(cache_dir), context + 1, "validation data", "valid")
    n = packed.n_sequences
    bounds = [(a, a + batch_size) for a in range(0, n - batch_size + 1, batch_size)] or [(0, n)]
    if max_batches is not None:
        bounds = bounds[:max_batches]
    return [_split_xy(packed.rows(range(a, b))) for a, b in bounds]
