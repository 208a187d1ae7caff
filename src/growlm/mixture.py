"""The mixture module: N experts grown over one substrate, their logits combined by a rule (paper §5) or weighted
per token by a trained router. A model part like :class:`growlm.model.GrowLM`; :mod:`growlm.compose` merges and
tunes mixtures, :mod:`growlm.loading` loads them, :mod:`growlm.store.mixture` owns their dir format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.model import GrowLM, KVCache
from growlm.rules import Rule

# the lowest prior a router starts from: log(0) would freeze an expert out of the gate for good
_MIN_PRIOR = 1e-4


@dataclass
class MixtureConfig:
    """What :func:`growlm.model.generate` and the evaluators read from a model's ``cfg``."""

    n_experts: int
    vocab_size: int
    context: int


class MixtureCache:
    """One KV cache per expert, advanced together; ``pos`` is the shared position."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.pos = 0


class Router(nn.Module):
    """Per-token gate: a Linear from the experts' concatenated final hidden states to N weights.

    Zero weights and ``log(prior)`` biases make it start exactly at the fixed rule it replaces,
    so training can only move away from the merge it improves on.
    """

    def __init__(self, in_features: int, prior: Sequence[float]) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, len(prior))
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.copy_(torch.tensor([max(p, _MIN_PRIOR) for p in prior]).log())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate weights ``[N, B, T]`` from hidden states ``[B, T, sum d_i]``."""
        return torch.softmax(self.proj(hidden).float(), dim=-1).permute(2, 0, 1)


class Mixture(nn.Module):
    """N experts over one substrate, combined per :class:`Rule` (or a trained :class:`Router`)."""

    def __init__(self, experts: Sequence[GrowLM], rule: Rule, router: Router | None = None) -> None:
        super().__init__()
        if len(experts) < 2:
            raise GrowlmError(f"a mixture needs at least two experts, got {len(experts)}")
        self.kind = rule.kind
        if self.kind.trained != (router is not None):
            raise GrowlmError(f"combine {rule.combine!r} and the presence of a router disagree")
        self.experts = nn.ModuleList(experts)
        self.rule = rule
        self.router = router
        vocab = {e.cfg.vocab_size for e in experts}
        if len(vocab) != 1:
            raise GrowlmError(f"experts disagree on the vocabulary size: {sorted(vocab)}")
        self.cfg = MixtureConfig(len(experts), vocab.pop(), min(e.cfg.context for e in experts))
        # a buffer, so .to(device) moves the fixed weights with the experts
        fixed = self.kind.fixed_weights(rule, len(experts))
        w = torch.tensor(fixed, dtype=torch.float32) if fixed is not None else None
        self.register_buffer("weights", w, persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: MixtureCache | None = None) -> torch.Tensor:
        """Combined logits ``[B, T, V]``, or the mean cross-entropy of the combined distribution."""
        caches = cache.caches if cache is not None else [None] * len(self.experts)
        logits = (e(idx, cache=c) for e, c in zip(self.experts, caches, strict=True))
        if self.router is None:
            out = self.kind.combine(logits, self.weights, self.rule.space, reuse_inputs=True)
        else:  # the gate needs every expert's final hidden state before any logits can be weighted
            hidden: list[torch.Tensor] = []
            hooks = [e.ln_f.register_forward_hook(lambda _m, _i, h: hidden.append(h)) for e in self.experts]
            try:
                logits = list(logits)
            finally:
                for h in hooks:
                    h.remove()
            out = self.kind.combine(logits, self.router(torch.cat(hidden, dim=-1)), self.rule.space,
                                    reuse_inputs=True)
        if cache is not None:
            cache.pos += idx.shape[1]
        if targets is None:
            return out
        return F.cross_entropy(out.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def make_cache(self, batch: int, max_len: int) -> MixtureCache:
        """A cache holding one KV cache per expert (so generation is cached for every expert)."""
        return MixtureCache([e.make_cache(batch, max_len) for e in self.experts])

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See :func:`growlm.model.generate`."""
        from growlm.model import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The experts' output layers (final norm + LM head), under the mixture's tensor names."""
        return {k: v for k, v in self.state_dict().items() if is_head(k)}

    def router_state(self) -> dict[str, torch.Tensor]:
        """The gate's tensors (empty without a router)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("router.")}


def is_head(name: str) -> bool:
    """Whether a mixture tensor name is an expert's output layer (final norm or LM head)."""
    return name.startswith("experts.") and (".head." in name or ".ln_f." in name)
