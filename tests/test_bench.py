"""The benchmark scripts' command-line contracts, on small sizes (the figures themselves are `make bench`'s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_json(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / script), "--json", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_stage_cost_quick_json_contract():
    """The performance issue's contract: ``stage_cost.py --quick --json`` prints the measured ratio and both models."""
    r = run_json("stage_cost.py", "--quick")
    assert {"measured_ratio", "flop_ratio", "flop_ratio_head"} <= set(r)
    assert 0 < r["flop_ratio"] < r["flop_ratio_head"] < 1  # the head is trained in every stage
    assert 0 < r["measured_ratio"] < 1  # a grow step over 8 frozen blocks is cheaper than a monolithic one


def test_gpu_speed_runs_its_figures_on_cpu():
    """The GPU benchmark's own code on a tiny model: per-stage rows with MFU against a measured peak."""
    r = run_json("gpu_speed.py", "--device", "cpu", "--tiny", "--repeats", "2", "--presets", "paper-9l-16bit")
    rows = r["presets"]["paper-9l-16bit"]
    assert [(s["frozen"], s["new"]) for s in rows] == [(0, 3), (3, 3), (6, 3)]
    assert r["peak_tflops"] > 0 and all(0 < s["mono_mfu"] < 1.5 and 0 < s["grow_mfu"] < 1.5 for s in rows)
    assert rows[-1]["measured_ratio"] < 0.9  # 3 new blocks over 6 frozen cost well under a 9-block step
