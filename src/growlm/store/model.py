"""The model-dir format: atomic safetensors I/O, per-block hashes, fingerprints, lineage and
verification (the layout is in :mod:`growlm.store`).

Weights are never pickled; loading checks every file's sha256 against model.json first, so a
truncated or bit-flipped file is refused with its name before any tensor is used. model.json is
checked too: its config (types, and the tensor shapes it implies), its file names (plain names
inside the dir), and its docking port: the tokenizer's own fingerprint and, for frozen substrates,
the fingerprint recomputed from the embedding must equal the recorded ones. A dir holding a
symlink or any other non-regular file is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from growlm.errors import GrowlmError
from growlm.files import (
    atomic_dir,
    atomic_save_tensors,
    atomic_write_json,
    check_name,
    check_tree,
    field,
    read_descriptor,
)
from growlm.hashing import canonical_json, sha256_file, sha256_tensors
from growlm.lora import attach_adapters
from growlm.model import GrowLM, ModelConfig
from growlm.store.records import FORMAT, LORA_COVERED, ModelRecord, SubstrateRecord
from growlm.substrate.base import substrate_fingerprint
from growlm.substrate.registry import kind_trains
from growlm.tokenizer import Tokenizer

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
ADAPTERS = "adapters.safetensors"
TOKENIZER_DIR = "tokenizer"


# ----------------------------------------------------------------------------------------------
# Hashes


def block_sha256(weights: dict[str, torch.Tensor], index: int) -> str:
    """sha256 of block ``index``'s base tensors, from a model's weights (as saved in model.safetensors)."""
    prefix = f"blocks.{index}."
    return sha256_tensors({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})


def base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state without LoRA adapters, under the plain (pre-adapter) names."""
    return {name.replace(".base_layer.", "."): t for name, t in module.state_dict().items() if ".lora_" not in name}


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA adapter tensors of a model (empty when it has none)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


LORA_KEYS = ("name", "rank", "alpha", "blocks", "targets")


def model_fingerprint(config: dict, substrate_fp: str, tokenizer_fp: str, weights: dict[str, torch.Tensor],
                      adapters: dict[str, torch.Tensor], lora: list[dict] | None = None) -> str:
    """sha256 over config, interface fingerprints, every tensor and (``lora``) the records the adapters are
    applied by: equal iff the model computes the same. A model without adapters hashes as it always has."""
    desc = {"config": config, "substrate": substrate_fp, "tokenizer": tokenizer_fp}
    if lora is not None:
        desc["lora"] = [{k: float(r[k]) if k == "alpha" else r[k] for k in LORA_KEYS} for r in lora]
    h = hashlib.sha256(canonical_json(desc))
    h.update(sha256_tensors(weights).encode())
    h.update(sha256_tensors(adapters).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Save / load


@dataclass(frozen=True)
class ModelDir:
    """A model dir (a run's stage is one too), with its checked model.json."""

    path: Path
    meta: ModelRecord


@dataclass
class SavedModel:
    """A loaded model dir: the module, its tokenizer dir and its metadata."""

    model: GrowLM
    meta: ModelRecord
    path: Path
    tokenizer_dir: Path = dataclasses.field(init=False)
    # loaded (and checked against model.json) by load_model; loading it again would re-parse the vocabulary
    _tokenizer: Tokenizer | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.tokenizer_dir = self.path / TOKENIZER_DIR

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (the one its model.json names)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_dir)
        return self._tokenizer


def save_model(model: GrowLM, out_dir: Path, *, tokenizer_dir: Path, substrate: dict, extra: dict | None = None,
               lineage: list[str] | None = None) -> ModelRecord:
    """Write ``model`` as an immutable, self-contained model dir; returns its model.json record (the one writer
    of model.json).

    ``substrate`` is ``{"kind", "fingerprint", "recipe"}``; ``extra`` adds run information
    (plan, stage, metrics, params_active, audit). The dir appears atomically or not at all.
    """
    tok = Tokenizer.load(tokenizer_dir)
    weights = base_state(model)
    adapters = adapter_state(model)
    config = model.cfg.to_dict()
    config["n_layers"] = len(model.blocks)
    records = list(model.lora_records) if adapters else None
    fp = model_fingerprint(config, substrate["fingerprint"], tok.fingerprint, weights, adapters, records)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": LORA_COVERED if adapters else 1,  # a model without adapters: byte-identical to before
        "config": config,
        "substrate": substrate,
        "substrate_fingerprint": substrate["fingerprint"],
        "tokenizer_fingerprint": tok.fingerprint,
        "blocks": [{"index": i, "sha256": block_sha256(weights, i)} for i in range(len(model.blocks))],
        "fingerprint": fp,
        "lineage": list(lineage or []),
        "lora": list(model.lora_records) or None,
        **model.param_counts(),
    }
    meta.update(extra or {})
    with atomic_dir(Path(out_dir)) as tmp:
        atomic_save_tensors(tmp / WEIGHTS, weights)
        files = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        if adapters:
            atomic_save_tensors(tmp / ADAPTERS, adapters)
            files[ADAPTERS] = sha256_file(tmp / ADAPTERS)
        shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        meta["files"] = files
        record = ModelRecord.read(meta, tmp / MODEL_JSON)  # what is written is what every reader will read
        atomic_write_json(tmp / MODEL_JSON, record.to_json())
    return record


