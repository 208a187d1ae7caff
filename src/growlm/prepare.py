"""``growlm data prepare``: token shards made ahead of training, on datatrove (local workers, a Slurm array, Ray).

::

    SOURCES (files, folders, globs) --plan--> DATA/prepare.json: the sources and their parts, one part a task
    task t (datatrove): PartReader (growlm.data.part_documents) --> ShardWriter (growlm's tokenizer, encode_batches)
                        --> DATA/train/t.u16 [and DATA/valid/t.u16], then DATA/tasks/t.json, then datatrove's
                            completion marker DATA/datatrove/completions/t
    all tasks done --finalize--> DATA/manifest.json (growlm.shards.write_manifest; the folder is complete)

The work is split into parts of about :data:`PART_BYTES` of source bytes: a text or JSONL file is cut at byte
offsets just after a space or newline (text) or at a line start (JSONL), a parquet file between row groups, a
save_to_disk folder at its Arrow files. Concatenating the tasks' shards in task order gives the sources' token
stream in their given order, exactly what the per-file cache gives the same files (one encoder,
:func:`growlm.data.encode_batches`), whatever the number of workers or machines.

Resume is datatrove's: a task is done when its completion marker exists, and a rerun of the same command
skips it. A shard appears by atomic rename, its task record after it and the marker last, so a killed task
leaves at most a hidden temp file and is simply run again. The prepare's identity (tokenizer fingerprint,
every source's size and mtime, the options) is recorded in ``DATA/prepare.json`` at the start and a rerun
must match it: a changed tokenizer or source is refused, never mixed in.

Readers, document semantics and error messages are growlm's own (:mod:`growlm.data`), driven by a datatrove
reader step: datatrove's JSONL reader skips bad lines with a warning, and its tokenizer step adds an EOS per
batch item, while training needs every bad line refused and a plain text file to stay one document.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseReader
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from growlm.data import (
    _MAX_CARRY,
    MAX_UNK_FRACTION,
    arrow_files,
    check_data_file,
    data_kind,
    encode_batches,
    part_documents,
    token_dtype,
)
from growlm.errors import GrowlmError, one_line
from growlm.files import atomic_file, atomic_write_json, fault_point
from growlm.shards import (
    MANIFEST,
    PREPARE_JSON,
    Manifest,
    PrepareOptions,
    ShardRecord,
    SourcePart,
    SourceRecord,
    SplitRecord,
    TokenizerRecord,
    Totals,
    is_prepared,
    parts_sha256,
    read_manifest,
    sha256_range,
    source_stat,
    write_manifest,
)
from growlm.store import check_out
from growlm.tokenizer import Tokenizer

# Source bytes per task: large enough that a task's start-up (a Python process with torch, on Slurm) is small
# beside its tokenizing (about 30 s per core at the measured rate), small enough that a corpus of hundreds of
# GB gives thousands of tasks to share out and a killed prepare loses little.
PART_BYTES = 128 << 20
EXECUTORS = ("local", "slurm", "ray")
DATA_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")  # what a folder given as a source contributes
TASKS, LOGS = "tasks", "datatrove"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Record):
    """A source file as the prepare found it (a change of size or mtime on a rerun is refused)."""

    path: str
    kind: Literal["text", "jsonl", "parquet", "arrow", "arrow-dir"]
    size: int
    mtime_ns: int


class Part(_Record):
    """One task's share of one source: the bytes ``[start, end)`` of a text or JSONL file, ``row_groups`` of a
    parquet file, or one Arrow file (``file``: its name inside a save_to_disk folder). The task also hashes
    bytes ``[hash_start, hash_end)`` of that file, and ``last`` marks the part that ends a text file (its EOS)."""

    source: int
    file: str
    kind: Literal["text", "jsonl", "parquet", "arrow"]
    start: int = 0
    end: int = 0
    row_groups: list[int] | None = None
    hash_start: int
    hash_end: int
    last: bool = True


class PrepareSpec(_Record):
    """``DATA/prepare.json``: what a prepare was asked, written before its first task. A rerun must ask the same."""

    format: Literal["growlm-prepare"] = "growlm-prepare"
    version: Literal[1] = 1
    tokenizer: TokenizerRecord
    token_bytes: Literal[2, 4]
    sources: list[SourceSpec]
    parts: list[Part]
    part_bytes: Annotated[int, Field(gt=0)]
    options: PrepareOptions
    command: str


class TaskRecord(_Record):
    """``DATA/tasks/NNNNN.json``: what one task wrote (its shards), read (its part's hash), and counted."""

    task: int
    shards: dict[Literal["train", "valid"], ShardRecord]
    part: SourcePart
    tokens: int
    unk: int


# ----------------------------------------------------------------------------------------------
# planning: sources -> parts


def expand_sources(sources: Sequence[str | Path]) -> list[Path]:
    """The source files of ``sources`` (files, folders, globs), absolute, in the order given.

    A folder contributes its ``.txt``/``.jsonl``/``.parquet``/``.arrow`` files, recursively, in name order
    (hidden ones left out), a save_to_disk folder inside it as one source; a save_to_disk folder given
    itself is one source. A glob contributes its matches in name order. A file listed twice is refused."""
    if not sources:
        raise GrowlmError("give at least one source: files, folders or globs of text, JSONL, parquet or "
                          "save_to_disk datasets")
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.exists():
            matches = [p]
        elif glob.has_magic(str(s)):
            matches = sorted(Path(m) for m in glob.glob(str(s), recursive=True))
            if not matches:
                raise GrowlmError(f"source {s} matches no file")
        else:
            raise GrowlmError(f"source not found: {s}")
        for m in matches:
            out.extend(_files_of(m.resolve()))
    seen: set[Path] = set()
    for p in out:
        if p in seen:
            raise GrowlmError(f"source {p} is given twice; each source is prepared once")
        seen.add(p)
    return out


def _files_of(p: Path) -> list[Path]:
    if not p.is_dir():
        return [p]
    if is_prepared(p):
        raise GrowlmError(f"{p} is a prepared data folder (tokens); name the text it was prepared from")
    if data_kind_or_none(p) is not None:
        return [p]  # a save_to_disk folder: one source
    found: list[Path] = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_prepared(Path(root, d)))
        here = Path(root)
        for d in list(dirs):
            if data_kind_or_none(here / d) is not None:
                found.append(here / d)
                dirs.remove(d)
        found.extend(here / f for f in sorted(files) if not f.startswith(".") and f.lower().endswith(DATA_SUFFIXES))
    if not found:
        raise GrowlmError(f"folder {p} holds no {', '.join(DATA_SUFFIXES)} files nor save_to_disk folders")
    return sorted(found)


