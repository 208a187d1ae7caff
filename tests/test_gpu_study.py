"""bench/gpu_study.sh, issue #29's 9-layer study on one GPU: its CPU dry run end to end, the shipped data's round
trip, the equal split of the budget, and the datasheet peaks that MFU is quoted against.

The study itself needs a GPU machine (``bash bench/gpu_study.sh --out DIR`` there, bench/README.md has the
command); here the whole script runs at toy size, so the one prepared GPU run does not fail on its first use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_study.sh"
sys.path.insert(0, str(REPO / "bench"))
from gpu_study import interleave, stage_steps, unpack_corpus, write_corpus  # noqa: E402
from timing import datasheet_peak  # noqa: E402


@pytest.mark.e2e(seconds=8)
def test_dry_run_trains_the_three_runs_on_one_budget_and_reports_every_figure(tmp_path):
    """``--dry-run`` on CPU, from another cwd with a relative --out: the three grow stages and both monolithic
    baselines train on the same tokens; every stage has its validation loss with tokens, FLOPs, seconds and both
    MFUs (the datasheet one null on a CPU, with a note); curves, comparisons, the report and its files."""
    env = {**os.environ, "GROWLM_PYTHON": sys.executable}
    env.pop("GROWLM_WHEELS", None)
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", "out", "--site", str(tmp_path / "site")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    figs = {x["figure"]: x for x in lines}
    summary = figs.pop("summary")
    assert summary["crashed"] == [] and summary["goals_missed"] == 0 and summary["dry_run"] is True
    assert not [f for f in figs if f.endswith(".crashed")]

    assert figs["datasheet_peak"]["value"] is None and "no datasheet peak" in figs["datasheet_peak"]["note"]
    assert figs["matmul_peak"]["value"] > 0
    budget = figs["budget.equal_tokens"]
    assert budget["met"] is True and budget["stage_tokens"]["grow"] == [budget["value"] // 3] * 3
    assert set(budget["per_run"].values()) == {budget["value"]}
    assert figs["runs.finished"]["finished"] == ["grow", "mono-glyph", "mono-trainable"]
    assert figs["growth_schedules"]["value"] == [] and "--extra" in figs["growth_schedules"]["note"]

    stages = {"grow": 3, "mono-glyph": 1, "mono-trainable": 1}
    for run, n in stages.items():
        for i in range(1, n + 1):
            st = figs[f"run[{run}].stage[{i}].valid_loss"]
            assert st["value"] > 0 and st["tokens"] == budget["value"] // n and st["flops"] > 0
            assert st["mfu_measured"] > 0 and "mfu_datasheet" in st and st["mfu_datasheet"] is None
        final = figs[f"run[{run}].valid_loss"]
        assert final["tokens"] == budget["value"] and final["value"] == figs[f"run[{run}].stage[{n}].valid_loss"]["value"]
        curve = figs[f"run[{run}].curve"]["value"]
        for key in range(3):  # tokens, FLOPs and seconds only grow along a curve
            assert [p[key] for p in curve] == sorted(p[key] for p in curve)
        assert curve[-1][0] == budget["value"] and curve[-1][3] == final["value"]
    # the grown model spends fewer FLOPs on the same tokens: its trunk runs forward only
    assert figs["run[grow].valid_loss"]["flops"] < figs["run[mono-glyph].valid_loss"]["flops"]
    for mono in ("mono-glyph", "mono-trainable"):
        c = figs[f"compare[grow-{mono}].equal_tokens"]
        assert c["value"] == pytest.approx(c["grow_loss"] - c["mono_loss"], abs=1e-4)
        assert c["mono_loss_at_grow_flops"] is not None

    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names == {"figures.jsonl", "summary.json", "gpu_study.log", "report.md", "metrics-grow.jsonl",
                     "metrics-mono-glyph.jsonl", "metrics-mono-trainable.jsonl"}  # a device call returns <= 8
    assert [json.loads(x) for x in (out / "figures.jsonl").read_text().splitlines()] == lines
    report = (out / "report.md").read_text()
    for text in ("| grow | configs/paper/9l-unicode.toml | 3 |", "| mono-trainable |", "Validation loss after each "
                 "grow stage", "Growth-study schedules of issue #27:"):
        assert text in report, text


def test_shipped_corpus_round_trips_and_a_changed_file_is_refused(tmp_path):
    """--prepare's writer and the GPU run's reader: the same text back, languages interleaved, sha256 checked."""
    docs = interleave([["en 1", "en 2", "en 3"], ["ru 1"], ["zh 1", "zh 2"]])
    assert docs == ["en 1", "ru 1", "zh 1", "en 2", "zh 2", "en 3"]
    manifest = write_corpus(tmp_path / "ship", {"train": docs, "valid": ["Привет", "你好"]}, {"sources": "test"})
    assert manifest["splits"]["valid"]["chars"] == len("Привет\n\n你好\n")
    paths, back = unpack_corpus(tmp_path / "ship", tmp_path / "data")
    assert back == manifest and paths["train"].read_text(encoding="utf-8") == "\n\n".join(docs) + "\n"
    write_corpus(tmp_path / "other", {"train": ["changed"], "valid": ["x"]}, {})
    (tmp_path / "ship" / "train.txt.xz").write_bytes((tmp_path / "other" / "train.txt.xz").read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        unpack_corpus(tmp_path / "ship", tmp_path / "data2")
    with pytest.raises(FileNotFoundError, match="--prepare"):
        unpack_corpus(tmp_path / "none", tmp_path / "data3")


def test_the_budget_splits_exactly_as_the_plans_tokens_do():
    grow, mono = [{"tokens": 10**9}] * 3, [{"tokens": 3 * 10**9}]
    assert stage_steps(grow, 192) == [64, 64, 64] and stage_steps(mono, 192) == [192]
    assert stage_steps([{"tokens": 1}, {"tokens": 3}], 8) == [2, 6]
    with pytest.raises(ValueError, match="multiple of 3"):  # 64.33 steps a stage would not be equal tokens
        stage_steps(grow, 193)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 836), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165.2),
    ("AMD Instinct MI300X", 1307.4),
])
def test_datasheet_peak_by_device_name(name, tflops):
    peak, note = datasheet_peak(name)
    assert peak == pytest.approx(tflops * 1e12) and "datasheet" in note


@pytest.mark.parametrize("name", ["NVIDIA A10G", "cpu (x86_64, 1 threads)", "NVIDIA GH200 480GB", "Tesla T4", ""])
def test_an_unknown_device_has_no_datasheet_peak_and_says_so(name):
    """Never a guess: no row, no figure (the A10G is an AWS part whose peak no datasheet states)."""
    peak, note = datasheet_peak(name)
    assert peak is None and "no datasheet peak known" in note
