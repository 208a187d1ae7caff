"""The Python API (``import growlm``) end to end on tiny data: each call gives what its command gives."""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import growlm
from cli_util import REPO, SMALL_PLAN, child_env, tensors_equal, write_plan
from conftest import copy_of
from growlm.cli import main
from growlm.errors import GrowlmError


def test_api_end_to_end(small_run, tmp_path, capsys, monkeypatch):
    # a plan file, read, and the run `growlm train plan.toml --out RUN` made of it (the shared one; the API
    # call on a copy resumes it, every stage complete, and returns the run dir)
    plan_file = small_run.parent / "plan.toml"
    plan = growlm.load_plan(plan_file)
    assert isinstance(plan, growlm.Plan) and plan.data.train == [small_run.parent / "train.txt"]
    assert growlm.train(plan_file, copy_of(small_run, tmp_path / "a"), resume=True, progress=False) == tmp_path / "a"
    run = small_run
    assert (run / "stage-2" / "model.json").is_file()
    assert (run / "plan.toml").read_text() == SMALL_PLAN

    # the same plan as a Plan object, its data under a path TOML text would need escaping, stopped
    # by Ctrl-C: the printed command (there is no plan file) resumes it to the very same weights
    odd = tmp_path / 'data "quoted" \\ dir'
    odd.mkdir()
    for name in ("train.txt", "valid.txt"):
        shutil.copyfile(small_run.parent / name, odd / name)
    odd_plan = growlm.plan_from_dict(tomllib.loads(SMALL_PLAN), odd)
    assert odd_plan.data.valid == [odd / "valid.txt"]
    b = tmp_path / "b"
    monkeypatch.setenv("GROWLM_FAULT", "sigint@step:1:2")
    with pytest.raises(GrowlmError, match="interrupted in stage-1") as e:
        growlm.train(odd_plan, b, progress=False)
    monkeypatch.delenv("GROWLM_FAULT")
    hint = shlex.split(str(e.value).split("continue with: ")[1])
    assert hint == ["growlm", "train", str(b / "plan.json"), "--out", str(b), "--resume"]
    assert main(hint[1:] + ["--no-progress"]) == 0
    assert not (b / "plan.toml").exists() and growlm.load_plan(b / "plan.json") == odd_plan
    assert tensors_equal(b / "stage-2" / "model.safetensors", run / "stage-2" / "model.safetensors")
    with pytest.raises(GrowlmError, match="holds a run of another plan"):
        growlm.train(plan, b, resume=True, progress=False)

    # load: a model with its tokenizer, or a mixture
    stage = run / "stage-2"
    loaded = growlm.load(stage)
    model, tokenizer = loaded
    assert type(model).__name__ == "GrowLM" and len(model.blocks) == 3 and tokenizer.encode("The quick")

    # evaluate: the dict `growlm eval --json` prints, for a path or a loaded model
    valid = str(small_run.parent / "valid.txt")
    scores = growlm.evaluate(stage, "ppl", data=[valid], progress=False)
    capsys.readouterr()
    assert main(["eval", str(stage), "--task", "ppl", "--data", valid, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == scores
    assert growlm.evaluate(loaded, "ppl", data=valid, progress=False) == scores
    assert scores["task"] == "ppl" and 0 < scores["loss"] < 10

    # merge two stages of the run: a mixture that loads and scores
    mix = growlm.merge([run / "stage-1", stage], tmp_path / "mix")
    mixture = growlm.load(mix).model
    assert type(mixture).__name__ == "Mixture" and len(mixture.experts) == 2 and mixture.rule.combine == "mean-logits"
    assert 0 < growlm.evaluate(mix, "ppl", data=[valid], progress=False)["loss"] < 10
    with pytest.raises(GrowlmError, match="inside the growlm model, mixture or run"):
        growlm.merge([run / "stage-1", stage], mix / "again")

    # export: a Hugging Face checkpoint (the LoRA of stage 2 folded in)
    hf = growlm.export(stage, tmp_path / "hf")
    assert hf == tmp_path / "hf" and (hf / "model.safetensors").is_file()
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]


def test_readme_python_api_example_runs(tmp_path, corpus_dir, capsys, monkeypatch):
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    loss, combine = capsys.readouterr().out.split()[-2:]
    assert 0 < float(loss) < 10 and combine == "mean-logits"
    assert (tmp_path / "mix" / "mixture.json").is_file() and (tmp_path / "hf" / "config.json").is_file()


def test_plan_from_dict_errors_name_the_key(tmp_path):
    raw = tomllib.loads(SMALL_PLAN)
    raw["stage"][1]["lora"]["rank"] = 0
    with pytest.raises(GrowlmError, match=r"stage\[2\]\.lora\.rank: Input should be greater than 0"):
        growlm.plan_from_dict(raw, tmp_path)
    with pytest.raises(GrowlmError) as e:  # relative paths resolve against the root given
        growlm.plan_from_dict(tomllib.loads(SMALL_PLAN), tmp_path)
    assert str(e.value) == f"plan (built in Python): tokenizer.corpus[0]: file not found: {tmp_path / 'train.txt'}"
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(GrowlmError, match=r"plan .*plan\.json is not valid JSON"):
        growlm.load_plan(bad)


@pytest.mark.process
def test_import_is_light_and_the_api_verbs_stay_functions():
    """``import growlm`` loads neither torch nor pydantic, and importing every module of the package (those behind
    the verbs among them: a submodule named like a verb would replace ``growlm.VERB`` when imported) leaves each
    ``growlm.VERB`` the API function."""
    code = ("import sys, growlm; assert 'torch' not in sys.modules and 'pydantic' not in sys.modules, 'heavy'; "
            "import importlib, pkgutil, growlm.api; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(growlm.__path__, 'growlm.') "
            "if m.name not in ('growlm.__main__', 'growlm.lm_eval_model')]; "
            "wrong = [v for v in growlm.api.__all__ if getattr(growlm, v) is not getattr(growlm.api, v)]; "
            "assert not wrong, wrong")
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(), cwd=Path(__file__).parent)