def data_kind_or_none(d: Path) -> str | None:
    """'arrow-dir' for a save_to_disk folder, None for an ordinary folder (a DatasetDict is refused)."""
    if (d / "dataset_dict.json").is_file() or (d / "dataset_info.json").is_file() or (d / "state.json").is_file():
        return data_kind(d)
    return None


def _cut_after(f, pos: int, size: int, cut: bytes) -> int:
    """The offset just after the first byte of ``cut`` at or after ``pos`` (``size`` when there is none)."""
    f.seek(pos)
    while pos < size:
        block = f.read(1 << 20)
        if not block:
            break
        hits = [i for c in cut if (i := block.find(c)) != -1]
        if hits:
            return pos + min(hits) + 1
        pos += len(block)
    return size


def _byte_parts(i: int, p: Path, kind: str, size: int, part_bytes: int, cut: bytes) -> list[Part]:
    """A text or JSONL file cut after a byte of ``cut`` near every multiple of ``part_bytes``."""
    bounds = [0]
    with open(p, "rb") as f:
        for nominal in range(part_bytes, size, part_bytes):
            b = _cut_after(f, max(nominal, bounds[-1]), size, cut)
            if bounds[-1] < b < size:
                bounds.append(b)
    bounds.append(size)
    n = len(bounds) - 1
    return [Part(source=i, file="", kind=kind, start=a, end=b, hash_start=a, hash_end=b, last=k == n - 1)
            for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]


