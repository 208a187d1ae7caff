"""Constructive growth: stacking new blocks, choosing what trains, counting what is active, what a
stage costs (:func:`stage_flop_per_token`) and the memory it needs (:func:`stage_memory`).

A grow stage stacks ``k`` new blocks on top and trains only them, the LM head and the final norm;
the substrate and every earlier block are frozen forever (``requires_grad=False``, left out of
the optimizer, bytes unchanged). A LoRA stage adds adapters beside the frozen blocks and trains
them together with whatever the stage's ``train`` names (see :func:`trainable_names`).
``train = "all"`` is monolithic training (the baselines, and the paper's "unfrozen-constructive"
first stage when the substrate is ``trainable``); ``"head"`` trains only the head and final norm;
``"adapters"`` only the stage's LoRA adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch

from growlm.errors import GrowlmError
from growlm.lora import lora_param_count
from growlm.memory import TrainingMemory, check_fits, gib, training_memory
from growlm.model import Block, GrowLM, ModelConfig, block_param_count, head_param_count
from growlm.plan import LoraSpec, Plan, StageSpec
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


def trainable_names(names: Iterable[str], *, train: str, new_blocks: Sequence[int], adapter: str | None,
                    trainable_embedding: bool) -> set[str]:
    """The parameter names a stage trains, decided from the plan alone, never from ``requires_grad``.

    ``new`` (default): the blocks this stage grows, the LM head and the final norm; ``all``: every
    block, head and norm (and a ``trainable`` substrate); ``head``: head and final norm only;
    ``adapters``: nothing but this stage's LoRA adapters. This stage's adapters (``adapter``) train
    in every mode; earlier stages' adapters never do. Pure over names, so ``growlm verify`` applies
    the same rule to a saved stage that training applied to the live model.
    """
    grown = tuple(f"blocks.{i}." for i in new_blocks)
    mine = (f".lora_A.{adapter}.", f".lora_B.{adapter}.") if adapter else ()
    out = set()
    for n in names:
        if ".lora_" in n:
            trains = any(m in n for m in mine)
        elif n == "embed.weight":
            trains = train == "all" and trainable_embedding
        elif n.startswith(("head.", "ln_f.")):
            trains = train != "adapters"
        else:
            trains = train == "all" or (train == "new" and n.startswith(grown))
        if trains:
            out.add(n)
    return out


def set_trainable(model: GrowLM, stage: StageSpec, new_blocks: list[int], adapter: str | None = None) -> set[str]:
    """Make exactly the parameters ``stage`` trains require grad (call it after any LoRA injection,
    which freezes every other parameter); returns their names."""
    names = trainable_names((n for n, _ in model.named_parameters()), train=stage.train, new_blocks=new_blocks,
                            adapter=adapter, trainable_embedding=model.cfg.trainable_embedding)
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


def stage_active_params(cfg: ModelConfig, stage: StageSpec, depth_before: int, trainable_embedding: bool) -> int:
    """Active trainable parameters of a stage, computed from shapes alone (no model needed).

    Training checks that the live model's trainable count equals this, so the LoRA budget check,
    which runs before any training, judges the number that really trains.
    """
    depth = depth_before + stage.grow
    n = {"all": depth * block_param_count(cfg) + head_param_count(cfg),
         "new": stage.grow * block_param_count(cfg) + head_param_count(cfg),
         "head": head_param_count(cfg),
         "adapters": 0}[stage.train]
    if stage.train == "all" and trainable_embedding:
        n += cfg.vocab_size * cfg.embed_dim
    if stage.lora is not None:
        n += lora_param_count(cfg.d_model, stage.lora.rank, len(lora_blocks(stage.lora, depth_before, depth)),
                              stage.lora.targets)
    return n


def _matmul_flops(weights: int, trains: bool, input_grad: bool) -> int:
    """FLOPs per token of multiplying by a ``weights``-element matrix in a training step: 2 for the forward,
    2 more for its own gradient when it trains, 2 more for its input's gradient when something below needs it."""
    return 2 * weights * (1 + trains + input_grad)


def stage_flop_per_token(cfg: ModelConfig, stage: StageSpec, depth_before: int,
                         earlier_lora: Sequence[Mapping] = ()) -> float:
    """Matmul FLOPs per training token of a stage: its forward and backward pass as autograd runs them.

    Every matrix multiplication costs 2 FLOPs per weight (or attention score) in the forward, 2 more for
    its weight gradient when the weight trains and 2 more for its input's gradient when anything below it
    needs one. So a frozen block under the lowest trainable tensor runs forward only (2 per weight); a
    frozen block above one (above a stage's adapters, or the base weights beside them once the gradient
    flows there) costs 4; a trained block 6. The LM head costs 6 unless it is frozen (``train =
    "adapters"``: 4). LoRA adapters are counted as the two matmuls they are, this stage's trained, those
    of ``earlier_lora`` (the model's ``lora_records`` from earlier stages: applied, frozen) not.
    Attention's score and value products cost 4·d·context per token forward, 8 more in a block the
    gradient reaches.

    Not counted, as in every MFU convention: elementwise work (norms, GELU, softmax, rotary, biases,
    the optimizer) and recomputation (the checkpointed cross-entropy's second logits pass). Equal to
    torch's ``FlopCounterMode`` over one training step (tests/test_compute.py).
    """
    d, V, T = cfg.d_model, cfg.vocab_size, cfg.context
    depth = depth_before + stage.grow
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
    stream = stage.train == "all" and cfg.trainable_embedding
    for i in range(depth):
        trains = stage.train == "all" or (stage.train == "new" and i >= depth_before)
        # a trained block's LayerNorms train, so its Linears' inputs need gradients even over a frozen trunk
        qkv = linear(i, "qkv", trains, stream or trains)
        total += 4 * d * T * (1 + 2 * qkv)  # scores and values: 2 matmuls forward, 4 backward
        stream = linear(i, "attn_out", trains, qkv) or stream
        fc = linear(i, "fc", trains, stream or trains)
        stream = linear(i, "mlp_out", trains, fc) or stream
    head_trains = stage.train != "adapters"  # the head and the final norm train in every other mode
    total += _matmul_flops(V * d, head_trains, stream or head_trains)
    return float(total)


