"""Constructive growth: stacking new blocks, choosing what trains, counting what is active, what a
stage costs (:func:`stage_flop_per_token`) and the memory it needs (:func:`stage_memory`).

A grow stage stacks ``k`` new blocks on top and trains only them, the LM head and the final norm;
the substrate and every earlier block are frozen forever (``requires_grad=False``, left out of
the optimizer, bytes unchanged). A stage may instead rebuild the stack from copies of its trained
blocks (:func:`stack`, depth stacking). What then trains, phase by phase, is the stage kind's to say
(:mod:`growlm.stages`: ``new``, ``all``, ``head``, ``adapters``, ``new-then-all``, ...); from its
:class:`~growlm.stages.TrainSet` this module derives the parameter names (:func:`trainable_names`), the
active count, the FLOPs and the memory of each phase, from shapes alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from growlm.errors import GrowlmError
from growlm.lora import lora_param_count
from growlm.memory import TrainingMemory, check_fits, gib, training_memory
from growlm.model import Block, GrowLM, ModelConfig, block_param_count, head_param_count
from growlm.plan import LoraSpec, Plan, StageSpec, depth_after
from growlm.stages import Phase, Shape, TrainSet, stage_kind
from growlm.substrate.registry import kind_trains

# (in, out) of each LoRA target's Linear, in multiples of d_model (lora.TARGETS names the modules)
_TARGET_WIDTHS = {"qkv": (1, 3), "attn_out": (1, 1), "fc": (1, 4), "mlp_out": (4, 1)}


def grow(model: GrowLM, k: int, init: str, generator: torch.Generator) -> list[int]:
    """Stack ``k`` new blocks on top of ``model``; returns their indices.

    ``random``: GPT-2 init (the paper). ``zero-out``: output projections of attention and FFN are
    zeroed, so each new block starts as the identity and the logits do not move (LLaMA-Pro).
    ``copy-top``: a copy of the current top block (MSLT / G_stack stacking).
    """
    if init == "copy-top" and not len(model.blocks):
        raise GrowlmError("init = \"copy-top\" needs an existing block to copy; the model has none")
    device = model.head.weight.device
    new = []
    for _ in range(k):
        if init == "copy-top":
            blk = copy.deepcopy(model.blocks[-1])
        else:
            blk = Block(model.cfg)
            blk.init_weights(generator)
            if init == "zero-out":
                with torch.no_grad():
                    for lin in (blk.attn.proj, blk.mlp.proj):
                        lin.weight.zero_()
                        lin.bias.zero_()
        model.blocks.append(blk.to(device))
        new.append(len(model.blocks) - 1)
    model.cfg.n_layers = len(model.blocks)
    return new


def stack(model: GrowLM, layers: Sequence[int]) -> list[int]:
    """Rebuild ``model``'s stack from copies of its blocks at ``layers`` (depth stacking: G_stack, FusionBench's
    depth up-scaling; ``[0, 1, 0, 1]`` doubles a two-block model); returns the new blocks, the positions
    holding a block listed earlier too (the first copy of each block is the block itself)."""
    old = list(model.blocks)
    model.blocks = torch.nn.ModuleList(copy.deepcopy(old[i]) for i in layers)
    model.cfg.n_layers = len(model.blocks)
    return stacked_copies(layers)


def stacked_copies(layers: Sequence[int]) -> list[int]:
    """The positions of a stack (``layers``) that repeat a block listed before them."""
    return [p for p, b in enumerate(layers) if b in layers[:p]]


def stage_shape(stage: StageSpec, depth_before: int) -> Shape:
    """The stack a stage's phases train on, from the plan alone: its depth and its new blocks."""
    depth = depth_after(stage, depth_before)
    new = stacked_copies(stage.layers) if stage.layers is not None else range(depth_before, depth)
    return Shape(depth, tuple(new))


