"""``growlm verify``: prove a run, a model or a mixture is what its records say.

For every model dir: each file's sha256 against model.json, each block's sha256 recomputed from
the weights, the substrate fingerprint recomputed from the embedding (frozen kinds), and the model
fingerprint. For a run, also the lineage: every stage names its parent's fingerprint, and every
tensor a stage did not train has the same bytes as in the stage before — frozen means provably
frozen across the whole lineage.

What a stage trained is derived, never read from the stage's own claims: the plan every stage
records (one plan per run) and the parent's depth give the blocks it grew, its adapter and its LoRA
records; the stage record (``new_blocks``, ``train``, ...) must agree with them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from growlm import audit
from growlm.errors import GrowlmError
from growlm.growth import lora_blocks, stage_shape, trainable_names
from growlm.loading import check_port, checked_skeleton
from growlm.lora import adapter_mismatch
from growlm.plan import plan_from_dict
from growlm.stages import stage_kind
from growlm.store import PLAN_JSON, MixtureDir, ModelDir, resolve, stages
from growlm.store.mixture import EXPERTS_DIR
from growlm.store.model import (
    ADAPTERS,
    LORA_COVERED,
    WEIGHTS,
    block_sha256,
    load_tensors,
    read_meta,
    recorded_fingerprint_of,
    verify_files,
)
from growlm.substrate.registry import kind_trains


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
        lines.append(f"{path}: {len(meta.files)} file checksum(s) ok")
        weights = load_tensors(path / WEIGHTS)
        checked_skeleton(path, meta, weights)
    except GrowlmError as e:
        problems.append(str(e))
        return meta, lines, problems
    adapters = load_tensors(path / ADAPTERS) if (path / ADAPTERS).is_file() else {}
    for blk in meta.blocks:
        got = block_sha256(weights, blk.index)
        if got != blk.sha256:
            problems.append(f"{path}: block {blk.index} sha256 {got[:12]} differs from the recorded {blk.sha256[:12]}")
    _, port = check_port(path, meta, weights["embed.weight"])
    problems += port
    if not port:
        lines.append(f"{path}: tokenizer fingerprint {meta.tokenizer_fingerprint[:12]} ok")
        if not kind_trains(meta.substrate.kind):
            lines.append(f"{path}: substrate {meta.substrate.kind} fingerprint {meta.substrate_fingerprint[:12]} ok")
    fp = recorded_fingerprint_of(meta, weights, adapters)
    if adapters and meta.version < LORA_COVERED:
        lines.append(f"{path}: note: written before fingerprints covered the LoRA records (rank, alpha, blocks, "
                     f"targets); they are checked for form only")
    if fp != meta.fingerprint:
        problems.append(f"{path}: model fingerprint {fp[:12]} differs from the recorded {meta.fingerprint[:12]}")
    else:
        lines.append(f"{path}: {len(meta.blocks)} block hash(es) and fingerprint {fp[:12]} ok")
    mismatch = adapter_mismatch(meta.lora_dicts(), meta.config["d_model"], adapters) if adapters else None
    if mismatch:  # what load_model refuses: verify never vouches for a dir that will not load
        problems.append(f"{path}: adapter tensors do not match the recorded LoRA stages: {mismatch}")
    return meta, lines, problems


def verify(path: Path) -> dict:
    """Verify a model dir, a run (all its stages and their lineage) or a mixture (all its experts)."""
    path = Path(path)
    found = resolve(path)
    if isinstance(found, MixtureDir):
        from growlm.loading import load_mixture

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
        if not problems and meta.stage is not None:  # a run's stage, checked without its parent
            n = meta.stage.index
            derived, problems = _derive_stage(n, meta, None)
            if derived is not None:
                ln, pr = _check_audit(n, n - 1, meta, derived, _file_digests(path), None)
                lines, problems = lines + ln, problems + pr
        return {"ok": not problems, "lines": lines, "problems": problems}
    return _verify_run(path, stages(found))


def _verify_run(path: Path, run_stages: list[tuple[int, Path]]) -> dict:
    """Every stage of a run, each against the plan the run recorded and against its parent stage."""
    lines, problems, prev, prev_digests, plan = [], [], None, None, None
    for k, (n, sdir) in enumerate(run_stages):
        p = run_stages[k - 1][0] if k else 0  # the stage before, by number: a gap is named, never relabelled
        if n != p + 1:
            problems.append(f"stage-{p + 1} is missing: stage-{n} has no parent in the run")
        meta, ln, pr = verify_model(sdir)
        lines += ln
        problems += pr
        if prev is not None:
            problems += _check_lineage(n, p, meta, prev)
        if plan is None and meta.plan is not None:
            plan = meta.plan
            problems += _check_run_plan(path, plan)
        elif meta.plan != plan:
            problems.append(f"stage-{n}: records another plan than the stages before it (a run has one plan)")
        derived, dp = _derive_stage(n, meta, prev)
        problems += dp
        now = None if pr else _file_digests(sdir)
        if now is not None and derived is not None:
            ln, pr = _check_audit(n, p, meta, derived, now, prev_digests)
            lines += ln
            problems += pr
            if prev_digests is not None:
                problems += _check_frozen(n, p, meta, derived, now, prev_digests)
        prev, prev_digests = meta, now
    if not problems:
        lines.append(f"{path}: lineage of {len(run_stages)} stage(s) ok: every frozen tensor unchanged since its stage")
    return {"ok": not problems, "lines": lines, "problems": problems}


def _check_run_plan(run: Path, recorded: dict) -> list[str]:
    """``RUN/plan.json`` (what ``--resume`` starts from) must be the plan the stages recorded."""
    try:
        mine = json.loads((run / PLAN_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []  # stage dirs gathered by hand: the stages' own records are the run's plan
    except (OSError, ValueError) as e:
        return [f"{run / PLAN_JSON} is unreadable: {e}"]
    if mine != recorded:
        return [f"{run / PLAN_JSON} differs from the plan its stages recorded: it was edited after they trained"]
    return []


def _check_lineage(n: int, p: int, meta: dict, parent: dict) -> list[str]:
    """Stage ``n`` against the stage before it, ``p``: the lineage link and the substrate."""
    out = []
    if not meta.lineage or meta.lineage[-1] != parent.fingerprint:
        out.append(f"stage-{n}: its lineage does not name stage-{p} ({parent.fingerprint[:12]}) as its parent")
    if meta.substrate_fingerprint != parent.substrate_fingerprint:
        out.append(f"stage-{n}: substrate fingerprint changed from stage-{p}")
    return out


def _declared(meta: dict, derived: dict, names) -> set[str]:
    """Every tensor some phase of the stage trains."""
    names = set(names)
    return set().union(*(trainable_names(names, ph.trains, derived["adapter"]) for ph in derived["phases"]))


_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")


def _origin(name: str, layers: list[int] | None) -> str:
    """The parent's tensor a stage's tensor began as: itself, or in a stack (``layers``) the block it copies."""
    m = _BLOCK.fullmatch(name) if layers is not None else None
    return f"blocks.{layers[int(m[1])]}.{m[2]}" if m and int(m[1]) < len(layers) else name


def _check_frozen(n: int, p: int, meta: dict, derived: dict, now: dict[str, str], parent: dict[str, str]) -> list[str]:
    """Every tensor of the parent (stage ``p``) that the plan does not train in stage ``n`` is byte-identical here
    (in a stack: every copy the plan does not train equals the block it copies)."""
    declared = _declared(meta, derived, set(now) | set(parent))
    layers = derived["layers"]
    pairs = [(k, k) for k in parent] if layers is None else \
        [(k, _origin(k, layers)) for k in now if _origin(k, layers) in parent]
    out = []
    for name, origin in sorted(pairs):
        if name in declared:
            continue
        if name not in now:
            out.append(f"stage-{n}: lacks {name} of stage-{p}: it cannot have grown from it")
        elif now[name] != parent[origin]:
            out.append(f"stage-{n}: frozen tensor {name} changed since stage-{p} (the plan trains "
                       f"{meta.stage.train!r} there, new blocks {derived['new_blocks']})")
    return out[:8]


def _derive_stage(n: int, meta: dict, parent: dict | None) -> tuple[dict | None, list[str]]:
    """What stage ``n`` trained, derived from the plan its model.json records and its parent's depth
    (``parent`` None: its own depth less the plan's growth), and its records checked against that.
    Returns ``{"phases", "new_blocks", "adapter", "layers"}`` (None when there is no plan to derive from) and
    the problems."""
    stage, raw = meta.stage, meta.plan
    if stage is None:
        return None, [f"stage-{n}: model.json has no stage record"]
    if raw is None:
        return None, [f"stage-{n}: model.json records no plan to check the stage against"]
    try:
        plan = plan_from_dict(raw, check_paths=False, source=f"recorded in stage-{n}/model.json")
    except GrowlmError as e:
        return None, [f"stage-{n}: {e}"]
    if not 1 <= n <= len(plan.stage):
        return None, [f"stage-{n}: the recorded plan has {len(plan.stage)} stage(s), none numbered {n}"]
    spec, depth = plan.stage[n - 1], len(meta.blocks)
    if spec.layers is not None:  # a stack's depth is its list's; its parent must hold every block it copies
        before = len(parent.blocks) if parent is not None else max(spec.layers) + 1
        if depth != len(spec.layers) or max(spec.layers) >= before:
            return None, [f"stage-{n}: has {depth} block(s), but the plan stacks {spec.layers} over the parent's {before}"]
    else:
        before = len(parent.blocks) if parent is not None else depth - spec.grow
        if before < 0 or depth != before + spec.grow:
            return None, [f"stage-{n}: has {depth} block(s), but the plan grows {spec.grow} over the parent's {before}"]
    adapter = f"stage{n}" if spec.lora else None
    kind, shape = stage_kind(spec.train), stage_shape(spec, before)
    phases = kind.phases(spec, shape, bool(meta.config.get("trainable_embedding")))
    derived = {"phases": phases, "new_blocks": list(shape.new_blocks), "adapter": adapter, "layers": spec.layers}
    want = {"index": n, "name": spec.name, "grow": spec.grow, "init": spec.init, "train": spec.train,
            "tokens": spec.tokens, "lora": spec.lora.model_dump() if spec.lora else None, "adapter": adapter,
            "new_blocks": derived["new_blocks"], **{k: getattr(spec, k) for k in ("layers", *kind.keys)}}
    problems = [f"stage-{n}: the stage record says {k} = {getattr(stage, k, None)!r}, the recorded plan and the parent's depth "
                f"give {v!r}" for k, v in want.items() if getattr(stage, k, None) != v]
    recorded = [(r.name, r.tokens, tuple(r.trains.blocks), r.trains.head, r.trains.embedding) for r in stage.phases or ()]
    planned = [(ph.name, ph.tokens, ph.trains.blocks, ph.trains.head, ph.trains.embedding) for ph in phases]
    if len(phases) > 1 and recorded != planned:
        problems.append(f"stage-{n}: the phases recorded in model.json ({[r[0] for r in recorded]}) are not the "
                        f"plan's {[p[0] for p in planned]} with what each trains")
    elif len(phases) == 1 and stage.phases is not None:
        problems.append(f"stage-{n}: records phases, though its plan stage (train = {spec.train!r}) has one")
    records = meta.lora_dicts()
    inherited = parent.lora_dicts() if parent is not None else records[:-1] if spec.lora else records
    if records[:len(inherited)] != inherited:
        problems.append(f"stage-{n}: its LoRA records of earlier stages differ from its parent's")
    if spec.lora:
        rank = spec.lora.rank
        rec = {"name": adapter, "rank": rank, "alpha": spec.lora.alpha or 2.0 * rank,
               "blocks": sorted(lora_blocks(spec.lora, before, depth)), "targets": list(spec.lora.targets)}
        mine = records[len(inherited)] if len(records) == len(inherited) + 1 else None
        if mine is None:
            problems.append(f"stage-{n}: the plan adds LoRA adapter {adapter}, model.json records "
                            f"{len(records) - len(inherited)} new LoRA record(s)")
        else:
            problems += [f"stage-{n}: lora record {adapter}.{k} = {mine.get(k)!r}, the recorded plan gives {v!r}"
                         for k, v in rec.items() if mine.get(k) != v]
    elif len(records) != len(inherited):
        problems.append(f"stage-{n}: records a LoRA adapter its plan stage does not add")
    return derived, problems


def _file_digests(path: Path) -> dict[str, str]:
    """The audit's per-tensor digests of a model dir's weight and adapter files."""
    tensors = load_tensors(path / WEIGHTS)
    if (path / ADAPTERS).is_file():
        tensors.update(load_tensors(path / ADAPTERS))
    return audit.digests(tensors.items())


def _check_audit(n: int, p: int, meta: dict, derived: dict, now: dict[str, str],
                 parent: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """Re-check a stage's trainable-set audit from its files: what the plan trains (``derived``) changed since
    the stage began, nothing else did, the stage began from its parent, and the record says so."""
    rec = meta.audit
    if rec is None:
        # growlm has recorded audits since before it recorded a stage's FLOPs: a stage with FLOPs lost its audit
        if meta.metrics is not None and meta.metrics.flops is not None:
            return [], [f"stage-{n}: no trainable-set audit recorded, though the growlm that wrote it records one: "
                        f"model.json was edited"]
        return [f"stage-{n}: no trainable-set audit recorded (written before growlm recorded audits)"], []
    start, steps = dict(rec.start_sha256), rec.steps
    declared = _declared(meta, derived, now)
    problems = [f"stage-{n}: {p}" for p in audit.check(start, now, declared, steps)]
    if parent is not None:
        layers = derived["layers"]
        moved = sorted(k for k in start if _origin(k, layers) in parent and start[k] != parent[_origin(k, layers)])
        if moved:
            problems.append(f"stage-{n}: did not start from stage-{p}: {len(moved)} tensor(s) differ, e.g. {moved[0]}")
    if not problems:
        again = audit.record(start, now, declared, steps)
        if any(again[k] != getattr(rec, k) for k in ("trained", "frozen")):
            problems.append(f"stage-{n}: the audit recorded in model.json does not match its files")
    if not problems and len(derived["phases"]) > 1:
        problems += _check_phases(n, meta, derived, now)
    if problems:
        return [], problems
    phased = f" in {len(derived['phases'])} phases, each as its plan says" if len(derived["phases"]) > 1 else ""
    return [f"stage-{n}: audit ok: {again['trained_tensors']} tensor(s) trained as the plan says "
            f"({', '.join(again['trained'])}){phased}, {again['frozen_tensors']} unchanged"], []


def _check_phases(n: int, meta: dict, derived: dict, now: dict[str, str]) -> list[str]:
    """Each phase's audit from the files and the records: a phase ends where the next begins (the last at the
    files), and in between exactly what that phase trains changed; the first begins where the stage did."""
    recs = meta.stage.phases
    if recs is None or len(recs) != len(derived["phases"]):
        return []  # the stage record's own check (_derive_stage) names what is missing
    if recs[0].audit.start_sha256 != meta.audit.start_sha256:
        return [f"stage-{n}: its first phase did not start where the stage did"]
    out = []
    for k, (ph, rec) in enumerate(zip(derived["phases"], recs, strict=True)):
        end = recs[k + 1].audit.start_sha256 if k + 1 < len(recs) else now
        declared = trainable_names(now, ph.trains, derived["adapter"])
        out += [f"stage-{n} phase {k + 1} ({ph.name}): {p}"
                for p in audit.check(rec.audit.start_sha256, end, declared, rec.audit.steps)]
    return out
