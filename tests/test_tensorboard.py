"""TensorBoard: ``growlm train --tensorboard`` and ``[train] tensorboard = true`` write RUN/tensorboard,
which TensorBoard's own reader reads back with the numbers of RUN/metrics.jsonl; ``eval --per-stage``
adds its metric per depth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli_util import SMALL_PLAN, growlm, growlm_process, write_plan
from growlm.cli import main

STEPS = 10  # each SMALL_PLAN stage: 1280 tokens / (batch 4 × context 32)


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under RUN/tensorboard as (step, value) pairs per tag, read as TensorBoard reads the
    directory (all event files in order, a resumed run's purge applied)."""
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tb_run(corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tb")
    plan = write_plan(d, SMALL_PLAN, corpus_dir)
    run = d / "run"
    assert main(["train", str(plan), "--out", str(run), "--tensorboard", "--no-progress"]) == 0
    return plan, run


def test_train_scalars_match_metrics(tb_run):
    _, run = tb_run
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    got = scalars(run)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the global step runs on across stages: stage 2's step k is STEPS + k
    want = {(r["stage"] - 1) * STEPS + r["step"]: r for r in recs}
    assert [s for s, _ in got["loss"]] == sorted(want)
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "params_active", "stage"):
        assert [v for _, v in got[key]] == pytest.approx([want[s][key] for s in sorted(want)], rel=1e-6), key
    assert {r["stage"] for r in recs} == {1, 2}
    # no eval_every: the validation loss of each stage's end, at its last global step
    assert [s for s, _ in got["valid_loss"]] == [STEPS, 2 * STEPS]


def test_flag_is_not_part_of_the_plan(tb_run):
    """The flag only watches: the recorded plan leaves it out, so resuming with or without it is the same plan."""
    plan, run = tb_run
    assert "tensorboard" not in (run / "plan.json").read_text()
    assert main(["train", str(plan), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert main(["train", str(plan), "--out", str(run), "--resume", "--tensorboard", "--no-progress"]) == 0


@pytest.mark.process
def test_resumed_run_hides_what_the_killed_one_logged_past_its_checkpoint(corpus_dir, tmp_path):
    """Killed at stage 2 step 5 (checkpoint at step 3, a loss logged at step 4): the resumed run logs step 4
    again and TensorBoard shows it once, as metrics.jsonl does. The kill -9 needs a process of its own; the
    resume runs in this one."""
    plan, run = write_plan(tmp_path, SMALL_PLAN, corpus_dir), tmp_path / "run"
    killed = growlm_process("train", str(plan), "--out", str(run), "--tensorboard", "--no-progress",
                            env={"GROWLM_FAULT": "kill@step:2:5"})
    assert killed.returncode != 0
    growlm("train", str(plan), "--out", str(run), "--resume", "--tensorboard", "--no-progress", check=True)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    got = scalars(run)["loss"]
    assert [s for s, _ in got] == [(r["stage"] - 1) * STEPS + r["step"] for r in recs] == list(range(2, 21, 2))
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in recs], rel=1e-6)


def test_plan_setting_and_per_stage_eval(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN.replace("log_every = 2", "log_every = 5\ntensorboard = true")
                      .replace("tokens = 1280\nlora", "tokens = 640\nlora"), corpus_dir)
    run = tmp_path / "run"
    assert main(["train", str(plan), "--out", str(run), "--no-progress"]) == 0
    assert [s for s, _ in scalars(run)["loss"]] == [5, 10, 15]  # stage 2 has 5 steps
    assert main(["eval", str(run), "--per-stage", "--task", "ppl", "--data", str(corpus_dir / "valid.txt")]) == 0
    got = scalars(run)
    tags = [t for t in got if t.startswith("eval/ppl-")]
    assert tags, sorted(got)
    for tag in tags:  # one point per stage, at its depth (2 grown blocks, then 1 more)
        assert [s for s, _ in got[tag]] == [2, 3], tag


def test_flag_is_refused_with_nproc(tmp_path, capsys):
    """torchrun's processes get the plan, not this process's flags: the plan setting is the way there."""
    assert main(["train", str(tmp_path / "plan.toml"), "--out", str(tmp_path / "run"), "--nproc", "2",
                 "--tensorboard"]) == 2
    assert "set [train] tensorboard = true in the plan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
