"""What a run cost, and what it had reached at another run's cost: the equal-compute reading.

A run's cost is counted per stage by training itself: ``model.json["metrics"]`` holds the stage's
``flops`` (tokens × :func:`growlm.growth.stage_flop_per_token`: the matmuls of the stage's forward and
backward as autograd runs them, frozen forwards, frozen weights the gradient passes through and LoRA
adapters counted, equal to torch's ``FlopCounterMode``) and ``wall_s`` (seconds spent in training steps,
evaluations and checkpoints left out), and every ``metrics.jsonl`` line holds the same two figures so far
in its stage, with ``valid_loss`` on the lines where the plan's ``eval_every`` fell. Stages are chained here into one curve per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from growlm.errors import GrowlmError
from growlm.store import MetricsLog, stages
from growlm.store.model import read_meta


@dataclass(frozen=True)
class Point:
    """One validation measurement of a run, with the run's cumulative cost when it was taken."""

    tokens: int
    flops: float
    seconds: float
    valid_loss: float


def stage_costs(run: Path) -> list[dict]:
    """Each finished stage's ``stage`` number, ``tokens``, ``flops``, ``seconds`` and final
    ``valid_loss``, in order."""
    out = []
    for index, path in stages(Path(run)):
        m = read_meta(path).metrics
        if m is None or m.flops is None or m.wall_s is None:
            raise GrowlmError(f"{path}: model.json records no training FLOPs (trained before growlm counted them)")
        out.append({"stage": index, "tokens": m.tokens, "flops": float(m.flops), "seconds": m.wall_s,
                    "valid_loss": m.valid_loss})
    if not out:
        raise GrowlmError(f"{run}: no finished stage")
    return out


def total_cost(run: Path) -> dict[str, float]:
    """The run's training ``flops`` and ``seconds`` over all its stages."""
    costs = stage_costs(run)
    return {"flops": sum(c["flops"] for c in costs), "seconds": sum(c["seconds"] for c in costs)}


def validation_curve(run: Path) -> list[Point]:
    """Validation loss against cumulative tokens, FLOPs and seconds, across every stage of ``run``:
    the ``eval_every`` points of ``metrics.jsonl`` and each stage's final measurement."""
    costs = stage_costs(run)
    by_stage: dict[int, list[dict]] = {}
    for rec in MetricsLog.read(run):
        if "valid_loss" in rec and "flops" in rec:
            by_stage.setdefault(int(rec["stage"]), []).append(rec)
    points, tok0, flop0, sec0 = [], 0, 0.0, 0.0
    for c in costs:
        for rec in by_stage.get(c["stage"], []):
            if rec["tokens"] < c["tokens"]:  # the stage's end is measured below, on its saved model
                points.append(Point(tok0 + rec["tokens"], flop0 + rec["flops"], sec0 + rec["wall_s"],
                                    float(rec["valid_loss"])))
        tok0, flop0, sec0 = tok0 + c["tokens"], flop0 + c["flops"], sec0 + c["seconds"]
        if c["valid_loss"] is not None:
            points.append(Point(tok0, flop0, sec0, float(c["valid_loss"])))
    return points


def loss_at(curve: list[Point], x: float, key: str) -> float | None:
    """The validation loss ``curve`` had reached when its ``key`` (``flops``, ``seconds`` or
    ``tokens``) was ``x``, interpolated linearly between measurements; None outside the curve
    (before its first measurement, or past its end: the run never spent that much)."""
    xs = [getattr(p, key) for p in curve]
    if not curve or x < xs[0] or x > xs[-1]:
        return None
    for (x0, p0), (x1, p1) in pairwise(zip(xs, curve, strict=True)):
        if x <= x1:  # the first segment reaching x (the curve's cost never decreases)
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return p0.valid_loss + t * (p1.valid_loss - p0.valid_loss)
    return curve[-1].valid_loss  # a curve of one measurement, taken at x