def stage_phases(stage: StageSpec, depth_before: int, trainable_embedding: bool) -> list[Phase]:
    """The phases of ``stage`` (its kind's), over the model ``depth_before`` blocks deep, checked: a kind (a
    plugin's, say) that gives none, a phase of no tokens, tokens that do not add up to the stage's, or a block
    the stack lacks is one line naming the kind, before anything trains."""
    shape = stage_shape(stage, depth_before)
    phases = list(stage_kind(stage.train).phases(stage, shape, trainable_embedding))
    where = f'stage kind "{stage.train}"'
    if not phases:
        raise GrowlmError(f"{where} gives no phase to train")
    if any(ph.tokens < 1 for ph in phases) or sum(ph.tokens for ph in phases) != stage.tokens:
        raise GrowlmError(f"{where}: its phases' tokens {[ph.tokens for ph in phases]} must be positive and add up "
                          f"to the stage's {stage.tokens:,}")
    if len({ph.name for ph in phases}) != len(phases):
        raise GrowlmError(f"{where}: two of its phases share a name ({[ph.name for ph in phases]})")
    for ph in phases:
        bad = [b for b in ph.trains.blocks if not 0 <= b < shape.depth]
        if bad:
            raise GrowlmError(f"{where}: phase {ph.name!r} trains block {bad[0]}, which a stack of {shape.depth} "
                              f"lacks")
    return phases


def trainable_names(names: Iterable[str], trains: TrainSet, adapter: str | None) -> set[str]:
    """The parameter names a phase trains, decided from the plan alone, never from ``requires_grad``:
    the blocks, head and final norm, and trainable substrate table its :class:`TrainSet` names, and this
    stage's adapters (``adapter``); earlier stages' adapters never train. Pure over names, so ``growlm
    verify`` applies the same rule to a saved stage that training applied to the live model.
    """
    blocks = tuple(f"blocks.{i}." for i in trains.blocks)
    mine = (f".lora_A.{adapter}.", f".lora_B.{adapter}.") if adapter else ()
    out = set()
    for n in names:
        if ".lora_" in n:
            on = any(m in n for m in mine)
        elif n == "embed.weight":
            on = trains.embedding
        elif n.startswith(("head.", "ln_f.")):
            on = trains.head
        else:
            on = n.startswith(blocks) if blocks else False
        if on:
            out.add(n)
    return out


def set_trainable(model: GrowLM, stage: StageSpec, new_blocks: Sequence[int], adapter: str | None = None, *,
                  trains: TrainSet | None = None) -> set[str]:
    """Make exactly the parameters a phase trains require grad (call it after any LoRA injection, which
    freezes every other parameter); returns their names. ``trains``: the phase's set (default: the
    first phase of ``stage``'s kind over the model as it is, ``new_blocks`` its new blocks)."""
    if trains is None:
        shape = Shape(len(model.blocks), tuple(new_blocks))
        trains = stage_kind(stage.train).phases(stage, shape, model.cfg.trainable_embedding)[0].trains
    names = trainable_names((n for n, _ in model.named_parameters()), trains, adapter)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def lora_blocks(spec: LoraSpec, n_before: int, n_after: int) -> list[int]:
    """Which blocks a LoRA spec adapts: ``frozen`` = the blocks that existed before this stage grew."""
    if spec.blocks == "frozen":
        return list(range(n_before))
    if spec.blocks == "all":
        return list(range(n_after))
    return list(spec.blocks)


def phase_active_params(cfg: ModelConfig, stage: StageSpec, phase: Phase, depth_before: int) -> int:
    """Active trainable parameters of one phase of a stage, computed from shapes alone (no model needed).

    Training checks that the live model's trainable count equals this, so the LoRA budget check,
    which runs before any training, judges the number that really trains.
    """
    t = phase.trains
    n = len(t.blocks) * block_param_count(cfg) + (head_param_count(cfg) if t.head else 0)
    if t.embedding:
        n += cfg.vocab_size * cfg.embed_dim
    if stage.lora is not None:
        depth = depth_after(stage, depth_before)
        n += lora_param_count(cfg.d_model, stage.lora.rank, len(lora_blocks(stage.lora, depth_before, depth)),
                              stage.lora.targets)
    return n


def stage_active_params(cfg: ModelConfig, stage: StageSpec, depth_before: int, trainable_embedding: bool) -> int:
    """Active trainable parameters of a stage: its largest phase's (:func:`phase_active_params`)."""
    return max(phase_active_params(cfg, stage, ph, depth_before)
               for ph in stage_phases(stage, depth_before, trainable_embedding))


