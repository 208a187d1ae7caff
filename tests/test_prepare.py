"""``growlm data prepare`` (issue 28): token shards made ahead on datatrove, and training that reads them.

One multi-source prepare (2 local workers) is shared by the module; a prepare killed with SIGKILL midway resumes
to the same shards; the prepared stream is the per-file cache's stream, so training gives the same batches and
the same weights (and resumes a killed run bit-identically); bad prepared data is refused in one line before
step 1; Slurm runs through datatrove's real executor with sbatch and scontrol faked; Ray (slow) in local mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_util import (
    SMALL_PLAN,
    child_env,
    growlm,
    growlm_process,
    one_line_error,
    snapshot,
    tensors_equal,
    write_plan,
)
from growlm import data
from growlm.data import Batches, Source, tokenize_file, validation_batches
from growlm.hashing import sha256_file
from growlm.prepare import held_out, prepare
from growlm.shards import read_manifest
from growlm.tokenizer import Tokenizer

DOCS = [f"Document {i}: the quick brown fox, Модель растёт слой за слоем {i % 7}." for i in range(120)]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def sources(artefacts, corpus_dir) -> Path:
    """Four sources of three kinds: a text file, JSONL, parquet (several row groups) and another text file."""
    def build(d: Path) -> None:
        d.mkdir()
        shutil.copy(corpus_dir / "train.txt", d / "a.txt")
        (d / "b.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS[:60]),
                                   encoding="utf-8")
        pq.write_table(pa.table({"text": DOCS[60:], "id": list(range(60))}), d / "c.parquet", row_group_size=16)
        shutil.copy(corpus_dir / "en.txt", d / "d.txt")

    return artefacts.get("prepare-sources", build)


def source_files(sources: Path) -> list[Path]:
    return [sources / n for n in ("a.txt", "b.jsonl", "c.parquet", "d.txt")]


@pytest.fixture(scope="session")
def prepared(artefacts, sources, tiny_tokenizer_dir) -> Path:
    """The four sources prepared by the command line with 2 local workers (one task per source)."""
    return artefacts.get("prepared", lambda d: growlm("data", "prepare", *source_files(sources), "--tokenizer",
                                                      tiny_tokenizer_dir, "--out", d, "--workers", "2", check=True))


@pytest.fixture(scope="session")
def prepared_train(artefacts, corpus_dir, tiny_tokenizer_dir) -> Path:
    """``train.txt`` alone prepared (what SMALL_PLAN trains on); tests/test_distributed.py shares it."""
    return artefacts.get("prepared-train", lambda d: prepare([corpus_dir / "train.txt"], tiny_tokenizer_dir, d,
                                                             workers=1, log=lambda _: None))


def shard_digests(d: Path) -> dict[str, str]:
    m = read_manifest(d)
    return {s.file: s.sha256 for split in m.splits.values() for s in split.shards}


def per_file_stream(files, tok, cache) -> np.ndarray:
    return np.concatenate([tokenize_file(f, tok, cache) for f in files])


def prepared_stream(d: Path, split: str = "train") -> np.ndarray:
    m = read_manifest(d)
    return np.concatenate([np.fromfile(d / s.file, dtype=np.uint16) for s in m.splits[split].shards])


# ----------------------------------------------------------------------------------------------
# what prepare writes


def test_prepared_stream_is_the_per_file_stream_and_the_manifest_records_it(prepared, sources, tok, tmp_path,
                                                                            tiny_tokenizer_dir):
    files = source_files(sources)
    assert np.array_equal(prepared_stream(prepared), per_file_stream(files, tok, tmp_path))
    m = read_manifest(prepared)
    assert m.tokenizer.fingerprint == tok.fingerprint and m.token_bytes == 2 and m.options.tasks == 4
    assert [s.path for s in m.sources] == [str(f) for f in files]
    for s, f in zip(m.sources, files, strict=True):  # one part each: its hash is the file's sha256
        assert [(p.start, p.end, p.sha256) for p in s.parts] == [(0, f.stat().st_size, sha256_file(f))]
    for rec in m.splits["train"].shards:
        assert sha256_file(prepared / rec.file) == rec.sha256
        assert (prepared / rec.file).stat().st_size == 2 * rec.tokens
    assert m.totals.tokens == m.splits["train"].tokens == sum(s.tokens for s in m.splits["train"].shards)
    assert m.splits["train"].documents == 2 + len(DOCS)  # a text file is one document, a row or line is one
    assert m.command.startswith("growlm data prepare ") and "--workers 2" in m.command


def test_parts_inside_files_keep_the_stream(sources, tok, tmp_path, tiny_tokenizer_dir):
    """Text cut after whitespace, JSONL at line starts, parquet between row groups: many tasks, the same tokens,
    whatever the number of workers."""
    files = source_files(sources)[:3]
    one = prepare(files, tiny_tokenizer_dir, tmp_path / "one", workers=1, part_bytes=3000, log=lambda _: None)
    two = prepare(files, tiny_tokenizer_dir, tmp_path / "two", workers=2, part_bytes=3000, log=lambda _: None)
    m = read_manifest(one)
    assert m.options.tasks >= 9 and len({p.file for s in m.sources for p in s.parts}) == 1
    assert [len(s.parts) > 1 for s in m.sources] == [True, True, True]
    assert np.array_equal(prepared_stream(one), per_file_stream(files, tok, tmp_path / "cache"))
    assert shard_digests(one) == shard_digests(two)
    assert m.sources[0].sha256 != sha256_file(files[0])  # a content hash over its parts
    assert [s.sha256 for s in m.sources] == [s.sha256 for s in read_manifest(two).sources]


def test_valid_fraction_and_shuffle(sources, tok, tmp_path, tiny_tokenizer_dir):
    jsonl = source_files(sources)[1]
    d = prepare([jsonl], tiny_tokenizer_dir, tmp_path / "d", workers=1, shuffle=True, valid_fraction=0.3,
                part_bytes=1500, log=lambda _: None)
    again = prepare([jsonl], tiny_tokenizer_dir, tmp_path / "again", workers=2, shuffle=True, valid_fraction=0.3,
                    part_bytes=1500, log=lambda _: None)
    assert shard_digests(d) == shard_digests(again)  # deterministic, whatever the workers
    held = [t for t in DOCS[:60] if held_out(t, 0.3)]
    assert 0 < len(held) < 60
    def documents(stream: np.ndarray) -> list[list[int]]:
        return [list(x) for x in np.split(stream, np.flatnonzero(stream == tok.eos_id)[:-1] + 1)]

    def encoded(texts: list[str]) -> list[list[int]]:
        return [[*tok.encode(t), tok.eos_id] for t in texts]

    valid, train = prepared_stream(d, "valid"), prepared_stream(d, "train")
    kept = [t for t in DOCS[:60] if not held_out(t, 0.3)]
    assert sorted(documents(valid)) == sorted(encoded(held))
    assert sorted(documents(train)) == sorted(encoded(kept)) and documents(train) != encoded(kept)  # shuffled
    vb = validation_batches([d], tok, context=8, batch_size=2, cache_dir=tmp_path)
    assert np.array_equal(vb[0][0][0].numpy(), valid[:8])


@pytest.mark.process
def test_kill_midway_resumes_to_the_same_shards(prepared, sources, tiny_tokenizer_dir, tmp_path):
    """SIGKILL in the middle of task 3's shard (1 worker); the rerun (2 workers) keeps tasks 1-2 and gives the
    shards of an uninterrupted prepare. The half-written shard never appears under its name."""
    out = tmp_path / "DATA"
    args = ["data", "prepare", *source_files(sources), "--tokenizer", tiny_tokenizer_dir, "--out", out]
    # its own session: datatrove's local executor keeps a multiprocess Manager process, which a kill -9 of the
    # command leaves behind holding the output pipes; the whole group goes, as a scheduler's kill would take it
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "growlm", *map(str, args), "--workers", "1"], stdout=log,
                             stderr=subprocess.STDOUT, env=child_env(GROWLM_FAULT="kill@prepare:2:1"),
                             start_new_session=True)
        rc = p.wait(timeout=120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == -9, (tmp_path / "log").read_text()
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "train").iterdir() if not p.name.startswith(".")) == ["00000.u16", "00001.u16"]
    assert [p.name for p in (out / "train").iterdir() if p.name.startswith(".00002.u16")]  # the killed temp file
    assert sorted(p.name for p in (out / "datatrove" / "completions").iterdir()) == ["00000", "00001"]
    one_line_error(_train(tmp_path, tiny_tokenizer_dir, out), "not finished preparing")
    kept = {n: (out / "train" / n).stat() for n in ("00000.u16", "00001.u16")}
    r = growlm(*args, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert shard_digests(out) == shard_digests(prepared)
    for n, st in kept.items():  # completed tasks are not run again
        now = (out / "train" / n).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]  # the temp file is gone
    r = growlm(*args)
    assert r.returncode == 0 and "already prepared" in r.stdout


def test_a_changed_tokenizer_or_source_is_refused(sources, tiny_tokenizer_dir, foreign_tokenizer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in source_files(sources)[:2]:
        shutil.copy(f, src / f.name)
    args = ["data", "prepare", src, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "DATA"]
    assert growlm(*args).returncode == 0
    before = snapshot(tmp_path / "DATA")
    (tmp_path / "DATA" / "manifest.json").rename(tmp_path / "manifest.json")  # unfinished again: resumable
    r = growlm("data", "prepare", src, "--tokenizer", foreign_tokenizer, "--out", tmp_path / "DATA")
    one_line_error(r, "another tokenizer", "new --out")
    with open(src / "b.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    one_line_error(growlm(*args), "b.jsonl changed since")
    (tmp_path / "manifest.json").rename(tmp_path / "DATA" / "manifest.json")
    one_line_error(growlm(*args), "already prepared, and not by this command", "b.jsonl changed")
    assert snapshot(tmp_path / "DATA") == before  # nothing was mixed in


@pytest.mark.parametrize("case", ["missing", "not-json", "empty", "fraction", "no-sbatch", "bad-line", "folder"])
def test_bad_prepare_input_is_one_line(case, sources, tiny_tokenizer_dir, tmp_path, monkeypatch):
    src, extra, needles = [str(source_files(sources)[0])], [], []
    if case == "missing":
        src, needles = [str(tmp_path / "nope*.jsonl")], ["matches no file"]
    elif case == "not-json":
        src, needles = [str(tmp_path / "absent.txt")], ["source not found"]
    elif case == "empty":
        (tmp_path / "e.txt").write_bytes(b"")
        src, needles = [str(tmp_path / "e.txt")], ["data file is empty"]
    elif case == "fraction":
        extra, needles = ["--valid-fraction", "1.5"], ["--valid-fraction"]
    elif case == "no-sbatch":
        monkeypatch.setenv("PATH", str(tmp_path))
        extra, needles = ["--executor", "slurm", "--partition", "p"], ["sbatch"]
    elif case == "bad-line":
        (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
        src, needles = [str(tmp_path / "x.jsonl")], ["bad JSON on line 2", "x.jsonl"]
    else:
        (tmp_path / "empty-folder").mkdir()
        src, needles = [str(tmp_path / "empty-folder")], ["holds no"]
    r = growlm("data", "prepare", *src, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "DATA", *extra)
    one_line_error(r, *needles)
    assert not (tmp_path / "DATA" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------
# training reads it


def test_same_tokens_same_batches(prepared, sources, tok, tmp_path):
    """A prepared folder and the per-file cache of its sources give the same batches, every rank its rows,
    and resume from the same counters."""
    files = source_files(sources)
    kw = dict(context=16, batch_size=4, seed=3, cache_dir=tmp_path)
    a = Batches([Source([prepared], 2.0), Source([files[0]], 1.0)], tok, **kw)
    b = Batches([Source(files, 2.0), Source([files[0]], 1.0)], tok, **kw)
    for _ in range(5):
        xa, ya = a.next()
        xb, yb = b.next()
        assert xa.equal(xb) and ya.equal(yb)
    assert a.state_dict() == b.state_dict()
    r1 = Batches([Source([prepared], 2.0), Source([files[0]], 1.0)], tok, rank=1, world_size=2, **kw)
    r1.load_state_dict(a.state_dict())
    x, _ = a.next()
    assert r1.next()[0].equal(x[1::2])


def test_a_large_source_is_ordered_without_a_table(prepared, tok, tmp_path, monkeypatch):
    """Above MATERIALISE_MAX sequences a source's epoch order is a keyed Feistel permutation, computed index by
    index: each epoch still visits every sequence once, deterministically, and resumes from the counters."""
    monkeypatch.setattr(data, "MATERIALISE_MAX", 0)
    for n in (1, 2, 1000, 1001, 4099):
        perm = data.permute(np.arange(n), n, key=7)
        assert sorted(perm.tolist()) == list(range(n))
        assert np.array_equal(data.permute(np.arange(n)[::-1], n, key=7), perm[::-1])
    assert not np.array_equal(data.permute(np.arange(4099), 4099, key=8), perm)
    b = Batches([Source([prepared])], tok, context=16, batch_size=5, seed=0, cache_dir=tmp_path)
    n = b.n_sequences
    seen = [i for _ in range(n // 5 * 2) for _ in [b.next()] for _, i in b.last_sequence_ids]
    assert sorted(seen[:n // 5 * 5]) != seen[:n // 5 * 5]
    assert len(set(seen[:n])) == min(n, len(seen))  # an epoch visits each sequence once
    state = b.state_dict()
    r = Batches([Source([prepared])], tok, context=16, batch_size=5, seed=0, cache_dir=tmp_path)
    r.load_state_dict(state)
    assert r.next()[0].equal(b.next()[0])


def prepared_plan(data_dir: Path) -> str:
    """SMALL_PLAN training on a prepared folder instead of train.txt."""
    return SMALL_PLAN.replace('train = ["train.txt"]', f'train = ["{data_dir}"]')


def _train(tmp: Path, tokenizer: Path, data_dir: Path, **kw) -> object:
    """``growlm train`` (in this process) of a one-stage plan over ``data_dir`` with the tokenizer dir given."""
    plan = tmp / "bad-plan.toml"
    plan.write_text(f"""[substrate]\nkind = "binary"\nbits = 16\n[tokenizer]\ndir = "{tokenizer}"\n[model]
