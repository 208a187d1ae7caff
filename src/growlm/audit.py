"""The trainable-set audit: proof that a stage trained exactly what its plan declares.

Every stage (grow, LoRA, monolithic, head-only, a mixture's router or heads) hashes each
parameter tensor when it starts and again when it ends. Every tensor the stage declares trainable
must have changed; every other tensor must be byte-identical. A violation stops the stage before it
is saved. The record goes into the stage's ``model.json`` (``"audit"``) with the start hash of every
tensor, so ``growlm verify`` re-checks it from the files alone: the frozen tensors against the start
hashes and the parent stage, the trained ones against their start values.

Names are those of the saved files (``model.safetensors`` / ``adapters.safetensors``): peft's
``.base_layer.`` wrapper does not appear, so a record reads the same with or without adapters.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from growlm import distributed
from growlm.errors import GrowlmError
from growlm.hashing import canonical_json, tensor_bytes

# How many names an error message lists before it says "and N more".
_SHOWN = 4


def saved_name(name: str) -> str:
    """A parameter's name as the model files store it (without peft's ``.base_layer.``)."""
    return name.replace(".base_layer.", ".")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes.

    It hashes a copy: numpy's view of a live parameter would pin its storage, which FSDP2 must resize.
    """
    h = hashlib.sha256(canonical_json([str(t.dtype), list(t.shape)]))
    h.update(tensor_bytes(t.detach().to("cpu", copy=True)))
    return h.hexdigest()


def digests(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """``{saved name: digest}`` of named tensors (FSDP shards are gathered first: a collective)."""
    return {saved_name(n): tensor_digest(distributed.full_tensor(t)) for n, t in tensors}


def group_of(name: str) -> str:
    """The tensor group a name belongs to: ``blocks.3``, ``blocks.3.lora.stage4``, ``head``, ``ln_f``,
    ``embed``, ``router.proj``, ``experts.0.head``, ..."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[i + 1].isdigit():
            block = ".".join(parts[:i + 2])
            lora = [p for p in parts if p.startswith("lora_")]
            return f"{block}.lora.{parts[parts.index(lora[0]) + 1]}" if lora else block
    return ".".join(parts[:-1]) or name


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check(start: Mapping[str, str], end: Mapping[str, str], declared: Iterable[str], steps: int) -> list[str]:
    """What is wrong with a stage that went from ``start`` to ``end`` digests (empty: nothing).

    ``declared`` are the names that must have changed, everything else must not have. After a single
    optimizer step a trained tensor can legitimately stand still (a LoRA ``A`` beside a zero ``B``,
    the blocks behind a zero-initialised projection get no gradient yet), so a one-step stage need
    only have moved some declared tensor.
    """
    declared = {saved_name(n) for n in declared}
    problems = []
    if set(start) != set(end):
        problems.append(f"the set of tensors changed during the stage ({_names(set(start) ^ set(end))})")
    unknown = declared - set(end)
    if unknown:
        problems.append(f"declared trainable but not in the model: {_names(unknown)}")
    changed = {n for n in end if n in start and end[n] != start[n]}
    if changed - declared:
        problems.append(f"{len(changed - declared)} frozen tensor(s) changed: {_names(changed - declared)}")
    still = (declared & set(end)) - changed
    if still and (steps >= 2 or not (declared & changed)):
        problems.append(f"{len(still)} trainable tensor(s) did not change: {_names(still)}")
    return problems


def record(start: Mapping[str, str], end: Mapping[str, str], declared: Iterable[str], steps: int) -> dict:
    """The audit record stored in ``model.json``: tensor groups and counts, and every start digest."""
    declared = {saved_name(n) for n in declared}
    trained = Counter(group_of(n) for n in end if n in declared)
    frozen = Counter(group_of(n) for n in end if n not in declared)
    return {"ok": True, "steps": steps, "trained": dict(sorted(trained.items())),
            "frozen": dict(sorted(frozen.items())), "trained_tensors": sum(trained.values()),
            "frozen_tensors": sum(frozen.values()), "start_sha256": dict(sorted(start.items()))}


def audit(start: Mapping[str, str], end: Mapping[str, str], declared: Iterable[str], steps: int, where: str) -> dict:
    """:func:`check` then :func:`record`; a violation raises one line naming the tensors."""
    declared = set(declared)
    problems = check(start, end, declared, steps)
    if problems:
        raise GrowlmError(f"{where}: the trainable-set audit failed: {'; '.join(problems)}; "
                          f"nothing was saved as a finished stage")
    return record(start, end, declared, steps)
