"""The one way the benchmarks time things: synchronised wall clock, median after a warm-up."""

from __future__ import annotations

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