def _matmul_flops(weights: int, trains: bool, input_grad: bool) -> int:
    """FLOPs per token of multiplying by a ``weights``-element matrix in a training step: 2 for the forward,
    2 more for its own gradient when it trains, 2 more for its input's gradient when something below needs it."""
    return 2 * weights * (1 + trains + input_grad)


def stage_flop_per_token(cfg: ModelConfig, stage: StageSpec, depth_before: int,
                         earlier_lora: Sequence[Mapping] = ()) -> float:
    """Matmul FLOPs per training token of a stage: over its phases (:func:`phase_flop_per_token`), weighted
    by their tokens, so that ``stage.tokens`` times this is the stage's FLOPs."""
    phases = stage_phases(stage, depth_before, cfg.trainable_embedding)
    return sum(ph.tokens * phase_flop_per_token(cfg, stage, ph, depth_before, earlier_lora)
               for ph in phases) / stage.tokens


def phase_flop_per_token(cfg: ModelConfig, stage: StageSpec, phase: Phase, depth_before: int,
                         earlier_lora: Sequence[Mapping] = ()) -> float:
    """Matmul FLOPs per training token of one phase of a stage: its forward and backward pass as autograd
    runs them.

    Every matrix multiplication costs 2 FLOPs per weight (or attention score) in the forward, 2 more for
    its weight gradient when the weight trains and 2 more for its input's gradient when anything below it
    needs one. So a frozen block under the lowest trainable tensor runs forward only (2 per weight); a
    frozen block above one (above a stage's adapters, or the base weights beside them once the gradient
    flows there) costs 4; a trained block 6. The LM head costs 6 unless the phase freezes it (4). LoRA adapters are counted as the two matmuls they are, this stage's trained, those
    of ``earlier_lora`` (the model's ``lora_records`` from earlier stages: applied, frozen) not.
    Attention's score and value products cost 4·d·context per token forward, 8 more in a block the
    gradient reaches.

    Not counted, as in every MFU convention: elementwise work (norms, GELU, softmax, rotary, biases,
    the optimizer) and recomputation (the checkpointed cross-entropy's second logits pass). Equal to
    torch's ``FlopCounterMode`` over one training step (tests/test_compute.py).
    """
    d, V, T = cfg.d_model, cfg.vocab_size, cfg.context
    depth = depth_after(stage, depth_before)
    phase_trains = phase.trains
    shapes = {t: (d * m_in, d * m_out) for t, (m_in, m_out) in _TARGET_WIDTHS.items()}
    adapters: dict[tuple[int, str], list[tuple[int, bool]]] = {}  # (block, target) -> [(rank, trains)]
    for rec in earlier_lora:
        for b in rec["blocks"]:
            for t in rec["targets"]:
                adapters.setdefault((b, t), []).append((int(rec["rank"]), False))
    if stage.lora is not None:
        for b in lora_blocks(stage.lora, depth_before, depth):
            for t in stage.lora.targets:
                adapters.setdefault((b, t), []).append((stage.lora.rank, True))

    total = 0

    def linear(block: int, target: str, trains: bool, input_grad: bool) -> bool:
        """Add one (possibly adapted) Linear's FLOPs; returns whether its output needs a gradient."""
        nonlocal total
        n_in, n_out = shapes[target]
        total += _matmul_flops(n_in * n_out, trains, input_grad)
        out_grad = trains or input_grad
        for rank, adapter_trains in adapters.get((block, target), ()):
            total += _matmul_flops(n_in * rank, adapter_trains, input_grad)
            total += _matmul_flops(rank * n_out, adapter_trains, input_grad or adapter_trains)
            out_grad = out_grad or adapter_trains
        return out_grad

    # the residual stream needs a gradient from the first trainable tensor up (the embedding's own
    # gradient is a lookup, no matmul)
    stream = phase_trains.embedding
    for i in range(depth):
        trains = i in phase_trains.blocks
        # a trained block's LayerNorms train, so its Linears' inputs need gradients even over a frozen trunk
        qkv = linear(i, "qkv", trains, stream or trains)
        total += 4 * d * T * (1 + 2 * qkv)  # scores and values: 2 matmuls forward, 4 backward
        stream = linear(i, "attn_out", trains, qkv) or stream
        fc = linear(i, "fc", trains, stream or trains)
        stream = linear(i, "mlp_out", trains, fc) or stream
    total += _matmul_flops(V * d, phase_trains.head, stream or phase_trains.head)
    return float(total)


