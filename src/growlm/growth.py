"""Constructive growth: stacking new blocks, choosing what trains, and counting what is active.

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
import dataclasses
from collections.abc import Iterable, Sequence

import torch

from growlm.errors import GrowlmError
from growlm.lora import lora_param_count
from growlm.model import Block, GrowLM, ModelConfig, block_param_count, flop_per_token, head_param_count
from growlm.plan import LoraSpec, Plan, StageSpec


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


def stage_flop_per_token(cfg: ModelConfig, stage: StageSpec, depth_before: int) -> float:
    """Matmul FLOPs per training token of a stage, from the model's FLOP model (:func:`flop_per_token`)
    at the stage's depth: what a grow stage saves is the backward pass through the frozen trunk.

    Blocks below the lowest block that trains or carries this stage's adapters run forward only;
    that block and every block above it are counted forward and backward, since the gradient flows
    through them (for a LoRA stage this counts the frozen weights' gradients too, an upper bound).
    """
    depth = depth_before + stage.grow
    lowest = {"all": 0, "new": depth_before if stage.grow else depth}.get(stage.train, depth)
    if stage.lora is not None:
        lowest = min([lowest, *lora_blocks(stage.lora, depth_before, depth)])
    return flop_per_token(dataclasses.replace(cfg, n_layers=depth), frozen=lowest)


def plan_active_params(plan: Plan, cfg: ModelConfig, depth0: int = 0) -> list[int]:
    """Active parameter count of every stage of a plan, in order."""
    out, depth = [], depth0
    for st in plan.stage:
        out.append(stage_active_params(cfg, st, depth, plan.substrate.kind == "trainable"))
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
