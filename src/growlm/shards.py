"""Prepared token data (``growlm data prepare``): the folder's layout, its typed manifest, and its reader.

A prepared folder ``DATA``::

    DATA/manifest.json      the record of everything below, written last and atomically: DATA is complete
                            exactly when it exists (prepare.py writes it, through write_manifest only)
    DATA/train/NNNNN.u16    token shards, one per prepare task, in task order (.u32 once the vocabulary
                            exceeds 65,536 ids); raw little-endian ids, an EOS after each document
    DATA/valid/NNNNN.u16    the documents held out by ``--valid-fraction``, in the same layout
    DATA/prepare.json       what the prepare was asked: compared on a rerun, so a changed tokenizer or
                            source is refused rather than mixed in
    DATA/tasks/  DATA/datatrove/   each task's record; datatrove's logs and completion markers

A split's token stream is the concatenation of its shards in the manifest's order. Training maps
the shards read-only (:func:`open_split`) after checking them against the manifest: the tokenizer
fingerprint, every shard's presence, size and sha256, and that no source still on disk has changed
since it was prepared. Each check fails in one line, before any step.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from growlm.errors import GrowlmError
from growlm.files import atomic_write_json, read_descriptor
from growlm.hashing import canonical_json
from growlm.store.records import validation_problem

FORMAT, VERSION = "growlm-prepared", 1
MANIFEST = "manifest.json"
PREPARE_JSON = "prepare.json"
SPLITS = ("train", "valid")
_HASH_BLOCK = 1 << 22

Count = Annotated[int, Field(ge=0, strict=True)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardRecord(_Record):
    """One token shard: its path relative to DATA, its size in tokens and documents, its sha256."""

    file: str
    tokens: Count
    documents: Count
    sha256: Sha256


class SplitRecord(_Record):
    """A split (train or valid): its shards in stream order and their totals."""

    tokens: Count
    documents: Count
    shards: list[ShardRecord]


class SourcePart(_Record):
    """The sha256 of bytes ``[start, end)`` of a source file (``file``: a data file's name inside a
    save_to_disk folder, "" for the source file itself). Each prepare task hashes the part it reads,
    so hashing scales with the workers as tokenizing does."""

    file: str
    start: Count
    end: Count
    sha256: Sha256


class SourceRecord(_Record):
    """A source file (or save_to_disk folder) as it was prepared. ``sha256`` is its content hash: the
    sha256 of the canonical JSON of its parts, which cover every byte (see :func:`parts_sha256`)."""

    path: str
    kind: Literal["text", "jsonl", "parquet", "arrow", "arrow-dir"]
    size: Count
    mtime_ns: Count
    sha256: Sha256
    parts: list[SourcePart]
    tokens: Count
    documents: Count
    unk: Count


class TokenizerRecord(_Record):
    fingerprint: Sha256
    vocab_size: Annotated[int, Field(gt=0, strict=True)]
    eos_id: Count
    path: str


class Totals(_Record):
    tokens: Count
    documents: Count
    shards: Count
    source_bytes: Count


class PrepareOptions(_Record):
    shuffle: bool
    valid_fraction: Annotated[float, Field(ge=0, lt=1)]
    tasks: Annotated[int, Field(gt=0, strict=True)]


class Manifest(_Record):
    """``DATA/manifest.json``: tokenizer fingerprint, each source's content hash, each shard's token count
    and sha256, the totals and the command that prepared it."""

    format: Literal["growlm-prepared"] = FORMAT
    version: Literal[1] = VERSION
    tokenizer: TokenizerRecord
    token_bytes: Literal[2, 4]
    sources: list[SourceRecord]
    splits: dict[Literal["train", "valid"], SplitRecord]
    totals: Totals
    options: PrepareOptions
    command: str
    datatrove: str


# ----------------------------------------------------------------------------------------------
# the manifest: one writer, one reader


def write_manifest(data_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``DATA/manifest.json`` all or nothing; the folder is complete from then on."""
    path = Path(data_dir) / MANIFEST
    atomic_write_json(path, manifest.model_dump(mode="json"))
    return path


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a folder made by ``growlm data prepare`` (finished or not)."""
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / PREPARE_JSON).is_file())


def read_manifest(data_dir: str | Path) -> Manifest:
    """The typed manifest of a prepared folder, or a one-line error (unfinished, unreadable, not valid)."""
    d = Path(data_dir)
    f = d / MANIFEST
    if not f.is_file():
        if (d / PREPARE_JSON).is_file():
            raise GrowlmError(f"{d} is not finished preparing (no {MANIFEST}); rerun the growlm data prepare "
                              f"command that made it to complete it")
        raise GrowlmError(f"{d} is not a prepared data folder (no {MANIFEST})")
    raw = read_descriptor(f, FORMAT, "prepared data")
    if raw.get("version") != VERSION:
        raise GrowlmError(f"{f} has version {raw.get('version')!r}; this growlm reads version {VERSION}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise GrowlmError(f"{f} is corrupt: {validation_problem(e)}") from None


# ----------------------------------------------------------------------------------------------
# content hashes of the sources


def sha256_range(path: str | Path, start: int, end: int) -> str:
    """sha256 of bytes ``[start, end)`` of a file, streamed (fewer bytes, if the file is shorter now)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (block := f.read(min(left, _HASH_BLOCK))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def parts_sha256(parts: list[SourcePart]) -> str:
    """A source's content hash from its parts (sorted by file and offset, so task order does not matter)."""
    rows = sorted([p.file, p.start, p.end, p.sha256] for p in parts)
    return hashlib.sha256(canonical_json(rows)).hexdigest()


def source_stat(path: str | Path, kind: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a source as prepare records it: a save_to_disk folder counts its ``.arrow``
    files' bytes and their latest mtime. None when it is gone."""
    p = Path(path)
    try:
        if kind != "arrow-dir":
            st = p.stat()
            return st.st_size, st.st_mtime_ns
        stats = [f.stat() for f in sorted(p.glob("*.arrow"))]
    except OSError:
        return None
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def _check_sources(data_dir: Path, manifest: Manifest) -> None:
    """A source still on disk whose size or mtime moved is hashed again; changed content is refused.
    A source that is gone is not an error: a prepared folder stands alone."""
    for s in manifest.sources:
        if source_stat(s.path, s.kind) in (None, (s.size, s.mtime_ns)):
            continue
        root = Path(s.path)
        try:
            now = parts_sha256([p.model_copy(update={"sha256": sha256_range(root / p.file if p.file else root,
                                                                            p.start, p.end)}) for p in s.parts])
        except OSError:
            now = None
        if now != s.sha256:
            raise GrowlmError(f"source {s.path} changed since {data_dir} was prepared from it (content sha256 "
                              f"{s.sha256[:12]}…, now {'unreadable' if now is None else now[:12] + '…'}); nothing trains "
                              f"on stale tokens: prepare it again into a new --out")


# ----------------------------------------------------------------------------------------------
# reading a split

# Shards this process has verified (path, size, mtime_ns, inode) -> sha256: each stage opens its data again
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def _stamp_path(stamp_dir: Path, data_dir: Path) -> Path:
    return stamp_dir / f"prepared-{hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]}.json"


def _load_stamps(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        stamps = json.loads(path.read_text(encoding="utf-8"))
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def _verify_sha256(data_dir: Path, shards: list[tuple[ShardRecord, Path, os.stat_result]],
                   stamp_dir: Path | None) -> None:
    """Every shard's sha256 against the manifest. A shard verified before with the same (size, mtime, inode),
    in this process or in a stamp file under ``stamp_dir`` (a run's cache), is not read again: a resumed
    run does not hash a few hundred GB anew, and a shard written since has another mtime."""
    stamp_file = _stamp_path(stamp_dir, data_dir) if stamp_dir is not None else None
    stamps = _load_stamps(stamp_file)
    fresh = False
    for rec, path, st in shards:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if _VERIFIED.get(key) == rec.sha256 or stamps.get(rec.file) == [*key[1:], rec.sha256]:
            _VERIFIED[key] = rec.sha256
            continue
        digest = sha256_range(path, 0, st.st_size)
        if digest != rec.sha256:
            raise GrowlmError(f"shard {path} does not match {data_dir / MANIFEST} (sha256 {digest[:12]}…, recorded "
                              f"{rec.sha256[:12]}…); nothing trains on damaged tokens: prepare the data again")
        _VERIFIED[key] = rec.sha256
        stamps[rec.file] = [*key[1:], rec.sha256]
        fresh = True
    if fresh and stamp_file is not None:
        try:  # a stamp only saves time: a cache that cannot be written is no error
            stamp_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stamp_file, stamps)
        except (OSError, GrowlmError):
            pass


def open_split(data_dir: str | Path, split: str, tokenizer: Any, *, verify: bool = True,
               stamp_dir: str | Path | None = None) -> list[np.memmap]:
    """The shards of ``split`` ("train" or "valid") of a prepared folder, as read-only memmaps in stream order.

    Refused in one line: an unfinished or corrupt folder, another tokenizer than ``tokenizer`` (its
    fingerprint), a split the folder does not have, a shard missing or of the wrong size, and, with
    ``verify``, a shard whose sha256 differs from the manifest or a source that changed since it was
    prepared (data-parallel ranks other than 0 pass ``verify=False``: rank 0 has checked before them).
    """
    d = Path(data_dir)
    m = read_manifest(d)
    if m.tokenizer.fingerprint != tokenizer.fingerprint:
        raise GrowlmError(f"{d} was prepared with another tokenizer (fingerprint {m.tokenizer.fingerprint[:12]}…, from "
                          f"{m.tokenizer.path}) than this one ({tokenizer.fingerprint[:12]}…); prepare it again with "
                          f"--tokenizer naming this plan's tokenizer")
    if split not in m.splits:
        have = ", ".join(m.splits) or "none"
        hint = " (it was prepared without --valid-fraction)" if split == "valid" else ""
        raise GrowlmError(f"{d} has no {split} split{hint}; its splits: {have}")
    dtype = np.dtype("<u2" if m.token_bytes == 2 else "<u4")
    shards = []
    for rec in m.splits[split].shards:
        path = d / rec.file
        try:
            st = path.stat()
        except OSError:
            raise GrowlmError(f"shard {path} listed in {d / MANIFEST} is missing; prepare the data again") from None
        if st.st_size != rec.tokens * m.token_bytes:
            raise GrowlmError(f"shard {path} holds {st.st_size:,} bytes, {d / MANIFEST} records {rec.tokens:,} tokens "
                              f"({rec.tokens * m.token_bytes:,} bytes): it is truncated or damaged; prepare the data again")
        shards.append((rec, path, st))
    if verify:
        _verify_sha256(d, shards, Path(stamp_dir) if stamp_dir is not None else None)
        _check_sources(d, m)
    return [np.memmap(path, dtype=dtype, mode="r") for rec, path, _ in shards if rec.tokens]
