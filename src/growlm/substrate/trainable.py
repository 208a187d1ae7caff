"""The learned-embedding baseline (paper §2.4 UNFROZEN): only its initial matrix lives here."""

from __future__ import annotations

import torch

from growlm.substrate.base import Substrate, make_substrate
from growlm.substrate.registry import Params, Vocab, register

INIT_STD = 0.02


def build_trainable(
    vocab_size: int, *, dim: int, seed: int = 0, tokenizer_fingerprint: str | None = None
) -> Substrate:
    """Initial ``[V, dim]`` matrix drawn from normal(0, 0.02) with a seeded generator (the GPT-2
    convention for ``nn.Embedding``); the model trains it, so ``trainable`` is True."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab_size, dim, generator=g, dtype=torch.float32) * INIT_STD
    recipe = {
        "kind": "trainable",
        "dim": dim,
        "bits": None,
        "seed": seed,
        "params": {"init": "normal", "mean": 0.0, "std": INIT_STD, "generator": "torch.Generator"},
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": vocab_size,
    }
    return make_substrate("trainable", table, 1, recipe)


class TrainableParams(Params):
    """``seed``: the initial matrix's generator seed."""

    seed: int = 0


def _trainable(vocab: Vocab, *, dim: int, seed: int) -> Substrate:
    return build_trainable(vocab.size, dim=dim, seed=seed, tokenizer_fingerprint=vocab.fingerprint)


register("trainable", _trainable, TrainableParams, trains=True)
