"""Frozen token substrates: the fixed ``[V, dim]`` matrix every model of a family embeds with.

``build_substrate(kind, dim=..., tokenizer=... | vocab_size=..., **params)`` makes a substrate of
a registered kind (:mod:`growlm.substrate.registry`; the built-ins are :data:`KINDS`);
``Substrate.save`` / ``Substrate.load`` store and verify it (fingerprint = sha256 of recipe + table).
"""

from __future__ import annotations

from typing import Any

from growlm.errors import GrowlmError
from growlm.memory import check_substrate_memory
from growlm.substrate.base import META_FILE, WEIGHT_FILE, Substrate, substrate_fingerprint
from growlm.substrate.registry import SUBSTRATE_KINDS, Vocab, get_kind

# isort: off
# the built-in kinds register themselves on import, in this order (the order of KINDS and of errors)
from growlm.substrate.glyph import BASES, GLYPH_PARAMS, GlyphRenderer, resolve_font
from growlm.substrate.binary import required_bits
from growlm.substrate import trainable as _trainable  # noqa: F401
# isort: on

KINDS = SUBSTRATE_KINDS.names()  # the built-in kinds

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


def build_substrate(
    kind: str,
    *,
    dim: int,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    **params: Any,
) -> Substrate:
    """Build a substrate of the registered ``kind`` and width ``dim``.

    ``tokenizer`` (anything with ``token_strings()``, ``vocab_size`` and ``fingerprint``) is
    required for ``glyph`` and optional otherwise (then ``vocab_size`` suffices; the tokenizer's
    fingerprint is recorded when given). ``params`` are the kind's own (those it does not declare are
    ignored): ``bits`` sets the code width of ``binary`` (default ``ceil(log2 V)``) and ``random-bits``
    (default 64); ``seed`` drives ``random-bits`` and ``trainable``; ``font_path``, ``workers`` and
    ``basis`` (``"reference"`` or ``"vocab"``) apply to ``glyph``. Deterministic: the same arguments
    give bit-identical tables and fingerprints. A size whose build would need more memory than the
    machine has free is refused before anything is allocated (:func:`growlm.memory.check_substrate_memory`).
    """
    entry = get_kind(kind)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise GrowlmError(f"--dim must be a positive integer, got {dim!r}")
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        raise GrowlmError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    rows = tokenizer.vocab_size if tokenizer is not None else vocab_size
    if rows is not None:  # refused before the builder allocates: a typo'd size is otherwise a swap storm
        check_substrate_memory(int(rows), dim)
    return entry.build(Vocab(kind, tokenizer, vocab_size), dim, params)