def _parquet_parts(i: int, p: Path, size: int, part_bytes: int) -> list[Part]:
    """Consecutive row groups of about ``part_bytes`` (uncompressed) per part; each part hashes an equal share
    of the file's bytes."""
    try:
        meta = pq.ParquetFile(p).metadata
    except Exception as e:  # pyarrow raises its own error kinds for a file that is not parquet
        raise GrowlmError(f"cannot read parquet file {p}: {one_line(e)}") from None
    groups: list[list[int]] = [[]]
    acc = 0
    for g in range(meta.num_row_groups):
        if groups[-1] and acc >= part_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(g)
        acc += meta.row_group(g).total_byte_size
    n = len(groups)
    return [Part(source=i, file="", kind="parquet", row_groups=rg, hash_start=k * size // n,
                 hash_end=(k + 1) * size // n) for k, rg in enumerate(groups)]


def plan_parts(files: Sequence[Path], tokenizer: Tokenizer, part_bytes: int = PART_BYTES) -> tuple[list[SourceSpec], list[Part]]:
    """The sources as found now, and the parts (tasks) that cover them, in order."""
    specs: list[SourceSpec] = []
    parts: list[Part] = []
    cut = b"".join(c.encode() for c in tokenizer.cut_chars)  # where a text may be cut without changing its ids
    for i, p in enumerate(files):
        check_data_file(p)
        kind = data_kind(p)
        if kind == "prepared":
            raise GrowlmError(f"{p} is a prepared data folder (tokens); name the text it was prepared from")
        if kind == "arrow-dir":
            arrows = arrow_files(p)
        st = source_stat(p, kind)
        assert st is not None
        specs.append(SourceSpec(path=str(p), kind=kind, size=st[0], mtime_ns=st[1]))
        if kind == "text":
            parts += _byte_parts(i, p, kind, st[0], part_bytes if cut else st[0] + 1, cut)
        elif kind == "jsonl":
            parts += _byte_parts(i, p, kind, st[0], part_bytes, b"\n")
        elif kind == "parquet":
            parts += _parquet_parts(i, p, st[0], part_bytes)
        elif kind == "arrow":
            parts.append(Part(source=i, file="", kind="arrow", hash_start=0, hash_end=st[0]))
        else:
            parts += [Part(source=i, file=f.name, kind="arrow", hash_start=0, hash_end=f.stat().st_size) for f in arrows]
    return specs, parts


# ----------------------------------------------------------------------------------------------
# the datatrove steps


def read_spec(data_dir: str | Path) -> PrepareSpec:
    """``DATA/prepare.json``, typed, or a one-line error."""
    f = Path(data_dir) / PREPARE_JSON
    try:
        return PrepareSpec.model_validate_json(f.read_bytes())
    except (OSError, ValidationError) as e:
        raise GrowlmError(f"{f} is unreadable or corrupt: {one_line(e)}") from None


def _part_path(spec: PrepareSpec, part: Part) -> Path:
    src = Path(spec.sources[part.source].path)
    return src / part.file if part.file else src


def held_out(text: str, fraction: float) -> bool:
    """Whether a document (or a text file's line) goes to the valid split: a hash of its text below
    ``fraction``, so equal texts always land on the same side, wherever and whenever they are read."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"growlm-valid")
    return int.from_bytes(h.digest(), "little") < fraction * 2**64


def _lines(pieces: Iterator[str]) -> Iterator[str]:
    """Pieces of a text regrouped into lines (newline kept); a line longer than ``_MAX_CARRY`` characters
    comes in pieces, so memory stays bounded."""
    carry = ""
    for piece in pieces:
        buf = carry + piece
        cut = buf.rfind("\n") + 1
        if cut:
            yield from (line + "\n" for line in buf[: cut - 1].split("\n"))
        carry = buf[cut:]
        if len(carry) > _MAX_CARRY:
            yield carry
            carry = ""
    if carry:
        yield carry


class PartReader(BaseReader):
    """datatrove reader: task ``rank`` reads part ``rank`` of ``DATA/prepare.json`` with growlm's readers.

    Each Document carries ``metadata["eos"]`` (an EOS follows it) and ``metadata["split"]``. A plain text file is
    one document: its pieces get no EOS and its last part ends with an empty EOS document; with a valid
    fraction its lines are held out one by one (a text file is otherwise all or nothing), each side of the file
    ending with an EOS."""

    name = "growlm part reader"

    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self.data_dir = data_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        spec = read_spec(self.data_dir)
        if world_size != len(spec.parts):
            raise GrowlmError(f"{self.data_dir}: {world_size} tasks for {len(spec.parts)} parts")
        part = spec.parts[rank]
        path, fraction = _part_path(spec, part), spec.options.valid_fraction
        src = spec.sources[part.source]
        if source_stat(src.path, src.kind) != (src.size, src.mtime_ns):  # on Slurm, hours may pass since the plan
            raise GrowlmError(f"source {src.path} changed since this prepare began (its size or mtime); its tokens "
                              f"would not mix with those already written: prepare into a new --out")
        docs = part_documents(path, part.kind, start=part.start, end=part.end, row_groups=part.row_groups)
        for k, text in enumerate(docs if part.kind != "text" or not fraction else _lines(docs)):
            split = "valid" if held_out(text, fraction) else "train"
            self.stat_update("documents" if part.kind != "text" else "pieces")
            yield Document(text=text, id=f"{rank}/{k}", metadata={"eos": part.kind != "text", "split": split})
        if part.kind == "text" and part.last:
            for split in ("train", "valid") if fraction else ("train",):
                yield Document(text="", id=f"{rank}/end-{split}", metadata={"eos": True, "split": split})


_TOKENIZERS: dict[tuple[str, str], Tokenizer] = {}  # one load per process, whatever the tasks it runs


def _tokenizer(spec: PrepareSpec) -> Tokenizer:
    key = (spec.tokenizer.path, spec.tokenizer.fingerprint)
    if key not in _TOKENIZERS:
        tok = Tokenizer.load(spec.tokenizer.path)
        if tok.fingerprint != spec.tokenizer.fingerprint:
            raise GrowlmError(f"the tokenizer at {spec.tokenizer.path} changed since this prepare began (fingerprint "
                              f"{spec.tokenizer.fingerprint[:12]}…, now {tok.fingerprint[:12]}…); its tokens would not mix")
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def shard_name(split: str, task: int, token_bytes: int) -> str:
    """A shard's path relative to DATA: ``train/00007.u16``."""
    return f"{split}/{task:05d}.u{token_bytes * 8}"


class _ShardOut:
    """One split's shard of a task, written through a temp file (renamed into place on success)."""

    def __init__(self, stack: contextlib.ExitStack, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.f = path, stack.enter_context(atomic_file(path))
        self.sha, self.tokens, self.documents = hashlib.sha256(), 0, 0
        self.pending: list[np.ndarray] = []  # documents held back to be shuffled

    def write(self, arr: np.ndarray) -> None:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()  # little-endian on any machine
        self.f.write(data)
        self.sha.update(data)
        self.tokens += arr.size


class ShardWriter(PipelineStep):
    """datatrove step: encode the task's documents with growlm's tokenizer and write its shards and record."""

    name = "growlm shard writer"
    type = "🔢 - TOKENIZER"

    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self.data_dir = data_dir

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        try:
            self._write(data, rank)
        except GrowlmError as e:  # a plain GrowlmError crosses process boundaries whatever its subclass
            raise GrowlmError(one_line(e)) from None

    def _write(self, data: DocumentsPipeline, rank: int) -> None:
        d = Path(self.data_dir)
        spec = read_spec(d)
        part = spec.parts[rank]
        tok = _tokenizer(spec)
        dtype = token_dtype(spec.tokenizer.vocab_size)
        shuffle = spec.options.shuffle and part.kind != "text"  # a text file is one document: never reordered
        splits = ("train", "valid") if spec.options.valid_fraction else ("train",)
        pending: deque[tuple[str, bool]] = deque()

        def texts() -> Iterator[tuple[str, bool]]:
            for doc in data:
                pending.append((doc.metadata["split"], doc.metadata["eos"]))
                yield doc.text, doc.metadata["eos"]

        unk = total = 0
        with contextlib.ExitStack() as stack:
            outs = {s: _ShardOut(stack, d / shard_name(s, rank, spec.token_bytes)) for s in splits}
            for batch, (arr, ends) in enumerate(encode_batches(texts(), tok, dtype), 1):
                meta = [pending.popleft() for _ in range(len(ends))]
                starts = np.concatenate([[0], ends[:-1]])
                for split, out in outs.items():
                    mine = [k for k, (s, _) in enumerate(meta) if s == split]
                    out.documents += sum(meta[k][1] for k in mine)
                    if shuffle:
                        out.pending.extend(arr[starts[k]:ends[k]] for k in mine)
                    elif len(mine) == len(meta):
                        out.write(arr)
                    elif mine:
                        out.write(np.concatenate([arr[starts[k]:ends[k]] for k in mine]))
                unk += int(np.count_nonzero(arr == tok.unk_id))
                total += arr.size
                self.stat_update("tokens", value=int(arr.size), unit="batch")
                fault_point("prepare", rank, batch)  # the tests' kill -9 in the middle of a shard
            for split, out in outs.items():
                if out.pending:  # the task's documents in an order drawn from its index alone
                    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"shuffle/{split}/{rank}".encode()).digest()[:8],
                                                               "little"))
                    for k in rng.permutation(len(out.pending)):
                        out.write(out.pending[k])
        shards = {}
        for split, out in outs.items():
            if out.tokens:
                shards[split] = ShardRecord(file=shard_name(split, rank, spec.token_bytes), tokens=out.tokens,
                                            documents=out.documents, sha256=out.sha.hexdigest())
            else:
                out.path.unlink(missing_ok=True)
        path = _part_path(spec, part)
        hashed = SourcePart(file=part.file, start=part.hash_start, end=part.hash_end,
                            sha256=sha256_range(path, part.hash_start, part.hash_end))
        (d / TASKS).mkdir(exist_ok=True)
        record = TaskRecord(task=rank, shards=shards, part=hashed, tokens=total, unk=unk)
        atomic_write_json(d / TASKS / f"{rank:05d}.json", record.model_dump(mode="json"))
        print(f"task {rank + 1}/{len(spec.parts)}: {total:,} tokens from {path}", flush=True)


