"""Adversarial, property-based tests of the Python API's arguments, plan LoRA tables and data weights
(the second probe's surfaces; the CLI's are in ``test_fuzz.py``, whose profiles and alarm these share).

The properties: every ``growlm.*`` call with any argument returns, or raises a one-line ``GrowlmError``
(never another exception, never a hang, never a change to the models it reads); a plan whose LoRA table
is accepted builds its adapters on the model its stages grow; a mixture of data files draws each file in
the ratio of its weights, whatever their magnitude.
"""

from __future__ import annotations

import json
import tomllib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import growlm
from cli_util import SMALL_PLAN, snapshot
from growlm.errors import GrowlmError
from test_fuzz import alarm, budget

ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
    st.binary(max_size=6), st.lists(st.integers(-3, 3), max_size=3), st.tuples(st.integers(0, 2)),
    st.dictionaries(st.sampled_from(["stage", "model", "data", "x"]), st.integers(0, 2), max_size=2),
    st.just(Path("/nonexistent/model")), st.just(float("nan")),
)


def one_line_growlm_error(call) -> object:
    """``call()``'s result, or None when it raised a one-line GrowlmError; anything else fails the example."""
    try:
        with alarm(60):
            return call()
    except GrowlmError as e:
        text = str(e)
        assert text and "\n" not in text.strip() and "Traceback" not in text, text
        return None


@pytest.fixture(scope="module")
def targets(tiny_model_dir, mixture, corpus_dir) -> dict[str, object]:
    return {"model": tiny_model_dir, "mixture": mixture, "text": corpus_dir / "valid.txt"}


@given(data=st.data())
@budget(30)
def test_fuzz_api_arguments(targets, tmp_path_factory, data):
    """Every API verb with odd arguments beside real ones: a result or one GrowlmError line, inputs untouched."""
    pick = st.one_of(ODD, st.sampled_from(list(targets.values())), st.sampled_from([str(v) for v in targets.values()]))
    out = tmp_path_factory.mktemp("out") / "o"
    verb = data.draw(st.sampled_from(["load", "evaluate", "merge", "export", "train", "plan_from_dict", "load_plan"]))
    before = {k: snapshot(v) for k, v in targets.items() if k != "text"}
    if verb == "load":
        one_line_growlm_error(lambda: growlm.load(data.draw(pick)))
    elif verb == "evaluate":
        kw = data.draw(st.fixed_dictionaries({}, optional={
            "data": st.one_of(pick, st.just(targets["text"])), "limit": ODD, "runs": ODD, "seed": ODD,
            "protocol": st.one_of(ODD, st.sampled_from(["paper", "loglik"]))}))
        task = data.draw(st.one_of(st.just("ppl"), ODD))
        one_line_growlm_error(lambda: growlm.evaluate(data.draw(pick), task, progress=False, **kw))
    elif verb == "merge":
        paths = data.draw(st.one_of(pick, st.lists(pick, max_size=3)))
        kw = data.draw(st.fixed_dictionaries({}, optional={
            "combine": st.one_of(ODD, st.sampled_from(["mean-logits", "mean-probs", "weighted"])),
            "weights": st.one_of(ODD, st.lists(st.floats(), max_size=3)), "space": ODD}))
        one_line_growlm_error(lambda: growlm.merge(paths, out, progress=False, **kw))
    elif verb == "export":
        one_line_growlm_error(lambda: growlm.export(data.draw(pick), out))
    elif verb == "train":
        one_line_growlm_error(lambda: growlm.train(data.draw(pick), out, progress=False, log=lambda *a: None))
    elif verb == "plan_from_dict":
        one_line_growlm_error(lambda: growlm.plan_from_dict(data.draw(ODD)))
    else:
        one_line_growlm_error(lambda: growlm.load_plan(data.draw(pick)))
    assert {k: snapshot(v) for k, v in targets.items() if k != "text"} == before


INT = st.one_of(st.integers(-2, 6), st.integers(-(2**64), 2**64), st.booleans(), st.floats(-1, 9), st.text(max_size=3))
LORA = st.fixed_dictionaries({}, optional={
    "rank": INT,
    "alpha": st.one_of(st.floats(), INT),
    "blocks": st.one_of(st.sampled_from(["frozen", "all", "none", ""]), st.lists(INT, max_size=4)),
    "targets": st.one_of(st.lists(st.sampled_from(["qkv", "attn_out", "fc", "mlp_out", "head", ""]), max_size=5),
                         st.text(max_size=5)),
})


@given(lora=LORA, stage=st.integers(0, 1))
@budget(40)
def test_fuzz_plan_lora_tables(lora, stage):
    """A LoRA table is refused when the plan is read, naming its key, or it builds on the model its stage grows."""
    from growlm.growth import lora_blocks
    from growlm.lora import add_lora
    from growlm.model import GrowLM, ModelConfig

    raw = tomllib.loads(SMALL_PLAN)
    raw["stage"][stage]["lora"] = lora
    plan = one_line_growlm_error(lambda: growlm.plan_from_dict(raw, check_paths=False))
    if plan is None:
        return
    spec = plan.stage[stage].lora
    before = sum(s.grow for s in plan.stage[:stage])
    after = before + plan.stage[stage].grow
    model = GrowLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=after, context=8, embed_dim=16))
    rec = add_lora(model, f"stage{stage + 1}", rank=spec.rank, alpha=spec.alpha or 2.0 * spec.rank,
                   blocks=lora_blocks(spec, before, after), targets=list(spec.targets), generator_seed=0)
    assert rec["blocks"] and rec["targets"]


WEIGHT = st.one_of(st.floats(), st.sampled_from([5e-324, 1e308, 1.0]),
                   st.integers(-1, 2**70), st.booleans(), st.text(max_size=3))


@given(weights=st.one_of(st.lists(WEIGHT, min_size=0, max_size=4), st.lists(st.sampled_from([1e308, 1.7e308]), min_size=2,
                                                                               max_size=2)))
@budget(40)
def test_fuzz_data_weights(weights, corpus_dir, tiny_tokenizer_dir, tmp_path_factory):
    """``data.weights`` is refused naming the key, or every file is drawn in the ratio of its weight."""
    from growlm.data import Batches, Source
    from growlm.tokenizer import Tokenizer

    raw = tomllib.loads(SMALL_PLAN)
    raw["data"] = {"train": [str(corpus_dir / "en.txt"), str(corpus_dir / "ru.txt")], "weights": weights}
    plan = one_line_growlm_error(lambda: growlm.plan_from_dict(raw, check_paths=False))
    if plan is None:
        return
    ws = plan.data.weights
    assert len(ws) == 2 and all(np.isfinite(w) and w > 0 for w in ws)
    batches = Batches([Source([p], w) for p, w in zip(plan.data.train, ws, strict=True)],
                      Tokenizer.load(tiny_tokenizer_dir), context=8, batch_size=2, seed=0,
                      cache_dir=tmp_path_factory.mktemp("shards"))
    share = [Fraction(w) / sum(map(Fraction, ws)) for w in ws]
    got = np.diff(np.concatenate([[0.0], batches._cum]))
    assert np.all(np.isfinite(got)) and abs(batches._cum[-1] - 1) < 1e-12
    assert all(abs(float(s) - g) < 1e-9 for s, g in zip(share, got, strict=True)), (weights, got)
    json.dumps(got.tolist(), allow_nan=False)
