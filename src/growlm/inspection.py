"""``growlm info``: what a preset, a model dir, a run, a mixture or a plan is, as one JSON object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from growlm.errors import GrowlmError
from growlm.memory import gib
from growlm.model import ModelConfig, count_params_meta, preset_config
from growlm.plan import Plan, depth_after
from growlm.store import MixtureDir, RunDir, resolve, stages
from growlm.store.mixture import info_mixture
from growlm.substrate.registry import kind_trains


def info_preset(name: str) -> dict:
    """Shape and exact parameter counts of a named paper preset (no weights are allocated)."""
    cfg, kind = preset_config(name)
    cfg = dataclasses.replace(cfg, trainable_embedding=kind_trains(kind))
    counts = count_params_meta(cfg)
    return {"preset": name, "substrate": kind, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size, "context": cfg.context,
            "embed_dim": cfg.embed_dim, "params_total": counts["params_total"],
            "params_trainable": counts["params_trainable"]}


def info_model(path: Path) -> dict:
    """Description of a saved model dir, a mixture dir, or a run (its stages); of a plan file, see :func:`info_plan`."""
    if Path(path).is_file():
        return info_plan(path)
    found = resolve(path)
    if isinstance(found, MixtureDir):
        return info_mixture(found.path)
    if isinstance(found, RunDir):
        return {"run": str(found.path), "stages": [info_model(s) for _, s in stages(found)]}
    meta = found.meta
    record, cfg = meta.to_json(), meta.config
    out = {
        "path": str(found.path), "n_layers": cfg["n_layers"], "d_model": cfg["d_model"], "n_heads": cfg["n_heads"],
        "vocab_size": cfg["vocab_size"], "context": cfg["context"], "substrate": meta.substrate.kind,
        "params_total": meta.params_total, "params_trainable": meta.params_trainable,
        "params_active": meta.params_active if meta.params_active is not None else meta.params_trainable,
        "blocks": record["blocks"], "substrate_fingerprint": meta.substrate_fingerprint,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint, "fingerprint": meta.fingerprint,
        "lineage": meta.lineage, "lora": record.get("lora"),
    }
    for k in ("stage", "metrics", "merged_from"):
        if k in record:
            out[k] = record[k]
    if meta.audit is not None:  # what trained and what stayed frozen; the start hashes stay in model.json
        out["audit"] = {k: v for k, v in record["audit"].items() if k != "start_sha256"}
    return out


def _plan_model(plan: Plan, root: Path) -> tuple[ModelConfig, list[dict]]:
    """The shape of a plan's stage-0 model and the adapters it carries, without building the substrate:
    the vocabulary comes from the base model, the tokenizer dir, the full layout (a preset, or
    ``compact = false``), or else from the compact tokenizer built in memory (one pass over its corpus)."""
    from growlm.tokenizer import FULL_VOCAB_SIZE, Tokenizer, build_tokenizer

    if plan.base is not None:
        meta = resolve(root / plan.base).meta
        return ModelConfig.from_dict(meta.config), meta.lora_dicts()
    spec = plan.tokenizer
    if spec.dir is not None:
        vocab = Tokenizer.load(root / spec.dir).vocab_size
    elif spec.preset is not None or not spec.compact:
        vocab = FULL_VOCAB_SIZE
    else:
        vocab = build_tokenizer([root / p for p in spec.corpus], compact=True, ngrams=tuple(spec.ngrams),
                                top_k=spec.top_k).vocab_size
    # the substrate at full width: its real table may be narrower (a bit code), which only lowers the estimate
    return ModelConfig(vocab_size=vocab, d_model=plan.model.d_model, n_heads=plan.model.n_heads,
                       context=plan.model.context, trainable_embedding=kind_trains(plan.substrate.kind),
                       rope_theta=plan.model.rope_theta), []


def _final_depth(plan: Plan, depth: int) -> int:
    """How many blocks the plan's last stage leaves, from ``depth`` before its first (growth and stacking)."""
    for st in plan.stage:
        depth = depth_after(st, depth)
    return depth


def info_plan(path: Path) -> dict:
    """A plan file's shape, the estimated memory one training process needs for its largest stage
    (:func:`growlm.growth.plan_memory`), on the device and in the dtype the plan's ``[train]`` selects here,
    and what each stage and phase will train, with its active parameters and FLOPs
    (:func:`growlm.growth.plan_schedule`), the run's ``training_flops`` their sum."""
    import torch

    from growlm.growth import plan_memory, plan_schedule
    from growlm.plan import blocks_problem, load_plan

    # its shape needs no data: a plan whose corpus is on another machine (a paper config) is described too
    plan = load_plan(path, check_paths=False)
    cfg, lora = _plan_model(plan, Path(path).parent)
    problem = blocks_problem(plan, cfg.n_layers) if plan.base is not None else None
    if problem:  # as training refuses it: a base's depth is known only now
        raise GrowlmError(f"plan {path}: {problem}")
    spec = plan.train
    cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    bf16 = spec.dtype == "bf16" or (spec.dtype == "auto" and cuda)
    est = plan_memory(plan, cfg, cfg.n_layers, lora, bf16=bf16)
    schedule = plan_schedule(plan, cfg, cfg.n_layers, lora)
    worst = max(range(len(est)), key=lambda i: est[i].total)
    where = (f"stage {worst + 1} of {len(est)}: {est[worst].describe()}; {spec.batch_size:,} rows x context "
             f"{cfg.context:,}, {'bf16' if bf16 else 'fp32'} on {'cuda' if cuda else 'cpu'}")
    return {"plan": str(path), "stages": len(plan.stage), "base": str(plan.base) if plan.base else None,
            "substrate": plan.substrate.kind, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "context": cfg.context,
            "n_layers": _final_depth(plan, cfg.n_layers), "batch_size": spec.batch_size,
            "estimated_training_memory": f"{gib(est[worst].total)} per process ({where})",
            "training_memory_bytes": est[worst].total,
            "training_flops": round(sum(ph["flops"] for st in schedule for ph in st["phases"])),
            "schedule": schedule}
