"""Adversarial, property-based tests of evaluation's inputs (hypothesis; the profiles of test_fuzz.py).

- The lm-eval plug-in (``--model growlm``), called in this process as lm-eval calls it: requests whose
  contexts and continuations are odd unicode, empty or far longer than the model's context, with odd
  ``gen_kwargs``; and ``--model_args`` as lm-eval's CLI parses them. Property: valid results (one per
  request, of the type lm-eval expects) or one clean one-line ``GrowlmError``; never another exception.
- ``evals.jsonl``, the sidecar of saved results: torn lines, non-JSON, bytes that are no UTF-8, records
  of the wrong types, huge numbers, NaN, a directory or a FIFO in its place. Property: ``growlm info``,
  ``export`` and ``eval --save`` work or end in one error line; the card's front matter is YAML and its
  markdown holds no markup but its own; a save never loses a result that was readable before it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from conftest import copy_of
from test_fuzz import budget, check_outcome, note, run_cli, scalars

# ----------------------------------------------------------------------------------------------
# Texts

ODD = ["", " ", "   ", "\n", "\n\n", "\t", "\r\n", "\x00", "\ud800", "\udfff", "\u202e", "\ufeff", "\u2028", "\x85",
       "<s>", "</s>", "<pad>", "<unk>", "👩\u200d👩\u200d👧", "e\u0301", "Ω≈ç√", "Модель", "我们", "\x1b[31m", "|", "`"]
texts = st.one_of(
    st.sampled_from(ODD),
    st.text(max_size=24),
    st.lists(st.sampled_from([*ODD, "a", " word", "Answer:"]), max_size=8).map("".join),
    # longer than the tiny model's 128-token context
    st.builds(lambda s, n: s * n, st.sampled_from(["word ", "Модель ", "x", "<s>", " "]), st.integers(40, 400)),
)


# ----------------------------------------------------------------------------------------------
# The lm-eval plug-in


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model (context 128) as ``--model growlm``, batching three requests at a time."""
    pytest.importorskip("lm_eval")  # the plug-in's tests need it (setup.sh installs it); the card's do not
    from growlm.lm_eval_model import GrowlmLM

    return GrowlmLM(str(tiny_model_dir), batch_size=3, device="cpu")


def clean_or_valid(call, check, what: str) -> None:
    """``call()`` returns a result that passes ``check``, or raises one one-line ``GrowlmError``."""
    from growlm.errors import GrowlmError

    try:
        out = call()
    except GrowlmError as e:
        note(f"refused: {e}")
        event(f"{what}: refused")
        assert str(e).strip() and "\n" not in str(e), repr(str(e))
        return
    event(f"{what}: done")
    check(out)


gen_kwargs = st.fixed_dictionaries({}, optional={
    "until": st.one_of(st.none(), texts, st.lists(texts, max_size=3), st.sampled_from([[1], 5, {"a": 1}, [None]])),
    "max_gen_toks": st.sampled_from([1, 2, 4, 0, -1, "abc", "3", 2.0, 1.5, 10**9, True, None, math.inf, [4]]),
    "do_sample": st.sampled_from([False, False, True]),
})


REQUESTS = {"loglikelihood": st.tuples(texts, texts), "loglikelihood_rolling": st.tuples(texts),
            "generate_until": st.tuples(texts, gen_kwargs)}


def check_results(kind: str, n: int, out: list) -> None:
    """One result per request, of the type lm-eval expects of ``kind``."""
    assert isinstance(out, list) and len(out) == n, out
    for r in out:
        if kind == "loglikelihood":
            logp, greedy = r
            assert isinstance(greedy, bool) and math.isfinite(logp) and logp <= 1e-4, r
        elif kind == "loglikelihood_rolling":
            assert math.isfinite(r) and r <= 1e-4, r
        else:
            assert isinstance(r, str), r


@budget(15)
@given(data=st.data())
def test_fuzz_lm_eval_requests(lm, data):
    """A batch of each output type per example (lm-eval hands a model one type at a time)."""
    from lm_eval.api.instance import Instance

    for kind, args in REQUESTS.items():
        batch = data.draw(st.lists(args, min_size=1, max_size=4), label=kind)
        note(f"{kind}: {batch!r}"[:2000])
        requests = [Instance(kind, {}, a, i, metadata=("fuzz", i, 1)) for i, a in enumerate(batch)]
        clean_or_valid(lambda: getattr(lm, kind)(requests, disable_tqdm=True),  # noqa: B023 (called at once)
                       lambda out: check_results(kind, len(batch), out), kind)  # noqa: B023


