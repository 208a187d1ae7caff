"""`growlm demo --study growth`: the figures read off hand-made curves, the schedules' plans, and one quick study
end to end on a local text (no network)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli_util import child_env, growlm, one_line_error
from growlm.compute import Point
from growlm.errors import GrowlmError


def curve(*pts: tuple[float, float]) -> list[Point]:
    """A validation curve of (FLOPs, loss) points; its tokens are FLOPs / 10 and its seconds FLOPs / 100."""
    return [Point(int(f / 10), f, f / 100, v) for f, v in pts]


def test_flops_to_reach_interpolates_to_the_first_crossing_or_says_not_reached():
    from growlm.demo.study import flops_to_reach

    c = curve((100, 5.0), (200, 4.0), (300, 3.0), (400, 3.4), (500, 2.0))
    assert flops_to_reach(c, 3.5) == pytest.approx(250)  # halfway from 4.0 at 200 to 3.0 at 300
    assert flops_to_reach(c, 4.0) == 200  # a measurement exactly at the target
    assert flops_to_reach(c, 3.2) == pytest.approx(280)  # the first crossing, not the later one after the bump
    assert flops_to_reach(c, 6.0) == 100  # already below at the first measurement: nothing earlier to read
    assert flops_to_reach(c, 1.9) is None  # never reached
    assert flops_to_reach([], 3.0) is None
    assert flops_to_reach(c, 3.5, "seconds") == pytest.approx(2.5)
    assert flops_to_reach(c, 3.5, "tokens") == pytest.approx(25)


def test_split_tokens_cuts_whole_batches_that_sum_to_the_budget():
    from growlm.demo.study import split_tokens

    assert split_tokens(40 * 512, (0.25, 0.75), 512) == [10 * 512, 30 * 512]
    assert split_tokens(10 * 512, (0.65, 0.35), 512) == [6 * 512, 4 * 512]  # 6.5 rounds to even, the rest after
    assert split_tokens(9 * 4, (1, 1, 1), 4) == [12, 12, 12]
    with pytest.raises(GrowlmError, match="whole number"):
        split_tokens(1000, (0.5, 0.5), 512)
    with pytest.raises(GrowlmError, match="cannot be shared"):
        split_tokens(512, (0.5, 0.5), 512)


def _figures():
    from growlm.demo.study import run_figures

    mono = curve((100, 4.0), (200, 3.0), (400, 2.5))
    # reaches 2.5 three quarters of the way from 2.8 at 200 to 2.4 at 300: 275 FLOPs, 0.6875 of monolithic's 400
    a = run_figures({"flops": 300.0, "seconds": 3.0}, curve((100, 3.5), (200, 2.8), (300, 2.4)),
                    {"flops": 400.0, "seconds": 4.0}, mono)
    # never goes below 2.6: not reached
    b = run_figures({"flops": 300.0, "seconds": 5.0}, curve((100, 3.5), (200, 2.9), (300, 2.6)),
                    {"flops": 400.0, "seconds": 4.0}, mono)
    return a, b


def test_run_figures_read_both_runs_curves():
    a, b = _figures()
    assert a["flops_to_monolithic_loss"] == pytest.approx(275) and a["ratio_to_monolithic_flops"] == pytest.approx(0.6875)
    assert a["final_valid_loss"] == 2.4 and a["monolithic_final_loss"] == 2.5 and a["flops_vs_monolithic"] == 0.75
    assert a["valid_loss_at_monolithic_flops"] is None  # it spent 300, never monolithic's 400
    assert a["monolithic_loss_at_its_flops"] == pytest.approx(2.75)  # monolithic at 300: halfway from 3.0 to 2.5
    assert b["flops_to_monolithic_loss"] is None and b["ratio_to_monolithic_flops"] is None


def test_aggregate_target_and_verdict():
    from growlm.demo.study import FIGURES, aggregate, hits_target, run_figures, verdict

    a, b = _figures()
    g = aggregate([a, b])
    assert g["seeds"] == 2 and g["reached"] == 1 and set(g["mean"]) == set(g["spread"]) == set(FIGURES)
    assert g["mean"]["final_valid_loss"] == pytest.approx(2.5) and g["spread"]["final_valid_loss"] == pytest.approx(0.2)
    assert g["mean"]["train_seconds"] == 4.0 and g["spread"]["train_seconds"] == 2.0
    assert g["mean"]["ratio_to_monolithic_flops"] is None and g["spread"]["flops_to_monolithic_loss"] is None
    assert hits_target([a]) and not hits_target([a, b]) and not hits_target([])
    assert not hits_target([a], target=0.6)

    mono_curve = curve((100, 4.0), (200, 3.0), (400, 2.5))
    m = run_figures({"flops": 400.0, "seconds": 4.0}, mono_curve, {"flops": 400.0, "seconds": 4.0}, mono_curve)
    assert m["ratio_to_monolithic_flops"] == 1.0 and m["valid_loss_at_monolithic_flops"] == 2.5

    def group(*per):
        return {**aggregate(list(per)), "per_seed": list(per)}

    v = verdict({"monolithic": group(m, m), "cheap": group(a, a), "short": group(a, b)})
    assert v["hits"] == ["cheap"]
    assert v["words"].startswith("yes: cheap reached the monolithic model's final validation loss (2.500 nats/token, "
                                 "seed spread 0.000) with at most 0.8x its training FLOPs in every one of 2 seeds")
    assert "needed 0.69x (0.69 to 0.69" in v["words"]
    v = verdict({"monolithic": group(m, m), "short": group(a, b)})
    assert v["hits"] == [] and v["words"].startswith("no: no grown schedule reached")
    assert "the lowest final loss among them, short's, is 2.500 (+0.000 against monolithic" in v["words"]
    assert "for 0.75x its FLOPs" in v["words"]
    # at its 300 FLOPs monolithic had 2.75: ahead by 0.35 and 0.15, a mean of 0.25, above the seed spread (0.2)
    assert v["ahead_at_equal_compute"] == ["short"]
    assert "short was ahead by 0.250 (2.500 against 2.750 at 0.75x its FLOPs) in every seed" in v["words"]
    v = verdict({"monolithic": group(m), "cheap": group(a)}, target=0.5)
    assert v["hits"] == [] and "the cheapest that reached it, cheap, needed 0.69x" in v["words"]
    assert v["words"].endswith("from one seed, so the seed-to-seed spread was not measured")


def test_equal_compute_margin_needs_every_seed_ahead_beyond_the_spread():
    from growlm.demo.study import equal_compute_margin

    def group(*pairs):  # (monolithic's loss at its FLOPs, its final loss) per seed
        finals = [f for _, f in pairs]
        return {"per_seed": [{"monolithic_loss_at_its_flops": m, "final_valid_loss": f} for m, f in pairs],
                "spread": {"final_valid_loss": max(finals) - min(finals)}}

    assert equal_compute_margin(group((3.4, 3.2), (3.5, 3.3))) == pytest.approx(0.2)
    assert equal_compute_margin(group((3.4, 3.2), (3.5, 3.6))) is None  # behind in one seed
    assert equal_compute_margin(group((3.4, 3.0), (3.5, 3.45))) is None  # 0.225 ahead, but the seeds spread 0.45
    assert equal_compute_margin(group((None, 3.0), (3.5, 3.3))) is None  # one seed spent more than monolithic


def test_figure_text_gives_mean_and_spread_or_why_a_figure_is_missing():
    from growlm.demo.study import aggregate
    from growlm.demo.study_report import figure_text

    a, b = _figures()
    g = {**aggregate([a, b]), "per_seed": [a, b]}
    assert figure_text(g, "final_valid_loss") == "2.500 ± 0.200"
    assert figure_text(g, "train_flops", 2, 100) == "3.00 ± 0.00"
    assert figure_text(g, "ratio_to_monolithic_flops", 2) == "not reached in 1 of 2 seeds (0.69 in the others)"
    assert figure_text(g, "valid_loss_at_monolithic_flops") == "spent less"
    one = {**aggregate([a]), "per_seed": [a]}
    assert figure_text(one, "final_valid_loss") == "2.400"
    more = {**aggregate([{**a, "monolithic_loss_at_its_flops": None}]), "per_seed": [{**a, "monolithic_loss_at_its_flops": None}]}
    assert figure_text(more, "monolithic_loss_at_its_flops") == "spent more"


def test_tuning_ranks_reached_shares_by_flops_then_the_rest_by_loss():
    from growlm.demo.study import tuning_key

    figs = [{"flops_to_monolithic_loss": None, "final_valid_loss": 2.6},
            {"flops_to_monolithic_loss": 300.0, "final_valid_loss": 2.4},
            {"flops_to_monolithic_loss": None, "final_valid_loss": 2.55},
            {"flops_to_monolithic_loss": 250.0, "final_valid_loss": 2.45}]
    assert [figs.index(f) for f in sorted(figs, key=tuning_key)] == [3, 1, 2, 0]


def test_mean_curve_averages_seeds_measured_at_the_same_flops():
    from growlm.demo.study_report import mean_curve

    assert mean_curve([curve((1, 4.0), (2, 3.0)), curve((1, 5.0), (2, 2.0))]) == [(1, 4.5), (2, 2.5)]
    assert mean_curve([curve((1, 4.0), (2, 3.0)), curve((1, 5.0), (3, 2.0))]) is None
    assert mean_curve([]) is None


def test_every_schedule_is_a_valid_plan_on_the_same_tokens(corpus_dir):
    """At the study's scale every schedule trains on the same budget in whole batches, the paper's as the demo
    grows it, and each validates as a plan (two-phase and stacking use their own stage keys)."""
    from growlm.demo.run import _grow_stages, _plan
    from growlm.demo.study import SCHEDULES, STUDY, STUDY_QUICK, study_variants, tuning_variants

    batch = STUDY.batch_size * STUDY.context
    by_name = {s.name: s for s in SCHEDULES}
    assert by_name["paper"].stages(STUDY) == _grow_stages(STUDY.depth, STUDY.tokens)
    assert by_name["stack"].stages(STUDY)[1]["layers"] == [0, 0, 1, 1]  # the order its tuning chose
    assert all(s.chosen in s.grid and s.option in s.options for s in SCHEDULES if s.grid)
    # the same tuning effort for each: three shares, three options, five runs
    assert {(len(s.grid), len(s.options)) for s in SCHEDULES if s.grid} == {(3, 3)}
    runs = [v.schedule.name for v in tuning_variants()]
    assert {runs.count(s.name) for s in SCHEDULES if s.grid} == {5} and runs.count("paper") == 0
    # the option is how the new blocks begin: every grown block after the first, or the order of the copies
    for option in by_name["late"].options:
        late = by_name["late"].stages(STUDY, option=option)
        assert "init" not in late[0] and late[1].get("init", "random") == option
    assert [st.get("init") for st in by_name["two-phase"].stages(STUDY, option="zero-out")] == \
        [None, "zero-out", "zero-out", "zero-out"]
    assert [st.get("init") for st in by_name["joint"].stages(STUDY, option="copy-top")] == \
        [None, "copy-top", "copy-top", "copy-top", None]
    assert [by_name["stack"].stages(STUDY, option=o)[1]["layers"] for o in by_name["stack"].options] == \
        [[0, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0]]
    for scale in (STUDY, STUDY_QUICK):
        for v in tuning_variants() + study_variants():
            stages = v.schedule.stages(scale, v.share, v.option)
            assert sum(st["tokens"] for st in stages) == scale.tokens, v.label
            assert all(st["tokens"] % batch == 0 for st in stages if scale is STUDY)
            _plan(substrate={"kind": "glyph"}, tokenizer={"corpus": [corpus_dir / "train.txt"]},
                  data={"train": [corpus_dir / "train.txt"]}, stages=stages, s=scale)


def test_the_cli_runs_the_study_with_its_flags(tmp_path, monkeypatch):
    from growlm import demo as demo_module

    calls = []
    monkeypatch.setattr(demo_module, "growth_study", lambda **kw: calls.append(kw))
    assert growlm("demo", "--study", "growth", "--quick", "--seeds", "3", "--out", str(tmp_path / "s")).returncode == 0
    assert growlm("demo", "--study", "growth").returncode == 0
    assert calls == [{"out": tmp_path / "s", "quick": True, "force": False, "seeds": 3, "tune": False},
                     {"out": Path("demo-out-growth"), "quick": False, "force": False, "seeds": None, "tune": False}]
    assert growlm("demo", "--study", "other").returncode == 2
    assert growlm("demo", "--study", "growth", "--tune").returncode == 0
    assert calls[-1] == {"out": Path("demo-out-growth-tuning"), "quick": False, "force": False, "seeds": None,
                         "tune": True}
    one_line_error(growlm("demo", "--tune"), "--tune", "--study growth")
    one_line_error(growlm("demo", "--study", "growth", "--tune", "--seeds", "2"), "--tune", "--seeds")
    assert len(calls) == 3


@pytest.mark.e2e(seconds=12)
def test_quick_study_end_to_end(tmp_path, monkeypatch, corpus_dir):
    """The quick study through the command line, on the fixture corpus instead of the downloaded text: every
    schedule at two seeds, each figure per seed and aggregated in results.json, the plot, the verdict."""
    from growlm.demo import data
    from growlm.demo.study import FIGURES, SCHEDULES

    text = {lang: {"train": corpus_dir / f"{lang}.txt", "valid": corpus_dir / "valid.txt"} for lang in ("en", "ru")}
    text["zh"] = {"train": corpus_dir / "train.txt", "valid": corpus_dir / "valid.txt"}
    monkeypatch.setattr(data, "fetch_demo_corpora", lambda: text)
    out = tmp_path / "study"
    r = growlm("demo", "--study", "growth", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["growth_study"]
    assert res["seeds"] == [0, 1] and res["excluded"] == {} and res["mode"] == "study"
    groups = res["schedules"]
    assert list(groups) == [s.name for s in SCHEDULES]
    for name, g in groups.items():
        assert g["seeds"] == 2 and [f["seed"] for f in g["per_seed"]] == [0, 1]
        assert set(g["mean"]) == set(g["spread"]) == set(FIGURES)
        for f in g["per_seed"]:
            assert set(FIGURES) <= set(f) and f["final_valid_loss"] > 0 and f["train_flops"] > 0
            assert len(res["curves"][f["run"]]) >= 2
        # every stage of every schedule trained on the same budget
        assert sum(st["tokens"] for st in g["stages"]) == res["scale"]["tokens"], name
    mono = groups["monolithic"]
    assert mono["mean"]["flops_vs_monolithic"] == 1.0
    # a schedule spends no more than monolithic on the same tokens: shallower or partly frozen stages
    assert all(g["mean"]["flops_vs_monolithic"] < 1 for n, g in groups.items() if n != "monolithic")
    assert isinstance(res["verdict"]["hits"], list) and res["verdict"]["words"].startswith(("yes: ", "no: "))
    report = (out / "report.md").read_text()
    assert (out / "loss_vs_flops.png").stat().st_size > 10_000 and "(loss_vs_flops.png)" in report
    assert res["verdict"]["words"] in report and "ratio to monolithic's FLOPs" in report
    assert (out / "plans" / "two-phase-seed1.json").is_file()


@pytest.mark.process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_killed_study_takes_its_workers_with_it(tmp_path):
    """The study's workers die with its process: killed (SIGKILL, nothing to clean up), it left them training
    into its --out, where the same command run again was starting afresh."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from growlm.demo.study import worker_init
        if __name__ == "__main__":
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=worker_init, initargs=(os.getpid(),))
            pid = pool.submit(os.getpid).result()
            pool.submit(time.sleep, 60)
            open({str(tmp_path / "pid")!r}, "w").write(str(pid))
            time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], env=child_env())
    try:
        for _ in range(300):
            if (tmp_path / "pid").exists() and (tmp_path / "pid").read_text():
                break
            time.sleep(0.05)
        worker = int((tmp_path / "pid").read_text())
        os.kill(worker, 0)  # alive, sleeping in its task
        parent.kill()
        parent.wait()
        for _ in range(100):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived the study's process")
    finally:
        parent.kill()


