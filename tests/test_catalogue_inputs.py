"""Inputs an outside probe found mishandled: outputs that overwrote, special files that hung,
evaluation that read a whole file at once, and mistakes that ended in a traceback.

Every mistake must end in one line ``growlm: error: ...`` with exit code 2 and leave what existed
byte-identical. Cases that need a process of their own (a file-size limit, dropped privileges, a
reader that would block, a peak memory) run the CLI in a child process; the rest run it in this
process (``growlm``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_util import SMALL_PLAN, child_env, growlm, one_line_error, snapshot, write_plan
from conftest import copy_of

# One torch thread: on a shared 2-core machine several threads per child only wait for each other.
ENV = {"OMP_NUM_THREADS": "1"}
# A reader blocked on a FIFO never returns; this turns that hang into a failure.
HANG_S = 60


def error(argv: list, *needles: str) -> None:
    """``growlm ARGV`` fails with exit code 2 and one error line naming every needle."""
    one_line_error(growlm(*argv), *needles)


def ok(argv: list) -> subprocess.CompletedProcess:
    """``growlm ARGV`` succeeds."""
    r = growlm(*argv)
    assert r.returncode == 0, r.stderr
    return r


def unprivileged() -> list[str]:
    """A command prefix under which a read-only dir really is read-only (root ignores modes
    unless it gives up the capability to, which ``setpriv`` does for the child alone)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only dir cannot be simulated")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


# Runs each call in turn in one child (a CLI argv list through cli.main, or a line of Python), so
# a batch of cases pays for one interpreter start; any escaping exception becomes rc 1 + traceback.
_BATCH = r"""
import contextlib, io, json, sys, traceback
from growlm.cli import main
results = []
for call in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(call) if isinstance(call, list) else exec(call) or 0
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append([rc, out.getvalue(), err.getvalue()])
print("RESULTS" + json.dumps(results))
"""


def in_child(calls: list, prefix: list[str] = (), file_limit_kb: int | None = None) -> list[subprocess.CompletedProcess]:
    """The exit code, stdout and stderr of each call, run in one child process under ``prefix`` and, when
    given, a file-size limit (a write past it fails with EFBIG: Python ignores SIGXFSZ). A call
    that blocks fails the test by the timeout instead of hanging it."""
    cmd = [*prefix, sys.executable, "-c", _BATCH, json.dumps([[str(a) for a in c] if isinstance(c, list) else c
                                                             for c in calls])]
    if file_limit_kb is not None:
        cmd = ["bash", "-c", f'ulimit -f {file_limit_kb}; exec "$@"', "bash", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(**ENV), timeout=HANG_S)
    assert r.returncode == 0 and "RESULTS" in r.stdout, r.stderr
    return [subprocess.CompletedProcess(call, *x) for call, x in zip(calls, json.loads(r.stdout.split("RESULTS", 1)[1]),
                                                                      strict=True)]


