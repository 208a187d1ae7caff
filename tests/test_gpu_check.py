"""bench/gpu_check.sh, the GPU check of issue #18: its CPU dry run end to end, the install step offline, the wheel
preparation command, and the batch search.

The GPU figures themselves need a GPU machine (``bash bench/gpu_check.sh --out DIR`` there); here every step runs
at toy sizes so the one prepared GPU run does not fail on its first use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
KEYS = {"figure", "value", "unit", "goal", "met", "device", "torch"}


def run_check(*args: str, cwd: Path | None = None, timeout: int = 400) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "GROWLM_PYTHON": sys.executable}
    env.pop("GROWLM_WHEELS", None)
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd or REPO, env=env,
                       timeout=timeout)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return r, lines


def by_name(lines: list[dict]) -> dict[str, dict]:
    return {x["figure"]: x for x in lines}


@pytest.mark.e2e(seconds=35)
def test_dry_run_runs_every_step_and_records_every_figure(tmp_path):
    """``--dry-run`` on CPU: install check, speed figures (no MFU goal), ratios, memory, a forced profile, the
    kill-and-resume plan and the pytest subset, each as a JSON line with its goal; a summary; the files.
    Started from another cwd with a relative --out, as a user might. Every MFU comes twice, over the measured
    peak and over the datasheet's, here an H200's by name (the CPU has no datasheet row)."""
    # the pytest step runs pytest in a child, a second suite start-up: its own test below replaces the run
    r, lines = run_check("--dry-run", "--out", "gpu-out", "--site", str(tmp_path / "site"), "--datasheet-name",
                         "NVIDIA H200", "--skip", "pytest", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    figs = by_name(lines)
    summary = figs.pop("summary")
    for f in figs.values():
        assert set(f) >= KEYS, f
        assert f["met"] in (True, False, None)
        assert not f["figure"].endswith(".crashed"), f
    stages = [f"grow[{f}+3]" for f in (0, 3, 6)]
    expected = {"install.missing", "matmul_peak", "datasheet_peak", "batch", "memory.grow[6+3]_vs_mono[9]",
                "plan.kill_resume"}
    expected |= {f"mono[{d}].{k}" for d in (3, 6, 9) for k in ("tokens_per_s", "mfu", "mfu_datasheet")}
    expected |= {f"{s}.{k}" for s in stages for k in ("tokens_per_s", "mfu", "mfu_datasheet", "ratio_over_model",
                                                       "cached_ratio_over_model")}
    assert expected <= set(figs), sorted(expected - set(figs))
    profiles = [f for name, f in figs.items() if name.startswith("profile[")]
    assert profiles and all(p["value"] and {"name", "ms_per_step"} <= set(p["value"][0]) for p in profiles)

    assert figs["install.missing"]["mode"] == "check-only" and figs["install.missing"]["installed"] == []
    assert figs["mono[9].mfu"]["goal"] is None and figs["mono[9].mfu"]["value"] > 0  # no MFU goal on CPU
    sheet = figs["datasheet_peak"]
    assert sheet["value"] == 989 and sheet["looked_up"] == "NVIDIA H200" and "h200" in sheet["note"]
    for name in ["mono[9]", *stages]:
        m, d = figs[f"{name}.mfu"], figs[f"{name}.mfu_datasheet"]
        assert d["goal"] is None and d["value"] == pytest.approx(m["value"] * figs["matmul_peak"]["value"] / 989,
                                                                 rel=0.01, abs=1e-4)
    for s in stages:
        ratio = figs[f"{s}.ratio_over_model"]
        assert ratio["goal"] == f"<= {RATIO_GOAL}" and ratio["met"] == (ratio["value"] <= RATIO_GOAL)
        assert ratio["value"] > 0
    mem = figs["memory.grow[6+3]_vs_mono[9]"]
    assert mem["goal"] == "< 1" and mem["grow_bytes"] > 0 and mem["mono_bytes"] > 0
    plan = figs["plan.kill_resume"]
    assert plan["met"] is True, plan
    assert plan["killed_rc"] == -9 and plan["audits"] == {"stage-1": True, "stage-2": True}

    goals = [f for f in figs.values() if f["goal"] is not None]
    assert summary["goals_met"] == sum(f["met"] is True for f in goals)
    assert summary["goals_met"] + summary["goals_missed"] == len(goals)
    assert summary["crashed"] == [] and summary["dry_run"] is True and summary["wall_s"] > 0

    out = tmp_path / "gpu-out"
    names = {p.name for p in out.iterdir()}
    assert names == {"figures.jsonl", "summary.json", "gpu_check.log", "pytest.log", "plan.log", "profiles.txt"}
    assert len(names) <= 8  # a device call brings back at most eight files
    assert [json.loads(x) for x in (out / "figures.jsonl").read_text().splitlines()] == lines
    assert json.loads((out / "summary.json").read_text())["goals_met"] == summary["goals_met"]
    assert (out / "pytest.log").read_text() == ""  # skipped here: its own test covers it
    assert "GROWLM_FAULT=kill@step:2:3" in (out / "plan.log").read_text()
    assert "Self CPU" in (out / "profiles.txt").read_text()


def fake_wheel(d: Path) -> Path:
    """A minimal pure-Python wheel of distribution ``gpucheck-fake``, module ``gpucheck_fake_mod``."""
    d.mkdir(parents=True, exist_ok=True)
    whl = d / "gpucheck_fake-0.1-py3-none-any.whl"
    files = {
        "gpucheck_fake_mod/__init__.py": "VALUE = 41 + 1\n",
        "gpucheck_fake-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpucheck-fake\nVersion: 0.1\n",
        "gpucheck_fake-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }
    record = "gpucheck_fake-0.1.dist-info/RECORD"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(record, "".join(f"{n},,\n" for n in [*files, record]))
    return whl


REQUIRE = ("--require", "gpucheck_fake_mod:gpucheck-fake")


@pytest.mark.e2e
def test_install_step_installs_only_what_fails_to_import_offline(tmp_path):
    """A module that does not import gets its wheel from the wheel dir (no index); the rest are left alone."""
    fake_wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    r, lines = run_check("--install-only", "--wheels", str(tmp_path / "wheels"), "--site", str(site), *REQUIRE)
    assert r.returncode == 0, r.stderr[-3000:]
    inst = by_name(lines)["install.missing"]
    assert inst["value"] == 0 and inst["met"] is True and inst["mode"] == "install"
    assert list(inst["missing_before"]) == ["gpucheck_fake_mod"] and inst["installed"] == ["gpucheck-fake"]
    assert "--no-index" in inst["pip"] and "--no-deps" in inst["pip"]
    assert (site / "gpucheck_fake_mod" / "__init__.py").is_file()


@pytest.mark.e2e
def test_install_step_checks_only_in_a_dry_run_and_fails_without_wheels(tmp_path):
    fake_wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    r, lines = run_check("--install-only", "--dry-run", "--wheels", str(tmp_path / "wheels"), "--site", str(site),
                         *REQUIRE)
    assert r.returncode == 0, r.stderr[-3000:]  # check-only: what is missing is a result
    inst = by_name(lines)["install.missing"]
    assert inst["mode"] == "check-only" and inst["value"] == 1 and inst["met"] is False
    assert inst["wheels"] == {"gpucheck-fake": "gpucheck_fake-0.1-py3-none-any.whl"} and not site.exists()

    r, lines = run_check("--install-only", "--wheels", str(tmp_path / "none"), "--site", str(site), *REQUIRE)
    assert r.returncode == 1  # the GPU run cannot go on without it
    inst = by_name(lines)["install.missing"]
    assert inst["no_wheel"] == ["gpucheck-fake"] and inst["met"] is False
    assert "--prepare-wheels" in r.stderr


@pytest.mark.e2e
def test_prepare_wheels_pins_the_lock_for_the_gpu_python_and_never_torch(tmp_path):
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    r = subprocess.run(["bash", str(SCRIPT), "--prepare-wheels", str(tmp_path / "w"), "--print-only"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip().splitlines()[-1]
    for part in ("pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12",
                 "--platform manylinux2014_x86_64", f"pydantic=={lock['pydantic']}",
                 f"pydantic_core=={lock['pydantic_core']}"):
        assert part in cmd, part
    assert not any(t.startswith("torch") for t in cmd.split()) and not (tmp_path / "w").exists()  # printed only
    r = subprocess.run(["bash", str(SCRIPT), "--prepare-wheels", str(tmp_path / "w"), "--print-only", "torch"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "torch" in r.stderr


sys.path.insert(0, str(REPO / "bench"))
from gpu_check import RATIO_GOAL, Report, pytest_step, search_batch  # noqa: E402


def test_pytest_step_runs_the_cpu_subset_and_records_its_counts(monkeypatch, tmp_path):
    """The dry run skips this step (a second suite start-up in a child); here its command and its reading of
    pytest's last line are checked against a child that reports, as pytest would, two passed and the rest left out."""
    import gpu_check

    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "..\n2 passed, 3 deselected in 4.1s\n", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    rep = Report(tmp_path / "out", "cpu", "x", dry=True)
    pytest_step(rep, type("A", (), {"pytest_timeout": None, "dry_run": True, "budget_s": 300})(), {"cuda": False})
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pytest", "-q"] and "tests/test_loop.py" in cmd and "nan_step or checkpoint_is_never" in cmd
    (fig,) = rep.figures
    assert fig["figure"] == "pytest" and fig["met"] is True and fig["passed"] == 2 and fig["deselected"] == 3
    assert "2 passed" in (tmp_path / "out" / "pytest.log").read_text()

