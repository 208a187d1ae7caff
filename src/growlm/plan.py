"""The plan: a typed, validated description of a whole growth run (``growlm train PLAN.toml``).

A plan names the substrate, the tokenizer, the model width, the data and an ordered list of
stages. Every table rejects unknown keys, every size must be positive, every path is resolved
relative to the plan file and must be readable — all before any training starts, with an error
that names the key (``stage[2].lora.rank``) or the file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from growlm.corpus import regular_file
from growlm.errors import GrowlmError
from growlm.stages.base import STAGE_KINDS, stage_kind

# Strict numbers: in lax mode pydantic reads `tokens = true` as 1 token and `lr = true` as 1.0 (a float may
# still be written as an integer, `lr = 1`)
Int = Annotated[int, Field(strict=True)]
Pos = Annotated[int, Field(gt=0, strict=True)]
NonNeg = Annotated[int, Field(ge=0, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
# finite: an infinite rate, decay or weight ends in NaN steps or an overflowing mixture far from the plan's key
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubstrateSpec(_Spec):
    kind: str = "glyph"  # a registered substrate kind (growlm.substrate.registry)
    dir: Path | None = None  # reuse an existing substrate (the shared docking port)
    bits: Pos | None = None
    seed: Int = 0
    # [substrate.params]: the kind's own parameters, typed by the Params model it registered. bits and seed
    # stay keys of [substrate] itself (every kind is offered them, and plans have always given them there)
    params: dict[str, Any] = {}

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        from growlm.substrate.registry import get_kind

        try:
            get_kind(kind)
        except GrowlmError as e:  # pydantic reports a ValueError under the key: substrate.kind: unknown ...
            raise ValueError(str(e)) from None
        return kind

    @field_validator("params")
    @classmethod
    def _kind_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the kind's Params model now, not when the substrate is built: a ValidationError
        raised here is reported under its own key, substrate.params.KEY."""
        if "kind" not in info.data:  # the kind was refused; that is the error to report
            return params
        from growlm.substrate.registry import get_kind

        shared = [k for k in params if k in cls.model_fields]
        if shared:
            raise ValidationError.from_exception_data("params", [InitErrorDetails(
                type=PydanticCustomError("shared_key", "give it as substrate.{key}, not in substrate.params",
                                         {"key": shared[0]}),
                loc=(shared[0],), input=params[shared[0]])])
        get_kind(info.data["kind"]).params.model_validate(params)
        return params

    @model_serializer(mode="wrap")
    def _omit_no_params(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``params`` key without parameters: the plan.json of every plan that gives none is
        byte-identical to the one recorded before the key existed (``--resume`` compares them)."""
        out = handler(self)
        if not self.params:
            out.pop("params", None)
        return out


class TokenizerSpec(_Spec):
    corpus: list[Path] = []
    compact: Flag = True
    ngrams: list[Pos] = [2, 3]
    top_k: Pos = 338
    dir: Path | None = None  # reuse an existing tokenizer
    preset: str | None = None
    ngram_list: Path | None = None  # another list for the preset; by default the one shipped with growlm

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if not (self.dir or self.preset or self.corpus):
            raise ValueError("give one of corpus, dir or preset")
        return self


class ModelSpec(_Spec):
    d_model: Pos
    n_heads: Pos
    context: Pos = 1024
    # a base below 1 turns RoPE's wavelengths upside down; 1e-300 overflows them into NaN
    rope_theta: Annotated[float, Field(gt=1, allow_inf_nan=False, strict=True)] = 10000.0

    @model_validator(mode="after")
    def _heads(self) -> ModelSpec:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


class DataSpec(_Spec):
    # Each entry a data file (text, JSONL, parquet, a save_to_disk folder), tokenized into the per-file cache on
    # first use, or a folder made by `growlm data prepare`: its train split under train, its valid split under valid
    train: list[Path]
    valid: list[Path] = []
    weights: list[PosFloat] | None = None  # one per train entry: a mixture

    @model_validator(mode="after")
    def _weights(self) -> DataSpec:
        if not self.train:
            raise ValueError("train must list at least one file")
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.train)} train files")
        return self


class TrainSpec(_Spec):
    batch_size: Pos = 8
    lr: PosFloat = 3e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1, strict=True)] = 0.1
    warmup: Annotated[float, Field(ge=0, lt=1, strict=True)] = 0.05  # fraction of each stage's steps
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 0.0
    grad_clip: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 1.0
    seed: Int = 0
    checkpoint_every: Pos = 100
    eval_every: Pos | None = None
    eval_batches: Pos = 8
    log_every: Pos = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Flag | None = None  # None: on for CUDA
    trunk_cache: Flag = False
    lora_budget: Pos | None = None  # active-parameter budget; default: the largest grow stage
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Scalars to RUN/tensorboard as well. A way of watching, not part of what the run computes: left out of
    # the recorded plan (plan_to_json), so turning it on or off never makes a resume "another plan"
    tensorboard: Flag = Field(False, exclude=True)


class LoraSpec(_Spec):
    rank: Pos = 8
    alpha: PosFloat | None = None  # default: 2 × rank
    blocks: Literal["frozen", "all"] | list[NonNeg] = "frozen"
    targets: list[Literal["qkv", "attn_out", "fc", "mlp_out"]] = ["qkv", "attn_out", "fc", "mlp_out"]

    @field_validator("blocks", "targets")
    @classmethod
    def _distinct(cls, v: object, info: ValidationInfo) -> object:
        # checked when the plan is read: peft fails on an empty list only after the stages before have trained
        if isinstance(v, list):
            if not v:
                raise ValueError(f"an empty list adapts nothing; name at least one {info.field_name[:-1]}")
            if len(set(v)) != len(v):
                raise ValueError(f"{sorted(x for x in set(v) if v.count(x) > 1)[0]!r} is listed twice")
        return v


class StageData(_Spec):
    # as DataSpec: files or prepared folders; empty lists take the plan's [data]
    train: list[Path] = []
    valid: list[Path] = []
    weights: list[PosFloat] | None = None


class StageSpec(_Spec):
    name: str | None = None
    grow: NonNeg = 0
    init: Literal["random", "zero-out", "copy-top"] = "random"
    # depth stacking: the stack rebuilt from copies of the trained blocks at these indices (replaces grow)
    layers: list[NonNeg] | None = None
    tokens: Pos
    # The stage kind (growlm.stages): what each of its phases trains besides this stage's LoRA adapters.
    # "new" = the grown blocks plus the LM head and final norm (the paper trains the head at every stage)
    train: str = "new"
    unfreeze_tokens: Pos | None = None  # train = "new-then-all": of tokens, the last these train every block
    lora: LoraSpec | None = None
    lr: PosFloat | None = None
    data: StageData | None = None

    @field_validator("train")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {v!r}; one of {', '.join(map(repr, STAGE_KINDS.names()))}")
        return v

    @model_validator(mode="after")
    def _fits_its_kind(self) -> StageSpec:
        kind = stage_kind(self.train)
        for other in STAGE_KINDS.names():
            for key in set(STAGE_KINDS[other].keys) - set(kind.keys):
                if getattr(self, key, None) is not None:
                    raise ValueError(f'{key} belongs to train = "{other}", not "{self.train}"')
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers = [] stacks no block; list the trained blocks to copy, e.g. [0, 1, 0, 1]")
            if self.grow:
                raise ValueError("layers rebuilds the stack from the trained blocks; it replaces grow: drop grow")
            if self.lora is not None:
                raise ValueError("layers with a lora table is not supported: stack in one stage, adapt in the next")
        if kind.needs_lora and self.lora is None:
            raise ValueError(f'train = "{self.train}" needs a lora table')
        if not kind.structure and (self.grow or self.layers):
            grown = f"the {self.grow} grown block(s)" if self.grow else "the stacked copies"
            raise ValueError(f'train = "{self.train}" would leave {grown} untrained; use train = "new"')
        if not kind.lora and self.lora is not None:
            raise ValueError(f'train = "{self.train}" already trains every block; drop the lora table')
        problem = kind.check(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_serializer(mode="wrap")
    def _without_unset_kind_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``layers`` or ``unfreeze_tokens`` key where the stage has none: the plan.json of every plan
        written before they existed is byte-identical (``--resume`` and ``verify`` compare them)."""
        out = handler(self)
        for key in ("layers", "unfreeze_tokens"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class Plan(_Spec):
    substrate: SubstrateSpec = SubstrateSpec()
    tokenizer: TokenizerSpec
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = TrainSpec()
    stage: list[StageSpec]
    base: Path | None = None  # grow on top of an existing model dir (same substrate and tokenizer)

    @field_validator("stage")
    @classmethod
    def _stages(cls, v: list[StageSpec]) -> list[StageSpec]:
        if not v:
            raise ValueError("a plan needs at least one [[stage]]")
        return v

    @model_validator(mode="after")
    def _lora_tables_fit(self) -> Plan:
        for i, st in enumerate(self.stage, 1):
            # a rank above the width adapts nothing more than full rank does, at any size peft is asked for
            if st.lora is not None and st.lora.rank > self.model.d_model:
                raise ValueError(f"stage[{i}].lora.rank: {st.lora.rank:,} is above model.d_model = "
                                 f"{self.model.d_model}: a low-rank adapter's rank is at most the width")
        if self.base is None:  # a base's depth is known once it is loaded: training checks it then
            problem = blocks_problem(self, 0)
            if problem:
                raise ValueError(problem)
        return self


def depth_after(stage: StageSpec, depth_before: int) -> int:
    """How many blocks the model has once ``stage`` has grown (or stacked) them."""
    return len(stage.layers) if stage.layers is not None else depth_before + stage.grow


def blocks_problem(plan: Plan, depth0: int) -> str | None:
    """What is wrong with the blocks the plan's stages name, when the model starts ``depth0`` blocks deep
    (None: nothing): every block a stage stacks exists before it, every block it adapts once it has grown."""
    depth = depth0
    for i, st in enumerate(plan.stage, 1):
        before, depth = depth, depth_after(st, depth)
        missing = [b for b in st.layers or () if b >= before]
        if missing:
            return (f"stage[{i}].layers: block {missing[0]} does not exist there (the model has {before} trained "
                    f"block(s) before the stage)")
        if st.lora is None:
            continue
        if st.lora.blocks == "frozen" and not before:
            return f"stage[{i}].lora.blocks: \"frozen\" adapts the blocks that exist before the stage grows; there are none"
        missing = [b for b in st.lora.blocks if b >= depth] if isinstance(st.lora.blocks, list) else []
        if missing:
            return f"stage[{i}].lora.blocks: block {missing[0]} does not exist there (the model has {depth} block(s))"
    return None


def _loc(loc: tuple) -> str:
    """Pydantic's error location as the plan key a user would write, e.g. ``stage[2].lora.rank``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part + 1}]" if out == "stage" else f"[{part}]"
        elif part in ("literal['frozen', 'all']",) or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def load_plan(path: str | Path, *, check_paths: bool = True) -> Plan:
    """Parse and validate a plan file; returns the plan, its paths absolute.

    A ``.json`` file is read as JSON (a run's resolved ``RUN/plan.json``, or a plan the demo
    wrote), any other file as TOML; both hold the same tables. Relative paths are relative to the
    plan file. ``check_paths=False`` skips the file checks (to inspect a plan's shape, e.g. its
    active parameter counts, without its data).
    """
    path = Path(path)
    if not path.is_file():
        raise GrowlmError(f"plan file not found: {path}")
    is_json = path.suffix.lower() == ".json"
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if is_json else tomllib.loads(text)
    except ValueError as e:  # UnicodeDecodeError, TOMLDecodeError and JSONDecodeError all are
        raise GrowlmError(f"plan {path} is not valid {'JSON' if is_json else 'TOML'}: {e}") from e
    return plan_from_dict(raw, path.parent.resolve(), check_paths=check_paths, source=path)


def plan_from_dict(raw: Mapping[str, Any], root: str | Path | None = None, *, check_paths: bool = True,
                   source: str | Path = "(built in Python)") -> Plan:
    """A plan from its tables as Python values (what a plan file parses to), validated as
    :func:`load_plan` validates a file: errors name the key, paths are made absolute relative to
    ``root`` (default: the current directory) and checked. ``source`` names the plan in errors.
    """
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].replace("Value error, ", "")
        where = f"{_loc(err['loc'])}: " if err["loc"] or err["type"] != "value_error" else ""  # it names its keys
        raise GrowlmError(f"plan {source}: {where}{msg}") from None
    return resolve_plan(plan, root, source=source) if check_paths else plan


def resolve_plan(plan: Plan, root: str | Path | None = None, *, source: str | Path = "(built in Python)") -> Plan:
    """``plan`` with every path absolute (relative to ``root``, default the current directory) and
    checked readable. Idempotent: a resolved plan comes back equal, so a run's ``plan.json``
    compares equal to the plan it was started with."""
    return _resolve_paths(plan, Path(root if root is not None else Path.cwd()).resolve(), source)


def _resolve_paths(plan: Plan, root: Path, plan_path: Path) -> Plan:
    """Make every path absolute (relative to the plan file) and check it can be read."""

    def fix(p: Path | None, key: str, want: str = "file") -> Path | None:
        """``want``: "file" (a regular file), "data" (a regular file or a save_to_disk folder), "dir"."""
        if p is None:
            return None
        where = f"plan {plan_path}: {key}:"
        try:
            q = (root / p).resolve() if not p.is_absolute() else p
            is_dir = q.is_dir()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop, a path too long
            raise GrowlmError(f"{where} unusable path {str(p)!r}: {e}") from None
        if want == "dir" and not is_dir:
            raise GrowlmError(f"{where} directory not found: {q}")
        if not (is_dir and want in ("dir", "data")):
            regular_file(q, f"{where} file")  # a FIFO or a device would block its reader forever
        if not os.access(q, os.R_OK):
            raise GrowlmError(f"{where} not readable: {q}")
        return q

    def fix_list(ps: list[Path], key: str) -> list[Path]:
        return [fix(p, f"{key}[{i}]", "data") for i, p in enumerate(ps)]

    tok = plan.tokenizer.model_copy(update={
        "corpus": fix_list(plan.tokenizer.corpus, "tokenizer.corpus"),
        "dir": fix(plan.tokenizer.dir, "tokenizer.dir", "dir"),
        "ngram_list": fix(plan.tokenizer.ngram_list, "tokenizer.ngram_list"),
    })
    from growlm.substrate.registry import get_kind

    files = get_kind(plan.substrate.kind).path_params
    params = {k: str(fix(Path(v), f"substrate.params.{k}")) if k in files and v is not None else v
              for k, v in plan.substrate.params.items()}
    sub = plan.substrate.model_copy(update={"dir": fix(plan.substrate.dir, "substrate.dir", "dir"), "params": params})
    data = plan.data.model_copy(update={"train": fix_list(plan.data.train, "data.train"),
                                        "valid": fix_list(plan.data.valid, "data.valid")})
    stages = []
    for i, st in enumerate(plan.stage, 1):
        if st.data is not None:
            sd = st.data.model_copy(update={"train": fix_list(st.data.train, f"stage[{i}].data.train"),
                                            "valid": fix_list(st.data.valid, f"stage[{i}].data.valid")})
            if sd.weights is not None and len(sd.weights) != len(sd.train):
                raise GrowlmError(f"plan {plan_path}: stage[{i}].data.weights: {len(sd.weights)} entries for {len(sd.train)} train files")
            st = st.model_copy(update={"data": sd})
        stages.append(st)
    base = fix(plan.base, "base", "dir")
    if base is not None:
        from growlm.store import ModelDir, resolve

        try:
            is_model = isinstance(resolve(base), ModelDir)
        except GrowlmError:
            is_model = False
        if not is_model:
            raise GrowlmError(f"plan {plan_path}: base: {base} is not a growlm model dir (no model.json)")
    return plan.model_copy(update={"tokenizer": tok, "substrate": sub, "data": data, "stage": stages,
                                   "base": base})


def plan_difference(a: Any, b: Any, loc: tuple = ()) -> str:
    """Where two recorded plans (:func:`plan_to_json`) first differ, as the plan key a user would write with
    both values, e.g. ``stage[2].lr: 0.003 -> 0.5``; empty when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, _ABSENT) != b.get(k, _ABSENT):
                return plan_difference(a.get(k, _ABSENT), b.get(k, _ABSENT), (*loc, k))
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return plan_difference(x, y, (*loc, i))
        return ""
    if a == b:
        return ""
    shown = ("(absent)" if v is _ABSENT else json.dumps(v)[:40] for v in (a, b))
    return f"{_loc(loc)}: {' -> '.join(shown)}"


_ABSENT = object()


def plan_to_json(plan: Plan) -> dict:
    """The resolved plan as plain JSON (recorded next to every stage it produces)."""
    return plan.model_dump(mode="json")
