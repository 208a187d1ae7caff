"""Fault injection: bad files, bad input and crashes, through the real CLI.

Every case asserts the exit code, a one-line message that names the problem and where it is (no
traceback), and that what was already written is byte-identical afterwards. The CLI runs in this
process, except where the guarantee needs a real one (kill -9, a resource limit, a lock held by another
process, a child's peak memory). The reference every fault is compared with is the shared ``small_run``
(``SMALL_PLAN`` trained uninterrupted). Rows of the catalogue proven in test_growth.py: kill -9 then
--resume, Ctrl-C, NaN loss, plan key errors, growing on another substrate. See docs/reliability.md for
the whole map.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cli_util import (
    REPO,
    SMALL_PLAN,
    child_env,
    growlm,
    growlm_process,
    one_line_error,
    snapshot,
    tensors_equal,
    write_plan,
)
from conftest import copy_of
from growlm.hashing import sha256_file
from growlm.store.model import block_sha256, recorded_fingerprint_of
from growlm.store.records import ModelRecord
from growlm.training import train

# ----------------------------------------------------------------------------------------------
# crashes


@pytest.mark.process
def test_kill_during_checkpoint_write_uses_previous_checkpoint(corpus_dir, tmp_path, small_run):
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    # kill -9 needs a process of its own; the resume after it runs here
    r = growlm_process("train", plan, "--out", tmp_path / "run", "--no-progress",
                       env={"GROWLM_FAULT": "kill@checkpoint:2:6"})
    assert r.returncode == -9
    ck = tmp_path / "run" / "checkpoints" / "stage-2"
    assert (ck / "step-00000003" / "state.json").is_file()  # the previous checkpoint is complete
    assert not (ck / "step-00000006").exists()  # the interrupted one never appeared under its name
    before = snapshot(tmp_path / "run" / "stage-1")
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "step 3" in r.stdout  # resumed from the last complete checkpoint
    assert snapshot(tmp_path / "run" / "stage-1") == before
    for name in ("model.safetensors", "adapters.safetensors"):
        assert tensors_equal(small_run / "stage-2" / name, tmp_path / "run" / "stage-2" / name)
    assert not list(ck.parent.glob("**/*.tmp"))


@pytest.mark.process
def test_two_runs_on_one_out_dir(corpus_dir, tmp_path, small_run):
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    # the first run is another live process holding the lock; the second runs here
    first = subprocess.Popen([sys.executable, "-m", "growlm", "train", str(plan), "--out", str(tmp_path / "run"),
                              "--no-progress"], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "plan.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    out, err = first.communicate(timeout=120)
    if "already holds a run" in second.stderr:  # the first had finished a stage before the second looked
        one_line_error(second, "--resume")
    else:
        one_line_error(second, "lock")
    assert first.returncode == 0, err
    for name in ("model.safetensors", "adapters.safetensors"):
        assert tensors_equal(small_run / "stage-2" / name, tmp_path / "run" / "stage-2" / name)


@pytest.mark.process
def test_disk_full_leaves_earlier_stages_and_no_partial_files(corpus_dir, tmp_path, small_run):
    sizes = {p: p.stat().st_size for p in small_run.rglob("*") if p.is_file()}
    w1, w2 = (small_run / f"stage-{n}" / "model.safetensors" for n in (1, 2))
    limit_kb = (sizes[w1] + sizes[w2]) // 2 // 1024
    assert all(s < limit_kb * 1024 for p, s in sizes.items() if p.name != "model.safetensors" or p == w1)
    plan = write_plan(tmp_path, SMALL_PLAN.replace("checkpoint_every = 3", "checkpoint_every = 1000"), corpus_dir)
    # a full disk: a file-size limit on a process of its own
    cmd = f"ulimit -f {limit_kb}; exec {sys.executable} -m growlm train {plan} --out {tmp_path / 'run'} --no-progress"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                       env=child_env())
    one_line_error(r, "could not write", "stage-2")
    assert (tmp_path / "run" / "stage-1" / "model.json").is_file()
    assert not (tmp_path / "run" / "stage-2").exists()
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    r = growlm("verify", str(tmp_path / "run" / "stage-1"))
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------
# bad files


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_weights_are_refused_with_the_file_named(tmp_path, small_run, damage):
    model = copy_of(small_run / "stage-1", tmp_path / "m")
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    for args in (("generate", str(model), "--prompt", "The"), ("eval", str(model), "--task", "ppl", "--data",
                                                                  str(REPO / "README.md")), ("verify", str(model))):
        one_line_error(growlm(*args), str(f))


def test_pickle_is_never_unpickled(tmp_path, small_run):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = copy_of(small_run / "stage-1", tmp_path / "m")
    f = model / "model.safetensors"
    f.write_bytes(pickle.dumps(Evil()))
    meta = json.loads((model / "model.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(f)  # even with a matching checksum
    (model / "model.json").write_text(json.dumps(meta))
    one_line_error(growlm("generate", str(model), "--prompt", "The"), "not a valid safetensors file", str(f))
    assert not marker.exists()


def test_merge_mismatch_is_refused_and_nothing_written(corpus_dir, tmp_path, small_run):
    other = SMALL_PLAN.replace('kind = "binary"\nbits = 16', 'kind = "random-bits"\nbits = 16')
    runs = train(write_plan(tmp_path, other, corpus_dir), tmp_path / "other", progress=False)
    r = growlm("merge", str(small_run / "stage-2"), str(runs[-1]), "--out", str(tmp_path / "mix"))
    one_line_error(r, "substrate", str(small_run / "stage-2"))
    assert not (tmp_path / "mix").exists()


# ----------------------------------------------------------------------------------------------
# bad corpora and plans


def test_corpus_errors_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("ok then caf\xe9".encode("latin-1"))
    one_line_error(growlm("tokenizer", "build", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t")),
                   "not found", "nope.txt")
    one_line_error(growlm("tokenizer", "build", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")),
                   "empty", "empty.txt")
    one_line_error(growlm("tokenizer", "build", "--corpus", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "t")),
                   "not UTF-8", "byte offset 11")
    assert not (tmp_path / "t").exists()


def test_training_text_outside_the_vocabulary_is_refused(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN.replace('train = ["train.txt"]\nvalid', 'train = ["greek.txt"]\nvalid'),
                      corpus_dir)
    (tmp_path / "greek.txt").write_text("αβγδεζηθικλμνξοπρστυφχψω " * 400)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress"),
                   "greek.txt", "<unk>")
    assert not list((tmp_path / "run").glob("stage-*"))


def _run_measuring_peak_rss(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in a child and return its own peak resident memory in MB (VmHWM, which unlike
    ru_maxrss does not inherit the test process's high-water mark across fork+exec)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['growlm', *{args!r}]\n"
            "try:\n    runpy.run_module('growlm', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "finally:\n"
            "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
            "    print('VmHWM', hwm, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=child_env())
    hwm = [ln for ln in r.stderr.splitlines() if ln.startswith("VmHWM")][-1].split()[1]
    return r, int(hwm) / 1024


@pytest.mark.process
@pytest.mark.parametrize("megabytes", [8, pytest.param(100, marks=pytest.mark.slow)])
def test_huge_single_line_corpus_stays_bounded(tmp_path, megabytes):
    f = tmp_path / "line.txt"
    with open(f, "w", encoding="utf-8") as fh:
        chunk = "the quick brown fox jumps over the lazy dog " * 1000
        for _ in range(megabytes * 1_000_000 // len(chunk)):
            fh.write(chunk)
    r, peak = _run_measuring_peak_rss(["tokenizer", "build", "--corpus", str(f), "--compact",
                                       "--out", str(tmp_path / "tok")])
    assert (tmp_path / "tok" / "tokenizer.json").is_file(), r.stderr
    assert peak < 600, f"peak RSS {peak:.0f} MB for a {megabytes} MB single line"


def test_plan_path_escaping_to_nowhere_is_refused(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN.replace('valid = ["valid.txt"]', 'valid = ["../../../../nowhere/valid.txt"]'),
                      corpus_dir)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run")), "data.valid[0]", "nowhere")


# ----------------------------------------------------------------------------------------------
# verify


def test_verify_passes_a_clean_run_and_finds_drift(tmp_path, small_run):
    r = growlm("verify", str(small_run))
    assert r.returncode == 0, r.stderr
    assert "lineage of 2 stage(s) ok" in r.stdout
    run = tmp_path / "run"
    copy_of(small_run, run)
    # forge stage-2: change frozen block 0 and rewrite every record so the files look self-consistent
    st2 = run / "stage-2"
    w = load_file(str(st2 / "model.safetensors"))
    w["blocks.0.attn.qkv.weight"] = w["blocks.0.attn.qkv.weight"] + 1e-3
    save_file(w, str(st2 / "model.safetensors"))
    meta = json.loads((st2 / "model.json").read_text())
    meta["blocks"][0]["sha256"] = block_sha256(w, 0)
    meta["files"]["model.safetensors"] = sha256_file(st2 / "model.safetensors")
    adapters = load_file(str(st2 / "adapters.safetensors"))
    meta["fingerprint"] = recorded_fingerprint_of(ModelRecord.model_validate(meta), w, adapters)
    (st2 / "model.json").write_text(json.dumps(meta))
    one_line_error(growlm("verify", str(run)), "frozen tensor", "blocks.0.attn.qkv.weight", "changed")