d_model = 16\nn_heads = 2\ncontext = 16\n[data]\ntrain = ["{data_dir}"]\n[train]\nbatch_size = 2\n
[[stage]]\ngrow = 1\ntokens = 64\n""")
    shutil.rmtree(tmp / "bad-run", ignore_errors=True)
    return growlm("train", plan, "--out", tmp / "bad-run", "--no-progress", **kw)


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "tokenizer", "source", "touched"])
def test_bad_prepared_data_is_refused_before_step_1(damage, sources, tiny_tokenizer_dir, foreign_tokenizer, tmp_path):
    src = tmp_path / "b.jsonl"
    shutil.copy(source_files(sources)[1], src)
    d = prepare([src], tiny_tokenizer_dir, tmp_path / "DATA", part_bytes=2000, log=lambda _: None)
    shard = d / read_manifest(d).splits["train"].shards[1].file
    tokenizer, needles = tiny_tokenizer_dir, []
    if damage == "missing":
        shard.unlink()
        needles = ["is missing", shard.name]
    elif damage == "truncated":
        os.truncate(shard, shard.stat().st_size - 2)
        needles = ["truncated", shard.name]
    elif damage == "flipped":
        b = bytearray(shard.read_bytes())
        b[5] ^= 1
        shard.write_bytes(bytes(b))
        needles = ["does not match", shard.name]
    elif damage == "tokenizer":
        tokenizer, needles = foreign_tokenizer, ["another tokenizer"]
    elif damage == "source":
        src.write_text(src.read_text().replace("fox", "cat"))
        needles = ["b.jsonl changed since"]
    else:  # a source whose mtime moved but whose bytes did not: hashed again, and accepted
        os.utime(src, ns=(1, 1))
    r = _train(tmp_path, tokenizer, d)
    if damage == "touched":
        assert r.returncode == 0, r.stderr
        return
    one_line_error(r, *needles)
    assert not (tmp_path / "bad-run" / "stage-1").exists() and not (tmp_path / "bad-run" / "metrics.jsonl").exists()


@pytest.mark.process
def test_training_from_prepared_data_equals_the_per_file_run_and_resumes_bit_identically(
        corpus_dir, prepared_train, small_run, tmp_path):
    """SMALL_PLAN over the prepared train.txt, killed in stage 2 and resumed: bit-identical to the per-file run."""
    plan = write_plan(tmp_path, prepared_plan(prepared_train), corpus_dir)
    killed = growlm_process("train", plan, "--out", tmp_path / "run", "--no-progress",
                            env={"GROWLM_FAULT": "kill@step:2:7"})
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "run" / "stage-1").is_dir() and not (tmp_path / "run" / "stage-2").exists()
    r = growlm("train", plan, "--out", tmp_path / "run", "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    for n, name in ((1, "model.safetensors"), (2, "model.safetensors"), (2, "adapters.safetensors")):
        assert tensors_equal(small_run / f"stage-{n}" / name, tmp_path / "run" / f"stage-{n}" / name)


# ----------------------------------------------------------------------------------------------
# other executors


def _fake(bin_dir: Path, name: str, body: str) -> None:
    f = bin_dir / name
    f.write_text("#!/bin/sh\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IXUSR)


def test_slurm_submits_an_array_and_a_manifest_job_that_datatrove_runs(prepared, sources, tiny_tokenizer_dir,
                                                                       tmp_path, monkeypatch):
    """No cluster here: sbatch and scontrol are stand-ins that record what datatrove submits. The job script is
    checked, then each array task and the manifest job run here as Slurm would start them (datatrove's own
    SlurmPipelineExecutor.run with SLURM_ARRAY_TASK_ID set): the shards equal the local prepare's. Not run:
    a real sbatch, srun and a shared filesystem across nodes."""
    import dill

    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    _fake(bin_dir, "sbatch", f'n=$(ls {jobs} | wc -l); n=$((n + 1)); mkdir {jobs}/$n; echo "$@" > {jobs}/$n/args\n'
                             f'for a; do last=$a; done; cp "$last" {jobs}/$n/script; echo "Submitted batch job $((100 + n))"\n')
    _fake(bin_dir, "scontrol", 'echo localhost\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "DATA"
    r = growlm("data", "prepare", *source_files(sources), "--tokenizer", tiny_tokenizer_dir, "--out", out,
               "--executor", "slurm", "--partition", "cpu", "--time", "02:00:00", "--workers", "3")
    assert r.returncode == 0, r.stderr
    assert "Slurm job 101" in r.stdout and not (out / "manifest.json").exists()
    submitted = sorted(jobs.iterdir(), key=lambda p: int(p.name))
    scripts = [(p / "script").read_text() for p in submitted]
    args = [(p / "args").read_text() for p in submitted]
    array, stats, manifest_job = scripts[0], scripts[1], scripts[2]
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=cpu", "#SBATCH --time=02:00:00",
                 "#SBATCH --cpus-per-task=1", f"launch_pickled_pipeline {out / 'datatrove' / 'executor.pik'}"):
        assert line in array, line
    assert "--qos" not in array and f"export PATH={Path(os.sys.executable).parent}:$PATH" in array
    assert "merge_stats" in stats
    assert "--dependency=afterok:101" in args[2] and "#SBATCH --array=0-0" in manifest_job
    assert f"launch_pickled_pipeline {out / 'datatrove' / 'manifest' / 'executor.pik'}" in manifest_job
    # what the cluster would do: each array task, then the manifest job
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    for pik, n in ((out / "datatrove" / "executor.pik", 4), (out / "datatrove" / "manifest" / "executor.pik", 1)):
        for i in range(n):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            with open(pik, "rb") as f:
                dill.load(f).run()
    assert shard_digests(out) == shard_digests(prepared)


@pytest.mark.slow
def test_ray_local_mode(prepared, sources, tiny_tokenizer_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = growlm("data", "prepare", *source_files(sources), "--tokenizer", tiny_tokenizer_dir, "--out",
                   tmp_path / "DATA", "--executor", "ray", "--workers", "2")
    finally:
        ray.shutdown()
    assert r.returncode == 0, r.stderr
    assert shard_digests(tmp_path / "DATA") == shard_digests(prepared)


def test_an_out_path_that_is_a_symlink_loop_is_one_line(sources, tiny_tokenizer_dir, tmp_path):
    """Found by tests/test_fuzz.py: resolving --out raised RuntimeError through to a traceback."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    r = growlm("data", "prepare", str(sources), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "loop"))
    one_line_error(r, "--out", "unusable path")
