"""The two evaluation protocols, the scoring several tasks share, and the confidence interval.

``paper`` ("Growing Transformers" §7, its ``_models_benchmarking.py``): the task's literal prompt is
encoded without special tokens, ``generate`` adds a handful of tokens (the task's budget: MMLU 1,
ARC/CSQA 2, BoolQ 1, SQuAD/BLEU as many as the gold answer has characters, at most 100), the decoded
continuation has ``<s>`` removed and is ``.strip().upper()``-ed and the task scores it: multiple
choice compares its first character with the gold label (:func:`choice_score`).

``loglik`` (lm-evaluation-harness): for each choice the summed log-probability of `` {choice}``
after the task's context (by default ``Question: {q}\\nAnswer:``); ``accuracy`` is the argmax,
``accuracy_norm`` the argmax of the log-likelihood per UTF-8 byte of the continuation. Context and
continuation are tokenized separately so no token straddles the boundary. A task may score its
items its own way instead (SQuAD v2: exact match and F1 of greedy generations).

Each task's prompts and scoring live in its own module of :mod:`growlm.evaluation.tasks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from growlm.errors import GrowlmError
from growlm.evaluation import LM, model_device
from growlm.evaluation.ppl import Window, score_windows
from growlm.evaluation.task import Item, Outcome, Progress, Task

PROTOCOLS = ("paper", "loglik")
GEN_CAP = 100  # the paper's cap on SQuAD/BLEU budgets
# lm-evaluation-harness's context for log-likelihood scoring
LOGLIK_TEMPLATE = "Question: {q}\nAnswer:"
LOGLIK_BATCH = 16


def select(task: Task, protocol: str, items: Sequence[Item]) -> list[Item]:
    """The items a protocol scores (the task's ``scorable``; all of them by default)."""
    keep = task.scorable
    return list(items) if keep is None else [it for it in items if keep(it, protocol)]


# ----------------------------------------------------------------------------------------------
# The paper's protocol


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


def choice_score(item: Item, text: str) -> Outcome:
    """Multiple choice: the first character of the upper-cased answer against the gold label."""
    first = text.strip().upper()[:1]
    return Outcome({"accuracy": float(first == item.gold.upper())},
                   valid=first != "" and first in {lb.upper() for lb in item.labels})


def run_paper(model: LM, tokenizer, task: Task, items: Sequence[Item], *, temperature: float = 0.0,
              generator: torch.Generator | None = None, advance: Progress = None) -> list[Outcome]:
    """The paper's protocol on ``items``, one KV-cached generation each."""
    out = []
    for it in items:
        text = continuation(model, tokenizer, task.prompt(it), task.budget_of(it), temperature=temperature,
                            generator=generator)
        out.append(task.score(it, text))
        if advance is not None:
            advance(1)
    return out


# ----------------------------------------------------------------------------------------------
# The log-likelihood protocol


def question_choices(item: Item) -> tuple[str, list[str]]:
    """``Question: {q}\\nAnswer:`` and each choice after a space."""
    return LOGLIK_TEMPLATE.format(q=item.question), [f" {c}" for c in item.choices]


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


def run_loglik_mc(model: LM, tokenizer, task: Task, items: Sequence[Item], advance: Progress = None) -> list[Outcome]:
    """accuracy / accuracy_norm of each multiple-choice item by choice log-likelihood."""
    reqs = [task.choices(it) for it in items]
    lls = choice_logliks(model, tokenizer, reqs, advance)
    out = []
    for it, (_, conts), ll in zip(items, reqs, lls, strict=True):
        gold = it.labels.index(it.gold)
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, conts, strict=True)]
        out.append(Outcome({"accuracy": float(int(np.argmax(ll)) == gold),
                            "accuracy_norm": float(int(np.argmax(norm)) == gold)}))
    return out


def run_protocol(model: LM, tokenizer, task: Task, protocol: str, items: Sequence[Item], *,
                 temperature: float = 0.0, generator: torch.Generator | None = None, advance: Progress = None) -> list[Outcome]:
    """Outcomes of ``items`` under ``protocol``; ``advance(k)`` reports progress."""
    if protocol == "paper":
        return run_paper(model, tokenizer, task, items, temperature=temperature, generator=generator, advance=advance)
    if task.loglik is not None:
        return task.loglik(model, tokenizer, items, advance)
    if task.choices is not None:
        return run_loglik_mc(model, tokenizer, task, items, advance)
    raise GrowlmError(f"{task.title} has no loglik protocol; use --protocol paper")


def progress_units(task: Task, protocol: str, items: Sequence[Item]) -> int:
    """How many ``advance`` steps :func:`run_protocol` reports for ``items`` (choices for loglik MC)."""
    if protocol == "loglik" and task.loglik is None and task.choices is not None:
        return sum(len(it.choices) for it in items)
    return len(items)


# ----------------------------------------------------------------------------------------------
# Statistics


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, 1.96·σ/√R and σ of per-run scores, σ the population standard deviation (as the paper)."""
    v = np.asarray(values, dtype=float)
    std = float(v.std())
    return float(v.mean()), 1.96 * std / math.sqrt(len(v)), std
