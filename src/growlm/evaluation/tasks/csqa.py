"""CommonsenseQA (paper §7): ARC's layout and protocol, five labelled options."""

from __future__ import annotations

from growlm.evaluation.task import TASKS
from growlm.evaluation.tasks.arc import labelled_choice_task

TASKS.register("csqa", labelled_choice_task("CommonsenseQA", "hf_datasets/tau/commonsense_qa/none/validation"))
