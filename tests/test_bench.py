"""The benchmark scripts' command-line contracts, on small sizes: each runs and reports its figures. How fast
anything is lives in the figures themselves (`make bench`, bench/README.md), never in an assertion here: a
ratio measured on a busy machine says nothing about the code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.e2e


def run_json(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / script), "--json", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_stage_cost_quick_json_contract():
    """The performance issue's contract: ``stage_cost.py --quick --json`` prints the measured ratio and both models."""
    r = run_json("stage_cost.py", "--quick", "--d-model", "64", "--layers", "4", "--vocab", "1024", "--repeats", "2")
    assert {"measured_ratio", "flop_ratio", "flop_ratio_head"} <= set(r)
    assert 0 < r["flop_ratio"] < r["flop_ratio_head"] < 1  # the head is trained in every stage
    assert r["measured_ratio"] > 0  # measured: whether it is below 1 is the benchmark's finding, not a test


def test_gpu_speed_runs_its_figures_on_cpu():
    """The GPU benchmark's own code on a tiny model: per-stage rows with MFU against a measured peak."""
    r = run_json("gpu_speed.py", "--device", "cpu", "--tiny", "--repeats", "2", "--presets", "paper-9l-16bit")
    rows = r["presets"]["paper-9l-16bit"]
    assert [(s["frozen"], s["new"]) for s in rows] == [(0, 3), (3, 3), (6, 3)]
    assert r["peak_tflops"] > 0 and all(s["mono_mfu"] > 0 and s["grow_mfu"] > 0 and s["measured_ratio"] > 0
                                        for s in rows)


def test_merge_cost_times_every_rule_against_the_same_singles():
    """Every combine rule is timed in turn with one set of single-expert runs; a mixture runs every expert."""
    r = run_json("merge_cost.py", "--quick", "--experts", "3")
    assert set(r["rules"]) == {"mean-logits", "mean-probs", "weighted-probs", "router"}
    for what in ("forward", "decode_step"):
        rows = [rule[what] for rule in r["rules"].values()]
        assert len({row["n_single_ms"] for row in rows}) == 1  # one reference, measured in the same rounds
        assert all(row["ratio"] > 0 for row in rows)
