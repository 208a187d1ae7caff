"""Bit-code substrates (paper §2.3, §2.4): the token-id binary code and random collision-free codes.

Both are ``{0, 1}`` float32 tables of width ``k`` lifted to ``dim`` by ``repeat_interleave(dim // k)``
(each bit repeated ``dim // k`` times consecutively), so the lifted matrix has rank ≤ k.
"""

from __future__ import annotations

import math

import torch

from growlm.errors import GrowlmError
from growlm.substrate.base import Substrate, make_substrate
from growlm.substrate.registry import Params, Vocab, register

DEFAULT_RANDOM_BITS = 64
# Up to this code width, random codes are a prefix of a random permutation of all 2^n codes
# (exact and fast); above it, draw-and-redraw converges at once and avoids a 2^n allocation.
_PERMUTATION_MAX_BITS = 22


def required_bits(vocab_size: int) -> int:
    """The fewest bits that give every id a distinct code: ``ceil(log2 V)`` (at least 1)."""
    return max(1, math.ceil(math.log2(vocab_size))) if vocab_size > 1 else 1


def _lift(dim: int, k: int) -> int:
    if dim % k:
        # one builder serves plans and `growlm substrate build`: name the setting as each spells it
        raise GrowlmError(f"the substrate's width {dim} (model.d_model in a plan, --dim for substrate build) "
                          f"is not a multiple of its code width k={k}")
    return dim // k


def id_codes(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, bits]`` float32 {0,1}: the binary code of each id, most significant bit first."""
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    return ((ids.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.float32)


def build_binary(
    vocab_size: int, *, dim: int, bits: int | None = None, tokenizer_fingerprint: str | None = None
) -> Substrate:
    """Token-id code: row ``t`` is the ``k``-bit binary code of ``t``, MSB first (the paper does not
    state the order; any fixed order is equivalent up to a permutation of features). ``k`` is
    ``ceil(log2 V)`` unless ``bits`` asks for more (e.g. 16 for a compact vocabulary)."""
    need = required_bits(vocab_size)
    k = need if bits is None else bits
    if k < need:
        raise GrowlmError(
            f"bits = {k} (substrate.bits in a plan, --bits for substrate build) is too few for {vocab_size} "
            f"token ids; the binary code needs at least {need}"
        )
    lift = _lift(dim, k)
    table = id_codes(torch.arange(vocab_size), k)
    recipe = {
        "kind": "binary",
        "dim": dim,
        "bits": k,
        "seed": None,
        "params": {"order": "msb-first", "values": [0, 1], "lift": "repeat_interleave"},
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": vocab_size,
    }
    return make_substrate("binary", table, lift, recipe)


def _random_codes(vocab_size: int, n: int, seed: int) -> torch.Tensor:
    """``[V, n]`` {0,1} float32, pairwise distinct, a pure function of (V, n, seed)."""
    g = torch.Generator().manual_seed(seed)
    if n <= _PERMUTATION_MAX_BITS:
        return id_codes(torch.randperm(2**n, generator=g)[:vocab_size], n)
    codes = torch.randint(0, 2, (vocab_size, n), generator=g, dtype=torch.uint8)
    while True:
        # Keep the first occurrence of each code; redraw the later duplicates from the same stream.
        _, inverse = torch.unique(codes, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), vocab_size, dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(vocab_size), reduce="amin")
        dup = first[inverse] != torch.arange(vocab_size)
        if not dup.any():
            return codes.to(torch.float32)
        codes[dup] = torch.randint(0, 2, (int(dup.sum()), n), generator=g, dtype=torch.uint8)


def build_random_bits(
    vocab_size: int,
    *,
    dim: int,
    bits: int | None = None,
    seed: int = 0,
    tokenizer_fingerprint: str | None = None,
) -> Substrate:
    """Random ``n``-bit codes (``n = bits``, default 64), unique per token by construction,
    seeded by ``seed``; the paper's 64_BIT / 256_BIT / 1024_BIT ablations."""
    n = DEFAULT_RANDOM_BITS if bits is None else bits
    if n < 1 or n < required_bits(vocab_size):
        raise GrowlmError(
            f"--bits {n} cannot give {vocab_size} tokens unique codes; use at least {required_bits(vocab_size)}"
        )
    lift = _lift(dim, n)
    recipe = {
        "kind": "random-bits",
        "dim": dim,
        "bits": n,
        "seed": seed,
        "params": {
            "values": [0, 1],
            "generator": "torch.Generator",
            "unique": "randperm-prefix" if n <= _PERMUTATION_MAX_BITS else "redraw-duplicates",
            "lift": "repeat_interleave",
        },
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": vocab_size,
    }
    return make_substrate("random-bits", _random_codes(vocab_size, n, seed), lift, recipe)


class BinaryParams(Params):
    """``bits``: the code width (default ``ceil(log2 V)``)."""

    bits: int | None = None


class RandomBitsParams(Params):
    """``bits``: the code width (default 64); ``seed``: the generator's seed."""

    bits: int | None = None
    seed: int = 0


def _binary(vocab: Vocab, *, dim: int, bits: int | None) -> Substrate:
    return build_binary(vocab.size, dim=dim, bits=bits, tokenizer_fingerprint=vocab.fingerprint)


def _random_bits(vocab: Vocab, *, dim: int, bits: int | None, seed: int) -> Substrate:
    return build_random_bits(vocab.size, dim=dim, bits=bits, seed=seed, tokenizer_fingerprint=vocab.fingerprint)


register("binary", _binary, BinaryParams)
register("random-bits", _random_bits, RandomBitsParams)