class Finalize(PipelineStep):
    """datatrove step (a one-task job after the others, on Slurm): write ``DATA/manifest.json``."""

    name = "growlm manifest"
    type = "🔢 - TOKENIZER"

    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self.data_dir = data_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        finalize(self.data_dir)


# ----------------------------------------------------------------------------------------------
# the manifest


def _task_record(d: Path, task: int) -> TaskRecord | None:
    try:
        return TaskRecord.model_validate_json((d / TASKS / f"{task:05d}.json").read_bytes())
    except (OSError, ValidationError):
        return None


def finalize(data_dir: str | Path) -> Manifest:
    """Assemble ``DATA/manifest.json`` from the task records once every task is done; refuse a source that is
    mostly ``<unk>`` (as the per-file cache refuses such a file), and remove the temp files killed tasks left."""
    d = Path(data_dir)
    spec = read_spec(d)
    records = [_task_record(d, t) for t in range(len(spec.parts))]
    missing = [t for t, r in enumerate(records) if r is None]
    if missing:
        raise GrowlmError(f"{len(missing)} of {len(records)} tasks of {d} have not completed (task {missing[0]} first); "
                          f"rerun the same growlm data prepare command to resume")
    done: list[TaskRecord] = [r for r in records if r is not None]
    sources = []
    for i, s in enumerate(spec.sources):
        mine = [r for r, p in zip(done, spec.parts, strict=True) if p.source == i]
        tokens, unk = sum(r.tokens for r in mine), sum(r.unk for r in mine)
        if tokens and unk / tokens > MAX_UNK_FRACTION:
            raise GrowlmError(f"{s.path}: {unk / tokens:.0%} of its tokens are <unk> (characters outside the tokenizer's "
                              f"vocabulary); build the tokenizer with this file in its corpus")
        parts = [r.part for r in mine]
        sources.append(SourceRecord(path=s.path, kind=s.kind, size=s.size, mtime_ns=s.mtime_ns, sha256=parts_sha256(parts),
                                    parts=parts, tokens=tokens, documents=sum(r.shards[k].documents for r in mine
                                                                             for k in r.shards), unk=unk))
    splits = {}
    for split in ("train", "valid") if spec.options.valid_fraction else ("train",):
        shards = [r.shards[split] for r in done if split in r.shards]
        splits[split] = SplitRecord(tokens=sum(s.tokens for s in shards), documents=sum(s.documents for s in shards),
                                    shards=shards)
    for split in splits.values():
        for s in split.shards:
            f = d / s.file
            if not f.is_file() or f.stat().st_size != s.tokens * spec.token_bytes:
                raise GrowlmError(f"shard {f} of a completed task is missing or damaged; remove "
                                  f"{d / LOGS / 'completions'} and rerun the same command")
    manifest = Manifest(
        tokenizer=spec.tokenizer, token_bytes=spec.token_bytes, sources=sources, splits=splits,
        totals=Totals(tokens=sum(s.tokens for s in splits.values()), documents=sum(s.documents for s in splits.values()),
                      shards=sum(len(s.shards) for s in splits.values()), source_bytes=sum(s.size for s in spec.sources)),
        options=spec.options, command=spec.command, datatrove=importlib.metadata.version("datatrove"))
    write_manifest(d, manifest)
    for sub in ("train", "valid", TASKS):  # what killed tasks left: hidden temp files, never a listed shard
        for leftover in (d / sub).glob(".*.tmp") if (d / sub).is_dir() else ():
            leftover.unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------------------------
