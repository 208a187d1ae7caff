"""The :class:`Substrate`: a frozen token matrix, the recipe that made it, and its fingerprint.

A substrate is stored as a compact ``table`` of shape ``[V, k]`` plus an integer ``lift``: the
matrix a model sees is ``table.repeat_interleave(lift, dim=1)`` of shape ``[V, k * lift]`` (the
paper's parameter-free widening of a 16-bit code to d_model, §2.3). On disk it is the lifted
``weight`` (so any tool that reads an embedding matrix can use it) plus a JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save as _save_safetensors

from growlm.errors import GrowlmError, one_line
from growlm.files import atomic_write_bytes
from growlm.hashing import canonical_json, sha256_tensors
from growlm.substrate.registry import SUBSTRATE_KINDS, kind_trains

WEIGHT_FILE = "substrate.safetensors"
META_FILE = "substrate.json"
FORMAT = "growlm.substrate/1"


def substrate_fingerprint(recipe: dict, table: torch.Tensor) -> str:
    """sha256 over the canonical recipe JSON and the table's dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(canonical_json(recipe))
    h.update(sha256_tensors({"table": table}).encode("ascii"))
    return h.hexdigest()


@dataclass
class Substrate:
    """A frozen token matrix ``weight = table.repeat_interleave(lift, dim=1)`` with its recipe.

    ``table`` is ``[V, k]`` float32, ``lift`` the repeat factor (1 for glyph/trainable),
    ``recipe`` everything needed to rebuild it, ``fingerprint`` the sha256 of recipe + table.
    """

    kind: str
    table: torch.Tensor
    lift: int
    recipe: dict
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        """Number of rows (token ids)."""
        return int(self.table.shape[0])

    @property
    def dim(self) -> int:
        """Width of the lifted matrix, ``k * lift`` (= d_model)."""
        return int(self.table.shape[1]) * self.lift

    @property
    def trainable(self) -> bool:
        """True only for the learned-embedding baseline; every other kind stays frozen."""
        return kind_trains(self.kind)

    @property
    def weight(self) -> torch.Tensor:
        """The ``[V, dim]`` float32 matrix a model embeds with."""
        if self.lift == 1:
            return self.table
        return self.table.repeat_interleave(self.lift, dim=1)

    def metadata(self) -> dict[str, Any]:
        """The JSON sidecar written next to the weights: the fingerprinted ``recipe`` plus its
        headline fields (``parameters`` = the recipe's kind-specific ``params``) for quick reading."""
        meta: dict[str, Any] = {
            "format": FORMAT,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "lift": self.lift,
            "tokenizer_fingerprint": self.recipe.get("tokenizer_fingerprint"),
            "fingerprint": self.fingerprint,
            "parameters": self.recipe.get("params"),
            "recipe": self.recipe,
        }
        if "font_sha256" in self.recipe:
            meta["font_sha256"] = self.recipe["font_sha256"]
        return meta

    def save(self, out_dir: str | Path) -> None:
        """Write ``substrate.safetensors`` (one tensor ``weight``, ``[V, dim]`` float32) and
        ``substrate.json`` atomically into ``out_dir`` (created if needed). The JSON is written
        last, so a directory with a JSON always has its weights."""
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GrowlmError(one_line(f"cannot create substrate directory {out}: {e}")) from e
        weight = self.weight.to(torch.float32).contiguous()
        # A single metadata key: safetensors serialises the metadata map in hash order, so more
        # than one key could make two saves of the same substrate differ byte-wise.
        blob = _save_safetensors({"weight": weight}, metadata={"format": "pt"})
        text = json.dumps(self.metadata(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write_bytes(out / WEIGHT_FILE, blob)
        atomic_write_bytes(out / META_FILE, text.encode("utf-8"))

    @classmethod
    def load(cls, dir: str | Path) -> Substrate:
        """Read a saved substrate and verify it: the weight must be an exact lift of its table and
        the recomputed fingerprint must equal the recorded one. Raises :class:`GrowlmError`
        naming the file on any missing, corrupt or tampered file. Never unpickles."""
        d = Path(dir)
        if not d.is_dir():
            raise GrowlmError(f"substrate directory not found: {d}")
        meta_path, weight_path = d / META_FILE, d / WEIGHT_FILE
        for p in (meta_path, weight_path):
            if not p.is_file():
                raise GrowlmError(f"substrate file missing: {p}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            recipe, kind, lift = meta["recipe"], meta["kind"], int(meta["lift"])
            recorded, vocab_size, dim = meta["fingerprint"], int(meta["vocab_size"]), int(meta["dim"])
            if not isinstance(recipe, dict) or kind not in SUBSTRATE_KINDS or lift < 1:
                raise ValueError("bad kind, lift or recipe")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise GrowlmError(one_line(f"corrupt substrate metadata {meta_path}: {e}")) from e
        try:
            tensors = _load_safetensors(str(weight_path))
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise GrowlmError(one_line(f"corrupt substrate weights {weight_path}: {e}")) from e
        weight = tensors.get("weight")
        if set(tensors) != {"weight"} or weight is None or weight.dtype != torch.float32:
            raise GrowlmError(
                f"corrupt substrate weights {weight_path}: expected one float32 tensor 'weight'"
            )
        if tuple(weight.shape) != (vocab_size, dim) or dim % lift:
            raise GrowlmError(
                f"corrupt substrate weights {weight_path}: shape {list(weight.shape)} does not match "
                f"vocab_size={vocab_size}, dim={dim}, lift={lift} in {meta_path}"
            )
        table = weight[:, ::lift].contiguous()
        # The fingerprint covers only the table, so check the other lifted columns separately.
        if lift > 1 and not torch.equal(table.repeat_interleave(lift, dim=1), weight):
            raise GrowlmError(
                f"tampered substrate weights {weight_path}: weight is not a lift (x{lift}) of its table"
            )
        actual = substrate_fingerprint(recipe, table)
        if actual != recorded:
            raise GrowlmError(
                f"substrate fingerprint mismatch in {d}: {META_FILE} records {recorded[:16]}…, "
                f"{WEIGHT_FILE} hashes to {actual[:16]}… (file modified or corrupt)"
            )
        sub = cls(kind=kind, table=table, lift=lift, recipe=recipe, fingerprint=recorded)
        # The headline fields repeat the recipe outside the fingerprint; they must not disagree with it.
        if sub.metadata() != meta:
            raise GrowlmError(
                f"inconsistent substrate metadata {meta_path}: headline fields disagree with its recipe"
            )
        return sub


def make_substrate(kind: str, table: torch.Tensor, lift: int, recipe: dict) -> Substrate:
    """Assemble a :class:`Substrate` from a float32 table, fingerprinting it."""
    table = table.to(torch.float32).contiguous()
    return Substrate(
        kind=kind, table=table, lift=lift, recipe=recipe, fingerprint=substrate_fingerprint(recipe, table)
    )
