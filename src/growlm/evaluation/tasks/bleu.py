"""Translation (OPUS-100, paper §7): the direction in words and the source sentence, as many new tokens
as the reference has characters, scored by BLEU; paper protocol only.

BLEU is sacrebleu's corpus BLEU of each sample on its own, averaged. Two choices the paper leaves
open: it ignores case (the continuation is upper-cased, the reference is not) and uses sacrebleu's
``zh`` tokenizer for Chinese targets. Records: translation {xx, yy}, scored in both directions; no
offline copy exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import sacrebleu

from growlm.evaluation.protocols import answer_budget
from growlm.evaluation.readers import bad_record
from growlm.evaluation.task import TASKS, Item, Outcome, Task

# the paper's prompt, byte for byte
BLEU_TEMPLATE = "Translate from {Src} to {Tgt}:\n{source}\nAnswer:"
LANGUAGES = {"en": "English", "ru": "Russian", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish"}


def translation_items(rec: dict, f: Path) -> list[Item]:
    """translation {xx: ..., yy: ...}: both directions, as the paper."""
    tr = rec.get("translation")
    if isinstance(tr, str):
        tr = json.loads(tr)
    if not isinstance(tr, dict) or len(tr) != 2:
        raise bad_record(f, "not a translation record (translation{src, tgt} expected)", rec)
    (a, ta), (b, tb) = sorted(tr.items())
    return [Item(question="", context=str(ta), answers=(str(tb),), subject=f"{a}-{b}"),
            Item(question="", context=str(tb), answers=(str(ta),), subject=f"{b}-{a}")]


def bleu_prompt(item: Item) -> str:
    """The direction in words, then the source sentence."""
    src, tgt = item.subject.split("-")
    return BLEU_TEMPLATE.format(Src=LANGUAGES.get(src, src), Tgt=LANGUAGES.get(tgt, tgt), source=item.context)


def bleu_score(item: Item, text: str) -> Outcome:
    """sacrebleu's corpus BLEU of this one sample, ignoring case (zh tokenizer for Chinese)."""
    answer = text.strip().upper().split("</S>")[0].strip()
    tgt = item.subject.split("-")[1]
    bleu = sacrebleu.corpus_bleu([answer], [[item.answers[0]]], lowercase=True,
                                 tokenize="zh" if tgt == "zh" else "13a")
    return Outcome({"bleu": bleu.score}, valid=bool(answer))


TASKS.register("bleu", Task(
    "translation", split="validation", normalise=translation_items, prompt=bleu_prompt, budget=answer_budget,
    score=bleu_score,
    no_offline="there is no offline copy of OPUS-100; pass --data PATH to translation pairs in the Hugging Face "
               "opus-100 layout (JSONL/parquet/save_to_disk records with a 'translation' field)"))
