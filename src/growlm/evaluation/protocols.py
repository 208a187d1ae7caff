"""The two evaluation protocols, their scoring and the confidence interval.

``paper`` ("Growing Transformers" §7, its ``_models_benchmarking.py``): the literal prompt is
encoded without special tokens, ``generate`` adds a handful of tokens (MMLU 1, ARC/CSQA 2, BoolQ 1,
SQuAD/BLEU as many as the gold answer has characters, at most 100), the decoded continuation has
``<s>`` removed and is ``.strip().upper()``-ed; multiple choice compares its first character with the
gold label, SQuAD v2 (answerable, first gold answer ≤ 8 characters) accepts it when it contains the
answer, and BLEU is sacrebleu's corpus BLEU of each sample on its own, averaged. Two choices the
paper leaves open: BLEU ignores case (the continuation is upper-cased, the reference is not) and uses
sacrebleu's ``zh`` tokenizer for Chinese targets.

``loglik`` (lm-evaluation-harness): for each choice the summed log-probability of `` {choice}``
after ``Question: {q}\\nAnswer:`` (BoolQ: ``{passage}\\nQuestion: {question}?\\nAnswer:`` with
`` yes``/`` no``); ``accuracy`` is the argmax, ``accuracy_norm`` the argmax of the log-likelihood per
UTF-8 byte of the continuation. Context and continuation are tokenized separately so no token
straddles the boundary. SQuAD v2 is scored on its answerable questions by the official exact match
and F1 (max over gold answers) of a greedy generation of up to 32 tokens cut at the first newline.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import sacrebleu
import torch

from growlm.errors import GrowlmError
from growlm.evaluation import LM, model_device
from growlm.evaluation.ppl import Window, score_windows
from growlm.evaluation.tasks import Item, get_task

# The paper's prompts, byte for byte (paper §7); ``{options}`` is one MC_OPTION per choice.
MMLU_TEMPLATE = "Question: {input}\nOptions: A) {A} B) {B} C) {C} D) {D}\nAnswer:"
MC_TEMPLATE = "Question: {q}\nOptions:\n{options}Answer:"
MC_OPTION = "{label}) {text}\n"
SQUAD_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
BOOLQ_TEMPLATE = "Context: {passage}\nQuestion: {question}\nAnswer (True/False):"
BLEU_TEMPLATE = "Translate from {Src} to {Tgt}:\n{source}\nAnswer:"

# lm-evaluation-harness contexts for log-likelihood scoring
LOGLIK_TEMPLATE = "Question: {q}\nAnswer:"
LOGLIK_BOOLQ_TEMPLATE = "{passage}\nQuestion: {question}?\nAnswer:"

PROTOCOLS = ("paper", "loglik")
GEN_CAP = 100  # the paper's cap on SQuAD/BLEU budgets
SQUAD_PAPER_MAX_CHARS = 8
SQUAD_LOGLIK_BUDGET = 32
LANGUAGES = {"en": "English", "ru": "Russian", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish"}
LOGLIK_BATCH = 16

Progress = Callable[[int], object] | None  # a progress bar's ``update``


@dataclass(frozen=True)
class Outcome:
    """The scores of one item; ``valid`` is None where validity is not defined (loglik)."""

    metrics: dict[str, float]
    valid: bool | None = None


# ----------------------------------------------------------------------------------------------
# Item selection


def select(task: str, protocol: str, items: Sequence[Item]) -> list[Item]:
    """The items a protocol scores (the task's ``scorable``; all of them by default)."""
    keep = get_task(task).scorable
    return list(items) if keep is None else [it for it in items if keep(it, protocol)]


def squad_scorable(item: Item, protocol: str) -> bool:
    """SQuAD scores answerable questions; the paper only those whose first answer is ≤ 8 characters."""
    if not (item.answers and item.answers[0]):
        return False
    return protocol != "paper" or len(item.answers[0]) <= SQUAD_PAPER_MAX_CHARS


# ----------------------------------------------------------------------------------------------
# The paper's protocol


def paper_prompt(task: str, item: Item) -> str:
    """The paper's literal prompt for ``item``."""
    return get_task(task).prompt(item)


def mmlu_prompt(item: Item) -> str:
    """MMLU: the options inline, A) to D)."""
    return MMLU_TEMPLATE.format(input=item.question, **dict(zip("ABCD", item.choices, strict=True)))


def choice_prompt(item: Item) -> str:
    """ARC / CommonsenseQA: one labelled option per line."""
    options = "".join(MC_OPTION.format(label=lb, text=t) for lb, t in zip(item.labels, item.choices, strict=True))
    return MC_TEMPLATE.format(q=item.question, options=options)


def boolq_prompt(item: Item) -> str:
    """BoolQ: the passage, the question, True/False."""
    return BOOLQ_TEMPLATE.format(passage=item.context, question=item.question)


def squad_prompt(item: Item) -> str:
    """SQuAD: the context and the question."""
    return SQUAD_TEMPLATE.format(context=item.context, question=item.question)


def bleu_prompt(item: Item) -> str:
    """Translation: the direction in words, then the source sentence."""
    src, tgt = item.subject.split("-")
    return BLEU_TEMPLATE.format(Src=LANGUAGES.get(src, src), Tgt=LANGUAGES.get(tgt, tgt), source=item.context)


def paper_budget(task: str, item: Item) -> int:
    """The paper's max_new_tokens: fixed for multiple choice, the gold answer's character count otherwise."""
    budget = get_task(task).budget
    return budget if isinstance(budget, int) else budget(item)


def answer_budget(item: Item) -> int:
    """As many new tokens as the gold answer has characters, at most :data:`GEN_CAP`."""
    return max(1, min(len(item.answers[0]), GEN_CAP))


def continuation(model: LM, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> str:
    """Decoded new text after ``prompt`` (left-truncated to fit the context), ``<s>`` removed."""
    context = model.cfg.context
    max_new_tokens = min(max_new_tokens, context - 1)
    ids = tokenizer.encode(prompt)[-(context - max_new_tokens):]
    idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    out = model.generate(idx, max_new_tokens, temperature=temperature, generator=generator)
    return tokenizer.decode(out[0, len(ids):].tolist()).replace("<s>", "")


def paper_score(task: str, item: Item, text: str) -> Outcome:
    """Score one continuation as the paper does."""
    return get_task(task).score(item, text)


def choice_score(item: Item, text: str) -> Outcome:
    """Multiple choice: the first character of the upper-cased answer against the gold label."""
    first = text.strip().upper()[:1]
    return Outcome({"accuracy": float(first == item.gold.upper())},
                   valid=first != "" and first in {lb.upper() for lb in item.labels})


def squad_score(item: Item, text: str) -> Outcome:
    """SQuAD: right when the answer is, or contains, the first gold answer (ignoring case)."""
    answer, gold = text.strip().upper(), item.answers[0].upper()
    return Outcome({"accuracy": float(answer == gold or gold in answer)}, valid=bool(answer))


def bleu_score(item: Item, text: str) -> Outcome:
    """Translation: sacrebleu's corpus BLEU of this one sample, ignoring case (zh tokenizer for Chinese)."""
    answer = text.strip().upper().split("</S>")[0].strip()
    tgt = item.subject.split("-")[1]
    bleu = sacrebleu.corpus_bleu([answer], [[item.answers[0]]], lowercase=True,
                                 tokenize="zh" if tgt == "zh" else "13a")
    return Outcome({"bleu": bleu.score}, valid=bool(answer))


def run_paper(model: LM, tokenizer, task: str, items: Sequence[Item], *, temperature: float = 0.0,
              generator: torch.Generator | None = None, advance: Progress = None) -> list[Outcome]:
    """The paper's protocol on ``items``, one KV-cached generation each."""
    out = []
    for it in items:
        text = continuation(model, tokenizer, paper_prompt(task, it), paper_budget(task, it),
                            temperature=temperature, generator=generator)
        out.append(paper_score(task, it, text))
        if advance is not None:
            advance(1)
    return out


# ----------------------------------------------------------------------------------------------
# The log-likelihood protocol


def loglik_request(task: str, item: Item) -> tuple[str, list[str]]:
    """Context and choice continuations of a multiple-choice item (lm-evaluation-harness style)."""
    return get_task(task).choices(item)


def question_choices(item: Item) -> tuple[str, list[str]]:
    """``Question: {q}\nAnswer:`` and each choice after a space."""
    return LOGLIK_TEMPLATE.format(q=item.question), [f" {c}" for c in item.choices]


def boolq_choices(item: Item) -> tuple[str, list[str]]:
    """The passage, ``Question: {question}?\nAnswer:``, and `` yes``/`` no``."""
    return LOGLIK_BOOLQ_TEMPLATE.format(passage=item.context, question=item.question), [f" {c}" for c in item.choices]


def choice_logliks(model: LM, tokenizer, requests: Sequence[tuple[str, Sequence[str]]],
                   advance: Progress = None) -> list[list[float]]:
    """Summed log-probability of each continuation given its context, all choices batched together."""
    context = model.cfg.context
    wins, shape = [], []
    for ctx, conts in requests:
        ctx_ids = tokenizer.encode(ctx)
        shape.append(len(conts))
        for c in conts:
            cont_ids = tokenizer.encode(c)
            full = (ctx_ids + cont_ids)[-context:]  # keep the end: the continuation is what is scored
            wins.append(Window(full, min(len(cont_ids), len(full) - 1)))
    nll = score_windows(model, wins, LOGLIK_BATCH, advance)
    out, k = [], 0
    for n in shape:
        out.append([-v for v in nll[k:k + n]])
        k += n
    return out


def run_loglik_mc(model: LM, tokenizer, task: str, items: Sequence[Item], advance: Progress = None) -> list[Outcome]:
    """accuracy / accuracy_norm of each multiple-choice item by choice log-likelihood."""
    reqs = [loglik_request(task, it) for it in items]
    lls = choice_logliks(model, tokenizer, reqs, advance)
    out = []
    for it, (_, conts), ll in zip(items, reqs, lls, strict=True):
        gold = it.labels.index(it.gold)
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, conts, strict=True)]
        out.append(Outcome({"accuracy": float(int(np.argmax(ll)) == gold),
                            "accuracy_norm": float(int(np.argmax(norm)) == gold)}))
    return out


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
        text = continuation(model, tokenizer, SQUAD_TEMPLATE.format(context=it.context, question=it.question),
                            SQUAD_LOGLIK_BUDGET)
        pred = text.strip().split("\n")[0].strip()
        out.append(Outcome({"exact_match": max(float(normalize_answer(pred) == normalize_answer(a)) for a in it.answers),
                            "f1": max(squad_f1(pred, a) for a in it.answers)}))
        if advance is not None:
            advance(1)
    return out