def read_meta(path: Path) -> ModelRecord:
    """model.json of a model dir as its typed record, or a one-line GrowlmError saying why the dir is not a model.

    Refuses a dir holding a symlink or special file, and a model.json whose fields have the wrong
    types, whose config cannot build a model, whose ``files`` reach outside the dir, or whose records
    contradict each other (block hashes for another depth, adapters without LoRA records).
    """
    path = Path(path)
    if not path.exists():
        raise GrowlmError(f"model not found: {path}")
    check_tree(path, "model")
    f = path / MODEL_JSON
    meta = ModelRecord.read(read_descriptor(f, FORMAT, "model"), f)
    cfg = model_config(meta.config, f)
    if len(meta.blocks) != cfg.n_layers:
        raise GrowlmError(f"{f} is inconsistent: {cfg.n_layers} layers but {len(meta.blocks)} block hashes")
    for i, blk in enumerate(meta.blocks):
        if blk.index != i:
            raise GrowlmError(f"{f} is corrupt: blocks[{i}] is not the record of block {i}")
    for name in meta.files:
        check_name(name, f"{f} files")
    if WEIGHTS not in meta.files:
        raise GrowlmError(f"{f} is corrupt: it records no checksum for {WEIGHTS}")
    for i, rec in enumerate(meta.lora or []):
        if max(rec.blocks) >= cfg.n_layers:
            raise GrowlmError(f"{f} is corrupt: lora[{i}].blocks must be block indices below {cfg.n_layers}, "
                              f"got {rec.blocks!r:.60}")
    if bool(meta.lora) != (ADAPTERS in meta.files):  # adapters without records would be dropped silently on load
        raise GrowlmError(f"{f} is inconsistent: it records {'no ' if ADAPTERS not in meta.files else ''}{ADAPTERS} "
                          f"but {'no' if not meta.lora else len(meta.lora)} LoRA record(s)")
    return meta


def recorded_fingerprint_of(meta: ModelRecord, weights: dict[str, torch.Tensor],
                            adapters: dict[str, torch.Tensor]) -> str:
    """The model fingerprint recomputed from the tensors and model.json's records, as :func:`save_model` made it
    (with the LoRA records from version 2 on): equal to the recorded one iff nothing that computes was edited."""
    lora = meta.lora_dicts() if adapters and meta.version >= LORA_COVERED else None
    return model_fingerprint(meta.config, meta.substrate_fingerprint, meta.tokenizer_fingerprint, weights,
                             adapters, lora)


def model_config(raw: dict, f: Path) -> ModelConfig:
    """The :class:`ModelConfig` of model.json ``f``'s ``config``, or a one-line error naming the key at fault."""
    hints = typing.get_type_hints(ModelConfig)
    for fld in dataclasses.fields(ModelConfig):
        kinds = typing.get_args(hints[fld.name]) or (hints[fld.name],)  # int | None -> (int, NoneType)
        field(raw, fld.name, kinds, f, "config.")
    try:
        return ModelConfig.from_dict(raw)
    except GrowlmError as e:
        raise GrowlmError(f"{f} is corrupt: {e}") from None