@pytest.fixture
def read_only(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    (d / "kept.txt").write_text("already here\n")
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# 1. outputs: refuse a non-empty --out unless --overwrite, and replace all or nothing


def _build_args(kind: str, corpus_dir: Path, tok_dir: Path, out: Path, variant: int) -> list[str]:
    """``tokenizer build`` / ``substrate build`` arguments; ``variant`` changes what gets built."""
    if kind == "tokenizer":
        return ["tokenizer", "build", "--corpus", str(corpus_dir / "en.txt"), "--compact",
                "--ngrams", "2,3" if variant == 0 else "2", "--out", str(out)]
    return ["substrate", "build", "--kind", "binary", "--tokenizer", str(tok_dir), "--bits", "16",
            "--dim", "16" if variant == 0 else "32", "--out", str(out)]


@pytest.mark.parametrize("kind", ["tokenizer", "substrate"])
def test_build_refuses_a_non_empty_out_unless_overwrite(kind, corpus_dir, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    ok(_build_args(kind, corpus_dir, tiny_tokenizer_dir, out, 0))
    before = snapshot(tmp_path)
    error(_build_args(kind, corpus_dir, tiny_tokenizer_dir, out, 1), str(out), "--overwrite")
    assert snapshot(tmp_path) == before
    ok(_build_args(kind, corpus_dir, tiny_tokenizer_dir, out, 1) + ["--overwrite"])
    after = snapshot(tmp_path)
    assert set(after) == set(before) and after != before  # replaced in place, nothing left beside it


@pytest.mark.parametrize("kind", ["tokenizer", "substrate"])
def test_build_into_an_empty_dir_is_fine(kind, corpus_dir, tiny_tokenizer_dir, tmp_path):
    (tmp_path / "out").mkdir()
    ok(_build_args(kind, corpus_dir, tiny_tokenizer_dir, tmp_path / "out", 0))
    assert len(list((tmp_path / "out").iterdir())) >= 2


@pytest.mark.parametrize("kind", ["tokenizer", "substrate", "export"])
def test_out_that_is_a_file_is_one_line(kind, corpus_dir, tiny_tokenizer_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a dir\n")
    args = (["export", str(tiny_model_dir), "--out", str(out)] if kind == "export"
            else _build_args(kind, corpus_dir, tiny_tokenizer_dir, out, 0) + ["--overwrite"])
    before = snapshot(tmp_path)
    error(args, str(out))
    assert out.read_text() == "not a dir\n" and snapshot(tmp_path) == before and list(before) == ["taken"]


@pytest.mark.process
def test_outs_in_a_read_only_dir_are_one_line(corpus_dir, tiny_tokenizer_dir, tiny_model_dir, hf_export, read_only):
    run = read_only / "run"  # a run dir (RUN/stage-N) where eval --per-stage cannot write RUN/eval
    read_only.chmod(0o755)
    copy_of(tiny_model_dir, run / "stage-1")
    run.chmod(0o555)
    read_only.chmod(0o555)
    before = snapshot(read_only)
    outs = [read_only / name for name in ("tok", "sub", "export", "imported")]
    calls = [_build_args("tokenizer", corpus_dir, tiny_tokenizer_dir, outs[0], 0),
             _build_args("substrate", corpus_dir, tiny_tokenizer_dir, outs[1], 0),
             ["export", tiny_model_dir, "--out", outs[2]],
             ["import", hf_export, "--out", outs[3]],
             ["eval", run, "--per-stage", "--task", "ppl", "--data", corpus_dir / "valid.txt"]]
    try:
        results = in_child(calls, prefix=unprivileged())
    finally:
        run.chmod(0o755)
    for out, r in zip(outs, results, strict=False):
        one_line_error(r, str(out), "Permission denied")
    one_line_error(results[-1], str(run / "eval"), "Permission denied")
    assert "stage=1" in results[-1].stdout and "loss=" in results[-1].stdout  # the scores still reach the user
    assert snapshot(read_only) == before


SAVE_INTO = {
    "tokenizer": "from growlm.tokenizer import Tokenizer; Tokenizer.load({src!r}).save({out!r})",
    "substrate": ("from growlm.substrate import build_substrate; from growlm.tokenizer import Tokenizer; "
                  "build_substrate('binary', dim=64, tokenizer=Tokenizer.load({src!r}), bits=16).save({out!r})"),
}


@pytest.mark.process
def test_a_full_disk_never_leaves_a_partial_file(corpus_dir, tiny_tokenizer_dir, tmp_path):
    kinds = ("tokenizer", "substrate")
    built = {k: tmp_path / f"built-{k}" for k in kinds}
    for k in kinds:
        ok(_build_args(k, corpus_dir, tiny_tokenizer_dir, built[k], 0))
        (tmp_path / f"save-{k}").mkdir()
    before = snapshot(tmp_path)
    calls = [_build_args(k, corpus_dir, tiny_tokenizer_dir, built[k], 1) + ["--overwrite"] for k in kinds]
    calls += [SAVE_INTO[k].format(src=str(tiny_tokenizer_dir), out=str(tmp_path / f"save-{k}")) for k in kinds]
    results = in_child(calls, file_limit_kb=4)
    for k, r in zip(kinds, results[:2], strict=True):  # --overwrite: the old dir stays whole
        one_line_error(r, "could not write", str(built[k]))
    for k, r in zip(kinds, results[2:], strict=True):  # save: no half-written file
        assert r.returncode != 0 and "could not write" in r.stderr, r.stderr
        out = tmp_path / f"save-{k}"
        assert all(f.stat().st_size < 4096 and not f.name.startswith(".") for f in out.iterdir())
        assert not (out / ("tokenizer.json" if k == "tokenizer" else "substrate.safetensors")).exists()
    def built_dirs(snap: dict[str, str]) -> dict[str, str]:
        return {f: h for f, h in snap.items() if f.startswith("built-")}

    assert built_dirs(snapshot(tmp_path)) == built_dirs(before) and len(built_dirs(before)) > 4


# ----------------------------------------------------------------------------------------------
# 2. special files: refused by name, never read (a FIFO would block forever)


@pytest.fixture
def fifo(tmp_path) -> Path:
    f = tmp_path / "fifo.txt"
    os.mkfifo(f)
    return f


@pytest.mark.process
def test_fifos_as_input_files_are_refused_by_name(fifo, corpus_dir, tiny_model_dir, tmp_path):
    calls = [["tokenizer", "build", "--corpus", fifo, "--out", tmp_path / "tok"],
             ["eval", tiny_model_dir, "--task", "ppl", "--data", fifo],
             ["eval", tiny_model_dir, "--task", "arc_easy", "--data", fifo]]
    for key in ("train", "valid"):
        d = tmp_path / key
        d.mkdir()
        plan = write_plan(d, SMALL_PLAN.replace(f'{key} = ["{key}.txt"]', f'{key} = ["fifo.txt"]'), corpus_dir)
        os.mkfifo(d / "fifo.txt")
        calls.append(["train", plan, "--out", d / "run", "--no-progress"])
    for r in in_child(calls):
        one_line_error(r, "fifo.txt", "FIFO")
    assert not (tmp_path / "tok").exists()


# ----------------------------------------------------------------------------------------------
# 3. perplexity: streamed in bounded memory, same values, <unk> share reported


@pytest.fixture(scope="module")
def flat_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A 0-block model: embedding, final norm and head only, so scoring megabytes takes seconds."""
    from growlm.model import GrowLM, ModelConfig
    from growlm.store.model import save_model
    from growlm.substrate import build_substrate
    from growlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_tokenizer_dir)
    sub = build_substrate("binary", dim=16, tokenizer=tok, bits=16)
    torch.manual_seed(0)
    model = GrowLM(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=1, n_layers=0, context=1024,
                               embed_dim=16))
    with torch.no_grad():
        model.embed.weight.copy_(sub.table)
    out = tmp_path_factory.mktemp("flat") / "model"
    save_model(model, out, tokenizer_dir=tiny_tokenizer_dir,
               substrate={"kind": sub.kind, "fingerprint": sub.fingerprint, "recipe": sub.recipe})
    return out


@pytest.mark.process
def test_ppl_of_a_huge_single_line_stays_bounded(flat_model_dir, corpus_dir, tmp_path):
    big = tmp_path / "line.txt"
    chunk = "the quick brown fox jumps over the lazy dog " * 1000
    with open(big, "w", encoding="utf-8") as fh:
        for _ in range(3_000_000 // len(chunk)):
            fh.write(chunk)
    # One child runs the CLI twice: a small file first (imports, model, allocator warmed up), then the
    # big one; only the growth of the peak between the two is the file's doing.
    code = ("import sys\nfrom growlm.cli import main\n"
            "def hwm():\n"
            "    return int([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]) // 1024\n"
            f"assert main(['eval', {str(flat_model_dir)!r}, '--task', 'ppl', '--data', {str(corpus_dir / 'valid.txt')!r}]) == 0\n"
            "small = hwm()\n"
            f"assert main(['eval', {str(flat_model_dir)!r}, '--task', 'ppl', '--data', {str(big)!r}, '--json']) == 0\n"
            "print('GROWTH', hwm() - small, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(**ENV),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n_bytes"] > 2_900_000 and math.isfinite(res["loss"])
    growth = int(r.stderr.split("GROWTH")[-1])
    # reading the file whole grew the peak by about 60 MB per MB of text (~180 MB here); streamed, ~15 MB
    assert growth < 60, f"peak memory grew {growth} MB for a 3 MB single line"


def test_streamed_ppl_equals_scoring_the_whole_text(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    import growlm.evaluation.ppl
    from growlm.evaluation.ppl import perplexity, score_windows, windows
    from growlm.loading import load_any

    model, tok = load_any(tiny_model_dir)
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    monkeypatch.setattr(growlm.evaluation.ppl, "_CHUNK_CHARS", 97)  # many pieces, cut inside lines and characters' runs
    res = perplexity(model, tok, [f, "a short string text"], batch_size=3)
    # the whole-text computation: every text encoded at once, every window scored
    nll = n_tok = n_bytes = n_chars = 0
    for t in (text, "a short string text"):
        ids = tok.encode(t)
        ws = windows(ids, model.cfg.context, model.cfg.context // 2)
        nll += sum(score_windows(model, ws, 3))
        n_tok += len(ids) - 1
        n_bytes += len(t.encode()) - len(tok.decode(ids[:1]).encode())
        n_chars += len(t) - len(tok.decode(ids[:1]))
    assert res["n_tokens"] == n_tok and res["n_bytes"] == n_bytes and res["n_chars"] == n_chars and res["n_texts"] == 2
    assert res["loss"] == pytest.approx(nll / n_tok, rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)
    assert res["bits_per_char"] == pytest.approx(nll / math.log(2) / n_chars, rel=1e-6)
    assert res["unk_rate"] == 0.0


def test_eval_reports_and_warns_about_unknown_characters(tiny_model_dir, corpus_dir, tmp_path):
    odd = tmp_path / "greek.txt"
    odd.write_text("Καλημέρα κόσμε, ένα μοντέλο μεγαλώνει. " * 20, encoding="utf-8")  # no Greek in the corpus
    r = ok(["eval", tiny_model_dir, "--task", "ppl", "--data", odd, "--json"])
    assert 0.5 < json.loads(r.stdout)["unk_rate"] <= 1.0
    assert r.stderr.startswith("growlm: warning:") and "<unk>" in r.stderr and len(r.stderr.splitlines()) == 1
    r = ok(["eval", tiny_model_dir, "--task", "ppl", "--data", corpus_dir / "valid.txt", "--json"])
    assert json.loads(r.stdout)["unk_rate"] == 0.0 and "warning" not in r.stderr


# ----------------------------------------------------------------------------------------------
# 4. one line, never a traceback


@pytest.mark.parametrize("ngrams", ["abc", "0", "", "2,x"])
def test_bad_ngrams_are_one_line(ngrams, corpus_dir, tmp_path):
    error(["tokenizer", "build", "--corpus", corpus_dir / "en.txt", "--ngrams", ngrams, "--out", tmp_path / "tok"],
          "n-gram")
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "-3"], "--top-k"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
])
def test_bad_generate_options_are_one_line(args, needle, tiny_model_dir):
    error(["generate", tiny_model_dir, "--prompt", "The", *args], needle)


def test_zero_new_tokens_prints_the_prompt(tiny_model_dir):
    assert ok(["generate", tiny_model_dir, "--prompt", "The fox", "--max-new-tokens", "0"]).stdout == "The fox\n"


@pytest.mark.parametrize("args,needle", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--runs", "0"], "--runs"),
])
def test_bad_eval_counts_are_one_line(args, needle, tiny_model_dir, corpus_dir):
    error(["eval", tiny_model_dir, "--task", "ppl", "--data", corpus_dir / "valid.txt", *args], needle)


@pytest.mark.parametrize("task", ["ppl", "arc_easy"])
def test_symlink_loops_are_one_line(task, tiny_model_dir, corpus_dir, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    error(["eval", tiny_model_dir, "--task", task, "--data", loop], str(loop))
    error(["eval", loop, "--task", "ppl", "--data", corpus_dir / "valid.txt"], str(loop))


@pytest.mark.parametrize("delta", [5, -5])
def test_import_with_an_edited_vocab_size_is_one_line(delta, hf_export, tmp_path):
    hf = copy_of(hf_export, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vocab_size"] += delta
    (hf / "config.json").write_text(json.dumps(cfg))
    error(["import", hf, "--out", tmp_path / "imported"], "vocab_size", "embed_in")
    assert not (tmp_path / "imported").exists()


def test_an_unanticipated_os_error_is_one_line(monkeypatch, tmp_path):
    import growlm.inspection

    def boom(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(growlm.inspection, "info_model", boom)
    error(["info", tmp_path / "m"], "Permission denied", str(tmp_path / "m"))