def run_protocol(model: LM, tokenizer, task: str, protocol: str, items: Sequence[Item], *,
                 temperature: float = 0.0, generator: torch.Generator | None = None, advance: Progress = None) -> list[Outcome]:
    """Outcomes of ``items`` under ``protocol``; ``advance(k)`` reports progress."""
    if protocol == "paper":
        return run_paper(model, tokenizer, task, items, temperature=temperature, generator=generator, advance=advance)
    spec = get_task(task)
    if spec.loglik is not None:
        return spec.loglik(model, tokenizer, items, advance)
    if spec.choices is not None:
        return run_loglik_mc(model, tokenizer, task, items, advance)
    raise GrowlmError(f"task {task!r} has no loglik protocol; use --protocol paper")


def has_loglik(task: str) -> bool:
    """Whether ``task`` can be scored under the loglik protocol."""
    spec = get_task(task)
    return spec.loglik is not None or spec.choices is not None


def progress_units(task: str, protocol: str, items: Sequence[Item]) -> int:
    """How many ``advance`` steps :func:`run_protocol` reports for ``items`` (choices for loglik MC)."""
    spec = get_task(task)
    if protocol == "loglik" and spec.loglik is None and spec.choices is not None:
        return sum(len(it.choices) for it in items)
    return len(items)


# ----------------------------------------------------------------------------------------------
# Statistics


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, 1.96·σ/√R and σ of per-run scores, σ the population standard deviation (as the paper)."""
    v = np.asarray(values, dtype=float)
    std = float(v.std())
    return float(v.mean()), 1.96 * std / math.sqrt(len(v)), std