def plan_active_params(plan: Plan, cfg: ModelConfig, depth0: int = 0) -> list[int]:
    """Active parameter count of every stage of a plan, in order."""
    out, depth = [], depth0
    for st in plan.stage:
        out.append(stage_active_params(cfg, st, depth, kind_trains(plan.substrate.kind)))
        depth = depth_after(st, depth)
    return out


def check_lora_budget(plan: Plan, cfg: ModelConfig, depth0: int = 0) -> None:
    """Reject, before training, a LoRA stage whose active count exceeds the budget.

    The budget is ``train.lora_budget`` or, by default, the largest grow stage's active count (the
    paper keeps LoRA phases within the same active-parameter budget as a growth stage).
    """
    counts = plan_active_params(plan, cfg, depth0)
    grow_counts = [c for c, st in zip(counts, plan.stage, strict=True)
                   if st.lora is None and stage_kind(st.train).sets_budget]
    budget = plan.train.lora_budget or (max(grow_counts) if grow_counts else None)
    if budget is None:
        return
    for i, (c, st) in enumerate(zip(counts, plan.stage, strict=True), 1):
        if st.lora is not None and c > budget:
            raise GrowlmError(f"stage[{i}].lora: {c:,} active parameters exceed the budget of {budget:,} "
                              f"(lower lora.rank or set train.lora_budget)")


def phases_problem(plan: Plan, depth: int, trainable_embedding: bool, world: int) -> str | None:
    """Why ``plan`` cannot train on ``world`` processes from a model of ``depth`` blocks, or None: FSDP2 shards
    a model in place once, for the tensors its first phase trains, so a stage of several phases runs on one
    process or under DDP (which each phase wraps anew)."""
    if world == 1 or plan.train.parallel != "fsdp":
        return None
    for i, st in enumerate(plan.stage, 1):
        if len(stage_phases(st, depth, trainable_embedding)) > 1:
            return (f"stage {i} (train = {st.train!r}) trains in several phases, which FSDP2 cannot (it shards the "
                    f"model once); set [train] parallel = \"ddp\", or give each phase its own stage")
        depth = depth_after(st, depth)
    return None


def _lowest_recorded(stage: StageSpec, phase: Phase, depth_before: int) -> int:
    """The lowest block holding a tensor the phase trains: autograd records it and every block above."""
    depth = depth_after(stage, depth_before)
    lowest = 0 if phase.trains.embedding else min(phase.trains.blocks, default=depth)
    if stage.lora is not None:
        lowest = min([lowest, *lora_blocks(stage.lora, depth_before, depth)])
    return lowest


def stage_memory(cfg: ModelConfig, stage: StageSpec, depth_before: int, *, rows: int, bf16: bool,
                 earlier_lora: Sequence[Mapping] = (), world: int = 1, sharded: bool = False) -> TrainingMemory:
    """Estimated memory of one process training ``stage`` on ``rows`` sequences of ``cfg.context`` tokens
    a step, in its hungriest phase (see :func:`growlm.memory.training_memory` for what it counts), from
    shapes alone. ``earlier_lora``: the adapters earlier stages left on the model (their parameters count
    as weights)."""
    depth = depth_after(stage, depth_before)
    adapters = sum(lora_param_count(cfg.d_model, int(r["rank"]), len(r["blocks"]), list(r["targets"]))
                   for r in earlier_lora)
    if stage.lora is not None:
        adapters += lora_param_count(cfg.d_model, stage.lora.rank,
                                     len(lora_blocks(stage.lora, depth_before, depth)), stage.lora.targets)
    total = cfg.vocab_size * cfg.embed_dim + depth * block_param_count(cfg) + head_param_count(cfg) + adapters
    return max((training_memory(params_total=total, params_trainable=phase_active_params(cfg, stage, ph, depth_before),
                                grad_layers=depth - _lowest_recorded(stage, ph, depth_before), tokens=rows * cfg.context,
                                d_model=cfg.d_model, vocab_size=cfg.vocab_size, bf16=bf16, world=world, sharded=sharded)
                for ph in stage_phases(stage, depth_before, cfg.trainable_embedding)), key=lambda m: m.total)


