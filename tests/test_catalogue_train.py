"""The training side of the probe's catalogue: run dirs, resume, metrics and what a failed start leaves.

Each test reproduces one defect the outside probe found (see docs/reliability.md) through the real
CLI, and fails on the code before its fix. The CLI runs in this process, except where the guarantee needs
a real one (kill -9, Ctrl-C, a file-size limit).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest

from cli_util import SMALL_PLAN, growlm, growlm_process, one_line_error, snapshot, write_plan
from conftest import copy_of

NO_CHECKPOINT = SMALL_PLAN.replace("checkpoint_every = 3", "checkpoint_every = 1000").replace("log_every = 2",
                                                                                              "log_every = 1")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.process
def test_kill_before_the_first_checkpoint_then_resume_logs_each_step_once(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, NO_CHECKPOINT, corpus_dir)
    run = tmp_path / "run"
    r = growlm_process("train", plan, "--out", run, "--no-progress", env={"GROWLM_FAULT": "kill@step:1:4"})
    assert r.returncode == -9 and len(_records(run)) == 4
    with open(run / "metrics.jsonl", "a") as f:  # a disk that filled mid-line, or a kill mid-write
        f.write('{"stage": 1, "step": 5, "tok')
    r = growlm("train", str(plan), "--out", str(run), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    steps = [(x["stage"], x["step"]) for x in _records(run)]  # every line parses: no glued or torn record
    assert steps == [(1, n) for n in range(1, 11)] + [(2, n) for n in range(1, 11)]


def _full_disk(kb: int):
    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (kb * 1024, kb * 1024))
    return limit


@pytest.mark.process
def test_disk_full_while_copying_the_plan_leaves_no_truncated_plan(corpus_dir, tmp_path):
    text = SMALL_PLAN + "# " + "a long comment keeps this plan larger than the disk allows\n# " * 300
    plan = write_plan(tmp_path, text, corpus_dir)
    assert plan.stat().st_size > 16 * 1024
    run = tmp_path / "run"
    r = growlm_process("train", plan, "--out", run, "--no-progress", preexec_fn=_full_disk(16))
    one_line_error(r, "could not write", "plan.toml")
    assert not (run / "plan.toml").exists() and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    r = growlm("train", str(plan), "--out", str(run), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (run / "plan.toml").read_text() == text


def test_a_failed_start_is_not_reused_by_another_plan(corpus_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 " * 100)
    text = SMALL_PLAN + '[stage.data]\ntrain = ["bad.txt"]\n'
    plan = write_plan(tmp_path, text, corpus_dir)
    run = tmp_path / "run"
    one_line_error(growlm("train", str(plan), "--out", str(run), "--no-progress"), "bad.txt")
    assert (run / "tokenizer").is_dir() and not list(run.glob("stage-*"))  # it failed after the docking port
    other = tmp_path / "other.toml"
    other.write_text(SMALL_PLAN.replace("d_model = 32", "d_model = 64"))
    left = snapshot(run)
    for resume in ([], ["--resume"]):
        one_line_error(growlm("train", str(other), "--out", str(run), "--no-progress", *resume),
                       "holds a run of another plan", "no stage trained in it yet")
    assert snapshot(run) == left
    one_line_error(growlm("train", str(plan), "--out", str(run), "--no-progress"), "pass --resume")


def test_every_stages_data_is_checked_before_the_first_stage_trains(corpus_dir, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 50 + b"\xff broken")
    plan = write_plan(tmp_path, SMALL_PLAN + '[stage.data]\ntrain = ["bad.txt"]\n', corpus_dir)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress"), "bad.txt")
    assert not list((tmp_path / "run").glob("stage-*"))


def test_out_inside_a_finished_stage_or_a_file_is_refused(small_run, tmp_path):
    small_run = copy_of(small_run.parent, tmp_path / "small") / "run"  # a private copy: a bug may write into it
    before = snapshot(small_run)
    plan = small_run.parent / "plan.toml"
    for out in (small_run / "stage-1", small_run / "stage-1" / "sub", small_run / "stage-2" / "tokenizer" / "x"):
        one_line_error(growlm("train", str(plan), "--out", str(out), "--no-progress"), "inside")
    one_line_error(growlm("train", str(plan), "--out", str(small_run / "plan.toml"), "--no-progress"), "is a file")
    assert snapshot(small_run) == before


def test_unwritable_out_is_one_line(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    # /proc refuses a new dir even to root, whom a read-only mode would not stop
    one_line_error(growlm("train", str(plan), "--out", "/proc/growlm-test/run", "--no-progress"),
                   "cannot write the run dir")


@pytest.mark.process
def test_corrupt_state_json_on_resume_is_one_line_and_keeps_the_stages(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    run = tmp_path / "run"
    assert growlm_process("train", plan, "--out", run, "--no-progress",
                          env={"GROWLM_FAULT": "kill@step:2:7"}).returncode == -9
    (state,) = (run / "checkpoints" / "stage-2").glob("step-*/state.json")
    for corrupt in ('{"files": 3}', "{not json", '{"files": {}, "step": "x"}'):
        state.write_text(corrupt)
        before = snapshot(run)
        one_line_error(growlm("train", str(plan), "--out", str(run), "--resume", "--no-progress"),
                       "corrupt", str(state.parent))
        assert snapshot(run) == before


@pytest.mark.process
def test_the_printed_resume_command_is_shell_quoted(corpus_dir, tmp_path):
    d = tmp_path / "my plans; rm -rf ~"
    d.mkdir()
    plan = write_plan(d, SMALL_PLAN, corpus_dir)
    run = tmp_path / "a run"
    r = growlm_process("train", plan, "--out", run, "--no-progress", env={"GROWLM_FAULT": "sigint@step:1:3"})
    assert r.returncode == 130
    command = r.stderr.split("continue with: ")[1].strip()
    assert shlex.split(command) == ["growlm", "train", str(plan), "--out", str(run), "--resume"]


@pytest.mark.parametrize("edit, needle", [
    ('train = ["train.txt"]\nvalid', "is a FIFO"),  # train.txt becomes a FIFO below
    ('train = ["loop"]\nvalid', "unusable path"),                       # a symlink loop
    ('train = ["bad\\u0000name"]\nvalid', "unusable path"),             # a NUL byte
    ('train = ["/dev/null"]\nvalid', "is a character device"),
])
def test_plan_paths_that_would_hang_or_crash_are_one_line(corpus_dir, tmp_path, edit, needle):
    from growlm.errors import GrowlmError
    from growlm.plan import load_plan

    plan = write_plan(tmp_path, SMALL_PLAN.replace('train = ["train.txt"]\nvalid', edit), corpus_dir)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    if needle == "is a FIFO":
        (tmp_path / "train.txt").unlink()
        os.mkfifo(tmp_path / "train.txt")
    with pytest.raises(GrowlmError, match=needle):
        load_plan(plan)


def test_base_must_be_a_model_dir(corpus_dir, tmp_path):
    from growlm.errors import GrowlmError
    from growlm.plan import load_plan

    (tmp_path / "empty").mkdir()
    plan = write_plan(tmp_path, 'base = "empty"\n' + SMALL_PLAN, corpus_dir)
    with pytest.raises(GrowlmError, match="base: .* is not a growlm model dir"):
        load_plan(plan)


def test_verify_a_run_with_a_stray_shorter_stage_is_one_line(small_run, tmp_path):
    run = copy_of(small_run, tmp_path / "run")
    copy_of(run / "stage-1", run / "stage-3")  # a copy of stage 1 where stage 3 would be
    r = growlm("verify", str(run))
    one_line_error(r, "stage-3")
    assert "Traceback" not in r.stderr


def test_no_command_writes_into_a_finished_stage_or_run(small_run, tmp_path, capsys):
    from growlm.cli import main

    small_run = copy_of(small_run.parent, tmp_path / "small") / "run"  # a private copy: a bug may write into it
    stage, before = small_run / "stage-2", snapshot(small_run)
    tok, model = str(stage / "tokenizer"), str(stage)
    commands = [
        ["tokenizer", "build", "--corpus", str(small_run.parent / "train.txt"), "--out", tok, "--overwrite"],
        ["substrate", "build", "--kind", "binary", "--tokenizer", tok, "--dim", "32", "--out",
         str(small_run / "substrate"), "--overwrite"],
        ["export", model, "--out", str(stage / "hf")],
        ["lora-merge", model, "--out", str(small_run / "merged")],
        ["merge", model, str(small_run / "stage-1"), "--out", str(small_run / "mix")],
        ["import", str(small_run), "--out", str(stage / "imported")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is inside the growlm model, mixture or run" in err[0], (argv, err)
    assert snapshot(small_run) == before


def test_nproc_is_checked_before_anything_starts(small_run, tmp_path):
    """--nproc below 1 is refused, and a batch that the ranks could not split is refused here, in one line,
    before torchrun starts a process (56 lines of torchrun's traceback and a resume hint for a run that never
    existed, before)."""
    plan = small_run.parent / "plan.toml"
    for n in ("0", "-1"):
        one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run"), "--nproc", n), "--nproc", n)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run"), "--nproc", "3"),
                   "batch_size 4 is not divisible by the world size 3")
    assert not (tmp_path / "run").exists()


def test_an_out_with_a_newline_is_refused_before_anything_is_written(small_run, tmp_path):
    """Issue 25 D16: a run dir whose name holds a newline: the resume command printed after Ctrl-C named another
    dir (and running it started a fresh run there). Refused up front; nothing is made."""
    one_line_error(growlm("train", str(small_run.parent / "plan.toml"), "--out", str(tmp_path / "a\nrun")),
                   "control character")
    assert list(tmp_path.iterdir()) == []


def _interrupted(small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running: int) -> Path:
    """A copy of ``small_run`` whose stage ``running`` was interrupted (Ctrl-C) at step 3, the stages before it
    finished."""
    import growlm.training as tr
    from growlm.training import Interrupted, train

    run = copy_of(small_run, tmp_path / "run")
    for i in range(running, 3):
        shutil.rmtree(run / f"stage-{i}")

    def ctrl_c(where: str, stage: int, step: int, phase: int | None = None) -> None:
        if (where, stage, step) == ("step", running, 3):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tr, "fault_point", ctrl_c)
        with pytest.raises(Interrupted):
            train(run / "plan.json", run, resume=True, progress=False)
    assert (run / "checkpoints" / f"stage-{running}").is_dir()
    return run


@pytest.mark.parametrize("running, edit, needles", [
    (1, lambda p: p["stage"][0].update(lr=0.5), ("checkpoint", "stage-1")),  # the running stage, nothing finished
    (2, lambda p: p["stage"][1].update(lr=0.5), ("stage-1", "stage[2].lr: null -> 0.5")),  # the running stage
    (2, lambda p: p["stage"][0].update(tokens=2560), ("stage-1", "stage[1].tokens: 1280 -> 2560")),  # a finished one
    (2, lambda p: p["train"].update(lr=0.5), ("stage-1", "train.lr: 0.003 -> 0.5")),
])
def test_resume_checks_the_plan_against_what_the_run_recorded(small_run, tmp_path, monkeypatch, running, edit,
                                                              needles):
    """``growlm train RUN/plan.json --out RUN --resume`` after editing RUN/plan.json: the finished stages and the
    running stage's checkpoint record the plan they trained under, so the edit is refused and nothing changes."""
    run = _interrupted(small_run, tmp_path, monkeypatch, running)
    plan = json.loads((run / "plan.json").read_text())
    edit(plan)
    (run / "plan.json").write_text(json.dumps(plan))
    before = snapshot(run)
    one_line_error(growlm("train", str(run / "plan.json"), "--out", str(run), "--resume", "--no-progress"),
                   "another plan", *needles)
    assert snapshot(run) == before


