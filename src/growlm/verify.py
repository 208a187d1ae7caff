"""``growlm verify``: prove a run, a model or a mixture is what its records say.

For every model dir: each file's sha256 against model.json, each block's sha256 recomputed from
the weights, the substrate fingerprint recomputed from the embedding (frozen kinds), and the model
fingerprint. For a run, also the lineage: every stage names its parent's fingerprint, and every
block that was frozen in a stage has the same sha256 as in the stage before — frozen means
provably frozen across the whole lineage.
"""

from __future__ import annotations

from pathlib import Path

from growlm import audit
from growlm.errors import GrowlmError
from growlm.growth import trainable_names
from growlm.store import MixtureDir, ModelDir, resolve, stages
from growlm.store.mixture import EXPERTS_DIR
from growlm.store.model import (
    ADAPTERS,
    LORA_COVERED,
    WEIGHTS,
    block_sha256,
    check_port,
    checked_skeleton,
    load_tensors,
    read_meta,
    recorded_fingerprint_of,
    verify_files,
)


def verify_model(path: Path) -> tuple[dict, list[str], list[str]]:
    """Check one model dir; returns (its model.json, report lines, problems).

    Everything load_model refuses is a problem here too (the same checks: config and tensor
    shapes, tokenizer and recomputed substrate fingerprints), so verify never vouches for a dir
    that will not load.
    """
    lines, problems = [], []
    meta = read_meta(path)
    try:
        verify_files(path, meta)
        lines.append(f"{path}: {len(meta['files'])} file checksum(s) ok")
        weights = load_tensors(path / WEIGHTS)
        checked_skeleton(path, meta, weights)
    except GrowlmError as e:
        problems.append(str(e))
        return meta, lines, problems
    adapters = load_tensors(path / ADAPTERS) if (path / ADAPTERS).is_file() else {}
    for blk in meta["blocks"]:
        got = block_sha256(weights, blk["index"])
        if got != blk["sha256"]:
            problems.append(f"{path}: block {blk['index']} sha256 {got[:12]} differs from the recorded {blk['sha256'][:12]}")
    _, port = check_port(path, meta, weights["embed.weight"])
    problems += port
    if not port:
        lines.append(f"{path}: tokenizer fingerprint {meta['tokenizer_fingerprint'][:12]} ok")
        if meta["substrate"]["kind"] != "trainable":
            lines.append(f"{path}: substrate {meta['substrate']['kind']} fingerprint {meta['substrate_fingerprint'][:12]} ok")
    fp = recorded_fingerprint_of(meta, weights, adapters)
    if adapters and meta["version"] < LORA_COVERED:
        lines.append(f"{path}: note: written before fingerprints covered the LoRA records (rank, alpha, blocks, "
                     f"targets); they are checked for form only")
    if fp != meta["fingerprint"]:
        problems.append(f"{path}: model fingerprint {fp[:12]} differs from the recorded {meta['fingerprint'][:12]}")
    else:
        lines.append(f"{path}: {len(meta['blocks'])} block hash(es) and fingerprint {fp[:12]} ok")
    return meta, lines, problems


def verify(path: Path) -> dict:
    """Verify a model dir, a run (all its stages and their lineage) or a mixture (all its experts)."""
    path = Path(path)
    found = resolve(path)
    if isinstance(found, MixtureDir):
        from growlm.compose import load_mixture

        lines, problems = [], []
        try:
            load_mixture(path)  # re-checks every checksum and fingerprint of the mixture
            lines.append(f"{path}: mixture checksums and fingerprints ok")
        except GrowlmError as e:
            problems.append(str(e))
        experts = path / EXPERTS_DIR
        # a missing or symlinked experts/ is already a problem above; never walk where it points
        for expert in sorted(experts.iterdir()) if experts.is_dir() and not experts.is_symlink() else []:
            try:
                _, ln, pr = verify_model(expert)
            except GrowlmError as e:  # not a model dir at all: one more problem of the mixture
                ln, pr = [], [str(e)]
            lines += ln
            problems += pr
        return {"ok": not problems, "lines": lines, "problems": problems}
    if isinstance(found, ModelDir):
        meta, lines, problems = verify_model(path)
        if not problems and meta.get("audit") is not None:  # a run's stage: its audit, without the parent
            ln, problems = _check_audit(_stage_index(meta), meta, _file_digests(path), None)
            lines += ln
        return {"ok": not problems, "lines": lines, "problems": problems}
    run_stages = stages(found)
    lines, problems, prev, prev_digests = [], [], None, None
    for n, sdir in run_stages:
        meta, ln, pr = verify_model(sdir)
        lines += ln
        problems += pr
        if prev is not None:
            problems += _check_lineage(n, meta, prev)
        now = None if pr else _file_digests(sdir)
        if now is not None:
            ln, pr = _check_audit(n, meta, now, prev_digests)
            lines += ln
            problems += pr
        prev, prev_digests = meta, now
    if not problems:
        lines.append(f"{path}: lineage of {len(run_stages)} stage(s) ok: every frozen block unchanged since its stage")
    return {"ok": not problems, "lines": lines, "problems": problems}