def test_evaluate_scores_a_loaded_model_as_it_is_in_memory(tiny_model_dir, mixture, corpus_dir, tmp_path):
    """evaluate(growlm.load(...)) scores the weights the caller holds, never the files again, and a model
    changed in memory does not claim the stored fingerprint."""
    import torch

    valid = corpus_dir / "valid.txt"
    model_dir = copy_of(tiny_model_dir, tmp_path / "model")
    stored = growlm.evaluate(model_dir, "ppl", data=valid, progress=False)
    loaded = growlm.load(model_dir)
    assert loaded.fingerprint == stored["model_fingerprint"] and loaded.unchanged()
    shutil.rmtree(model_dir)  # nothing is read from the dir again: unchanged weights, the same dict
    assert growlm.evaluate(loaded, "ppl", data=valid, progress=False) == stored

    with torch.no_grad():
        loaded.model.head.weight.zero_()  # every logit 0: the uniform distribution, ln V nats per token
    changed = growlm.evaluate(loaded, "ppl", data=valid, progress=False)
    assert changed["loss"] == pytest.approx(math.log(loaded.model.cfg.vocab_size), rel=1e-5) != stored["loss"]
    assert not loaded.unchanged() and changed["model_fingerprint"] is None
    assert changed.keys() == stored.keys() and changed["model"] == stored["model"] == str(model_dir)

    # a mixture likewise: its recorded fingerprint while unchanged, None after an expert's head is zeroed
    mix = mixture
    stored = growlm.evaluate(mix, "ppl", data=valid, progress=False)
    loaded = growlm.load(mix)
    assert growlm.evaluate(loaded, "ppl", data=valid, progress=False) == stored
    with torch.no_grad():
        loaded.model.experts[0].head.weight.zero_()
    changed = growlm.evaluate(loaded, "ppl", data=valid, progress=False)
    assert changed["loss"] != pytest.approx(stored["loss"]) and changed["model_fingerprint"] is None
    assert growlm.evaluate(mix, "ppl", data=valid, progress=False) == stored  # the dir itself is as it was


def test_a_lora_scaling_changed_in_memory_is_a_changed_model(small_run):
    """How the adapters apply is part of the model: a LoRA scaling changed in memory (no tensor touched) makes
    ``unchanged()`` false, so the stored fingerprint is not claimed for what it now computes."""
    from growlm.lora import lora_layers

    loaded = growlm.load(small_run / "stage-2")
    assert loaded.unchanged()
    name, layer = next(iter(lora_layers(loaded.model)))
    for adapter in layer.scaling:
        layer.scaling[adapter] *= 100
    assert not loaded.unchanged(), name


