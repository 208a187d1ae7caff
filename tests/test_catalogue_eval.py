"""Evaluation inputs an outside probe found mishandled (issue 25): the lm-eval plug-in's requests and
``--model_args`` that ended in a traceback (D9), and stage and data file names that went raw into the
exported model card's markdown (D15).

The plug-in is driven in this process, through the calls lm-eval itself makes (``simple_evaluate``,
``loglikelihood``, ``generate_until``): the ``python -m growlm.lm_eval_model`` command line spends some
seconds indexing lm-eval's tasks before it builds the model, and ``tests/test_lm_eval.py`` runs it.
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from cli_util import growlm, one_line_error
from conftest import copy_of

# what a probe named its stage and its data file: a cell break, a script, an image with a handler,
# and newlines that would start a heading, a table row or the end of the front matter
HOSTILE_STAGE = "x|y <script>alert(1)</script>\n## injected\n| a | b |"
HOSTILE_DATA = "a|b<img src=x onerror=alert(2)>\n---\nevil: `1`.txt"


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model as lm-eval's ``--model growlm`` (context: 128 tokens)."""
    pytest.importorskip("lm_eval")  # the plug-in's tests need it (setup.sh installs it); the card's do not
    from growlm.lm_eval_model import GrowlmLM

    return GrowlmLM(str(tiny_model_dir), device="cpu")


def _request(kind: str, *args: object):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args, 0, metadata=("growlm_probe", 7, 1))


@pytest.mark.parametrize(("model_args", "device", "needle"), [
    ({}, "cpu", "path=DIR"),
    ({"path": "MODEL", "max_gen_toks": "abc"}, "cpu", "max_gen_toks"),
    ({"path": "MODEL"}, "bogus", "--device 'bogus'"),
    ({"path": "MODEL", "batch_size": 0}, "cpu", "--batch_size"),
])
def test_bad_model_args_end_the_lm_eval_command_in_one_line(model_args, device, needle, tiny_model_dir,
                                                            monkeypatch, capsys):
    """D9: the model is built by lm-eval's own ``simple_evaluate``, as its CLI builds it, and
    ``growlm.lm_eval_model.main`` ends the command with one error line, exit code 2."""
    pytest.importorskip("lm_eval")
    import lm_eval

    from growlm import lm_eval_model

    model_args = {k: str(tiny_model_dir) if v == "MODEL" else v for k, v in model_args.items()}

    def cli_evaluate() -> None:
        # as lm-eval's CLI calls it (which always passes --batch_size, 1 by default); the model is built before
        # any task is looked up; no seeds, so this process's RNGs stay as they were
        lm_eval.simple_evaluate(model="growlm", model_args=model_args, device=device, batch_size=1,
                                tasks=["growlm_never_loaded"], random_seed=None, numpy_random_seed=None,
                                torch_random_seed=None, fewshot_random_seed=None)

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", cli_evaluate)
    monkeypatch.setattr(sys, "argv", ["lm_eval_model"])
    with pytest.raises(SystemExit) as done:
        lm_eval_model.main([])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert done.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("growlm: error: ") and needle in lines[-1], err
    assert sum(ln.startswith("growlm: error:") for ln in lines) == 1, err


def test_device_and_batch_size_in_model_args_win_over_lm_eval_defaults(tiny_model_dir):
    """lm-eval's CLI always passes ``--device`` and ``--batch_size`` (its defaults ``cuda:0`` and 1), so
    ``--model_args device=cpu`` or ``batch_size=2`` was a TypeError traceback (a keyword given twice)."""
    pytest.importorskip("lm_eval")
    from growlm.lm_eval_model import GrowlmLM

    cli_defaults = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    for lm in (GrowlmLM.create_from_arg_obj({"path": str(tiny_model_dir), "device": "cpu", "batch_size": 2},
                                            cli_defaults),
               GrowlmLM.create_from_arg_string(f"path={tiny_model_dir},device=cpu,batch_size=2", cli_defaults)):
        assert (lm.batch_size, str(lm._device)) == (2, "cpu")


def test_a_continuation_longer_than_the_window_is_refused_in_one_line(lm):
    """D9: a continuation of more tokens than the whole context cannot be scored under one context
    (``--model hf`` stops on an assertion): one line naming the request, before anything is scored;
    a long context is cut from the left as before."""
    from growlm.errors import GrowlmError

    fits = _request("loglikelihood", "Question: " * 200, " word")
    with pytest.raises(GrowlmError) as err:
        lm.loglikelihood([fits, _request("loglikelihood", "Q", " word" * 300)], disable_tqdm=True)
    msg = str(err.value)
    assert "\n" not in msg and "growlm_probe, doc 7" in msg and "continuation" in msg and "128" in msg, msg
    ((logp, _),) = lm.loglikelihood([fits], disable_tqdm=True)
    assert logp < 0


