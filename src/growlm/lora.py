"""LoRA phases through ``peft``: low-rank adapters beside the untouched frozen blocks.

Adapters of every LoRA stage stay separate tensors (``blocks.N.attn.qkv.lora_A.<stage>.weight``)
and stay applied in later stages, so the base blocks remain byte-identical across the whole lineage
and every low-rank change is visible. :func:`merge_adapters` folds them into the base weights in
fp32 when asked (``growlm lora-merge``, export).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn

from growlm.errors import GrowlmError

# plan target name -> module path inside a block
TARGETS = {"qkv": "attn.qkv", "attn_out": "attn.proj", "fc": "mlp.fc", "mlp_out": "mlp.proj"}


def _peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    return LoraConfig, inject_adapter_in_model, LoraLayer


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module of ``model`` that carries LoRA adapters."""
    _, _, LoraLayer = _peft()
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def add_lora(model: nn.Module, name: str, *, rank: int, alpha: float, blocks: list[int],
             targets: list[str], generator_seed: int = 0) -> dict:
    """Attach a new adapter ``name`` to ``targets`` of ``blocks``; returns its record for model.json.

    Earlier adapters stay applied (their sum is). peft's injection leaves every adapter trainable and
    freezes everything else, so the caller then sets what trains (``growth.set_trainable``).
    """
    if not blocks:
        raise GrowlmError(f"LoRA stage {name}: there are no blocks to adapt")
    n = len(model.blocks)
    bad = [b for b in blocks if b >= n]
    if bad:
        raise GrowlmError(f"LoRA stage {name}: block index {bad[0]} does not exist (the model has {n} blocks)")
    record = {"name": name, "rank": rank, "alpha": alpha, "blocks": sorted(blocks), "targets": list(targets)}
    # B starts at zero (peft default), so the seed only shapes A; seed it for reproducible runs.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        _inject(model, record)
    return record


def _inject(model: nn.Module, record: dict) -> None:
    LoraConfig, inject_adapter_in_model, _ = _peft()
    blocks = "|".join(str(b) for b in record["blocks"])
    modules = "|".join(TARGETS[t].replace(".", r"\.") for t in record["targets"])
    cfg = LoraConfig(r=record["rank"], lora_alpha=record["alpha"], lora_dropout=0.0,
                     target_modules=rf"blocks\.({blocks})\.({modules})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(cfg, model, adapter_name=record["name"])
    # peft activates only the newest adapter on every wrapped layer; keep all of them applied
    for _, mod in lora_layers(model):
        mod.set_adapter(list(mod.lora_A.keys()))


def _io(d_model: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target Linear of a block."""
    return {"qkv": (d_model, 3 * d_model), "attn_out": (d_model, d_model), "fc": (d_model, 4 * d_model),
            "mlp_out": (4 * d_model, d_model)}


def adapter_shapes(records: list[dict], d_model: int) -> dict[str, tuple[int, ...]]:
    """The adapter tensors LoRA ``records`` make, by saved name, with their shapes (A: rank x in, B: out x rank)."""
    io, out = _io(d_model), {}
    for rec in records:
        for b in rec["blocks"]:
            for t in rec["targets"]:
                i, o = io[t]
                out[f"blocks.{b}.{TARGETS[t]}.lora_A.{rec['name']}.weight"] = (rec["rank"], i)
                out[f"blocks.{b}.{TARGETS[t]}.lora_B.{rec['name']}.weight"] = (o, rec["rank"])
    return out


def adapter_mismatch(records: list[dict], d_model: int, tensors: dict[str, torch.Tensor]) -> str | None:
    """What differs between the adapter tensors ``records`` make and ``tensors`` (None: nothing)."""
    want = adapter_shapes(records, d_model)
    for name in sorted(set(want) ^ set(tensors)):
        return f"{name} is {'missing' if name in want else 'not made by any recorded LoRA stage'}"
    for name, shape in sorted(want.items()):
        if tuple(tensors[name].shape) != shape:
            return f"{name} has shape {list(tensors[name].shape)}, the records give {list(shape)}"
    return None


def attach_adapters(model: nn.Module, records: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """Re-create saved adapters (frozen) and load their tensors (used when loading a model dir)."""
    problem = adapter_mismatch(records, model.cfg.d_model, tensors)
    if problem:  # checked first: a shape mismatch would surface from load_state_dict as a RuntimeError
        raise GrowlmError(f"adapter tensors do not match the recorded LoRA stages: {problem}")
    for rec in records:
        _inject(model, rec)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    lora_missing = [k for k in missing if ".lora_" in k]
    if lora_missing or unexpected:
        raise GrowlmError(f"adapter tensors do not match the recorded LoRA stages: {(lora_missing or unexpected)[0]}")
    for _, p in model.named_parameters():
        p.requires_grad_(False)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in fp32) and drop the wrappers; returns the model."""
    for name, mod in list(lora_layers(model)):
        base = mod.get_base_layer()
        dtype = base.weight.dtype
        delta = sum(mod.get_delta_weight(a).float() for a in mod.lora_A)
        base.weight.copy_((base.weight.float() + delta).to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    if hasattr(model, "lora_records"):
        model.lora_records = []
    return model


def lora_param_count(d_model: int, rank: int, n_blocks: int, targets: list[str]) -> int:
    """Adapter parameters: r·(in + out) per adapted Linear."""
    io = _io(d_model)
    return n_blocks * sum(rank * sum(io[t]) for t in targets)