def verify_files(path: Path, meta: ModelRecord) -> None:
    """Check every weight file against the sha256 recorded in model.json (read by :func:`read_meta`)."""
    files = meta.files
    if ADAPTERS not in files and (Path(path) / ADAPTERS).exists():
        raise GrowlmError(f"{Path(path) / ADAPTERS} is not recorded in {MODEL_JSON}: the dir was modified")
    for name, digest in files.items():
        f = Path(path) / name
        if not f.is_file():
            raise GrowlmError(f"missing weight file {f}")
        if sha256_file(f) != digest:
            raise GrowlmError(f"checksum mismatch in {f}: the file is truncated or corrupted")


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never a pickle), with a clear error for anything else."""
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise GrowlmError(f"{f} is not a valid safetensors file: {e}") from e


def checked_skeleton(path: Path, meta: ModelRecord, weights: dict[str, torch.Tensor]) -> GrowLM:
    """The model model.json's config builds (on the meta device, no memory), once ``weights`` are
    checked to be exactly its tensors: every name, no other, each of the shape the config gives."""
    f = Path(path) / WEIGHTS
    with torch.device("meta"):
        model = GrowLM(model_config(meta.config, Path(path) / MODEL_JSON))
    want = model.state_dict()
    missing = set(want) - set(weights)
    if missing:
        raise GrowlmError(f"{f} lacks tensors: {', '.join(sorted(missing)[:5])}")
    extra = set(weights) - set(want)
    if extra:
        raise GrowlmError(f"{f} holds tensors the config in {MODEL_JSON} has no place for: {', '.join(sorted(extra)[:5])}")
    for name in sorted(want):
        if weights[name].shape != want[name].shape:
            raise GrowlmError(f"{f}: tensor {name} has shape {list(weights[name].shape)}, but the config in "
                              f"{MODEL_JSON} gives {list(want[name].shape)}")
    return model


def embedding_fingerprint(substrate: SubstrateRecord, table: torch.Tensor) -> str | None:
    """The substrate fingerprint of the embedding ``table`` under model.json's recipe, or ``None``
    for a trainable substrate (its embedding moves in training, so only the starting point is recorded)."""
    if kind_trains(substrate.kind):
        return None
    return substrate_fingerprint(substrate.recipe, table)


def check_port(path: Path, meta: ModelRecord, embedding: torch.Tensor | None = None) -> tuple[Tokenizer | None, list[str]]:
    """The docking port a model dir really has, against the one its model.json records.

    Loads the tokenizer (its fingerprint is computed from its own vocabulary) and recomputes the
    substrate fingerprint from the embedding (``embedding``, or read from the weights file; the
    one pass over it that load and verify make). Returns the tokenizer (``None`` when it does not
    load) and the problems found, each one line.
    """
    return port_problems(path, meta.substrate, meta.substrate_fingerprint, meta.tokenizer_fingerprint,
                         bool(meta.config.get("trainable_embedding")), embedding)


def port_problems(path: Path, sub: SubstrateRecord, substrate_fp: str, tokenizer_fp: str, trainable_embedding: bool,
                  embedding: torch.Tensor | None = None) -> tuple[Tokenizer | None, list[str]]:
    """:func:`check_port` of the records given one by one (a dir about to be written has no model.json yet)."""
    path = Path(path)
    problems = []
    try:
        tok = Tokenizer.load(path / TOKENIZER_DIR)
    except GrowlmError as e:
        tok = None
        problems.append(str(e))
    if tok is not None and tok.fingerprint != tokenizer_fp:
        problems.append(f"{path}: tokenizer/ has fingerprint {tok.fingerprint[:12]}, but {MODEL_JSON} records "
                        f"{tokenizer_fp[:12]}: the tokenizer was replaced")
    if sub.fingerprint != substrate_fp or sub.kind != sub.recipe.get("kind", sub.kind):
        problems.append(f"{path}: {MODEL_JSON} contradicts itself about its substrate (kind {sub.kind!r}, "
                        f"recipe kind, and the two substrate fingerprints must agree)")
    if kind_trains(sub.kind) and not trainable_embedding:
        problems.append(f"{path}: {MODEL_JSON} names a trainable substrate but its config freezes the embedding")
    elif not kind_trains(sub.kind):
        if embedding is None:
            embedding = _read_embedding(path / WEIGHTS)
        fp = embedding_fingerprint(sub, embedding)
        if fp != substrate_fp:
            problems.append(f"{path}: the embedding does not match substrate fingerprint "
                            f"{substrate_fp[:12]} (got {fp[:12]})")
    return tok, problems


def _read_embedding(f: Path) -> torch.Tensor:
    """Only ``embed.weight`` of a weights file: the port check needs no other tensor."""
    try:
        with safe_open(str(f), framework="pt") as st:
            return st.get_tensor("embed.weight")
    except (SafetensorError, OSError, ValueError) as e:
        raise GrowlmError(f"{f} is not a valid safetensors file with an embed.weight: {e}") from e


def load_model(path: Path, device: str | torch.device = "cpu", verify: bool = True) -> SavedModel:
    """Load a model dir written by :func:`save_model`; adapters, if any, are re-attached (not merged).

    ``verify=False`` skips only the files' checksums and the fingerprint (for a caller that just checked
    them); the config, the tensor shapes and the docking port are always checked. The fingerprint is
    recomputed from the tensors and model.json's records, so an edited record (a LoRA alpha, a config
    value) never computes something else under the recorded name.
    """
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_files(path, meta)
    weights = load_tensors(path / WEIGHTS)
    model = checked_skeleton(path, meta, weights)
    tok, problems = check_port(path, meta, weights["embed.weight"])
    if problems:
        raise GrowlmError(problems[0])
    model.load_state_dict(weights, strict=True, assign=True)
    model.embed.weight.requires_grad_(model.cfg.trainable_embedding)
    adapters = load_tensors(path / ADAPTERS) if ADAPTERS in meta.files else {}
    if verify and recorded_fingerprint_of(meta, weights, adapters) != meta.fingerprint:
        raise GrowlmError(f"{path / MODEL_JSON}: its records do not give its fingerprint "
                          f"{meta.fingerprint[:12]}: it was edited (`growlm verify {path}` says more)")
    if adapters:
        attach_adapters(model, meta.lora_dicts(), adapters)
        model.lora_records = meta.lora_dicts()
    model.to(device)
    return SavedModel(model=model, meta=meta, path=path, _tokenizer=tok)
