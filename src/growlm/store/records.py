"""model.json and mixture.json as typed records. model.json: one writer (:func:`growlm.store.model.save_model`), and every reader gets a
:class:`ModelRecord` from :func:`growlm.store.model.read_meta`, never a dict read by string key.

The format on disk is unchanged: a record is validated from the JSON a model dir holds (dirs written by earlier
growlm versions lack the keys added since, which are optional here) and written as the same sorted JSON, so a
dir written now is byte-identical to one written before the record had a type. Keys this growlm does not know
are kept (``extra="allow"``): they change nothing a load computes, or the fingerprint would cover them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from growlm.errors import GrowlmError
from growlm.lora import TARGETS

FORMAT = "growlm-model"
# model.json version 2: the fingerprint covers the LoRA records too (how the adapters apply: rank, alpha, blocks,
# targets). A version-1 dir with adapters predates that: it still loads and verifies, with a note saying so.
LORA_COVERED = 2


class _Record(BaseModel):
    # strict: a JSON string is no number and true is no 1 (an edited record is refused, never coerced)
    model_config = ConfigDict(frozen=True, extra="allow", strict=True)

    def to_json(self) -> dict[str, Any]:
        """The record as model.json holds it: the keys it was made with, nothing added."""
        return self.model_dump(mode="json", exclude_unset=True)


class BlockRecord(_Record):
    """One block's sha256 over its base tensors (``blocks.N.*`` of model.safetensors)."""

    index: int
    sha256: str


class SubstrateRecord(_Record):
    """The docking port's substrate: its kind, fingerprint and the recipe that rebuilds it."""

    kind: str
    fingerprint: str
    recipe: dict[str, Any]


class LoraRecord(_Record):
    """How one LoRA stage's adapters apply (:func:`growlm.lora.add_lora` writes it): a load builds them from it."""

    name: str
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    blocks: list[int] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)

    @field_validator("alpha")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("blocks", "targets")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("must be distinct")
        if v and isinstance(v[0], str) and not all(t in TARGETS for t in v):
            raise ValueError(f"must name {', '.join(TARGETS)}")
        if v and isinstance(v[0], int) and min(v) < 0:
            raise ValueError("must be block indices (>= 0)")
        return v

    def as_dict(self) -> dict[str, Any]:
        """The record as :mod:`growlm.lora` takes it."""
        return self.model_dump()


class StageRecord(_Record):
    """What a run's stage was asked to do (the recorded plan's stage, and the blocks it grew) and, for a stage
    of several phases, what each phase trained and measured."""

    index: int
    name: str | None = None
    grow: int = 0
    init: str = "random"
    layers: list[int] | None = None
    train: str = "new"
    unfreeze_tokens: int | None = None
    lora: dict[str, Any] | None = None
    adapter: str | None = None
    tokens: int | None = None
    steps: int | None = None
    new_blocks: list[int] = []
    phases: list[PhaseRecord] | None = None


class TrainSetRecord(_Record):
    """What one phase trained besides the stage's adapters (:class:`growlm.stages.TrainSet`)."""

    blocks: list[int]
    head: bool
    embedding: bool


class PhaseRecord(_Record):
    """One phase of a stage of several: its name, tokens and steps, what it trained, what it measured, its audit."""

    name: str
    tokens: int
    steps: int
    trains: TrainSetRecord
    metrics: MetricsRecord
    audit: AuditRecord


class MetricsRecord(_Record):
    """What a stage's training measured: losses, tokens, steps, seconds and FLOPs (the last two since growlm
    counted them)."""

    train_loss: float | None = None
    valid_loss: float | None = None
    tokens: int = 0
    wall_s: float | None = None
    steps: int = 0
    flops: int | float | None = None


class AuditRecord(_Record):
    """The trainable-set audit (:mod:`growlm.audit`): what trained, what stayed frozen, and every start digest."""

    ok: bool
    steps: int
    trained: dict[str, int]
    frozen: dict[str, int]
    trained_tensors: int
    frozen_tensors: int
    start_sha256: dict[str, str]