odd_values = st.one_of(
    st.sampled_from(["", "/nonexistent", "x" * 5000, "a\x00b", "CORPUS", "auto", "auto:4", "cuda", "cuda:99",
                     "cuda:x", "bogus", "meta", "mps", "abc", "0", "-3", "1.5", "true", "None", "[1, 2]"]),
    scalars, st.none(), st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)
# mostly what a user writes, each key sometimes with an odd value, sometimes an unknown key
model_args = st.builds(
    lambda usual, odd: usual | odd,
    st.fixed_dictionaries({"path": st.just("MODEL")}, optional={"batch_size": st.sampled_from([1, 2, "3", "auto"]),
                                                                 "device": st.just("cpu"),
                                                                 "max_gen_toks": st.sampled_from([1, 16, "8"])}),
    st.dictionaries(st.sampled_from(["path", "batch_size", "device", "max_gen_toks", "max_batch_size", "pth", "",
                                     "a\nb", "pretrained"]), odd_values, max_size=1),
)
# what lm-eval's CLI passes besides --model_args (its defaults: batch size 1 on cuda:0)
cli_flags = st.fixed_dictionaries({"batch_size": st.sampled_from([1, 1, 4, "auto", "auto:2", 0, "x"]),
                                   "max_batch_size": st.sampled_from([None, 8]),
                                   "device": st.sampled_from(["cuda:0", "cuda:0", "cpu", None, "bogus"])})


@budget(25)
@given(args=model_args, flags=cli_flags)
def test_fuzz_lm_eval_model_args(tiny_model_dir, corpus_dir, args, flags):
    """``--model_args`` as a JSON object (a dict as given) and as ``key=value,...`` (parsed by lm-eval's
    CLI parser; what that parser refuses, the CLI refuses with its own usage line before any model)."""
    pytest.importorskip("lm_eval")
    from lm_eval._cli.utils import key_val_to_dict

    from growlm.lm_eval_model import GrowlmLM

    real = {"MODEL": str(tiny_model_dir), "CORPUS": str(corpus_dir)}
    args = {k: real.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    note(f"model_args={args!r}"[:2000] + f" flags={flags!r}")

    def check(model: object) -> None:
        assert isinstance(model, GrowlmLM) and model.batch_size >= 1 and model.max_gen_toks >= 1

    clean_or_valid(lambda: GrowlmLM.create_from_arg_obj(args, flags), check, "dict")
    line = ",".join(f"{k}={v}" for k, v in args.items())
    try:
        parsed = key_val_to_dict(line)
    except ValueError:
        return
    clean_or_valid(lambda: GrowlmLM.create_from_arg_obj(parsed, flags), check, "key=value")


# ----------------------------------------------------------------------------------------------
# evals.jsonl

HOSTILE = ["x|y <script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\n---\nevil: 1", "[a](javascript:x)",
           "*b* _i_ ~~s~~ `c`", "\\|", "a\u2028b", "c\x85d", "\ud800", "# h", "&lt;&amp;"]
names = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=16))
raw_numbers = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" + "0" * 400, "1" + "0" * 5000, "1e-400", "-0",
               "true", '"2.0"', "[]", "{}", "null"]


@st.composite
def record(draw, fp: str) -> bytes:
    """One line of a sidecar, as ``growlm eval --save`` or a hand edit would write it (no line end)."""
    value = st.one_of(scalars, names, st.lists(st.one_of(scalars, names), max_size=3))
    # mostly a record of this model with a task name (read back, so on the card), else anything
    usual = draw(st.integers(0, 9)) < 7
    task = st.one_of(st.sampled_from(["ppl", "mmlu"]), names) if usual else \
        st.one_of(scalars, st.none(), st.lists(scalars, max_size=2))
    rec = draw(st.fixed_dictionaries(
        {"task": task, "model_fingerprint": st.just(fp) if usual else st.sampled_from(["another-model", None, 1])},
        optional={"ppl": scalars, "acc": scalars, "protocol": value, "data": value, "n": value, "saved_at": value}))
    rec.update(draw(st.dictionaries(names, scalars, max_size=2)))
    text = json.dumps(rec, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:  # a number JSON writers do not write
        text = text[:-1] + f', "ppl": {draw(st.sampled_from(raw_numbers))}}}'
    return text.encode("utf-8", "surrogatepass")


@st.composite
def sidecar(draw, fp: str) -> bytes | str:
    """The bytes of a sidecar, or ``"dir"`` / ``"fifo"`` for a special file in its place."""
    shape = draw(st.sampled_from(["file", "file", "file", "dir", "fifo"]))
    event(f"sidecar: {shape}")
    if shape != "file":
        return shape
    line = st.one_of(
        record(fp), record(fp), record(fp),
        record(fp).flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n])),  # torn
        st.binary(max_size=24), st.text(max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b"\xff\xfe\xfd", b"[" * 100_000, b"{" * 3, b'{"task": "ppl"']),
    )
    lines = draw(st.lists(line, max_size=5))
    seps = draw(st.lists(st.sampled_from([b"\n"] * 6 + [b"\r\n", b"\r", b""]), min_size=len(lines), max_size=len(lines)))
    return b"".join(a + b for a, b in zip(lines, seps, strict=True))