GB = 2**30


def fake_probe(fixed: float, per_seq: float, oom_above: float):
    calls = []

    def probe(b: int) -> int | None:
        calls.append(b)
        need = fixed + per_seq * b
        return None if need > oom_above else int(need)

    return probe, calls


def test_batch_search_predicts_from_two_probes_and_steps_down_on_oom():
    probe, calls = fake_probe(10 * GB, 0.5 * GB, oom_above=100 * GB)
    b, trials = search_batch(probe, capacity=140 * GB, cap=1024)
    # the two probes give 10 GB + 0.5 GB per sequence: 85% of 140 GB predicts 216, which runs out of memory
    # (as may a real step whose probe under-estimated), then 184 does, then 160 fits
    assert calls == [8, 16, 216, 184, 160] and b == 160
    assert trials[-1] == [b, int((10 + 0.5 * b) * GB)]


def test_batch_search_caps_and_halves_when_nothing_large_fits():
    probe, _ = fake_probe(GB, 0.01 * GB, oom_above=1000 * GB)
    assert search_batch(probe, capacity=140 * GB, cap=64)[0] == 64
    probe, calls = fake_probe(10 * GB, 10 * GB, oom_above=60 * GB)
    b, _ = search_batch(probe, capacity=140 * GB)
    assert b == 4 and calls == [8, 4]
    with pytest.raises(RuntimeError):
        search_batch(fake_probe(200 * GB, GB, 1000 * GB)[0], capacity=140 * GB)
