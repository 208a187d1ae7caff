"""Perplexity: sliding-window loss, perplexity and bits per byte of UTF-8 text files (:mod:`growlm.evaluation.ppl`).

Not a benchmark: ``--data`` (required) names the texts, ``--limit`` keeps the first files, and the
result is pooled over all of them (one run, protocol ``sliding_window``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from growlm.errors import GrowlmError
from growlm.evaluation import LM
from growlm.evaluation.ppl import perplexity
from growlm.evaluation.task import TASKS, DataArg, Options, Task


def read_texts(data: DataArg) -> list[Path]:
    """The text files given, refusing none (there is no default text to measure)."""
    if data is None:
        raise GrowlmError("task 'ppl' needs text: pass --data FILE [FILE ...] (UTF-8 text files)")
    return [Path(data)] if isinstance(data, str | Path) else [Path(p) for p in data]


def measure(model: LM, tokenizer: Any, texts: list[Path], options: Options) -> dict:
    """The perplexity of ``texts`` (the first ``options.limit`` of them), as ``growlm eval`` reports it."""
    res = perplexity(model, tokenizer, texts[:options.limit] if options.limit else texts, progress=options.progress)
    return {"protocol": "sliding_window", "n": res.pop("n_texts"), "runs": 1, **res}


TASKS.register("ppl", Task("perplexity", read=read_texts, measure=measure))
