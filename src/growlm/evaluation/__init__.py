"""Evaluation: sliding-window perplexity and zero-shot benchmarks under two protocols.

* ``paper``: the generation protocol of "Growing Transformers" §7 (exact prompts, tiny generation
  budgets, first-character scoring, mean ± 1.96σ/√R over repeated runs).
* ``loglik``: the lm-evaluation-harness protocol (log-likelihood of each choice, ``acc`` and
  ``acc_norm``; SQuAD exact match / F1 of greedy generations).

Everything here is written against a minimal language-model interface (:class:`LM`) so that a
single decoder and a mixture of experts are evaluated by the same code; :func:`growlm.loading.load_any`
turns a path into such a model.

From the bottom up: ``task`` (what a task is: ``Item``, ``Outcome``, ``Task`` and the ``TASKS``
registry), ``readers`` (the public data formats), ``ppl`` (sliding-window scoring) and ``protocols``
(the scoring tasks share), ``tasks/`` (one module per task, perplexity included) and ``run``
(``evaluate``: one task on one model or on every stage of a run).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class LM(Protocol):
    """What evaluation needs from a model: logits, its context length and a (KV-cached) ``generate``."""

    cfg: Any  # only ``cfg.context`` is read

    def __call__(self, idx: torch.Tensor) -> torch.Tensor: ...

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor: ...

    def parameters(self) -> Any: ...

    def eval(self) -> Any: ...


def model_device(model: LM) -> torch.device:
    """Where the model's weights live (inputs must be created there)."""
    return next(iter(model.parameters())).device


__all__ = ["LM", "model_device"]