@pytest.mark.process
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stop_ends_the_studys_workers_at_once_and_starts_no_queued_run(tmp_path, corpus_dir, stop):
    """Ctrl-C (SIGINT to the terminal's process group: every worker's loop gets it too) or a SIGTERM to the
    study's process alone (the workers never see it) while two workers train: the study ends within seconds,
    every worker with it, and no run waiting its turn starts (a queued run used to start after Ctrl-C and hold
    the terminal until it finished)."""
    from cli_util import SMALL_PLAN, write_plan
    from growlm.files import atomic_write_json
    from growlm.plan import load_plan, plan_to_json

    plan = load_plan(write_plan(tmp_path, SMALL_PLAN.replace("tokens = 1280", "tokens = 256000"), corpus_dir))
    out = tmp_path / "study"
    (out / "plans").mkdir(parents=True)
    for name in "abcd":
        atomic_write_json(out / "plans" / f"{name}.json", plan_to_json(plan))
    script = tmp_path / "study.py"
    script.write_text(textwrap.dedent("""
        import sys
        from pathlib import Path
        from rich.console import Console
        from growlm.demo.study import _train_all
        if __name__ == "__main__":
            _train_all(Path(sys.argv[1]), list("abcd"), Console(), 2)
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=child_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # both workers in their loops: the stage has begun in each log
            logs = [out / "logs" / f"{n}.log" for n in "ab"]
            if all(f.is_file() and "stage 1/" in f.read_text() for f in logs):
                break
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
        assert time.monotonic() - t0 < 10, err
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        assert "leaked" not in err  # the workers' killed locks, before tqdm's lock was a thread one
        with pytest.raises(ProcessLookupError):  # no worker left in the group
            for _ in range(100):
                os.killpg(proc.pid, 0)
                time.sleep(0.05)
        assert not (out / "runs" / "c").exists() and not (out / "runs" / "d").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.e2e(seconds=8)
def test_quick_tuning_end_to_end(tmp_path, monkeypatch, corpus_dir):
    """``--tune`` at the toy scale: every share and option of every tuned schedule once, at the tuning seed,
    ranked by the one rule, each schedule with the same number of runs; the report says it is the tuning."""
    from growlm.demo import data
    from growlm.demo.study import SCHEDULES, TUNE_SEED, tuning_key

    text = {lang: {"train": corpus_dir / f"{lang}.txt", "valid": corpus_dir / "valid.txt"} for lang in ("en", "ru")}
    text["zh"] = {"train": corpus_dir / "train.txt", "valid": corpus_dir / "valid.txt"}
    monkeypatch.setattr(data, "fetch_demo_corpora", lambda: text)
    out = tmp_path / "tuning"
    r = growlm("demo", "--study", "growth", "--tune", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["growth_study"]
    assert res["mode"] == "tuning" and res["seeds"] == [TUNE_SEED]
    tuned = [s for s in SCHEDULES if s.grid]
    assert set(res["tuning"]["ranked"]) == {s.name for s in tuned}
    for s in tuned:
        ranked = res["tuning"]["ranked"][s.name]
        assert len(ranked) == len(s.grid) + len(s.options) - 1
        figs = [res["schedules"][k]["per_seed"][0] for k in ranked]
        assert figs == sorted(figs, key=tuning_key)
        assert {res["schedules"][k]["option"] for k in ranked} == set(s.options)
    assert res["tuning"]["chosen_option"] == {s.name: s.option for s in tuned}
    assert "This is the tuning run" in (out / "report.md").read_text()