def test_empty_contexts_are_scored_and_generated_from_the_prefix_token(lm):
    """D9: an empty ``generate_until`` context (a traceback before, and in ``--model hf``) generates from
    the prefix token, as lm-eval scores an empty log-likelihood context; an all-space context and an
    empty continuation no longer crash lm-eval's encoder."""
    import torch

    (text,) = lm.generate_until([_request("generate_until", "", {"until": [], "max_gen_toks": 6})], disable_tqdm=True)
    with torch.no_grad():
        greedy = lm.model.generate(torch.tensor([[lm.prefix_token_id]]), 6, eos_id=lm.eot_token_id)[0, 1:].tolist()
    if lm.eot_token_id in greedy:
        greedy = greedy[:greedy.index(lm.eot_token_id)]
    assert text == lm.tok_decode(greedy)
    spaces, empty, blank = lm.loglikelihood([_request("loglikelihood", "   ", "Paris"),
                                             _request("loglikelihood", "", "Paris"),
                                             _request("loglikelihood", "", "")], disable_tqdm=True)
    assert spaces[0] < 0 and empty[0] < 0 and blank == (0.0, True)


def _cells(rendered: str) -> list[list[str]]:
    """The rows of every table in rendered HTML, each a list of its cells' text."""
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, flags=re.S)
    return [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, flags=re.S)] for row in rows]


def test_hostile_stage_and_data_names_stay_text_in_the_card(tiny_model_dir, tmp_path):
    """D15: a stage name and a data file name holding ``|``, ``<script>``, ``<img onerror>`` and newlines
    stay one cell of text each in the exported card; its front matter stays YAML that says the same."""
    from markdown_it import MarkdownIt

    from growlm.model_card import save_eval

    model = copy_of(tiny_model_dir, tmp_path / "m")
    meta_path = model / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"stage": {"index": 1, "name": HOSTILE_STAGE}}))
    save_eval(model, {"task": "ppl", "model_fingerprint": meta["fingerprint"], "ppl": 2.0, "n": 3},
              data=[f"/data/{HOSTILE_DATA}"])
    r = growlm("export", model, "--to", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr

    text = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    fm = yaml.safe_load(head)
    one_line = lambda s: " ".join(s.split())  # noqa: E731
    assert fm["model-index"][0]["results"][0]["dataset"]["name"] == one_line(HOSTILE_DATA)

    rendered = MarkdownIt("commonmark").enable("table").render(body)
    assert "<script" not in rendered and "<img" not in rendered
    assert re.findall(r"<h\d>(.*?)</h\d>", rendered) == ["m", "Architecture", "Docking port", "Lineage", "Evaluation"]
    tables = _cells(rendered)
    assert len(tables) == 6 and all(len(row) == len(tables[0]) for row in tables[:2])  # architecture
    lineage, evaluation = tables[2:4], tables[4:6]
    assert len(lineage[1]) == len(lineage[0]) and len(evaluation[1]) == len(evaluation[0])
    # the names read as they were given, on one line
    assert lineage[1][0] == f"1 ({one_line(HOSTILE_STAGE)})"
    assert evaluation[1][2] == one_line(HOSTILE_DATA)


def test_a_record_that_cannot_be_utf8_is_saved_and_read_back(tiny_model_dir, tmp_path):
    """A ``--data`` path of bytes that are no UTF-8 (Python holds them as surrogate escapes) failed the
    save with a UnicodeEncodeError; a name holding U+2028 was cut in two when read back."""
    from growlm.model_card import read_evals, save_eval

    model = copy_of(tiny_model_dir, tmp_path / "m")
    save_eval(model, {"task": "ppl", "ppl": 2.0}, data=[str(Path("/d") / "caf\udce9.txt")])
    save_eval(model, {"task": "ppl", "ppl": 3.0}, data=["/d/line\u2028sep\x85.txt"])
    assert [(r["ppl"], r["data"]) for r in read_evals(model)] == [(2.0, ["/d/caf\udce9.txt"]),
                                                                  (3.0, ["/d/line\u2028sep\x85.txt"])]


@pytest.mark.parametrize("edit, key", [({"stage": "abc"}, "stage"), ({"metrics": [1]}, "metrics"),
                                       ({"stage": {"index": 1, "name": ["a", "|"]}}, "stage.name")])
def test_a_stage_record_of_another_shape_is_refused_by_every_reader(edit, key, tiny_model_dir, tmp_path):
    """model.json's ``stage`` and ``metrics`` are typed records: ``growlm export`` ended in an AttributeError
    traceback on a hand edit of them that ``verify`` passed; now export, verify and info refuse it in one line."""
    model = copy_of(tiny_model_dir, tmp_path / "m")
    meta_path = model / "model.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | edit))
    for argv in (["export", model, "--out", tmp_path / "hf"], ["verify", model], ["info", model]):
        one_line_error(growlm(*argv), "model.json is corrupt", key)
    assert not (tmp_path / "hf").exists()
