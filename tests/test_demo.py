"""`growlm demo --quick`: the whole pipeline at toy scale, on real text from the package registries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_util import child_env, growlm, one_line_error
from conftest import USER_CACHE
from growlm.demo.spec import PROMPTS


@pytest.mark.e2e(seconds=40)
def test_quick_demo_end_to_end(tmp_path):
    """The installed console script, as a user types it (a relative --out), with the user's own cache of the
    downloaded text."""
    out = tmp_path / "demo"
    env = {"GROWLM_CACHE": os.environ[USER_CACHE]}
    r = subprocess.run([str(Path(sys.executable).parent / "growlm"), "demo", "--quick", "--out", "demo"],
                       capture_output=True, text=True, env=child_env(**env), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    for png in ("loss_curves.png", "bpb_vs_depth.png", "loss_vs_flops.png", "loss_vs_seconds.png"):
        assert (out / png).stat().st_size > 10_000 and f"({png})" in report
    res = json.loads((out / "results.json").read_text())
    ppl = res["ppl"]
    assert res["seeds"] == [0, 1]
    runs = {"grown-glyph", "grown-glyph-seed1", "monolithic-glyph", "monolithic-glyph-seed1", "monolithic-trainable",
            "grown-binary16", "specialist-en", "specialist-ru", "specialist-zh"}
    mixtures = {"mixture-mean-logits", "mixture-mean-logits+head", "mixture-mean-probs", "mixture-mean-logits+zh"}
    assert {k.split("/")[0] for k in ppl} == runs | mixtures
    assert len([k for k in ppl if k.startswith("grown-glyph/")]) == 2  # every stage of the grown model
    assert all(set(m) == {"en", "ru", "zh", "mixed"} and all(0 < v["bits_per_byte"] < 10 for v in m.values())
               for m in ppl.values())
    # per character, Cyrillic text (two bytes a letter) costs more bits than per byte
    assert all(v["ru"]["bits_per_char"] > 1.5 * v["ru"]["bits_per_byte"] for v in ppl.values())

    # every model: its training cost, samples that start with their prompt, and their real-word rates
    assert set(res["train_flops"]) == set(res["train_seconds"]) == set(res["samples"]) == runs | mixtures
    assert all(res["samples"][m][lang].startswith(p) for m in res["samples"] for lang, p in PROMPTS.items())
    assert all(0 <= w["rate"] <= 1 and w["real"] <= w["words"] for m in res["real_words"].values() for w in m.values())
    # a grow stage runs the frozen blocks forward only: less compute than monolithic for the same tokens
    for k in ("", "-seed1"):
        assert res["train_flops"][f"grown-glyph{k}"] < res["train_flops"][f"monolithic-glyph{k}"]
    # a mixture costs what its experts cost
    assert res["train_flops"]["mixture-mean-logits"] == res["train_flops"]["specialist-en"] + res["train_flops"]["specialist-ru"]
    # each specialist shares a little of the other's language: the common ground logit averaging needs
    plan = json.loads((out / "plans" / "specialist-ru.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in plan["data"]["train"]] == ["ru.train.txt", "en.train.txt"]
    assert plan["data"]["weights"] == [0.9, 0.1] and plan["data"]["valid"][0].endswith("ru.valid.txt")

    # the equal-compute reading: monolithic spent more, so its curve passed the grown model's FLOPs
    eq = res["equal_compute"]
    assert eq["grown"]["train_flops"] == (res["train_flops"]["grown-glyph"] + res["train_flops"]["grown-glyph-seed1"]) / 2
    for base in ("monolithic-glyph", "monolithic-trainable"):
        b = eq["baselines"][base]
        assert b["train_flops"] > eq["grown"]["train_flops"] and b["loss_at_grown_flops"] is not None
        assert len(res["curves"][base]) >= 3
    hl = res["headline"]
    assert hl["grown-glyph"]["spread"] == max(hl["grown-glyph"]["bits_per_byte"]) - min(hl["grown-glyph"]["bits_per_byte"])
    assert hl["words"] in report and "Equal compute" in report and "bpb mixed" in report

    # every merge rule beats the off-domain expert on each of its experts' domains
    for mix in ("mixture-mean-logits", "mixture-mean-logits+head", "mixture-mean-probs"):
        assert ppl[mix]["en"]["loss"] < ppl["specialist-ru/stage-2"]["en"]["loss"]
        assert ppl[mix]["ru"]["loss"] < ppl["specialist-en/stage-2"]["ru"]["loss"]
    tw = res["training_words"]
    assert tw["ru"]["mean_length"] > tw["en"]["mean_length"] >= 3 and tw["ru"]["forms"] > 100
    assert "drawn en 90% + ru 10%; ru 90% + en 10%; zh 80% + en 10% + ru 10%" in " ".join(report.split())
    assert "per character" in report and f"{tw['ru']['forms']:,} distinct forms" in report
    assert {b["protocol"] for b in res["bench"]} == {"paper", "loglik"}
    assert res["old_experts_unchanged"] is True
    assert ppl["mixture-mean-logits+zh"]["zh"]["loss"] < ppl["mixture-mean-logits"]["zh"]["loss"]



def test_a_second_run_keeps_the_first_report_beside(tmp_path, capsys):
    """A second run never overwrites the first report silently: it is moved beside (``force`` replaces it)."""
    from rich.console import Console

    from growlm.demo.run import _fresh_out

    out = tmp_path / "demo"
    (out / "runs").mkdir(parents=True)
    (out / "report.md").write_text("first")
    assert _fresh_out(out, False, Console()) == out
    (kept,) = tmp_path.glob("demo.prev-*")
    assert (kept / "report.md").read_text() == "first" and (kept / "runs").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["plans"]
    (out / "report.md").write_text("second")
    _fresh_out(out, True, Console())
    assert list(tmp_path.glob("demo.prev-*")) == [kept] and not (out / "report.md").exists()


def test_a_run_cut_off_midway_is_kept_beside_and_the_next_starts_afresh(tmp_path):
    """A demo killed before its report leaves plans, a docking port and some runs; the same command again starts
    afresh (before, it stopped at the port's tokenizer: "not empty; pass --overwrite", a flag demo lacks), the
    cut-off run kept beside, or removed with ``force``."""
    from rich.console import Console

    from growlm.demo.run import _fresh_out

    out = tmp_path / "demo"
    for d in ("plans", "port/tokenizer", "runs/monolithic"):
        (out / d).mkdir(parents=True)
    (out / "port" / "tokenizer" / "tokenizer.json").write_text("{}")
    _fresh_out(out, False, Console())
    (kept,) = tmp_path.glob("demo.prev-*")
    assert (kept / "port" / "tokenizer" / "tokenizer.json").is_file() and (kept / "runs" / "monolithic").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["plans"]
    (out / "port").mkdir()
    _fresh_out(out, True, Console())
    assert list(tmp_path.glob("demo.prev-*")) == [kept] and sorted(p.name for p in out.iterdir()) == ["plans"]
    # a directory that holds no demo's output is written into, never moved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _fresh_out(mine, True, Console())
    assert (mine / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("mine.prev-*"))


@pytest.mark.parametrize("study", [[], ["--study", "growth"]])
def test_an_out_that_is_a_file_is_one_line_and_left_alone(tmp_path, study):
    (tmp_path / "f").write_text("mine")
    r = growlm("demo", "--quick", *study, "--out", str(tmp_path / "f"))
    one_line_error(r, f"--out {tmp_path / 'f'}: exists and is not a directory; nothing was written")
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_the_cli_passes_its_flags_to_the_demo(tmp_path, monkeypatch):
    from growlm import demo as demo_module

    one_line_error(growlm("demo", "--quick", "--seeds", "0", "--out", str(tmp_path / "d")), "--seeds")
    assert not (tmp_path / "d").exists()
    calls = []
    monkeypatch.setattr(demo_module, "demo", lambda **kw: calls.append(kw))
    assert growlm("demo", "--quick", "--seeds", "1", "--out", str(tmp_path / "d")).returncode == 0
    assert calls == [{"out": tmp_path / "d", "quick": True, "force": False, "seeds": 1}]


def test_headline_says_whether_the_difference_exceeds_the_seed_spread():
    from growlm.demo.run import headline

    h = headline({"grown-glyph": [3.0, 3.1], "monolithic-glyph": [2.6, 2.58]})
    assert h["grown-glyph"]["mean"] == pytest.approx(3.05) and h["spread"] == pytest.approx(0.1)
    assert h["difference"] == pytest.approx(0.46)
    assert h["words"].startswith("monolithic is ahead by 0.460") and "more than the seed-to-seed spread (0.100)" in h["words"]
    h = headline({"grown-glyph": [3.0, 3.2], "monolithic-glyph": [3.15, 3.1]})
    assert h["words"].startswith("the difference (0.025 bits/byte, grown ahead) is within the seed-to-seed spread (0.200)")
    h = headline({"grown-glyph": [3.0], "monolithic-glyph": [3.1]})
    assert "from one seed" in h["words"] and h["grown-glyph"]["stdev"] is None


def test_equal_compute_reads_each_baseline_at_the_grown_models_cost():
    from growlm.compute import Point
    from growlm.demo.run import equal_compute

    def curve(*pts):
        return [Point(int(f), f, s, v) for f, s, v in pts]

    cost = {"grown-glyph": {"flops": 200.0, "seconds": 20.0}, "grown-glyph-seed1": {"flops": 250.0, "seconds": 30.0},
            "monolithic-glyph": {"flops": 400.0, "seconds": 40.0},
            "monolithic-glyph-seed1": {"flops": 400.0, "seconds": 40.0},
            "monolithic-trainable": {"flops": 400.0, "seconds": 40.0}}
    mono = curve((100, 10, 4.0), (300, 30, 3.0), (400, 40, 2.5))
    curves = {"grown-glyph": curve((200, 20, 3.4)), "grown-glyph-seed1": curve((250, 30, 3.2)),
              "monolithic-glyph": mono, "monolithic-glyph-seed1": mono,
              "monolithic-trainable": curve((300, 30, 2.0), (400, 40, 1.9))}
    eq = equal_compute(cost, curves, 2)
    assert eq["grown"] == {"model": "grown-glyph", "train_flops": 225.0, "train_seconds": 25.0,
                           "valid_loss": pytest.approx(3.3)}
    m = eq["baselines"]["monolithic-glyph"]
    # seed 0 read at 200 FLOPs (3.5) and 20 s (3.5); seed 1 at 250 FLOPs (3.25) and 30 s (3.0)
    assert m["loss_at_grown_flops"] == pytest.approx(3.375) and m["loss_at_grown_seconds"] == pytest.approx(3.25)
    assert m["seeds"] == 2 and m["valid_loss"] == 2.5 and m["train_flops"] == 400.0
    # the trainable baseline's first measurement came after the grown model's whole budget
    t = eq["baselines"]["monolithic-trainable"]
    assert t["seeds"] == 1 and t["loss_at_grown_flops"] is None and t["loss_at_grown_seconds"] is None
    assert eq["words"].startswith("for the same training FLOPs the grown model is ahead: the grown model ends at 3.300")
    assert "had reached 3.375" in eq["words"] and "(3.250 at the grown model's seconds)" in eq["words"]
