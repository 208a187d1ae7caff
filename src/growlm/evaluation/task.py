"""What an evaluation task is: a :class:`Task`, registered by name in :data:`TASKS`.

A benchmark's questions are :class:`Item` s, whatever their source format, and each scored item an
:class:`Outcome`. Every built-in task is one module of :mod:`growlm.evaluation.tasks` that defines its
Task and registers it with one line; a task of your own does the same (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from growlm.errors import GrowlmError
from growlm.evaluation import LM
from growlm.registry import Registry

DataArg = str | Path | Iterable[str | Path] | None  # --data: one path (or hf:NAME), several, or none
Progress = Callable[[int], object] | None  # a progress bar's ``update``


@dataclass(frozen=True)
class Item:
    """One benchmark question, whatever its source format.

    Multiple choice: ``choices`` with parallel ``labels`` and the ``gold`` label. BoolQ has the
    labels T/F with choice texts yes/no. SQuAD: ``context`` plus ``answers`` (gold texts, the first
    is the reference). Translation: ``context`` is the source sentence, ``answers`` the reference and
    ``subject`` the direction ``src-tgt``.
    """

    question: str
    choices: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    gold: str = ""
    answers: tuple[str, ...] = ()
    context: str = ""
    subject: str = ""


@dataclass(frozen=True)
class Outcome:
    """The scores of one item; ``valid`` is None where validity is not defined (loglik)."""

    metrics: dict[str, float]
    valid: bool | None = None


@dataclass(frozen=True)
class Options:
    """How a task is scored: ``growlm eval``'s options, checked (``progress``: draw a progress bar)."""

    protocol: str
    limit: int | None
    runs: int
    seed: int
    sample: bool
    progress: bool


@dataclass(frozen=True)
class Task:
    """One evaluation task, registered by name in :data:`TASKS` (see docs/extending.md).

    A benchmark is scored item by item. Data: ``split`` of the files given (or of the ``offline``
    copies: (package, path inside it), first found wins; ``no_offline`` says what to pass when none
    exists), each record turned into items by ``normalise`` (None skips it). The paper's protocol:
    ``prompt(item)`` generates ``budget`` new tokens (a number, or ``budget(item)``), which
    ``score(item, text)`` turns into an Outcome. The log-likelihood protocol: ``choices(item)`` gives
    the context and the continuations whose log-likelihoods pick the answer (``item.labels``/
    ``item.gold``), or ``loglik(model, tokenizer, items, advance)`` scores the items its own way; with
    neither the task has no loglik protocol. ``scorable(item, protocol)`` keeps the items a protocol
    scores (default: all).

    A task that is no benchmark (perplexity) measures instead: ``read(data)`` turns ``--data`` into
    what it scores (before any model is loaded) and ``measure(model, tokenizer, source, options)``
    returns the result's scores; ``--protocol`` does not change it and ``--sample`` does not apply.
    """

    title: str
    split: str = "validation"
    normalise: Callable[[dict, Path], Item | list[Item] | None] | None = None
    prompt: Callable[[Item], str] | None = None
    budget: int | Callable[[Item], int] = 1
    score: Callable[[Item, str], Outcome] | None = None
    choices: Callable[[Item], tuple[str, list[str]]] | None = None
    loglik: Callable[[LM, Any, list[Item], Progress], list[Outcome]] | None = None
    scorable: Callable[[Item, str], bool] | None = None
    offline: tuple[tuple[str, str], ...] = ()
    no_offline: str = ""
    read: Callable[[DataArg], list] | None = None
    measure: Callable[[LM, Any, list, Options], dict] | None = None

    def __post_init__(self) -> None:
        # refused when written, not once a model is half scored
        if self.is_benchmark and None in (self.normalise, self.prompt, self.score):
            raise ValueError(f"task {self.title!r} needs normalise, prompt and score (a benchmark) or read and measure")
        if not self.is_benchmark and self.read is None:
            raise ValueError(f"task {self.title!r} measures: it needs read as well")

    @property
    def is_benchmark(self) -> bool:
        """Scored item by item under the paper or loglik protocol (every task that does not measure)."""
        return self.measure is None

    @property
    def has_loglik(self) -> bool:
        """Whether the task's items can be scored under the loglik protocol."""
        return self.loglik is not None or self.choices is not None

    def budget_of(self, item: Item) -> int:
        """The paper's max_new_tokens for ``item``."""
        return self.budget if isinstance(self.budget, int) else self.budget(item)


# the tasks by name; the built-ins are registered by growlm.evaluation.tasks (imported on first read)
TASKS: Registry[Task] = Registry("eval task", "growlm.evaluation.tasks")


def get_task(name: str) -> Task:
    """The registered task ``name``, or a one-line error naming the known ones."""
    task = TASKS.get(name)
    if task is None:
        raise GrowlmError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return task
