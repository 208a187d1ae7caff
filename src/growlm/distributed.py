"""Data parallelism with PyTorch's own engine: torchrun launches, DDP or FSDP2 synchronises.

Each rank runs the frozen trunk forward-only on its shard of every global batch; only the
trainable top (new blocks, LoRA adapters, head, final norm) is synchronised. Rank 0 alone writes
logs, metrics and checkpoints; every rank runs the same number of steps, so all agree on every
stage boundary (a barrier marks each one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when launched by torchrun with > 1 process."""
    _, w = world()
    if w > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (the global batch's loss); identity when not distributed."""
    if not dist.is_initialized():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def wrap(model: torch.nn.Module, kind: str, device: torch.device) -> torch.nn.Module:
    """Wrap for gradient synchronisation of the trainable parameters only.

    DDP registers reducer hooks only on parameters that require grad, so the frozen trunk is
    never synchronised. FSDP2 (``fully_shard``, per parameter) gives each trainable block its own
    group; the root group holds the rest (head, final norm, and the frozen trunk, gathered for the
    forward; frozen tensors get no gradient, so they have nothing to reduce).
    """
    if not dist.is_initialized():
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in model.blocks:
            if any(p.requires_grad for p in blk.parameters()):
                fully_shard(blk)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def rank0_first(build: Callable[[], T]) -> T:
    """Run ``build`` on rank 0 first (it writes any cache), then on the others (they read it)."""
    if world()[0] == 0:
        out = build()
        barrier()
        return out
    barrier()
    return build()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(plan: str, out: str, nproc: int, *, resume: bool = False) -> int:
    """``growlm train --nproc N``: run the same command under torchrun with N local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "growlm", "train", str(plan), "--out", str(out), "--no-progress"]
    if resume:
        cmd.append("--resume")
    r = subprocess.run(cmd)
    if r.returncode:
        print(f"growlm: error: a training process failed (exit code {r.returncode}); completed stages in {out} "
              f"are intact; continue with: growlm train {plan} --out {out} --nproc {nproc} --resume",
              file=sys.stderr)
    return r.returncode


def whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor on ``t``'s device: collective when ``t`` is an FSDP2 DTensor (every rank must call)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor gathered whole on CPU: collective when ``t`` is an FSDP2 shard (every rank must call)."""
    return whole(t.detach()).cpu()


def like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` (a whole tensor) placed as ``param`` is: sharded the same way when ``param`` is an FSDP2 shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(t.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return t.to(param.device)


def gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (collective under FSDP2; plain tensors otherwise)."""
    return {k: full_tensor(v) for k, v in model.state_dict().items()}