def _place(path: Path, content: bytes | str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(content)


# tags the card's own markdown renders to; a hostile name must add none (a link, an image, a script, emphasis)
CARD_TAGS = {"h1", "h2", "p", "code", "ul", "li", "table", "thead", "tbody", "tr", "th", "td"}


def check_card(text: str, n_results: int) -> None:
    """A card as exported: front matter that is YAML, a body of the card's own markup, whole table rows."""
    from markdown_it import MarkdownIt

    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    fm = yaml.safe_load(head)
    assert fm["library_name"] == "transformers"
    html = MarkdownIt("commonmark").enable("table").render(body)
    tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", html))
    assert tags <= CARD_TAGS, tags - CARD_TAGS
    assert len(re.findall(r"<h[12]>", html)) == 5
    for table in re.findall(r"<table>(.*?)</table>", html, flags=re.S):
        widths = {len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)}
        assert len(widths) == 1, widths
    if n_results:  # the results table: its header and one row per saved result
        assert len(re.findall(r"<tr>", re.findall(r"<table>(.*?)</table>", html, flags=re.S)[-1])) == 1 + n_results


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> Path:
    """A private copy of the tiny model: the sidecar is written into it."""
    return copy_of(tiny_model_dir, tmp_path_factory.mktemp("fuzz-evals") / "m")


@pytest.fixture(scope="module")
def meta(model):
    """The model's model.json (read before any sidecar: a FIFO in the dir makes it refuse to load)."""
    from growlm.store.model import read_meta

    return read_meta(model)


@budget(40)
@given(data=st.data())
def test_fuzz_evals_jsonl_card(model, meta, data):
    """Any sidecar: the results read back, and the card, are well-formed (in this process, many examples)."""
    from growlm.model_card import EVALS, card_text, read_evals

    content = data.draw(sidecar(meta.fingerprint))
    note(f"sidecar: {content!r}"[:3000])
    _place(model / EVALS, content)
    results = read_evals(model, meta.fingerprint)
    event(f"results read back: {min(len(results), 3)}{'+' if len(results) > 3 else ''}")
    assert all(isinstance(r, dict) and isinstance(r["task"], str) for r in results)
    check_card(card_text(model, meta), len(results))


def checked(argv: list[str], cwd: Path):
    """``growlm ARGV`` run in this process, its outcome checked (success, or one error line)."""
    res = run_cli(argv, cwd)
    event(f"{argv[0]}: {'ok' if res.ok else 'error'}")
    check_outcome(res)
    return res


@budget(8)
@given(data=st.data())
def test_fuzz_evals_jsonl_commands(model, meta, corpus_dir, data):
    """``growlm info``, ``export`` and ``eval --save`` with any sidecar: each works or ends in one line, and
    a save keeps every result that read back before it, then adds its own."""
    from growlm.model_card import EVALS, read_evals

    fp = meta.fingerprint
    content = data.draw(sidecar(fp))
    note(f"sidecar: {content!r}"[:3000])
    _place(model / EVALS, content)
    with tempfile.TemporaryDirectory(prefix="growlm-fuzz-") as t:
        checked(["info", str(model)], Path(t))
        if checked(["export", str(model), "--out", str(Path(t) / "hf")], Path(t)).ok:
            check_card((Path(t) / "hf" / "README.md").read_text(encoding="utf-8"), len(read_evals(model, fp)))
        before = read_evals(model, fp)
        res = checked(["eval", str(model), "--task", "ppl", "--data", str(corpus_dir / "valid.txt"), "--save"], Path(t))
    after = read_evals(model, fp)
    assert json.dumps(after[:len(before)]) == json.dumps(before)  # as text: a NaN score equals itself
    assert len(after) == len(before) + (1 if res.ok else 0)
    if res.ok:
        assert after[-1]["model_fingerprint"] == fp and math.isfinite(after[-1]["ppl"])
