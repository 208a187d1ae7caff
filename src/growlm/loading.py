"""Loading what growlm wrote: any model dir, run stage or mixture dir, into a module ready to use. The one place
that builds a model from its files (the skeleton its config gives, its weights, its LoRA adapters through peft,
its tokenizer) and that checks the docking port (the tokenizer's and the substrate's fingerprints, recomputed
from the files, against the records; and two ports against each other, for a merge or a base to grow on).

The formats themselves (model.json and mixture.json records, checksums, fingerprints over records) are
:mod:`growlm.store`'s; training (a base, a finished stage), composition, evaluation and the API load through here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from growlm.errors import GrowlmError
from growlm.lora import attach_adapters
from growlm.mixture import Mixture, Router
from growlm.model import GrowLM
from growlm.rules import Rule
from growlm.store import MixtureDir, ModelDir, RunDir, resolve, stages
from growlm.store.mixture import ROUTER, info_mixture, read_tensors, read_tokenizer, verify_dir
from growlm.store.model import (
    ADAPTERS,
    MODEL_JSON,
    TOKENIZER_DIR,
    WEIGHTS,
    load_tensors,
    model_config,
    read_meta,
    recorded_fingerprint_of,
    verify_files,
)
from growlm.store.records import ModelRecord, SubstrateRecord
from growlm.substrate.base import substrate_fingerprint
from growlm.substrate.registry import kind_trains
from growlm.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# A model dir


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


# ----------------------------------------------------------------------------------------------
# The docking port


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


def port_difference(mine: tuple[str, str], theirs: tuple[str, str]) -> tuple[str, str, str] | None:
    """Where two docking ports differ, as ``(what, mine, theirs)`` (None: they are one port); each port is
    its ``(substrate fingerprint, tokenizer fingerprint)``."""
    for what, a, b in zip(("substrate", "tokenizer"), mine, theirs, strict=True):
        if a != b:
            return what, a, b
    return None


# ----------------------------------------------------------------------------------------------
# A mixture dir, and any path


def load_mixture(path: Path, device: str | torch.device = "cpu") -> tuple[Mixture, Tokenizer]:
    """Load and fully verify a mixture dir; returns ``(Mixture, Tokenizer)``.

    Refuses a tampered dir: every file's checksum, every expert's fingerprint, the docking port,
    the tokenizer and the mixture's own fingerprint are checked before it is returned.
    """
    path = Path(path)
    desc = verify_dir(path)
    models = [load_model(path / e.path, verify=False).model for e in desc.experts]
    rule = Rule(desc.combine, desc.space, tuple(desc.weights) if desc.weights is not None else None)
    router = None
    if rule.kind.trained:  # its per-token weights come from the router stored beside the experts
        if ROUTER not in desc.tensors or desc.router is None:
            raise GrowlmError(f"mixture {path} combines with a router but stores none")
        router = Router(desc.router.in_features, desc.router.prior)
    mixture = Mixture(models, rule, router)
    mixture.load_state_dict(read_tensors(path, desc, {*mixture.router_state(), *mixture.head_state()}), strict=False)
    tok = read_tokenizer(path, desc)
    for p in mixture.parameters():
        p.requires_grad_(False)
    return mixture.to(device).eval(), tok


def load_any(path: str | Path) -> tuple[Any, Any]:
    """The model and tokenizer stored at ``path`` (a model dir, run stage or mixture), ready for inference.

    Raises a one-line GrowlmError when ``path`` is not a model, so callers never need to know which
    kind of model a path holds.
    """
    found = _model_or_mixture(path)
    if isinstance(found, MixtureDir):
        mixture, tok = load_mixture(found.path)
        mixture.eval()
        return mixture, tok
    saved = load_model(found.path)
    saved.model.eval()
    return saved.model, saved.tokenizer()


def fingerprint_of(path: str | Path) -> str:
    """The fingerprint recorded for the model at ``path`` (what results are attributed to)."""
    found = _model_or_mixture(path)
    if isinstance(found, MixtureDir):
        return info_mixture(found.path)["fingerprint"]
    return found.meta.fingerprint


def _model_or_mixture(path: str | Path) -> ModelDir | MixtureDir:
    """What ``path`` holds, refusing a run: it is many models, one per stage."""
    found = resolve(path)
    if isinstance(found, RunDir):
        last = stages(found)[-1][1]
        raise GrowlmError(f"{path} is a training run, not a model; pass one of its stages (e.g. {last})")
    return found