def test_the_api_takes_what_its_docs_and_readme_give_and_refuses_the_rest_in_one_line(small_run, corpus_dir,
                                                                                       tmp_path, monkeypatch):
    """Issue 25 D19: raw exceptions where the API promises one-line GrowlmErrors."""
    valid = corpus_dir / "valid.txt"
    # evaluate((model, tokenizer)): the pair README's `model, tokenizer = growlm.load(...)` gives
    model, tokenizer = growlm.load(small_run / "stage-2")
    pair = growlm.evaluate((model, tokenizer), "ppl", data=valid, progress=False)
    stored = growlm.evaluate(small_run / "stage-2", "ppl", data=valid, progress=False)
    assert pair["loss"] == stored["loss"] and pair["model_fingerprint"] is None  # no dir: no stored name claimed
    for bad in (3, None):
        with pytest.raises(GrowlmError, match="evaluate: a model dir"):
            growlm.evaluate(bad, "ppl", data=valid)
    # train(dict): the plan's tables, paths relative to the current directory
    monkeypatch.chdir(small_run.parent)
    tables = tomllib.loads((small_run.parent / "plan.toml").read_text())
    tables["stage"] = tables["stage"][:1]
    run = growlm.train(tables, tmp_path / "run", progress=False, log=lambda *_: None)
    assert (run / "stage-1" / "model.json").is_file()
    with pytest.raises(GrowlmError, match="plan: a Plan, a plan file or a dict"):
        growlm.train(42, tmp_path / "other")
    # merge(weights="ab")
    with pytest.raises(GrowlmError, match="weights must be one number per expert"):
        growlm.merge([small_run / "stage-1", small_run / "stage-2"], tmp_path / "mix", combine="weighted",
                     weights="ab")
    assert not (tmp_path / "mix").exists() and not (tmp_path / "other").exists()


@pytest.mark.parametrize("argv, verb, args, kwargs", [
    (["tokenizer", "build", "--corpus", "c.txt", "--out", "t"], "build_tokenizer", ("t",),
     {"corpus": ["c.txt"], "preset": None, "ngram_list": None, "compact": False, "overwrite": False}),
    (["substrate", "build", "--kind", "binary", "--vocab-size", "9", "--dim", "16", "--out", "s"], "build_substrate",
     ("s", "binary"), {"dim": 16, "tokenizer": None, "vocab_size": 9, "bits": None, "params": {}, "overwrite": False}),
    (["info", "m"], "info", ("m",), {"preset": None}),
    (["train", "p.toml", "--out", "r", "--tensorboard"], "train", ("p.toml", "r"),
     {"resume": False, "progress": True, "tensorboard": True}),
    (["lora-merge", "m", "--out", "o"], "lora_merge", ("m", "o"), {}),
    (["generate", "m", "--prompt", "Hi", "--top-k", "3"], "generate", ("m", "Hi"), {"top_k": 3}),
    (["eval", "m", "--task", "ppl", "--data", "v.txt", "--limit", "2"], "evaluate", ("m", "ppl"),
     {"data": ["v.txt"], "sample": False, "per_stage": False, "save": False, "limit": 2}),
    (["export", "m", "--out", "h"], "export", ("m", "h"), {}),
    (["import", "h", "--out", "m"], "import_hf", ("h", "m"), {}),
    (["merge", "a", "b", "--out", "x", "--tokens", "64"], "merge", (["a", "b"], "x"),
     {"weights": None, "router": False, "finetune_head": False, "data": None, "tokens": 64}),
    (["verify", "r"], "verify", ("r",), {}),
    (["data", "prepare", "a.txt", "--tokenizer", "t", "--out", "D", "--workers", "2"], "prepare_data",
     (["a.txt"], "t", "D"), {"workers": 2, "executor": "local", "shuffle": False, "valid_fraction": 0.0,
                            "slurm": {"partition": None, "time": None}}),
])
def test_every_command_is_its_api_function(monkeypatch, capsys, argv, verb, args, kwargs):
    """The CLI only parses and prints: each command calls its ``growlm.*`` function with the options given, and
    an option left out is not passed at all (the function's own default is the one default)."""
    import growlm.api as api

    calls = []
    real = getattr(api, verb)

    class Result(dict):  # what each verb returns, as far as the command prints it
        vocab_size, fingerprint, kind, dim = 1, "f" * 64, "binary", 16

        def __truediv__(self, other):
            return Path("x") / other

    @functools.wraps(real)  # the parser reads the function's defaults for its help
    def fake(*a, **kw):
        calls.append((a, {k: v for k, v in kw.items() if k != "log"}))
        return {"verify": Result(ok=True, lines=[]), "info": Result(fingerprint="f" * 64), "generate": "text",
                "evaluate": Result(), "train": Path(".")}.get(verb, Result())

    monkeypatch.setattr(api, verb, fake)
    monkeypatch.setattr("growlm.compose.merge_summary", lambda out: "merged")
    monkeypatch.setattr("growlm.store.stages", lambda run: [])
    if verb == "lora_merge":
        monkeypatch.setattr(api, "info", lambda out: {"fingerprint": "f" * 64})
    assert main(argv) == 0, capsys.readouterr().err
    assert calls == [(args, kwargs)]