def test_resume_under_the_recorded_plan_finishes_the_run(small_run, tmp_path, monkeypatch):
    run = _interrupted(small_run, tmp_path, monkeypatch, 2)
    r = growlm("train", str(run / "plan.json"), "--out", str(run), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert growlm("verify", str(run)).returncode == 0


@pytest.mark.parametrize("lora, needle", [
    ('{ rank = 2, targets = [] }', "stage[2].lora.targets: an empty list"),
    ('{ rank = 2, targets = ["qkv", "qkv"] }', "stage[2].lora.targets: 'qkv' is listed twice"),
    ('{ rank = 2, blocks = [0, 0] }', "stage[2].lora.blocks: 0 is listed twice"),
    ('{ rank = 2, blocks = [] }', "stage[2].lora.blocks: an empty list"),
    ('{ rank = 2, blocks = [3] }', "stage[2].lora.blocks: block 3 does not exist there (the model has 3 block(s))"),
])
def test_every_stages_lora_table_is_checked_when_the_plan_is_read(corpus_dir, tmp_path, lora, needle):
    """D10: a LoRA table peft cannot build, or one with duplicates, is refused before stage 1 trains."""
    plan = write_plan(tmp_path, SMALL_PLAN.replace('{ rank = 2, blocks = "frozen", targets = ["qkv", "fc"] }', lora),
                      corpus_dir)
    one_line_error(growlm("info", str(plan)), needle)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run")), needle)
    assert not (tmp_path / "run").exists()


def test_lora_on_frozen_blocks_needs_blocks_before_the_stage(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN.replace("[[stage]]\ngrow = 2\n", "[[stage]]\ngrow = 2\nlora = { rank = 2 }\n"),
                      corpus_dir)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run")), "stage[1].lora.blocks", "there are none")


@pytest.mark.parametrize("old, new, needles", [
    ("d_model = 32\nn_heads = 2", "d_model = 30\nn_heads = 2", ("model.d_model", "width 30")),
    ("kind = \"binary\"\nbits = 16", "kind = \"glyph\"\n[substrate.params]\nfont_path = \"train.txt\"",
     ("font_path", "train.txt", "not a font")),
    ("kind = \"binary\"\nbits = 16", "kind = \"glyph\"\n[substrate.params]\nfont_path = \".\"",
     ("font_path", "is a directory")),
    ("context = 32", "context = 32\nrope_theta = 1e-300", ("model.rope_theta", "greater than 1")),
    ("grow = 2\ntokens = 1280", "grow = 2\ntokens = true", ("stage[1].tokens", "valid integer")),
    ('rank = 2, blocks', 'rank = 2, alpha = inf, blocks', ("stage[2].lora.alpha", "finite")),
])
def test_plan_mistakes_are_named_by_their_key(corpus_dir, tmp_path, old, new, needles):
    """D18: each message names the plan key at fault (not a flag `train` lacks), and no install hint for a font
    the user named."""
    assert old in SMALL_PLAN
    plan = write_plan(tmp_path, SMALL_PLAN.replace(old, new, 1), corpus_dir)
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"))
    one_line_error(r, *needles)
    assert "fonts-unifont" not in r.stderr


def test_a_font_that_is_not_a_font_file_is_named_without_an_install_hint(tmp_path, monkeypatch):
    from growlm.errors import GrowlmError
    from growlm.substrate import resolve_font

    (tmp_path / "fonts").mkdir()
    (tmp_path / "notes.txt").write_text("not a font")
    for path, needle in ((tmp_path / "fonts", "not a font file"), (tmp_path / "notes.txt", "not a font Pillow can read")):
        with pytest.raises(GrowlmError, match=needle) as e:
            resolve_font(str(path))
        assert str(path) in str(e.value) and "font_path" in str(e.value) and "fonts-unifont" not in str(e.value)
        monkeypatch.setenv("GROWLM_FONT", str(path))
        with pytest.raises(GrowlmError, match=r"\$GROWLM_FONT"):
            resolve_font(None)
        monkeypatch.delenv("GROWLM_FONT")


def test_a_lora_rank_above_the_width_is_refused_when_the_plan_is_read(corpus_dir, tmp_path):
    """Found by tests/test_fuzz_api.py: rank = 2**40 passed the plan and peft tried to allocate it."""
    plan = write_plan(tmp_path, SMALL_PLAN.replace("rank = 2,", "rank = 1099511627776,"), corpus_dir)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run")), "stage[2].lora.rank", "model.d_model = 32")
