"""Saved models: atomic safetensors I/O, per-block hashes, fingerprints, lineage and verification.

A model dir is immutable once written and self-contained::

    DIR/model.json          config, substrate/tokenizer fingerprints, per-block sha256, file checksums,
                            fingerprint, lineage, params, plan/stage/metrics when it came from a run
    DIR/model.safetensors   base weights (embed.weight, blocks.N.*, ln_f.*, head.weight)
    DIR/adapters.safetensors  LoRA tensors, kept apart from the untouched base blocks (optional)
    DIR/tokenizer/          the tokenizer it speaks

Weights are never pickled; loading checks every file's sha256 against model.json first, so a
truncated or bit-flipped file is refused with its name before any tensor is used.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from growlm.errors import GrowlmError
from growlm.fileio import atomic_dir, atomic_save_tensors, atomic_write_json, read_descriptor
from growlm.hashing import canonical_json, sha256_file, sha256_tensors
from growlm.model import GrowLM, ModelConfig

FORMAT = "growlm-model"
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


def model_fingerprint(config: dict, substrate_fp: str, tokenizer_fp: str, weights: dict[str, torch.Tensor],
                      adapters: dict[str, torch.Tensor]) -> str:
    """sha256 over config, interface fingerprints and every tensor: equal iff the model computes the same."""
    h = hashlib.sha256(canonical_json({"config": config, "substrate": substrate_fp, "tokenizer": tokenizer_fp}))
    h.update(sha256_tensors(weights).encode())
    h.update(sha256_tensors(adapters).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Save / load


@dataclass
class SavedModel:
    """A loaded model dir: the module, its tokenizer dir and its metadata."""

    model: GrowLM
    meta: dict
    path: Path
    tokenizer_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer_dir = self.path / TOKENIZER_DIR

    def tokenizer(self):
        from growlm.tokenizer import Tokenizer

        return Tokenizer.load(self.tokenizer_dir)


def save_model(model: GrowLM, out_dir: Path, *, tokenizer_dir: Path, substrate: dict, extra: dict | None = None,
               lineage: list[str] | None = None) -> dict:
    """Write ``model`` as an immutable, self-contained model dir; returns the model.json content.

    ``substrate`` is ``{"kind", "fingerprint", "recipe"}``; ``extra`` adds run information
    (plan, stage, metrics, params_active, lora). The dir appears atomically or not at all.
    """
    from growlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    weights = base_state(model)
    adapters = adapter_state(model)
    config = model.cfg.to_dict()
    config["n_layers"] = len(model.blocks)
    fp = model_fingerprint(config, substrate["fingerprint"], tok.fingerprint, weights, adapters)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
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
        atomic_write_json(tmp / MODEL_JSON, meta)
    return meta


def read_meta(path: Path) -> dict:
    """model.json of a model dir, or a one-line GrowlmError saying why the dir is not a model."""
    path = Path(path)
    if not path.exists():
        raise GrowlmError(f"model not found: {path}")
    return read_descriptor(path / MODEL_JSON, FORMAT, "model")


def verify_files(path: Path, meta: dict) -> None:
    """Check every weight file against the sha256 recorded in model.json."""
    for name, digest in meta.get("files", {}).items():
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


def load_model(path: Path, device: str | torch.device = "cpu", verify: bool = True) -> SavedModel:
    """Load a model dir written by :func:`save_model`; adapters, if any, are re-attached (not merged)."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_files(path, meta)
    cfg = ModelConfig.from_dict(meta["config"])
    with torch.device("meta"):
        model = GrowLM(cfg)
    weights = load_tensors(path / WEIGHTS)
    missing = set(model.state_dict()) - set(weights)
    if missing:
        raise GrowlmError(f"{path / WEIGHTS} lacks tensors: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(weights, strict=True, assign=True)
    model.embed.weight.requires_grad_(cfg.trainable_embedding)
    if (path / ADAPTERS).is_file() and meta.get("lora"):
        from growlm.lora import attach_adapters

        attach_adapters(model, meta["lora"], load_tensors(path / ADAPTERS))
        model.lora_records = list(meta["lora"])
    model.to(device)
    return SavedModel(model=model, meta=meta, path=path)
