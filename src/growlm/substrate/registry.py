"""The substrate kinds by name: each kind's module registers its builder and its typed parameters.

``register("binary", build, BinaryParams)`` from the kind's own module is all it takes for
:func:`growlm.substrate.build_substrate`, the plan's ``[substrate] kind`` and ``growlm substrate
build --kind`` to offer it (see ``docs/extending.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from growlm.errors import GrowlmError
from growlm.registry import Registry

if TYPE_CHECKING:
    from growlm.substrate.base import Substrate


class Params(BaseModel):
    """Base of a kind's typed parameters: strict types, so a wrong type is refused, not coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Vocab:
    """What a builder gets besides its width and parameters: the tokenizer, or only a vocabulary size."""

    kind: str
    tokenizer: Any = None
    given_size: int | None = None

    @property
    def fingerprint(self) -> str | None:
        """The tokenizer's fingerprint, recorded in the recipe (None without a tokenizer)."""
        return None if self.tokenizer is None else str(self.tokenizer.fingerprint)

    @property
    def size(self) -> int:
        """The number of rows: the tokenizer's vocab_size (which a given size must equal), else the given size."""
        if self.tokenizer is not None:
            v = int(self.tokenizer.vocab_size)
            if self.given_size is not None and self.given_size != v:
                raise GrowlmError(f"vocab_size {self.given_size} disagrees with the tokenizer's vocab_size {v}")
            return v
        if self.given_size is None:
            raise GrowlmError(f"substrate kind {self.kind!r} needs a tokenizer or a vocab_size")
        return self.given_size

    def strings(self, why: str) -> list[str]:
        """The token strings in id order; a kind that reads them says ``why`` when no tokenizer is given."""
        if self.tokenizer is None:
            raise GrowlmError(f"substrate kind {self.kind!r} needs a tokenizer ({why})")
        strings = list(self.tokenizer.token_strings())
        if len(strings) != self.size:
            raise GrowlmError(f"tokenizer lists {len(strings)} token strings but has vocab_size {self.size}")
        return strings


@dataclass(frozen=True)
class SubstrateKind:
    """A registered kind: ``builder(vocab, dim=..., **params)`` returns the :class:`Substrate`;
    ``params`` (a :class:`Params` model) declares the keyword parameters it takes; ``trains``: the model
    learns the table (the trainable-embedding baseline), where every other kind stays frozen."""

    name: str
    builder: Callable[..., Substrate]
    params: type[Params]
    trains: bool = False

    @property
    def path_params(self) -> tuple[str, ...]:
        """The parameters typed as a filesystem path (``Path``, alone or in a union): files, which a
        plan gives relative to the plan file like every other path in it."""
        return tuple(k for k, f in self.params.model_fields.items()
                     if f.annotation is Path or Path in get_args(f.annotation))

    def build(self, vocab: Vocab, dim: int, given: dict[str, Any]) -> Substrate:
        """Validate the parameters this kind declares (others in ``given`` are ignored, so one call, or
        the plan's bits and seed, can serve every kind) and build."""
        params = self._validate({k: v for k, v in given.items() if k in self.params.model_fields}, strict=True)
        return self.builder(vocab, dim=dim, **{k: getattr(params, k) for k in self.params.model_fields})

    def from_text(self, given: dict[str, str]) -> dict[str, Any]:
        """Parameters written as text (``--param KEY=VALUE``), each converted to the type this kind
        declares for it ("16" to 16 for an int); a key it does not declare is refused."""
        params = self._validate(given, strict=False)
        return {k: getattr(params, k) for k in given}

    def _validate(self, given: dict[str, Any], *, strict: bool) -> Params:
        try:
            return self.params.model_validate(given, strict=strict)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"not a parameter of this kind; it takes: {', '.join(self.params.model_fields) or 'none'}"
            raise GrowlmError(f"substrate kind {self.name!r}: {where}: {msg}") from None


SUBSTRATE_KINDS: Registry[SubstrateKind] = Registry("substrate kind", "growlm.substrate")


def register(kind: str, builder: Callable[..., Substrate], params: type[Params], *,
             trains: bool = False) -> SubstrateKind:
    """Register substrate kind ``kind``: ``builder(vocab: Vocab, *, dim, **params) -> Substrate``, with
    ``params`` declaring its parameters and their types and defaults; ``trains``: the model learns its table."""
    return SUBSTRATE_KINDS.register(kind, SubstrateKind(kind, builder, params, trains))


def unregister(kind: str) -> None:
    """Remove ``kind`` (tests: registration must not leak from one to the next)."""
    SUBSTRATE_KINDS.unregister(kind)


@contextmanager
def registered(kind: str, builder: Callable[..., Substrate], params: type[Params]) -> Iterator[SubstrateKind]:
    """:func:`register` for the duration of a ``with`` block."""
    with SUBSTRATE_KINDS.registered(kind, SubstrateKind(kind, builder, params)) as entry:
        yield entry


def kind_trains(kind: str) -> bool:
    """Whether the model learns a substrate of ``kind`` (False for a kind no plugin registers here, such as an
    imported checkpoint's embedding: a table growlm did not build is never trained as a substrate)."""
    entry = SUBSTRATE_KINDS.get(kind)
    return entry is not None and entry.trains


def get_kind(kind: str) -> SubstrateKind:
    """The registered kind, or a one-line error naming the valid choices."""
    entry = SUBSTRATE_KINDS.get(kind)
    if entry is None:
        raise GrowlmError(f"unknown substrate kind {kind!r}; choose one of: {', '.join(SUBSTRATE_KINDS.names())}")
    return entry
