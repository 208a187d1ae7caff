"""docs/extending.md's three worked examples, executed exactly as written there: a toy substrate
kind, a toy combine rule and a toy eval task, each used the way a user would (plan, CLI, library)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from growlm.cli import main
from growlm.errors import GrowlmError
from growlm.registry import Registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example(section: str, lang: str = "python") -> str:
    """The one ```{lang} block under the ``## {section}`` heading of docs/extending.md."""
    body = DOC.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{lang}\n(.*?)```", body, re.S)
    assert len(blocks) == 1, f"{section}: expected one {lang} block, found {len(blocks)}"
    return blocks[0]


@contextmanager
def loaded(section: str, registry: Registry, name: str) -> Iterator[dict]:
    """Run the section's example as its own module; its registration is undone afterwards."""
    assert name not in registry
    namespace = {"__name__": f"toy_{name.replace('-', '_')}"}
    try:
        exec(compile(example(section), f"{DOC}#{section}", "exec"), namespace)  # noqa: S102
        assert name in registry
        yield namespace
    finally:
        registry.unregister(name)
    assert name not in registry


# ----------------------------------------------------------------------------------------------
# A substrate kind


def test_toy_substrate_kind(corpus_dir, tmp_path, capsys):
    from cli_util import SMALL_PLAN, write_plan
    from growlm.plan import SubstrateSpec, load_plan, plan_to_json
    from growlm.substrate import KINDS, Substrate, build_substrate
    from growlm.substrate.registry import SUBSTRATE_KINDS

    with loaded("A substrate kind", SUBSTRATE_KINDS, "digits"):
        s = build_substrate("digits", dim=8, vocab_size=300, base=4, seed=5)  # seed: not the kind's, ignored
        assert s.kind == "digits" and s.weight.shape == (300, 8) and not s.trainable
        assert s.table[6].tolist() == pytest.approx([2 / 3, 1 / 3] + [0.0] * 6)  # 6 = 1·4 + 2
        assert build_substrate("digits", dim=8, vocab_size=300, base=4).fingerprint == s.fingerprint
        assert build_substrate("digits", dim=8, vocab_size=300, base=5).fingerprint != s.fingerprint
        with pytest.raises(GrowlmError, match="substrate kind 'digits': base: Input should be a valid integer"):
            build_substrate("digits", dim=8, vocab_size=300, base="4")
        s.save(tmp_path / "sub")
        assert Substrate.load(tmp_path / "sub").fingerprint == s.fingerprint
        # the plan offers it, its params reach the builder and are recorded in the run's plan.json
        one_stage = SMALL_PLAN.split("[[stage]]")[0] + "[[stage]]" + SMALL_PLAN.split("[[stage]]")[1]
        plan = write_plan(tmp_path, one_stage.replace('[substrate]\nkind = "binary"\nbits = 16\n',
                                                      example("A substrate kind", "toml")), corpus_dir)
        assert load_plan(plan).substrate.params == {"base": 4}
        assert main(["train", str(plan), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        built = Substrate.load(tmp_path / "run" / "substrate")
        assert built.recipe["params"] == {"base": 4}
        assert torch.equal(built.table, build_substrate("digits", dim=32, vocab_size=built.vocab_size, base=4).table)
        assert json.loads((tmp_path / "run" / "plan.json").read_text())["substrate"]["params"] == {"base": 4}
        assert load_plan(tmp_path / "run" / "plan.json") == load_plan(plan)
        # checked against DigitsParams when the plan is read, each error naming its key
        good = plan.read_text()
        for bad, error in (("scale = 2", "scale: unknown key"), ('base = "4"', "base: Input should be a valid integer"),
                           ("seed = 1", "seed: give it as substrate.seed, not in substrate.params")):
            plan.write_text(good.replace("\nbase = 4\n", f"\n{bad}\n"))
            with pytest.raises(GrowlmError) as e:
                load_plan(plan)
            assert str(e.value) == f"plan {plan}: substrate.params.{error}"
        plan.write_text(good)
        # and so does the CLI: --param KEY=VALUE, typed by DigitsParams
        assert main(["substrate", "build", "--kind", "digits", "--vocab-size", "50", "--dim", "4",
                     "--out", str(tmp_path / "cli")]) == 0
        assert Substrate.load(tmp_path / "cli").recipe["params"] == {"base": 10}
        assert main(["substrate", "build", "--kind", "digits", "--param", "base=4", "--vocab-size", "50", "--dim",
                     "4", "--out", str(tmp_path / "cli4")]) == 0
        assert Substrate.load(tmp_path / "cli4").recipe["params"] == {"base": 4}
        capsys.readouterr()
        for param, error in (("base=four", "substrate kind 'digits': base: Input should be a valid integer, unable "
                                           "to parse string as an integer"),
                             ("scale=2", "substrate kind 'digits': scale: not a parameter of this kind; it takes: base"),
                             ("seed=2", "--param seed: give it as --seed"), ("base", "--param takes KEY=VALUE, got 'base'")):
            assert main(["substrate", "build", "--kind", "digits", "--param", param, "--vocab-size", "50", "--dim",
                         "4", "--out", str(tmp_path / "bad")]) == 2
            assert capsys.readouterr().err == f"growlm: error: {error}\n"
        assert not (tmp_path / "bad").exists()
    # gone again: the built-ins are what is left, and the plan names them
    assert SUBSTRATE_KINDS.names() == KINDS == ("glyph", "binary", "random-bits", "trainable")
    with pytest.raises(ValidationError, match="unknown substrate kind 'digits'; choose one of: glyph, binary"):
        SubstrateSpec(kind="digits")
    with pytest.raises(GrowlmError, match="unknown substrate kind 'digits'"):
        build_substrate("digits", dim=8, vocab_size=300)
    # a plan without params records no params key: its plan.json is the one recorded before the key existed
    assert plan_to_json(load_plan(write_plan(tmp_path, SMALL_PLAN, corpus_dir)))["substrate"] == \
        {"kind": "binary", "dir": None, "bits": 16, "seed": 0}


# ----------------------------------------------------------------------------------------------
# A combine rule


def test_toy_combine_rule(tiny_model_dir, expert_b, tmp_path):
    from growlm.cli import build_parser
    from growlm.compose import add_expert, merge
    from growlm.loading import load_mixture, load_model
    from growlm.rules import RULES

    a, b = tiny_model_dir, expert_b  # two experts that differ, on one docking port
    idx = torch.randint(0, load_model(a).model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with loaded("A combine rule", RULES, "max-logits"):
        out = merge([a, b], tmp_path / "mix", combine="max-logits")
        desc = json.loads((out / "mixture.json").read_text())
        assert (desc["combine"], desc["space"], desc["weights"]) == ("max-logits", "logits", None)
        mix, _ = load_mixture(out)
        with torch.no_grad():
            want = torch.maximum(load_model(a).model.eval()(idx), load_model(b).model.eval()(idx))
            assert torch.equal(mix(idx), want)
        assert build_parser().parse_args(["merge", str(a), str(b), "--out", "m", "--combine", "max-logits"]).combine \
            == "max-logits"
        grown = add_expert(out, tiny_model_dir, tmp_path / "mix3")  # parameter-free: the rule carries over
        assert len(load_mixture(grown)[0].experts) == 3
    with pytest.raises(GrowlmError, match="unknown combine rule 'max-logits'"):
        load_mixture(out)
    with pytest.raises(GrowlmError, match="unknown combine rule 'max-logits'; choose one of mean-logits, mean-probs, "
                                          "weighted$"):
        merge([a, b], tmp_path / "mix2", combine="max-logits")


# ----------------------------------------------------------------------------------------------
# An eval task


def test_toy_eval_task(tiny_model_dir, tmp_path, capsys):
    from growlm.evaluation import protocols as P
    from growlm.evaluation.run import evaluate
    from growlm.evaluation.task import TASKS
    from growlm.loading import load_any

    data = tmp_path / "echo.jsonl"
    pairs = [("fox", "dog"), ("model", "layer"), ("quick", "lazy"), ("brown", "frozen"), ("grows", "jumps")]
    data.write_text("".join(json.dumps({"word": w, "other": o}) + "\n" for w, o in pairs), encoding="utf-8")
    model, tok = load_any(tiny_model_dir)
    with loaded("An eval task", TASKS, "echo") as toy:
        items = [toy["echo_item"]({"word": w, "other": o}, data) for w, o in pairs]
        paper = evaluate(tiny_model_dir, "echo", data=data, progress=False)
        # the same numbers by hand: one greedy token after the prompt, its first character against "A"
        texts = [P.continuation(model, tok, toy["echo_prompt"](it), 1) for it in items]
        outcomes = [P.choice_score(it, t) for it, t in zip(items, texts, strict=True)]
        assert paper["n"] == len(pairs) and paper["protocol"] == "paper"
        assert paper["accuracy"] == pytest.approx(sum(o.metrics["accuracy"] for o in outcomes) / len(pairs))
        assert paper["invalid_rate"] == pytest.approx(1 - sum(o.valid for o in outcomes) / len(pairs))
        loglik = evaluate(tiny_model_dir, "echo", data=data, protocol="loglik", progress=False)
        lls = P.choice_logliks(model, tok, [toy["echo_choices"](it) for it in items])
        assert loglik["accuracy"] == pytest.approx(sum(ll[0] > ll[1] for ll in lls) / len(pairs))
        assert main(["eval", str(tiny_model_dir), "--task", "echo", "--data", str(data), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["accuracy"] == paper["accuracy"]
    with pytest.raises(GrowlmError, match="unknown task 'echo'"):
        evaluate(tiny_model_dir, "echo", data=data, progress=False)


def test_a_name_is_registered_once():
    from growlm.rules import RULES, CombineRule

    with pytest.raises(ValueError, match="combine rule 'mean-logits' is already registered"):
        RULES.register("mean-logits", CombineRule())
    with RULES.registered("twin", CombineRule()):
        assert "twin" in RULES
    assert "twin" not in RULES


def test_a_path_parameter_is_a_file_relative_to_the_plan(corpus_dir, tmp_path, monkeypatch):
    """Like every path in a plan, a substrate parameter typed Path (the glyph kind's font_path) is
    relative to the plan file, not to wherever the command runs, and is checked when the plan is read."""
    from cli_util import SMALL_PLAN, write_plan
    from growlm.plan import load_plan, plan_to_json, resolve_plan

    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "my-font.otf").write_bytes(b"not read until the substrate is built")
    plan = write_plan(plans, SMALL_PLAN.replace('kind = "binary"\nbits = 16\n',
                                                'kind = "glyph"\n[substrate.params]\nfont_path = "my-font.otf"\n'),
                      corpus_dir)
    monkeypatch.chdir(tmp_path)  # the plan's folder is not the working directory
    p = load_plan(Path("plans") / "plan.toml")
    assert p.substrate.params == {"font_path": str(plans / "my-font.otf")}
    assert resolve_plan(p) == p and plan_to_json(p)["substrate"]["params"] == {"font_path": str(plans / "my-font.otf")}
    (plans / "my-font.otf").unlink()
    with pytest.raises(GrowlmError) as e:
        load_plan(plan)
    assert str(e.value) == f"plan {plan}: substrate.params.font_path: file not found: {plans / 'my-font.otf'}"


# ----------------------------------------------------------------------------------------------
# A stage kind


def test_toy_stage_kind(corpus_dir, tmp_path):
    from safetensors.torch import load_file

    from cli_util import SMALL_PLAN, write_plan
    from growlm.api import train, verify
    from growlm.stages import STAGE_KINDS

    text = SMALL_PLAN.split("[[stage]]")[0] + "[[stage]]\ngrow = 2\ntokens = 256\n[[stage]]\ntrain = \"top\"\ntokens = 256\n"
    with loaded("A stage kind", STAGE_KINDS, "top"):
        run = tmp_path / "run"
        train(write_plan(tmp_path, text, corpus_dir), run, progress=False, log=lambda m: None)
        before, after = (load_file(run / f"stage-{i}" / "model.safetensors") for i in (1, 2))
        moved = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n in after if not torch.equal(before[n], after[n])}
        assert moved == {"blocks.1", "head", "ln_f"}  # the top block of two, and the head: nothing else
        assert verify(run)["ok"]
    with pytest.raises(GrowlmError, match="unknown stage kind 'top'"):
        train(write_plan(tmp_path, text, corpus_dir), tmp_path / "run2", progress=False, log=lambda m: None)
