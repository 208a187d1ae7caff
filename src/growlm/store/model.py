"""The model-dir format: atomic safetensors I/O, per-block hashes, fingerprints, lineage and the
checks of the files against model.json (the layout is in :mod:`growlm.store`). Building a model from
a dir, and checking its docking port, is :mod:`growlm.loading`'s.

Weights are never pickled; every file's sha256 is checked against model.json before a tensor is
used, so a truncated or bit-flipped file is refused with its name. model.json is checked too: its
config (types, and the tensor shapes it implies) and its file names (plain names inside the dir).
A dir holding a symlink or any other non-regular file is refused.
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
from safetensors import SafetensorError
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
from growlm.model import GrowLM, ModelConfig
from growlm.store.records import FORMAT, LORA_COVERED, ModelRecord
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
