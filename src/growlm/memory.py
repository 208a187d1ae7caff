"""Memory a job will need, estimated from shapes before anything is allocated, and what the machine has.

An absurd size (a substrate of two billion rows, a batch of 100,000 sequences) was otherwise found out
by the allocator, or by swapping, minutes in. These are estimates, not measurements: they count the
large tensors each docstring lists and leave out allocator slack, the framework's own footprint and
compilation buffers, so a job refused here would not have fitted, while one let through may still be
tight. Pure functions of shapes, except :func:`available_bytes`, which asks the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from growlm.errors import GrowlmError
from growlm.model import LOSS_CHUNK_ROWS

# Bytes autograd keeps per token for each d_model unit of a block the gradient passes through: measured
# with saved_tensors_hooks (fp32: 18.2 d-wide tensors of 4 bytes; bf16 autocast: 23.2 of mostly 2 bytes),
# rounded up
_ACT_BYTES = {False: 76, True: 48}
# per logit alive at once: the logits, their fp32 log-probabilities and the gradient of the loss by them
_LOGIT_BYTES = 12
_TOKEN_BYTES = 16  # a step's inputs and targets, int64 each


def gib(n: float) -> str:
    """``n`` bytes as GiB, three significant digits."""
    return f"{n / (1 << 30):.3g} GiB"


@dataclass(frozen=True)
class TrainingMemory:
    """An estimate of one training process's memory in bytes, by what holds it."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        """All of it."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        """The parts: ``weights 0.1 GiB, gradients 0.05 GiB, AdamW 0.1 GiB, activations 27 GiB, logits 0.1 GiB``."""
        parts = (("weights", self.weights), ("gradients", self.gradients), ("AdamW", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits))
        return ", ".join(f"{name} {gib(n)}" for name, n in parts)


def training_memory(*, params_total: int, params_trainable: int, grad_layers: int, tokens: int, d_model: int,
                    vocab_size: int, bf16: bool, world: int = 1, sharded: bool = False) -> TrainingMemory:
    """Estimated memory of one process training a model, per step of ``tokens`` tokens (its rows × context).

    Counted: every parameter in fp32 (autocast computes in bf16 but keeps fp32 weights); per trainable
    parameter an fp32 gradient and AdamW's two fp32 moments; the activations autograd keeps for the
    ``grad_layers`` blocks the gradient passes through, one more block's worth for the forward's working
    set, and the token batch; the logits of at most 8,192 rows at a time (the loss takes larger batches
    by chunks). ``sharded`` (FSDP) splits parameters, gradients and optimizer state across ``world``
    processes; DDP (``world`` > 1, not sharded) holds a second copy of the gradients in its buckets.
    """
    share = world if sharded else 1
    activations = tokens * d_model * _ACT_BYTES[bf16] * (grad_layers + 1) + tokens * _TOKEN_BYTES
    return TrainingMemory(
        weights=4 * params_total // share,
        gradients=4 * params_trainable * (2 if world > 1 and not sharded else 1) // share,
        optimizer=8 * params_trainable // share,
        activations=activations,
        logits=min(tokens, LOSS_CHUNK_ROWS) * vocab_size * _LOGIT_BYTES,
    )


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for a new job on ``device``, in bytes; None where it cannot be told.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` of
    /proc/meminfo (free pages plus the cache the kernel can reclaim), or free pages alone where there
    is no /proc, capped by a cgroup v2 ``memory.max`` (a container's limit, which /proc does not show).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (OSError, ValueError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    return min(avail, int(limit)) if limit.isdigit() else avail


def check_fits(need: int, device: torch.device | str, what: str, hint: str, processes: int = 1) -> None:
    """Refuse, in one line naming ``what`` and ``hint`` (how to need less), a job whose estimated ``need``
    bytes per process, times the ``processes`` sharing this memory, exceed what ``device`` has free.
    Nothing is refused where the free memory cannot be told."""
    avail = available_bytes(device)
    if avail is None or need * processes <= avail:
        return
    together = f" ({processes} processes sharing it: {gib(need * processes)})" if processes > 1 else ""
    raise GrowlmError(f"{what}, more than the {gib(avail)} of {torch.device(device).type} memory available"
                      f"{together}; {hint}")


def substrate_memory(vocab_size: int, dim: int) -> int:
    """Estimated bytes to build and save a ``[vocab_size, dim]`` substrate: its float32 matrix three times
    over (as built, the contiguous copy that is saved, and the serialised file, all alive at once)."""
    return 3 * 4 * vocab_size * dim


def check_substrate_memory(vocab_size: int, dim: int) -> None:
    """Refuse a substrate whose build would need more memory than the machine has, before allocating any."""
    need = substrate_memory(vocab_size, dim)
    check_fits(need, "cpu", f"a [{vocab_size:,}, {dim}] substrate needs an estimated {gib(need)} to build and save "
               f"(its float32 matrix, the copy that is saved and the file)",
               "use a smaller vocabulary or --dim")
