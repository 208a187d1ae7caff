"""The one way the benchmarks time things: synchronised wall clock, median after a warm-up; and the two peaks
MFU is quoted against: the matmul peak measured in the same run, and the datasheet's dense bf16 peak."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch


def once(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds for one call of ``fn``, waiting for queued GPU work before and after."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2,
                   device: torch.device | None = None) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats, warmup, device)["fn"]


def square_mm(n: int, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], float]:
    """A square ``torch.mm`` to time and its FLOPs: FLOPs over its time is the attainable matmul peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2.0 * n**3


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of a square ``torch.mm`` in ``dtype`` on ``device``, timed alone."""
    mm, flops = square_mm(n, device, dtype)
    return flops / median_seconds(mm, repeats, warmup=3, device=device)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn within every repeat so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# Dense (no 2:4 sparsity) bf16 tensor peaks in FLOP/s, the denominator the field quotes MFU against. The figures
# and their order follow nanochat's table (karpathy/nanochat, nanochat/common.py get_peak_flops, after torchtitan's
# tools/utils.py), which takes them from the vendors' datasheets, where NVIDIA quotes "with sparsity", halved here
# (H100 and H200 SXM: 1,979 -> 989; H100 PCIe: 1,513 -> 756). The two rows nanochat lacks cite their datasheet. A row
# matches when each of its words is a word of the device name (torch.cuda.get_device_name, lower case), and the first
# match wins, so a variant (NVL, PCIe) comes before its family and "l4" never matches an L40. The A10G, an AWS part
# with no public datasheet figure, is left out on purpose: an unknown device reports no datasheet MFU, never a guess.
DATASHEET_BF16: tuple[tuple[str, float], ...] = (
    ("gb200", 2.5e15), ("b200", 2.25e15), ("b100", 1.8e15),
    ("h200 nvl", 836e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("h800 nvl", 989e12), ("h800", 756e12),
    ("a100", 312e12), ("a800", 312e12), ("a40", 149.7e12), ("a30", 165e12),
    ("a10", 125e12),  # NVIDIA A10 datasheet: BF16 tensor 125 TFLOPS (250 with sparsity); not nanochat's
    ("l40s", 362e12),
    ("l40", 181e12),  # NVIDIA L40 datasheet: BF16 tensor 362 TFLOPS with sparsity; not nanochat's
    ("l4", 121e12),
    ("mi355x", 2.5e15), ("mi325x", 1.3074e15), ("mi300x", 1.3074e15), ("mi300a", 980.6e12), ("mi250x", 383e12),
    ("mi250", 362.1e12),
    ("5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
)


def datasheet_peak(device_name: str) -> tuple[float | None, str]:
    """The datasheet's dense bf16 peak (FLOP/s) of the device called ``device_name``, and what it was matched as;
    ``(None, why)`` for a device the table lacks (a CPU, say): MFU against it is then unknown, not guessed."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for row, peak in DATASHEET_BF16:
        if set(row.split()) <= words:
            return peak, f"{row} (dense bf16 datasheet peak, {peak / 1e12:g} TFLOP/s)"
    return None, f"no datasheet peak known for {device_name!r}: MFU against the datasheet is not reported"
