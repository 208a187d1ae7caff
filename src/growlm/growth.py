"""Constructive growth: stacking new blocks, choosing what trains, and counting what is active.

A grow stage stacks ``k`` new blocks on top and trains only them, the LM head and the final norm;
the substrate and every earlier block are frozen forever (``requires_grad=False``, left out of
the optimizer, bytes unchanged). ``train = "all"`` is monolithic training (the baselines, and the
paper's "unfrozen-constructive" first stage when the substrate is ``trainable``); ``"head"`` trains
only the head and final norm.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from growlm.errors import GrowlmError
from growlm.lora import lora_param_count
from growlm.model import Block, GrowLM, ModelConfig, block_param_count, head_param_count
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


def set_trainable(model: GrowLM, stage: StageSpec, new_blocks: list[int]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what ``stage`` trains; returns the trainable parameters in order."""
    for p in model.parameters():
        p.requires_grad_(False)
    if stage.train == "all":
        for name, p in model.named_parameters():
            if ".lora_" in name:
                continue
            p.requires_grad_(name != "embed.weight" or model.cfg.trainable_embedding)
    else:
        for i in new_blocks:
            for p in model.blocks[i].parameters():
                p.requires_grad_(True)
        for p in (*model.head.parameters(), *model.ln_f.parameters()):
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lora_blocks(spec: LoraSpec, n_before: int, n_after: int) -> list[int]:
    """Which blocks a LoRA spec adapts: ``frozen`` = the blocks that existed before this stage grew."""
    if spec.blocks == "frozen":
        return list(range(n_before))
    if spec.blocks == "all":
        return list(range(n_after))
    return list(spec.blocks)


def stage_active_params(cfg: ModelConfig, stage: StageSpec, depth_before: int, trainable_embedding: bool) -> int:
    """Active trainable parameters of a stage, computed from shapes alone (no model needed)."""
    depth = depth_before + stage.grow
    if stage.train == "all":
        n = depth * block_param_count(cfg) + head_param_count(cfg)
        return n + (cfg.vocab_size * cfg.embed_dim if trainable_embedding else 0)
    n = stage.grow * block_param_count(cfg) + head_param_count(cfg)
    if stage.lora is not None:
        n += lora_param_count(cfg.d_model, stage.lora.rank, len(lora_blocks(stage.lora, depth_before, depth)),
                              stage.lora.targets)
    return n


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
