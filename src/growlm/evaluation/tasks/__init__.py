"""The built-in evaluation tasks, one module each (ARC's two sets share one): perplexity, then the
benchmarks of the paper's §7.

Each module defines its task (how records become items, its prompts and scoring) and registers it in
:data:`~growlm.evaluation.task.TASKS` with one line; importing this package registers them all.
"""

from growlm.evaluation.task import TASKS  # the registry, here with every built-in in it (--task's choices)

# isort: off
# the built-ins register themselves on import, in this order (the order of --task's choices and of errors)
from growlm.evaluation.tasks import ppl, mmlu, arc, csqa, boolq, squad_v2, bleu  # noqa: F401
# isort: on

__all__ = ["TASKS"]
