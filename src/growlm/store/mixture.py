"""The mixture-dir format (the layout is in :mod:`growlm.store`): mixture.json and its checks, and
the writing and reading back of the dir's files. What a mixture computes (the combine rules, the
router, post-merge tuning) is :mod:`growlm.compose`'s, which calls here for every file.

Each expert is a byte-identical copy of a model dir that its own model.json checksums; mixture.json
checksums every other file, so each byte is hashed once per verification. Nothing in mixture.json
is trusted before it is checked: every field's type, every file name (plain names inside the dir),
every expert path (``experts/i``, never elsewhere), every checksum and fingerprint.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from growlm.errors import GrowlmError
from growlm.files import (
    atomic_save_tensors,
    atomic_write_json,
    check_name,
    check_tree,
    read_descriptor,
)
from growlm.hashing import canonical_json, sha256_file, sha256_tensors
from growlm.rules import RULES, SPACES
from growlm.store.model import TOKENIZER_DIR, ModelDir, load_tensors, read_meta, verify_files
from growlm.store.records import MIXTURE_FORMAT, MIXTURE_VERSION, MixtureRecord
from growlm.tokenizer import Tokenizer

MIXTURE_JSON = "mixture.json"
EXPERTS_DIR = "experts"
ROUTER = "router.safetensors"
HEADS = "heads.safetensors"


@dataclass(frozen=True)
class MixtureDir:
    """A mixture dir; :func:`verify_dir` and :func:`info_mixture` read and check its mixture.json."""

    path: Path


def expert_path(index: int) -> str:
    """Where expert ``index`` lies in a mixture dir, as mixture.json records it."""
    return f"{EXPERTS_DIR}/{index}"


def mixture_fingerprint(rule: dict, expert_fps: Sequence[str], substrate_fp: str, tokenizer_fp: str,
                        tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the rule (its JSON: combine, space, weights), the experts, the docking port and the
    stored tensors (router, heads)."""
    h = hashlib.sha256(canonical_json({"rule": rule, "experts": list(expert_fps),
                                       "substrate": substrate_fp, "tokenizer": tokenizer_fp}))
    h.update(sha256_tensors(tensors).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing (in a temp dir that becomes the mixture dir: see merge in growlm.compose)


def write_experts(root: Path, experts: Sequence[ModelDir]) -> None:
    """Copy the expert model dirs byte for byte to ``root/experts/i``, and the first one's tokenizer
    to ``root/tokenizer``; each copy's files are checked, as the copy is what the mixture will trust."""
    for i, e in enumerate(experts):
        rel = expert_path(i)
        shutil.copytree(e.path, root / rel)
        verify_files(root / rel, read_meta(root / rel))
    shutil.copytree(experts[0].path / TOKENIZER_DIR, root / TOKENIZER_DIR)


def write_tensors(root: Path, stored: dict[str, dict[str, torch.Tensor]]) -> None:
    """The mixture's own tensors, as ``{file name (ROUTER or HEADS): tensors}``."""
    for name, tensors in stored.items():
        atomic_save_tensors(root / name, tensors)


def write_desc(root: Path, rule: dict, experts: Sequence[ModelDir], router: dict | None,
               stored: dict[str, dict[str, torch.Tensor]], tuning: list[dict]) -> MixtureRecord:
    """Write ``root/mixture.json``, last: it checksums every other file, so they must all be in place.

    ``rule`` is the rule's JSON (combine, space, weights), ``router`` the gate's description (or
    ``None``), ``stored`` what :func:`write_tensors` wrote, ``tuning`` the post-merge stage records.
    Returns the written record.
    """
    rels = [expert_path(i) for i in range(len(experts))]
    ref = experts[0].meta
    tensors = {k: v for t in stored.values() for k, v in t.items()}
    desc = {
        "format": MIXTURE_FORMAT, "version": MIXTURE_VERSION, **rule,
        "router": router,
        "experts": [{"path": rel, "fingerprint": e.meta.fingerprint, "source": str(e.path.resolve())}
                    for rel, e in zip(rels, experts, strict=True)],
        "substrate_fingerprint": ref.substrate_fingerprint,
        "tokenizer_fingerprint": ref.tokenizer_fingerprint,
        "tensors": sorted(stored),
        "tuning": tuning,
        "fingerprint": mixture_fingerprint(rule, [e.meta.fingerprint for e in experts],
                                           ref.substrate_fingerprint, ref.tokenizer_fingerprint, tensors),
        "files": _checked_files(root, rels),
    }
    record = MixtureRecord.read(desc, root / MIXTURE_JSON)  # what is written is what every reader will read
    atomic_write_json(root / MIXTURE_JSON, record.to_json())
    return record


# ----------------------------------------------------------------------------------------------
# Reading and checking


def _checked_names(root: Path, expert_paths: Sequence[str]) -> list[str]:
    """Every file under ``root`` that mixture.json checksums: all but mixture.json itself and the
    expert weight files, which the experts' own model.json checksums (so each byte is hashed once
    per verification)."""
    skip = {MIXTURE_JSON}
    for rel in expert_paths:
        skip |= {f"{rel}/{name}" for name in read_meta(root / rel).files}
    names = (f.relative_to(root).as_posix() for f in sorted(root.rglob("*")) if f.is_file())
    return [n for n in names if n not in skip]


def _checked_files(root: Path, expert_paths: Sequence[str]) -> dict[str, str]:
    """sha256 of every file :func:`_checked_names` lists."""
    return {name: sha256_file(root / name) for name in _checked_names(root, expert_paths)}


def read_desc(path: Path) -> MixtureRecord:
    """mixture.json of a mixture dir as its typed record, every field checked before anything reads it;
    a dir holding a symlink or special file is refused."""
    path = Path(path)
    check_tree(path, "mixture")
    f = path / MIXTURE_JSON
    desc = MixtureRecord.read(read_descriptor(f, MIXTURE_FORMAT, "mixture"), f)
    if desc.combine not in RULES:
        raise GrowlmError(f"{f} is corrupt: unknown combine rule {desc.combine!r}")
    if desc.space not in SPACES:
        raise GrowlmError(f"{f} is corrupt: space is {desc.space!r}, not one of {', '.join(SPACES)}")
    for name in desc.tensors:
        if name not in (ROUTER, HEADS):
            raise GrowlmError(f"{f} is corrupt: tensors lists {name!r}; a mixture stores only {ROUTER} and {HEADS}")
    for name in desc.files:
        check_name(name, f"{f} files")
    return desc


def verify_dir(path: Path) -> MixtureRecord:
    """Check every file and fingerprint of a mixture dir except its own tensors; returns mixture.json."""
    path = Path(path)
    desc = read_desc(path)
    rels = [e.path for e in desc.experts]
    for i, rel in enumerate(rels):
        if rel != expert_path(i):  # never follow a path out of the mixture dir
            raise GrowlmError(f"mixture {path}: expert {i} has path {rel!r}, expected {EXPERTS_DIR}/{i}")
    # a file dropped from the record would otherwise go unchecked (and unnoticed)
    unrecorded = sorted(set(_checked_names(path, rels)) - set(desc.files))
    if unrecorded:
        raise GrowlmError(f"mixture {path} was modified: {unrecorded[0]} is not recorded in {MIXTURE_JSON}")
    for name, digest in desc.files.items():
        f = path / name
        if not f.is_file():
            raise GrowlmError(f"mixture {path} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise GrowlmError(f"mixture {path} was modified: checksum mismatch in {name}")
    for rel, e in zip(rels, desc.experts, strict=True):
        meta = read_meta(path / rel)
        verify_files(path / rel, meta)
        if meta.fingerprint != e.fingerprint:
            raise GrowlmError(f"mixture {path}: {rel} has fingerprint {meta.fingerprint[:12]}, "
                              f"{MIXTURE_JSON} records {e.fingerprint[:12]}")
        for what in ("substrate_fingerprint", "tokenizer_fingerprint"):
            if getattr(meta, what) != getattr(desc, what):
                raise GrowlmError(f"mixture {path}: {rel} has {what} {getattr(meta, what)[:12]}, not {getattr(desc, what)[:12]}")
    return desc


def verified_experts(path: Path) -> list[ModelDir]:
    """The experts of the mixture dir ``path``, once every file and fingerprint of it is checked."""
    path = Path(path)
    return [ModelDir(path / e.path, read_meta(path / e.path)) for e in verify_dir(path).experts]


def read_tensors(path: Path, desc: MixtureRecord, expected: Collection[str]) -> dict[str, torch.Tensor]:
    """The tensors a verified mixture dir stores (router, heads), refused unless each one's name is in
    ``expected`` (the mixture's own) and together with mixture.json they give its recorded fingerprint."""
    tensors = {}
    for name in desc.tensors:
        tensors.update(load_tensors(path / name))
    unknown = set(tensors) - set(expected)
    if unknown:
        raise GrowlmError(f"mixture {path} stores unknown tensors: {', '.join(sorted(unknown)[:5])}")
    fp = mixture_fingerprint(desc.rule, [e.fingerprint for e in desc.experts], desc.substrate_fingerprint,
                             desc.tokenizer_fingerprint, tensors)
    if fp != desc.fingerprint:
        raise GrowlmError(f"mixture {path} was modified: fingerprint {fp[:12]} differs from the recorded "
                          f"{desc.fingerprint[:12]}")
    return tensors


def read_tokenizer(path: Path, desc: MixtureRecord) -> Tokenizer:
    """The shared tokenizer of a mixture dir, refused unless it has the fingerprint mixture.json records."""
    tok = Tokenizer.load(Path(path) / TOKENIZER_DIR)
    if tok.fingerprint != desc.tokenizer_fingerprint:
        raise GrowlmError(f"mixture {path}: tokenizer fingerprint {tok.fingerprint[:12]} is not the recorded "
                          f"{desc.tokenizer_fingerprint[:12]}")
    return tok


def info_mixture(path: Path) -> dict:
    """Description of a mixture dir for ``growlm info`` (reads metadata only; no hashing)."""
    path = Path(path)
    desc = read_desc(path)
    experts = []
    for e in desc.experts:
        meta = read_meta(path / e.path)
        cfg = meta.config
        experts.append({"path": e.path, "fingerprint": meta.fingerprint, "n_layers": cfg["n_layers"],
                        "d_model": cfg["d_model"], "context": cfg["context"], "params_total": meta.params_total,
                        "source": e.source})
    router = desc.router
    router_params = (router.in_features + 1) * len(experts) if router else 0
    return {
        "kind": "mixture", "path": str(path), "n_experts": len(experts), "combine": desc.combine,
        "space": desc.space, "experts": experts,
        # the effective fixed weights (uniform for the means); a router's are per token
        "weights": None if router else desc.weights or [1.0 / len(experts)] * len(experts),
        "params_total": sum(e["params_total"] for e in experts) + router_params,
        "vocab_size": read_meta(path / desc.experts[0].path).config["vocab_size"],
        "context": min(e["context"] for e in experts),
        "tuned": [r.stage for r in desc.tuning],
        "substrate_fingerprint": desc.substrate_fingerprint,
        "tokenizer_fingerprint": desc.tokenizer_fingerprint, "fingerprint": desc.fingerprint,
    }

