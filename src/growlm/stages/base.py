"""What a stage kind is: a plan's ``[[stage]] train = "..."`` names one, and the kind says, from the plan alone,
what each of its phases trains and on how many of the stage's tokens.

A stage first changes the model's structure (``grow`` new blocks on top, or rebuild the stack from copies of
trained blocks with ``layers``; :mod:`growlm.growth` does both) and then trains it in one or more phases. Each
phase is one fit of the training loop with its own optimizer, learning-rate schedule and in-stage checkpoints,
and trains exactly its :class:`TrainSet` (plus the stage's LoRA adapters, when it has a ``lora`` table). From the
phases, :mod:`growlm.growth` derives the stage's active parameters, FLOPs and memory, the loop its
``requires_grad`` and audit, and ``growlm verify`` what each phase may have changed.

A new kind is one file that subclasses :class:`StageKind` and one :data:`STAGE_KINDS` registration
(``docs/extending.md``); its name is then a ``train`` value every plan accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from growlm.registry import Registry

if TYPE_CHECKING:
    from growlm.plan import StageSpec


@dataclass(frozen=True)
class TrainSet:
    """What one phase trains besides the stage's own LoRA adapters (which train in every phase; earlier
    stages' adapters never do): these blocks, the LM head with the final norm, a trainable substrate's table."""

    blocks: tuple[int, ...]
    head: bool = True
    embedding: bool = False  # only ever with a substrate kind that trains (the trainable-embedding baseline)


@dataclass(frozen=True)
class Phase:
    """One fit of a stage: its name (in logs, metrics and model.json), its share of the stage's tokens and
    what it trains."""

    name: str
    tokens: int
    trains: TrainSet


@dataclass(frozen=True)
class Shape:
    """Where a stage's phases start: the depth once the stage has grown or stacked its blocks, and which
    blocks are new (grown on top, or the later copies in a stack)."""

    depth: int
    new_blocks: tuple[int, ...]


class StageKind:
    """A registered kind of stage. Subclasses set :attr:`name` and implement :meth:`phases`; the other
    attributes say which plan settings the kind accepts.

    ``keys``: the stage keys of this kind's own (``unfreeze_tokens``); any other kind refuses them.
    ``structure``: whether the stage may grow or stack blocks (a kind that trains no block would leave
    new ones untrained). ``lora``: whether a ``lora`` table makes sense (a kind that trains every
    block already trains what adapters would). ``needs_lora``: the kind trains nothing without one.
    ``sets_budget``: its active count is the default LoRA budget (the paper's grow stage).
    """

    name: str = ""
    keys: tuple[str, ...] = ()
    structure: bool = True
    lora: bool = True
    needs_lora: bool = False
    sets_budget: bool = False

    def check(self, stage: StageSpec) -> str | None:
        """What is wrong with ``stage``'s table for this kind (None: nothing); the common checks (known
        keys, growth, LoRA) have run. Override to check the kind's own keys."""
        return None

    def phases(self, stage: StageSpec, shape: Shape, trainable_embedding: bool) -> list[Phase]:
        """The stage's phases in order, their tokens summing to ``stage.tokens``."""
        raise NotImplementedError


def every_block(shape: Shape) -> tuple[int, ...]:
    """Every block of the stack the stage trains on."""
    return tuple(range(shape.depth))


def new_blocks(shape: Shape) -> tuple[int, ...]:
    """The blocks this stage grew (or stacked as second copies)."""
    return tuple(shape.new_blocks)


def single(kind: StageKind, stage: StageSpec, trains: TrainSet) -> list[Phase]:
    """The one phase of a one-phase kind, named after the kind."""
    return [Phase(kind.name, stage.tokens, trains)]


STAGE_KINDS: Registry[StageKind] = Registry("stage kind", "growlm.stages")


def register(kind: StageKind) -> StageKind:
    """Add ``kind`` under its name (a name is registered once); returns it."""
    return STAGE_KINDS.register(kind.name, kind)


def stage_kind(name: str) -> StageKind:
    """The kind registered as ``name`` (a plan's ``train`` value; the plan has checked it is registered)."""
    return STAGE_KINDS[name]
