"""SQuAD v2 (paper §7): the context and the question, as many new tokens as the first gold answer has
characters; right when the continuation is, or contains, that answer. Only the answerable questions
whose first answer is at most 8 characters are scored, as the paper.

The loglik protocol (lm-evaluation-harness) scores every answerable question by the official exact
match and F1 (max over the gold answers) of a greedy generation of up to 32 tokens cut at the first
newline. Records: context, question, answers {text} (the Hugging Face layout, or the official
nested JSON); no package ships the data.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from growlm.evaluation import LM
from growlm.evaluation.protocols import answer_budget, continuation
from growlm.evaluation.readers import bad_record, is_header_row
from growlm.evaluation.task import TASKS, Item, Outcome, Progress, Task

# the paper's prompt, byte for byte (the loglik protocol generates after it too)
SQUAD_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
SQUAD_PAPER_MAX_CHARS = 8
SQUAD_LOGLIK_BUDGET = 32


def squad_item(rec: dict, f: Path) -> Item | None:
    """context, question, answers {text: [...]} (empty for unanswerable questions)."""
    if is_header_row(rec):
        return None
    answers = rec.get("answers")
    if isinstance(answers, str):
        answers = json.loads(answers)
    if not isinstance(answers, dict) or "context" not in rec or "question" not in rec:
        raise bad_record(f, "not a SQuAD record (context, question, answers{text} expected)", rec)
    return Item(question=str(rec["question"]), context=str(rec["context"]),
                answers=tuple(str(a) for a in answers.get("text", [])))


def squad_scorable(item: Item, protocol: str) -> bool:
    """Answerable questions; the paper only those whose first answer is ≤ 8 characters."""
    if not (item.answers and item.answers[0]):
        return False
    return protocol != "paper" or len(item.answers[0]) <= SQUAD_PAPER_MAX_CHARS


def squad_prompt(item: Item) -> str:
    """The context and the question."""
    return SQUAD_TEMPLATE.format(context=item.context, question=item.question)


def squad_score(item: Item, text: str) -> Outcome:
    """Right when the answer is, or contains, the first gold answer (ignoring case)."""
    answer, gold = text.strip().upper(), item.answers[0].upper()
    return Outcome({"accuracy": float(answer == gold or gold in answer)}, valid=bool(answer))


def normalize_answer(s: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the official SQuAD script."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def run_loglik_squad(model: LM, tokenizer, items: Sequence[Item], advance: Progress = None) -> list[Outcome]:
    """exact_match / f1 (max over gold answers) of greedy generations cut at the first newline."""
    out = []
    for it in items:
        text = continuation(model, tokenizer, squad_prompt(it), SQUAD_LOGLIK_BUDGET)
        pred = text.strip().split("\n")[0].strip()
        out.append(Outcome({"exact_match": max(float(normalize_answer(pred) == normalize_answer(a)) for a in it.answers),
                            "f1": max(squad_f1(pred, a) for a in it.answers)}))
        if advance is not None:
            advance(1)
    return out


TASKS.register("squad_v2", Task(
    "SQuAD v2", split="validation", normalise=squad_item, prompt=squad_prompt, budget=answer_budget,
    score=squad_score, loglik=run_loglik_squad, scorable=squad_scorable,
    no_offline="no package ships SQuAD 2.0; pass --data PATH to the official dev-v2.0.json (SQuAD JSON) "
               "or a Hugging Face squad_v2 validation file"))