def plan_active_params(plan: Plan, cfg: ModelConfig, depth0: int = 0) -> list[int]:
    """Active parameter count of every stage of a plan, in order."""
    out, depth = [], depth0
    for st in plan.stage:
        out.append(stage_active_params(cfg, st, depth, kind_trains(plan.substrate.kind)))
        depth += st.grow
    return out


def check_lora_budget(plan: Plan, cfg: ModelConfig, depth0: int = 0) -> None:
    """Reject, before training, a LoRA stage whose active count exceeds the budget.

    The budget is ``train.lora_budget`` or, by default, the largest grow stage's active count (the
    paper keeps LoRA phases within the same active-parameter budget as a growth stage).
    """
    counts = plan_active_params(plan, cfg, depth0)
    grow_counts = [c for c, st in zip(counts, plan.stage, strict=True) if st.lora is None and st.train == "new"]
    budget = plan.train.lora_budget or (max(grow_counts) if grow_counts else None)
    if budget is None:
        return
    for i, (c, st) in enumerate(zip(counts, plan.stage, strict=True), 1):
        if st.lora is not None and c > budget:
            raise GrowlmError(f"stage[{i}].lora: {c:,} active parameters exceed the budget of {budget:,} "
                              f"(lower lora.rank or set train.lora_budget)")


def _lowest_recorded(stage: StageSpec, depth_before: int) -> int:
    """The lowest block holding a tensor the stage trains: autograd records it and every block above."""
    depth = depth_before + stage.grow
    lowest = {"all": 0, "new": depth_before if stage.grow else depth}.get(stage.train, depth)
    if stage.lora is not None:
        lowest = min([lowest, *lora_blocks(stage.lora, depth_before, depth)])
    return lowest


def stage_memory(cfg: ModelConfig, stage: StageSpec, depth_before: int, *, rows: int, bf16: bool,
                 earlier_lora: Sequence[Mapping] = (), world: int = 1, sharded: bool = False) -> TrainingMemory:
    """Estimated memory of one process training ``stage`` on ``rows`` sequences of ``cfg.context`` tokens
    a step (see :func:`growlm.memory.training_memory` for what it counts), from shapes alone.
    ``earlier_lora``: the adapters earlier stages left on the model (their parameters count as weights)."""
    depth = depth_before + stage.grow
    adapters = sum(lora_param_count(cfg.d_model, int(r["rank"]), len(r["blocks"]), list(r["targets"]))
                   for r in earlier_lora)
    if stage.lora is not None:
        adapters += lora_param_count(cfg.d_model, stage.lora.rank,
                                     len(lora_blocks(stage.lora, depth_before, depth)), stage.lora.targets)
    total = cfg.vocab_size * cfg.embed_dim + depth * block_param_count(cfg) + head_param_count(cfg) + adapters
    return training_memory(params_total=total,
                           params_trainable=stage_active_params(cfg, stage, depth_before, cfg.trainable_embedding),
                           grad_layers=depth - _lowest_recorded(stage, depth_before), tokens=rows * cfg.context,
                           d_model=cfg.d_model, vocab_size=cfg.vocab_size, bf16=bf16, world=world, sharded=sharded)


def plan_memory(plan: Plan, cfg: ModelConfig, depth0: int = 0, earlier_lora: Sequence[Mapping] = (), *,
                bf16: bool, world: int = 1) -> list[TrainingMemory]:
    """Estimated memory of one training process for every stage of ``plan``, in order (``cfg``: the
    stage-0 model's shape; ``earlier_lora``: its adapters). Each process takes ``batch_size / world`` rows."""
    out, depth, lora = [], depth0, list(earlier_lora)
    for st in plan.stage:
        out.append(stage_memory(cfg, st, depth, rows=plan.train.batch_size // world, bf16=bf16, earlier_lora=lora,
                                world=world, sharded=world > 1 and plan.train.parallel == "fsdp"))
        if st.lora is not None:
            lora.append({"rank": st.lora.rank, "blocks": lora_blocks(st.lora, depth, depth + st.grow),
                         "targets": list(st.lora.targets)})
        depth += st.grow
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
