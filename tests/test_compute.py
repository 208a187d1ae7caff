"""What a stage costs (its FLOP model against torch's own count) and the equal-compute reading of
validation curves (growlm.compute)."""

from __future__ import annotations

import json

import pytest
import torch

import growlm
from cli_util import SMALL_PLAN, write_plan
from growlm.compute import Point, loss_at, stage_costs, total_cost, validation_curve
from growlm.errors import GrowlmError
from growlm.growth import set_trainable, stage_flop_per_token
from growlm.model import GrowLM, ModelConfig, flop_per_token
from growlm.plan import LoraSpec, StageSpec


def _counted(model: GrowLM, cfg: ModelConfig) -> float:
    """Matmul and attention FLOPs per token that torch counts in one real training step.

    Two rows of ``context`` tokens: under the 512 rows from which the loss runs torch's fused
    ``linear_cross_entropy``, which the counter has no rule for (it would count the head as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    # the math backend runs attention as matmuls the counter sees (it has no rule for the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, targets=x).backward()
    return counter.get_total_flops() / x.numel()


def _stage_model(stage: StageSpec, depth_before: int, earlier: list[dict], trainable_embedding: bool = False) -> GrowLM:
    """The model a stage trains, built as ``Trainer.run_stage`` builds it: ``depth_before`` blocks carrying
    the ``earlier`` stages' adapters, grown, this stage's adapters added, its trainable set declared."""
    from growlm.growth import grow, lora_blocks
    from growlm.lora import add_lora

    model = GrowLM(ModelConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=depth_before, context=32,
                               trainable_embedding=trainable_embedding))
    for n, rec in enumerate(earlier):
        model.lora_records.append(add_lora(model, f"stage{n}", rank=rec["rank"], alpha=2.0 * rec["rank"],
                                           blocks=rec["blocks"], targets=rec["targets"], generator_seed=n))
    new = grow(model, stage.grow, stage.init, torch.Generator().manual_seed(0))
    adapter = None
    if stage.lora is not None:
        adapter = "this"
        model.lora_records.append(add_lora(model, adapter, rank=stage.lora.rank, alpha=2.0 * stage.lora.rank,
                                           blocks=lora_blocks(stage.lora, depth_before, len(model.blocks)),
                                           targets=list(stage.lora.targets), generator_seed=9))
    set_trainable(model, stage, new, adapter)
    return model


_EARLIER = [{"rank": 2, "blocks": [0, 1], "targets": ["qkv", "fc"]}]


@pytest.mark.parametrize(("stage", "depth_before", "earlier"), [
    (StageSpec(grow=1, tokens=1), 2, []),  # grow: two frozen blocks forward only
    (StageSpec(grow=3, train="all", tokens=1), 0, []),  # monolithic
    (StageSpec(train="head", tokens=1), 3, []),  # the whole stack forward only
    # adapters only, on every block: the frozen head and base weights pass the gradient down (4 per weight)
    (StageSpec(train="adapters", lora=LoraSpec(rank=2), tokens=1), 3, []),
    # adapters on block 1's output projections only: block 1's qkv and attention run forward only
    (StageSpec(train="adapters", lora=LoraSpec(rank=4, blocks=[1], targets=["attn_out", "mlp_out"]), tokens=1), 3, []),
    (StageSpec(grow=1, lora=LoraSpec(rank=2, targets=["qkv", "fc"]), tokens=1), 2, []),  # grow + LoRA on the trunk
    (StageSpec(grow=1, lora=LoraSpec(rank=2, blocks="all"), tokens=1), 2, []),  # adapters on the grown block too
    (StageSpec(train="head", lora=LoraSpec(rank=2, blocks=[2]), tokens=1), 3, []),
    (StageSpec(grow=1, tokens=1), 2, _EARLIER),  # an earlier stage's adapters: applied, frozen, forward only
    (StageSpec(train="adapters", lora=LoraSpec(rank=2, blocks=[1]), tokens=1), 3, _EARLIER),  # ... and passed through
], ids=["grow", "all", "head", "adapters", "adapters-block1-out", "grow+lora", "grow+lora-all", "head+lora",
        "grow-over-old-adapters", "adapters-over-old-adapters"])
def test_stage_flops_equal_torch_counter(stage, depth_before, earlier):
    """Each kind of stage's FLOP model is exactly what torch counts in one training step of the model
    training builds for it (issue 25: a LoRA stage was billed as if every block and the head trained)."""
    model = _stage_model(stage, depth_before, earlier)
    assert _counted(model, model.cfg) == stage_flop_per_token(model.cfg, stage, depth_before, earlier)


def test_stage_flops_trainable_embedding_and_order():
    stage = StageSpec(grow=2, train="all", tokens=1)
    model = _stage_model(stage, 0, [], trainable_embedding=True)
    assert _counted(model, model.cfg) == stage_flop_per_token(model.cfg, stage, 0)  # a lookup's gradient: no matmul
    cfg = ModelConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=3, context=32)
    grow, mono = StageSpec(grow=1, tokens=1), StageSpec(grow=3, train="all", tokens=1)
    head, adapters = StageSpec(train="head", tokens=1), StageSpec(train="adapters", lora=LoraSpec(rank=2), tokens=1)
    flops = {k: stage_flop_per_token(cfg, st, d) for k, st, d in
             (("head", head, 3), ("grow", grow, 2), ("mono", mono, 0), ("adapters", adapters, 3))}
    assert flops["head"] < flops["grow"] < flops["adapters"] < flops["mono"]
    # the closed form for a frozen prefix under a trained top agrees with the stage model
    assert flops["mono"] == flop_per_token(cfg) and flops["head"] == flop_per_token(cfg, frozen=3)
    assert flops["grow"] == flop_per_token(cfg, frozen=2)


def test_loss_at_reads_a_curve():
    curve = [Point(10, 100.0, 1.0, 4.0), Point(20, 200.0, 2.0, 3.0), Point(40, 400.0, 3.0, 2.0)]
    assert loss_at(curve, 150.0, "flops") == pytest.approx(3.5)
    assert loss_at(curve, 2.5, "seconds") == pytest.approx(2.5)
    assert loss_at(curve, 40, "tokens") == 2.0 and loss_at(curve, 10, "tokens") == 4.0
    assert loss_at(curve, 401.0, "flops") is None  # the run never spent that much
    assert loss_at(curve, 99.0, "flops") is None  # before its first measurement
    assert loss_at([], 1.0, "flops") is None


def test_run_cost_and_curve(tmp_path, corpus_dir):
    plan_file = write_plan(tmp_path, SMALL_PLAN.replace("log_every = 2", "log_every = 2\neval_every = 4"),
                           corpus_dir)
    run = growlm.train(plan_file, tmp_path / "run", progress=False)
    costs = stage_costs(run)
    plan = growlm.load_plan(plan_file)
    cfg = ModelConfig(vocab_size=json.loads((run / "stage-1" / "model.json").read_text())["config"]["vocab_size"],
                      d_model=32, n_heads=2, context=32)
    depth = 0
    for c, st in zip(costs, plan.stage, strict=True):
        assert c["flops"] == pytest.approx(c["tokens"] * stage_flop_per_token(cfg, st, depth), rel=1e-9)
        assert c["seconds"] > 0
        depth += st.grow
    assert total_cost(run)["flops"] == pytest.approx(sum(c["flops"] for c in costs))

    # every log line carries its stage's FLOPs and training seconds so far
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("flops" in r and "wall_s" in r for r in lines)
    evals = [r for r in lines if "valid_loss" in r]
    curve = validation_curve(run)
    # the mid-stage evaluations and each stage's final one, with cumulative cost across stages
    assert len(curve) == len([r for r in evals if r["tokens"] < costs[r["stage"] - 1]["tokens"]]) + len(costs)
    assert all(a.tokens < b.tokens and a.flops < b.flops and a.seconds <= b.seconds
               for a, b in zip(curve, curve[1:], strict=False))
    assert curve[-1].tokens == sum(c["tokens"] for c in costs)
    assert curve[-1].flops == pytest.approx(total_cost(run)["flops"])
    assert curve[-1].valid_loss == costs[-1]["valid_loss"]
    first_eval = evals[0]
    assert curve[0] == Point(first_eval["tokens"], first_eval["flops"], first_eval["wall_s"], first_eval["valid_loss"])

    # a damaged log line is named, not a traceback
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"stage": 2, "step"\n')
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(GrowlmError, match=f"metrics.jsonl: line {n} is not a JSON record"):
        validation_curve(run)

    # a stage saved before growlm counted FLOPs has no cost to read: said, not guessed
    meta_file = run / "stage-1" / "model.json"
    meta = json.loads(meta_file.read_text())
    del meta["metrics"]["flops"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GrowlmError, match="stage-1.*records no training FLOPs"):
        stage_costs(run)


def test_training_seconds_count_the_steps_only(tmp_path, corpus_dir, monkeypatch):
    """``wall_s`` (what the equal-compute reading compares) is the time spent in training steps: the
    evaluations and checkpoints between them are not training compute. A fake clock makes every step
    take 1 s and every evaluation and checkpoint 1000 s."""
    import types

    import growlm.training as training

    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(fn, seconds):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)
        return timed

    monkeypatch.setattr(training.Loop, "_step", taking(training.Loop._step, 1.0))
    monkeypatch.setattr(training, "evaluate_loss", taking(training.evaluate_loss, 1000.0))
    monkeypatch.setattr(training.Loop, "_checkpoint", taking(training.Loop._checkpoint, 1000.0))
    plan = write_plan(tmp_path, SMALL_PLAN.replace("log_every = 2", "log_every = 2\neval_every = 2"), corpus_dir)
    run = growlm.train(plan, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("valid_loss" in r for r in lines) >= 4 and clock[0] > 4000  # evaluations and checkpoints ran
    assert all(r["wall_s"] == r["step"] for r in lines)
    for c in stage_costs(run):
        assert c["seconds"] == c["tokens"] / (4 * 32)  # one second per step of 4 x 32 tokens