# the command


def command_line(sources: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, workers: int | None,
                 executor: str, shuffle: bool, valid_fraction: float) -> str:
    """The ``growlm data prepare`` command these arguments are (recorded in the manifest)."""
    args = ["growlm", "data", "prepare", *map(str, sources), "--tokenizer", str(tokenizer), "--out", str(out)]
    args += ["--workers", str(workers)] if workers is not None else []
    args += ["--executor", executor] + (["--shuffle"] if shuffle else [])
    args += ["--valid-fraction", repr(valid_fraction)] if valid_fraction else []
    return shlex.join(args)


def _difference(old: PrepareSpec, new: PrepareSpec) -> str:
    """What differs between a recorded prepare and this command, in words ('' when they are the same prepare)."""
    if old.tokenizer.fingerprint != new.tokenizer.fingerprint:
        return (f"it was prepared with another tokenizer (fingerprint {old.tokenizer.fingerprint[:12]}…, from "
                f"{old.tokenizer.path}; --tokenizer gives {new.tokenizer.fingerprint[:12]}…)")
    was, now = {s.path: s for s in old.sources}, {s.path: s for s in new.sources}
    for path in [*was, *now]:
        if path not in now:
            return f"source {path} was part of it and is not now"
        if path not in was:
            return f"source {path} was not part of it"
        if was[path] != now[path]:
            a, b = was[path], now[path]
            return f"source {path} changed since (size {a.size:,} -> {b.size:,} bytes, mtime {a.mtime_ns} -> {b.mtime_ns})"
    if list(was) != list(now):
        return "its sources were given in another order"
    if old.options != new.options or old.part_bytes != new.part_bytes:
        return (f"it was prepared with other options (shuffle {old.options.shuffle}, valid fraction "
                f"{old.options.valid_fraction}; now shuffle {new.options.shuffle}, valid fraction {new.options.valid_fraction})")
    # the same tokenizer read from another path, or the same command written another way, is the same prepare
    same = {"command": True, "tokenizer": {"path"}}
    return "" if old.model_dump(exclude=same) == new.model_dump(exclude=same) else "its parts differ"


