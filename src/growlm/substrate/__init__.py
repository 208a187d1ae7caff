"""Frozen token substrates: the fixed ``[V, dim]`` matrix every model of a family embeds with.

``build_substrate(kind, dim=..., tokenizer=... | vocab_size=...)`` makes one of :data:`KINDS`;
``Substrate.save`` / ``Substrate.load`` store and verify it (fingerprint = sha256 of recipe + table).
"""

from __future__ import annotations

from typing import Any

from growlm.errors import GrowlmError
from growlm.substrate.base import KINDS, META_FILE, WEIGHT_FILE, Substrate, substrate_fingerprint
from growlm.substrate.binary import build_binary, build_random_bits, required_bits
from growlm.substrate.glyph import BASES, GLYPH_PARAMS, GlyphRenderer, build_glyph, resolve_font
from growlm.substrate.trainable import build_trainable

__all__ = [
    "BASES",
    "GLYPH_PARAMS",
    "KINDS",
    "META_FILE",
    "WEIGHT_FILE",
    "GlyphRenderer",
    "Substrate",
    "build_substrate",
    "required_bits",
    "resolve_font",
    "substrate_fingerprint",
]


def _vocab_size(kind: str, tokenizer: Any, vocab_size: int | None) -> int:
    if tokenizer is not None:
        v = int(tokenizer.vocab_size)
        if vocab_size is not None and vocab_size != v:
            raise GrowlmError(f"vocab_size {vocab_size} disagrees with the tokenizer's vocab_size {v}")
        return v
    if vocab_size is None:
        raise GrowlmError(f"substrate kind {kind!r} needs a tokenizer or a vocab_size")
    return vocab_size


def build_substrate(
    kind: str,
    *,
    dim: int,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    bits: int | None = None,
    seed: int = 0,
    font_path: str | None = None,
    workers: int | None = None,
    basis: str = "reference",
) -> Substrate:
    """Build a substrate of ``kind`` (one of :data:`KINDS`) and width ``dim``.

    ``tokenizer`` (anything with ``token_strings()``, ``vocab_size`` and ``fingerprint``) is
    required for ``glyph`` and optional otherwise (then ``vocab_size`` suffices; the tokenizer's
    fingerprint is recorded when given). ``bits`` sets the code width of ``binary`` (default
    ``ceil(log2 V)``) and ``random-bits`` (default 64); ``seed`` drives ``random-bits`` and
    ``trainable``; ``font_path``, ``workers`` and ``basis`` (``"reference"`` or ``"vocab"``) apply
    to ``glyph``. Deterministic: the same arguments give bit-identical tables and fingerprints.
    """
    if kind not in KINDS:
        raise GrowlmError(f"unknown substrate kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise GrowlmError(f"--dim must be a positive integer, got {dim!r}")
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        raise GrowlmError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    fingerprint = None if tokenizer is None else str(tokenizer.fingerprint)
    if kind == "glyph":
        if tokenizer is None:
            raise GrowlmError("substrate kind 'glyph' needs a tokenizer (it renders the token strings)")
        strings = list(tokenizer.token_strings())
        v = _vocab_size(kind, tokenizer, vocab_size)
        if len(strings) != v:
            raise GrowlmError(f"tokenizer lists {len(strings)} token strings but has vocab_size {v}")
        return build_glyph(
            strings,
            dim=dim,
            font_path=font_path,
            workers=workers,
            basis=basis,
            tokenizer_fingerprint=fingerprint,
        )
    v = _vocab_size(kind, tokenizer, vocab_size)
    if kind == "binary":
        return build_binary(v, dim=dim, bits=bits, tokenizer_fingerprint=fingerprint)
    if kind == "random-bits":
        return build_random_bits(v, dim=dim, bits=bits, seed=seed, tokenizer_fingerprint=fingerprint)
    return build_trainable(v, dim=dim, seed=seed, tokenizer_fingerprint=fingerprint)
