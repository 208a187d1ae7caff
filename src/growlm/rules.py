"""How expert logits combine into a mixture's: the combine rules, registered by name in :data:`RULES`.

Over expert logits ``l_i``:

* ``mean-logits``: ``mean_i l_i`` (the paper; a geometric mean of the distributions, "AND")
* ``mean-probs``:  ``log mean_i softmax(l_i)`` (Branch-Train-Merge's mixture, "OR")
* ``weighted``:    fixed weights summing to 1, in logit space or probability space
* ``router``:      per-token weights from a gate trained after merging (:mod:`growlm.compose`), in either space

A low module of its own: the mixture format (:mod:`growlm.store.mixture`) checks a ``combine`` against
:data:`RULES` and the mixture model (:mod:`growlm.compose`) applies it, so neither imports the other for it.
A new rule is one module and one line: ``RULES.register(name, MyRule())`` (see docs/extending.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.registry import Registry

SPACES = ("logits", "probs")


@dataclass(frozen=True)
class Rule:
    """How expert logits combine: ``combine`` (a name in :data:`RULES`), the ``space`` weights act in,
    and the fixed weights (normalised; ``None`` for a uniform mean and for a router's per-token weights)."""

    combine: str
    space: str
    weights: tuple[float, ...] | None

    @property
    def kind(self) -> CombineRule:
        """The registered :class:`CombineRule` this rule is an instance of."""
        kind = RULES.get(self.combine)
        if kind is None:
            raise GrowlmError(f"unknown combine rule {self.combine!r}; choose one of {', '.join(RULES.names())}")
        return kind

    def prior(self, n: int) -> list[float]:
        """The fixed weights as a list (uniform when none are given): where a router starts."""
        return list(self.weights) if self.weights is not None else [1.0 / n] * n

    def to_json(self) -> dict:
        return {"combine": self.combine, "space": self.space,
                "weights": list(self.weights) if self.weights is not None else None}


class CombineRule:
    """One way of combining expert logits, registered by name in :data:`RULES` (see docs/extending.md).

    The class attributes describe it: ``spaces`` where weights act (the first is the default; with
    more than one the user picks, ``--weighted-space``); ``weighted``: it takes fixed weights, one per
    expert; ``trained``: its weights are per token, from a gate trained after merging (never asked for
    by name); ``extends``: it has no parameters, so a mixture combined this way takes a new expert
    under the same rule. The default :meth:`combine` is the weighted mean in its space.
    """

    spaces: tuple[str, ...] = ("logits",)
    weighted: bool = False
    trained: bool = False
    extends: bool = True

    def combine(self, logits: Iterable[torch.Tensor], weights: torch.Tensor | None, space: str, *,
                reuse_inputs: bool = False) -> torch.Tensor:
        """N expert logits ``[B, T, V]`` (an iterable, one at a time) -> one ``[B, T, V]`` usable as logits.

        ``weights`` is what :meth:`fixed_weights` gave, as an ``[N]`` tensor, or a router's ``[N, B, T]``.
        With ``reuse_inputs`` (outside autograd) the inputs are temporaries the result may overwrite.
        """
        return combine_logits(logits, weights, space, reuse_inputs=reuse_inputs)

    def fixed_weights(self, rule: Rule, n: int) -> list[float] | None:
        """The weights a :class:`Mixture` of ``n`` experts hands to :meth:`combine` (None: uniform)."""
        return None if rule.weights is None else list(rule.weights)


class MeanProbs(CombineRule):
    """``log mean_i softmax(l_i)``: the uniform weights are held explicitly, so each expert's pass adds
    ``log(1/N)`` instead of a pass of its own at the end."""

    spaces = ("probs",)

    def fixed_weights(self, rule: Rule, n: int) -> list[float] | None:
        return rule.prior(n)


class Weighted(CombineRule):
    """Fixed user weights summing to 1, in logit or probability space."""

    spaces = SPACES
    weighted = True
    extends = False  # the weights cannot cover a new expert


class Routed(CombineRule):
    """Per-token weights from a trained :class:`Router`, in either space."""

    spaces = SPACES
    trained = True
    extends = False


# the combine rules by name; a mixture.json's combine must name one of them
RULES: Registry[CombineRule] = Registry("combine rule", "growlm.rules")

# the built-in combine rules
RULES.register("mean-logits", CombineRule())
RULES.register("mean-probs", MeanProbs())
RULES.register("weighted", Weighted())
RULES.register("router", Routed())


def fixed_rules() -> tuple[str, ...]:
    """The combine rules a user asks for by name (every registered one but the trained)."""
    return tuple(n for n in RULES.names() if not RULES.get(n).trained)


def make_rule(combine: str, n: int, weights: Sequence[float] | None = None, space: str = "logits") -> Rule:
    """Validate a combine request for ``n`` experts; ``weights`` are normalised to sum to 1."""
    kind = RULES.get(combine)
    if kind is None or kind.trained:
        raise GrowlmError(f"unknown combine rule {combine!r}; choose one of {', '.join(fixed_rules())}")
    if space not in SPACES:
        raise GrowlmError(f"unknown weighted space {space!r}; choose logits or probs")
    space = space if space in kind.spaces else kind.spaces[0]
    if not kind.weighted:
        if weights is not None:
            takers = " or ".join(f'"{r}"' for r in fixed_rules() if RULES.get(r).weighted)
            raise GrowlmError(f"weights only apply to combine = {takers}, not {combine!r}")
        return Rule(combine, space, None)
    if weights is None:
        raise GrowlmError(f'combine = "{combine}" needs weights (one per expert, e.g. --weights 0.7,0.3)')
    try:  # a string is iterable too: "ab" would be two weights
        ws = None if isinstance(weights, str | bytes) else [float(w) for w in weights]
    except (TypeError, ValueError):
        ws = None
    if ws is None:
        raise GrowlmError(f"weights must be one number per expert, got {weights!r:.60}")
    if len(ws) != n:
        raise GrowlmError(f"{len(ws)} weights given for {n} experts")
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise GrowlmError(f"weights must be finite and non-negative, got {ws}")
    total = sum(ws)
    if total <= 0:
        raise GrowlmError(f"weights must sum to a positive value, got {ws}")
    return Rule(combine, space, tuple(w / total for w in ws))


def combine_logits(logits: Iterable[torch.Tensor], weights: torch.Tensor | None, space: str, *,
                   reuse_inputs: bool = False) -> torch.Tensor:
    """Combine N expert logits ``[B, T, V]`` into one ``[B, T, V]`` usable as logits.

    ``weights`` is ``[N]`` (fixed) or ``[N, B, T]`` (per token), summing to 1 over N; ``None``
    is the uniform mean. In ``probs`` space the result is the log of the mixture probability,
    already normalised, so softmax/cross-entropy over it give the mixture itself. The experts are
    folded in one at a time (a running sum / log-sum-exp), so ``logits`` may be a generator and
    only one expert's logits need exist at once: no [N, B, T, V] stack, no extra pass over it.

    The inputs are left untouched unless ``reuse_inputs``: then, outside autograd, the caller hands
    over temporaries (a mixture's expert outputs) and the result is folded into their memory. On a
    CPU every fresh [B, T, V] tensor is page-faulted in anew, which costs more than the arithmetic.
    """
    in_place = reuse_inputs and not torch.is_grad_enabled()
    acc, n = None, 0
    for i, lg in enumerate(logits):
        w = None if weights is None else weights[i] if weights.dim() == 1 else weights[i].unsqueeze(-1)
        if space == "logits" and in_place:
            if acc is not None:
                acc = acc.add_(lg) if w is None else acc.addcmul_(lg, w)
            elif w is None:
                acc = lg
            else:  # the first expert's memory takes the sum, unless the weights widen its dtype
                acc = lg.mul_(w) if torch.result_type(lg, w) == lg.dtype else lg * w
        elif space == "logits":
            term = lg if w is None else lg * w
            # from the first sum on the accumulator is ours: add in place (the inputs stay untouched)
            acc = term if acc is None else acc + term if n == 1 else acc.add_(term)
        elif in_place:
            acc = _fold_log_probs_(acc, lg, None if w is None else w.float().log())
        else:
            term = F.log_softmax(lg.float(), dim=-1)
            term = term if w is None else term + w.float().log()
            # in place unless autograd needs the inputs (logaddexp's backward reads them)
            grad = term.requires_grad or (acc is not None and acc.requires_grad)
            acc = term if acc is None else torch.logaddexp(acc, term, out=None if grad else acc)
        n += 1
    if weights is not None or n == 1:
        return acc
    return acc.div_(n) if space == "logits" else acc.sub_(math.log(n))


# rows per chunk of the in-place fold on a CPU: 1 MB of fp32 scratch, which stays in cache
_CPU_CHUNK = 1 << 18


def _fold_log_probs_(acc: torch.Tensor | None, lg: torch.Tensor, log_w: torch.Tensor | None) -> torch.Tensor:
    """``logaddexp(acc, log_softmax(lg) + log_w)`` into ``acc`` (or into ``lg`` for the first expert).

    Outside autograd only. On a CPU the rows go in chunks through one small scratch buffer, so no
    temporary is allocated per chunk: the allocator would hand each one out as fresh pages. On a GPU
    (a caching allocator) the whole tensor is one chunk, so the kernels stay few.
    """
    vocab = lg.shape[-1]
    if acc is None:
        own = lg.dtype == torch.float32 and lg.is_contiguous()
        out = lg if own else torch.empty(lg.shape, dtype=torch.float32, device=lg.device)
    else:
        out = acc
    src, dst = lg.reshape(-1, vocab), out.view(-1, vocab)
    per_row = log_w is not None and log_w.dim() > 0
    lw = log_w.reshape(-1, 1) if per_row else log_w
    rows = max(1, min(src.shape[0], _CPU_CHUNK // vocab if lg.device.type == "cpu" else src.shape[0]))
    scratch = torch.empty(rows, vocab, dtype=torch.float32, device=lg.device)
    for s in range(0, src.shape[0], rows):
        part = dst[s:s + rows]
        term = torch.log_softmax(src[s:s + rows], -1, dtype=torch.float32, out=scratch[:part.shape[0]])
        if lw is not None:
            term.add_(lw[s:s + rows] if per_row else lw)
        if acc is None:
            part.copy_(term)
        else:
            torch.logaddexp(part, term, out=part)
    return out