def _clear_stale_completions(d: Path, spec: PrepareSpec) -> None:
    """A completion marker whose task record or shard is gone (deleted by hand) is dropped, so the task reruns."""
    marks = d / LOGS / "completions"
    for t in range(len(spec.parts)):
        mark = marks / f"{t:05d}"
        if not mark.exists():
            continue
        rec = _task_record(d, t)
        if rec is None or any(not (d / s.file).is_file() or (d / s.file).stat().st_size != s.tokens * spec.token_bytes
                              for s in rec.shards.values()):
            mark.unlink()


@contextlib.contextmanager
def _quiet(log: Path) -> Iterator[None]:
    """datatrove logs each task (and each error's traceback) to stderr: while it runs, that goes to ``log``
    (beside its per-task logs), so the command still ends in one line. The Rust tokenizer runs one thread per
    task: the workers are the parallelism (and a forked worker would disable its pool with a warning)."""
    from datatrove.utils.logging import setup_default_logger

    log.parent.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stderr(f):
            setup_default_logger()
            try:
                yield
            finally:
                sys.stderr.flush()
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
        setup_default_logger()  # back on the real stderr


def _start(out: Path, spec: PrepareSpec, log: Callable[[str], None]) -> bool:
    """Create DATA with its prepare.json, or check that the prepare it holds is this one; False when DATA is
    already complete."""
    if out.is_dir() and (out / MANIFEST).is_file():
        read_manifest(out)
        diff = _difference(read_spec(out), spec)
        if diff:
            raise GrowlmError(f"{out} is already prepared, and not by this command: {diff}; prepare into a new --out")
        log(f"{out} is already prepared by this command ({MANIFEST}); nothing to do")
        return False
    if out.is_dir() and (out / PREPARE_JSON).is_file():
        diff = _difference(read_spec(out), spec)
        if diff:
            raise GrowlmError(f"{out} holds an unfinished prepare that this command would not continue: {diff}; "
                              f"its tokens must not mix, so prepare into a new --out (or remove {out})")
        log(f"resuming the prepare in {out}: completed tasks are kept")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GrowlmError(f"--out {out} exists and is not an empty directory nor a prepare; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PREPARE_JSON, spec.model_dump(mode="json"))
    return True


def prepare(sources: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, workers: int | None = None,
            executor: str = "local", shuffle: bool = False, valid_fraction: float = 0.0,
            part_bytes: int = PART_BYTES, slurm: dict[str, Any] | None = None,
            log: Callable[[str], None] = print) -> Path:
    """``growlm data prepare``: tokenize ``sources`` with the tokenizer dir ``tokenizer`` into the prepared folder
    ``out`` (see the module docstring); returns ``out``.

    ``executor`` "local" runs ``workers`` processes here (default: one per CPU core) and writes the manifest
    before it returns; "ray" runs the tasks on the Ray cluster ``ray.init()`` finds (``workers`` at once,
    default all) and writes it too; "slurm" submits a job array (``workers``: at most that many at once) and a
    job after it that writes the manifest, then returns (``slurm``: ``partition`` and ``time`` for sbatch).
    A rerun of the same command resumes; another tokenizer, a changed source or other options are refused.
    """
    if executor not in EXECUTORS:
        raise GrowlmError(f"--executor: {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if not (isinstance(valid_fraction, int | float) and 0 <= valid_fraction < 1):
        raise GrowlmError(f"--valid-fraction must be at least 0 and below 1, got {valid_fraction}")
    if workers is not None and workers < 1:
        raise GrowlmError(f"--workers: at least 1, got {workers}")
    _check_executor(executor, slurm or {})
    given = out
    try:  # a symlink loop, a NUL byte or a name too long for the system: one line, never a traceback
        out = Path(out).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise GrowlmError(f"--out {given}: unusable path: {e}") from None
    check_out(out)
    tok = Tokenizer.load(tokenizer)
    files = expand_sources(sources)
    specs, parts = plan_parts(files, tok, part_bytes)
    token_bytes = token_dtype(tok.vocab_size).itemsize
    spec = PrepareSpec(
        tokenizer=TokenizerRecord(fingerprint=tok.fingerprint, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                                  path=str(Path(tokenizer).resolve())),
        token_bytes=token_bytes, sources=specs, parts=parts, part_bytes=part_bytes,
        options=PrepareOptions(shuffle=shuffle, valid_fraction=float(valid_fraction), tasks=len(parts)),
        command=command_line(sources, tokenizer, given, workers=workers, executor=executor, shuffle=shuffle,
                             valid_fraction=valid_fraction))
    if not _start(out, spec, log):
        return out
    _TOKENIZERS[(spec.tokenizer.path, tok.fingerprint)] = tok  # tasks run here, or in forks of this process
    _clear_stale_completions(out, spec)
    pipeline = [PartReader(str(out)), ShardWriter(str(out))]
    n = len(parts)
    if executor == "slurm":
        return _submit_slurm(out, pipeline, n, workers, slurm or {}, log)
    log(f"preparing {len(specs)} source(s), {sum(s.size for s in specs):,} bytes, in {n} task(s) on "
        f"{executor} workers; datatrove's logs: {out / LOGS}")
    with _quiet(out / LOGS / "prepare.log"):
        if executor == "local":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            # fork: a worker starts with growlm already imported (a fresh interpreter per worker would import
            # torch again, through the tokenizer's hashing, seconds of CPU each)
            LocalPipelineExecutor(pipeline, tasks=n, workers=min(workers or cores, n), logging_dir=str(out / LOGS),
                                  start_method="fork").run()
        else:
            _run_ray(out, pipeline, n, workers)
    manifest = finalize(out)
    log(f"prepared {manifest.totals.tokens:,} tokens ({', '.join(f'{k} {v.tokens:,}' for k, v in manifest.splits.items())})"
        f" in {manifest.totals.shards} shard(s) -> {out / MANIFEST}")
    return out


def _check_executor(executor: str, slurm: dict[str, Any]) -> None:
    """What an executor needs, checked before anything is written."""
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise GrowlmError("--executor ray needs Ray: pip install 'ray[default]' (or growlm[ray])")
    if executor == "slurm":
        if shutil.which("sbatch") is None:
            raise GrowlmError("--executor slurm needs sbatch on the PATH: run it on a Slurm login node")
        if not slurm.get("partition"):
            raise GrowlmError("--executor slurm needs --partition (the Slurm partition to run the tasks on)")


def _run_ray(out: Path, pipeline: list, n: int, workers: int | None) -> None:
    import ray
    from datatrove.executor import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init()  # the cluster `ray start` made on this node (or RAY_ADDRESS), else a local one
    RayPipelineExecutor(pipeline, tasks=n, workers=workers or -1, logging_dir=str(out / LOGS), cpus_per_task=1,
                        mem_per_cpu_gb=2).run()


def _submit_slurm(out: Path, pipeline: list, n: int, workers: int | None, slurm: dict[str, Any],
                  log: Callable[[str], None]) -> Path:
    """Submit the tasks as a Slurm job array and the manifest as a job that waits for them (afterok)."""
    from datatrove.executor import SlurmPipelineExecutor

    # every job finds this very Python, growlm and datatrove's launch_pickled_pipeline (a shared filesystem)
    env = f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"
    common = dict(partition=slurm["partition"], env_command=env, cpus_per_task=1, mem_per_cpu_gb=2, qos="",
                  time=slurm.get("time") or "24:00:00")
    tasks = SlurmPipelineExecutor(pipeline, tasks=n, workers=workers or -1, job_name="growlm-prepare",
                                  logging_dir=str(out / LOGS), **common)
    manifest = SlurmPipelineExecutor([Finalize(str(out))], tasks=1, job_name="growlm-prepare-manifest",
                                     logging_dir=str(out / LOGS / "manifest"), depends=tasks, **common)
    try:
        manifest.run()  # submits the array first, then this job with --dependency=afterok:<array>
    except subprocess.CalledProcessError as e:
        raise GrowlmError(f"sbatch refused a job (exit code {e.returncode}; its own message is above); completed "
                          f"tasks are kept, rerun this command once it is fixed") from None
    log(f"submitted {n} task(s) as Slurm job {tasks.job_id} and the manifest as job {manifest.job_id} (after it); "
        f"{out / MANIFEST} appears when they end; if a task fails, rerun this command once the jobs have ended "
        f"(completed tasks are kept)")
    return out