class ModelRecord(_Record):
    """A model dir's model.json."""

    format: Literal["growlm-model"]
    version: Literal[1, 2]
    config: dict[str, Any]  # typed as a ModelConfig by growlm.store.model.model_config
    substrate: SubstrateRecord
    substrate_fingerprint: str
    tokenizer_fingerprint: str
    blocks: list[BlockRecord]
    fingerprint: str
    lineage: list[str]
    lora: list[LoraRecord] | None = None
    params_total: int
    params_trainable: int
    params_active: int | None = None
    files: dict[str, str]
    plan: dict[str, Any] | None = None  # typed as a Plan by growlm.plan.plan_from_dict where it is needed
    stage: StageRecord | None = None
    metrics: MetricsRecord | None = None
    audit: AuditRecord | None = None

    @classmethod
    def read(cls, raw: object, f: Path) -> ModelRecord:
        """``raw`` (model.json's JSON) as a record, or a one-line error naming the file and the key at fault."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise GrowlmError(f"{f} is corrupt: {validation_problem(e)}") from None

    def lora_dicts(self) -> list[dict[str, Any]]:
        """The LoRA records as :mod:`growlm.lora` takes them (empty without adapters)."""
        return [r.as_dict() for r in self.lora or []]

    def extra(self, key: str) -> Any:
        """A key this growlm's type does not name (``imported_from``, ``merged_from``, ...), or None."""
        return (self.model_extra or {}).get(key)


def validation_problem(e: ValidationError) -> str:
    """Pydantic's first error as the key a user would read in the file: ``lora[0].alpha is missing``."""
    err = e.errors()[0]
    where = ""
    for part in err["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif not (isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "list", "dict"))):
            where += ("." if where else "") + str(part)
    if not where:  # a check across keys (counts that must agree)
        return err["msg"].replace("Value error, ", "")
    if err["type"] == "missing":
        return f"{where} is missing"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 40 else shown[:40] + "..."
    return f"{where} is {shown}: {err['msg'].replace('Value error, ', '')}"


# ----------------------------------------------------------------------------------------------
# mixture.json

MIXTURE_FORMAT = "growlm-mixture"
MIXTURE_VERSION = 1
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ExpertEntry(_Record):
    """An expert of a mixture: its copy inside the mixture dir and the fingerprint it must have."""

    path: str
    fingerprint: str
    source: str | None = None


class RouterRecord(_Record):
    """A trained per-token gate: its input width and the prior it started from."""

    in_features: int = Field(gt=0)
    prior: list[Finite]


class TuningRecord(_Record):
    """One post-merge stage (``router`` or ``head``) and what it measured; its audit rides along as given."""

    stage: str
    tokens: int = 0
    loss_before: float | None = None
    loss_after: float | None = None


class MixtureRecord(_Record):
    """A mixture dir's mixture.json (written by :func:`growlm.store.mixture.write_desc`, its one writer)."""

    format: Literal["growlm-mixture"]
    version: Literal[1]
    combine: str
    space: str
    weights: list[Finite] | None
    router: RouterRecord | None
    experts: list[ExpertEntry] = Field(min_length=2)
    substrate_fingerprint: str
    tokenizer_fingerprint: str
    tensors: list[str]
    tuning: list[TuningRecord]
    fingerprint: str
    files: dict[str, str]

    @model_validator(mode="after")
    def _counts(self) -> MixtureRecord:
        n = len(self.experts)
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"{len(self.weights)} weights for {n} experts")
        if self.router is not None and len(self.router.prior) != n:
            raise ValueError(f"router.prior has {len(self.router.prior)} entries for {n} experts")
        return self

    @classmethod
    def read(cls, raw: object, f: Path) -> MixtureRecord:
        """``raw`` (mixture.json's JSON) as a record, or a one-line error naming the file and the key at fault."""
        if isinstance(raw, dict) and raw.get("version") != MIXTURE_VERSION:
            raise GrowlmError(f"{f} has version {raw.get('version')!r}; this growlm reads version {MIXTURE_VERSION}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise GrowlmError(f"{f} is corrupt: {validation_problem(e)}") from None

    @property
    def rule(self) -> dict[str, Any]:
        """How the experts' logits combine, as the fingerprint and :class:`growlm.rules.Rule` take it."""
        return {"combine": self.combine, "space": self.space, "weights": self.weights}
