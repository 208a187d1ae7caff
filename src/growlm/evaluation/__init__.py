"""Evaluation: sliding-window perplexity and zero-shot benchmarks under two protocols.

* ``paper``: the generation protocol of "Growing Transformers" §7 (exact prompts, tiny generation
  budgets, first-character scoring, mean ± 1.96σ/√R over repeated runs).
* ``loglik``: the lm-evaluation-harness protocol (log-likelihood of each choice, ``acc`` and
  ``acc_norm``; SQuAD exact match / F1 of greedy generations).

Everything here is written against a minimal language-model interface (:class:`LM`) so that a
single decoder and a mixture of experts are evaluated by the same code. :func:`load_any` is the one
place that turns a path into such a model.

From the bottom up: ``task`` (what a task is: ``Item``, ``Outcome``, ``Task`` and the ``TASKS``
registry), ``readers`` (the public data formats), ``ppl`` (sliding-window scoring) and ``protocols``
(the scoring tasks share), ``tasks/`` (one module per task, perplexity included) and ``run``
(``evaluate``: one task on one model or on every stage of a run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from growlm.errors import GrowlmError
from growlm.store import MixtureDir, ModelDir, RunDir, resolve, stages
from growlm.store.model import load_model


class LM(Protocol):
    """What evaluation needs from a model: logits, its context length and a (KV-cached) ``generate``."""

    cfg: Any  # only ``cfg.context`` is read

    def __call__(self, idx: torch.Tensor) -> torch.Tensor: ...

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor: ...

    def parameters(self) -> Any: ...

    def eval(self) -> Any: ...


def load_any(path: str | Path) -> tuple[LM, Any]:
    """The model and tokenizer stored at ``path`` (a model dir, run stage or mixture), ready for inference.

    Raises a one-line GrowlmError when ``path`` is not a model, so callers never need to know which
    kind of model a path holds.
    """
    found = _model_or_mixture(path)
    if isinstance(found, MixtureDir):
        from growlm.compose import load_mixture

        mixture, tok = load_mixture(found.path)
        mixture.eval()
        return mixture, tok
    saved = load_model(found.path)
    saved.model.eval()
    return saved.model, saved.tokenizer()


def fingerprint_of(path: str | Path) -> str:
    """The fingerprint recorded for the model at ``path`` (what results are attributed to)."""
    found = _model_or_mixture(path)
    if isinstance(found, MixtureDir):
        from growlm.store.mixture import info_mixture

        return info_mixture(found.path)["fingerprint"]
    return found.meta.fingerprint


def _model_or_mixture(path: str | Path) -> ModelDir | MixtureDir:
    """What ``path`` holds, refusing a run: it is many models, one per stage."""
    found = resolve(path)
    if isinstance(found, RunDir):
        last = stages(found)[-1][1]
        raise GrowlmError(f"{path} is a training run, not a model; pass one of its stages (e.g. {last})")
    return found


def model_device(model: LM) -> torch.device:
    """Where the model's weights live (inputs must be created there)."""
    return next(iter(model.parameters())).device


__all__ = ["LM", "fingerprint_of", "load_any", "model_device"]