def _check_lineage(n: int, meta: dict, parent: dict) -> list[str]:
    """A stage against its parent: lineage link, substrate, and every block it did not train."""
    out = []
    if not meta["lineage"] or meta["lineage"][-1] != parent["fingerprint"]:
        out.append(f"stage-{n}: its lineage does not name stage-{n - 1} ({parent['fingerprint'][:12]}) as its parent")
    if meta["substrate_fingerprint"] != parent["substrate_fingerprint"]:
        out.append(f"stage-{n}: substrate fingerprint changed from stage-{n - 1}")
    stage = meta.get("stage") or {}
    if stage.get("train") == "all":
        return out  # a monolithic stage trains every block by design
    new = set(stage.get("new_blocks", []))
    mine = {blk["index"]: blk["sha256"] for blk in meta["blocks"]}
    for blk in parent["blocks"]:
        if blk["index"] in new:
            continue
        now = mine.get(blk["index"])
        if now is None:
            out.append(f"stage-{n}: lacks block {blk['index']} of stage-{n - 1}: it cannot have grown from it")
        elif now != blk["sha256"]:
            out.append(f"stage-{n}: frozen block {blk['index']} changed (sha256 {blk['sha256'][:12]} -> {now[:12]})")
    return out


def _stage_index(meta: dict) -> int | str:
    stage = meta.get("stage")
    return stage.get("index", "?") if isinstance(stage, dict) else "?"


def _file_digests(path: Path) -> dict[str, str]:
    """The audit's per-tensor digests of a model dir's weight and adapter files."""
    tensors = load_tensors(path / WEIGHTS)
    if (path / ADAPTERS).is_file():
        tensors.update(load_tensors(path / ADAPTERS))
    return audit.digests(tensors.items())


def _check_audit(n: int, meta: dict, now: dict[str, str], parent: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """Re-check a stage's trainable-set audit from its files: what the plan trains changed since the
    stage began, nothing else did, the stage began from its parent, and the record says so."""
    stage, rec = meta.get("stage"), meta.get("audit")
    if not isinstance(stage, dict):
        return [], [f"stage-{n}: model.json has no stage record"]
    if rec is None:
        return [f"stage-{n}: no trainable-set audit recorded (written before growlm recorded audits)"], []
    try:
        start, steps = dict(rec["start_sha256"]), int(rec["steps"])
        declared = trainable_names(now, train=stage["train"], new_blocks=list(stage["new_blocks"]),
                                   adapter=stage.get("adapter"),
                                   trainable_embedding=bool(meta["config"].get("trainable_embedding")))
    except (KeyError, TypeError, ValueError) as e:
        return [], [f"stage-{n}: the audit or stage record in model.json is malformed ({e!r})"]
    problems = [f"stage-{n}: {p}" for p in audit.check(start, now, declared, steps)]
    if parent is not None:
        moved = sorted(k for k in set(start) & set(parent) if start[k] != parent[k])
        if moved:
            problems.append(f"stage-{n}: did not start from stage-{n - 1}: {len(moved)} tensor(s) differ, e.g. {moved[0]}")
    if not problems:
        again = audit.record(start, now, declared, steps)
        if any(again[k] != rec.get(k) for k in ("trained", "frozen")):
            problems.append(f"stage-{n}: the audit recorded in model.json does not match its files")
    if problems:
        return [], problems
    return [f"stage-{n}: audit ok: {again['trained_tensors']} tensor(s) trained as the plan says "
            f"({', '.join(again['trained'])}), {again['frozen_tensors']} unchanged"], []