def _walk(plan: Plan, depth0: int, earlier_lora: Sequence[Mapping]) -> Iterator[tuple[StageSpec, int, list]]:
    """Each stage of ``plan`` with the depth before it and the adapters applied by then (``earlier_lora``,
    the stage-0 model's, and the plan's earlier stages')."""
    depth, lora = depth0, list(earlier_lora)
    for st in plan.stage:
        yield st, depth, list(lora)
        if st.lora is not None:
            lora.append({"rank": st.lora.rank, "blocks": lora_blocks(st.lora, depth, depth_after(st, depth)),
                         "targets": list(st.lora.targets)})
        depth = depth_after(st, depth)


def plan_memory(plan: Plan, cfg: ModelConfig, depth0: int = 0, earlier_lora: Sequence[Mapping] = (), *,
                bf16: bool, world: int = 1) -> list[TrainingMemory]:
    """Estimated memory of one training process for every stage of ``plan``, in order (``cfg``: the
    stage-0 model's shape; ``earlier_lora``: its adapters). Each process takes ``batch_size / world`` rows."""
    return [stage_memory(cfg, st, depth, rows=plan.train.batch_size // world, bf16=bf16, earlier_lora=lora,
                         world=world, sharded=world > 1 and plan.train.parallel == "fsdp")
            for st, depth, lora in _walk(plan, depth0, earlier_lora)]


def plan_schedule(plan: Plan, cfg: ModelConfig, depth0: int = 0, earlier_lora: Sequence[Mapping] = ()) -> list[dict]:
    """What every stage of ``plan`` will do, before anything trains: its ``depth`` after it, its ``train``
    kind and each phase's ``name``, ``tokens`` (the plan's, rounded up to whole batches as training runs
    them), ``active_params`` and training ``flops``: the counts training records in ``model.json`` (``cfg``:
    the stage-0 model's shape; ``earlier_lora``: its adapters)."""
    out, batch = [], plan.train.batch_size * plan.model.context
    for i, (st, depth, lora) in enumerate(_walk(plan, depth0, earlier_lora), 1):
        phases = []
        for ph in stage_phases(st, depth, cfg.trainable_embedding):
            tokens = -(-ph.tokens // batch) * batch
            phases.append({"name": ph.name, "tokens": tokens, "active_params": phase_active_params(cfg, st, ph, depth),
                           "flops": tokens * phase_flop_per_token(cfg, st, ph, depth, lora)})
        out.append({"stage": i, "depth": depth_after(st, depth), "train": st.train, "phases": phases})
    return out


def check_plan_memory(plan: Plan, cfg: ModelConfig, depth0: int, earlier_lora: Sequence[Mapping],
                      device: torch.device, *, bf16: bool, world: int = 1) -> None:
    """Refuse, before training allocates anything, a plan whose estimated memory for any stage exceeds
    what ``device`` has free: one line with the estimate and what to lower (processes on one CPU share
    its memory; on CUDA each has its own device)."""
    rows, ctx = plan.train.batch_size // world, cfg.context
    spread = "" if device.type == "cpu" else ", or spread the batch over more GPUs (growlm train --nproc)"
    for i, est in enumerate(plan_memory(plan, cfg, depth0, earlier_lora, bf16=bf16, world=world), 1):
        check_fits(est.total, device, f"stage {i} needs an estimated {gib(est.total)} per process to train "
                   f"({est.describe()}; {rows:,} rows x context {ctx:,}, "
                   f"{'bf16' if bf16 else 'fp32'} on {device.type})",
                   f"lower train.batch_size (now {plan.train.batch_size:,}) or model.context (now {ctx:,}){spread}",
                   processes=world if device.type == "cpu" else 1)
