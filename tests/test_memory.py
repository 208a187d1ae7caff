"""Absurd sizes are refused up front, in one line with the estimate (issue 25, D7): a substrate of two
billion rows, a batch of 100,000 sequences. The memory estimate (growlm.memory) is shown by ``growlm info PLAN``."""

from __future__ import annotations

import time
import tomllib

from cli_util import SMALL_PLAN, growlm, one_line_error, write_plan
from growlm import memory
from growlm.growth import plan_memory
from growlm.memory import TrainingMemory, available_bytes, training_memory
from growlm.model import ModelConfig
from growlm.plan import Plan, load_plan, plan_from_dict


def load_plan_text(text: str) -> Plan:
    """A plan from TOML text, its paths unchecked (only its shape matters here)."""
    return plan_from_dict(tomllib.loads(text), check_paths=False)


def test_huge_vocab_substrate_is_refused_before_allocating(tmp_path):
    # the reported command: a [2e9, 16] float32 matrix is 119 GiB, built, copied and serialised
    t0 = time.perf_counter()
    r = growlm("substrate", "build", "--kind", "trainable", "--vocab-size", "2000000000", "--dim", "16",
               "--out", tmp_path / "sub")
    one_line_error(r, "[2,000,000,000, 16] substrate", "358 GiB to build", "memory available", "smaller vocabulary")
    assert time.perf_counter() - t0 < 2 and not (tmp_path / "sub").exists()


def test_plan_over_the_available_memory_is_refused_before_the_first_batch(tmp_path, corpus_dir, monkeypatch):
    """The refusal itself, made deterministic: this machine is said to have 1 MiB free."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1 << 20)
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    r = growlm("train", plan, "--out", tmp_path / "run")
    one_line_error(r, "stage 1 needs an estimated", "GiB per process to train", "activations", "4 rows x context 32",
                   "fp32 on cpu", "more than the 0.000977 GiB of cpu memory available",
                   "lower train.batch_size (now 4)")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "stage-1").exists()


def test_the_reported_huge_batch_is_refused_at_once(tmp_path, corpus_dir):
    """batch_size = 100,000 over a 60 KB corpus reached 8 GB and was still on step 1 after 150 s. Its
    estimate is 29 GiB, over the 23 GiB the reporting machine had free; the refusal is run here with a
    hundred times that batch, beyond any machine, so it happens wherever the suite runs."""
    reported = SMALL_PLAN.replace("batch_size = 4", "batch_size = 100000")
    cfg = ModelConfig(vocab_size=406, d_model=32, n_heads=2, context=32, embed_dim=16)
    assert max(e.total for e in plan_memory(load_plan_text(reported), cfg, bf16=False)) > 25 << 30
    plan = write_plan(tmp_path, SMALL_PLAN.replace("batch_size = 4", "batch_size = 10000000"), corpus_dir)
    t0 = time.perf_counter()
    r = growlm("train", plan, "--out", tmp_path / "run")
    one_line_error(r, "stage 1 needs an estimated", "10,000,000 rows x context 32",
                   "lower train.batch_size (now 10,000,000)")
    assert time.perf_counter() - t0 < 2 and not (tmp_path / "run" / "stage-1").exists()


def test_info_plan_shows_the_estimate(tmp_path, corpus_dir):
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    r = growlm("info", plan)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("estimated_training_memory"))
    assert "GiB per process (stage 2 of 2: weights" in line and "4 rows x context 32" in line
    assert any(x.split() == ["n_layers", "3"] for x in r.stdout.splitlines())
    # the same figure the training start compares with the machine's memory
    p = load_plan(plan)
    vocab = int(next(x for x in r.stdout.splitlines() if x.startswith("vocab_size")).split()[1].replace(",", ""))
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_heads=2, context=32)
    assert f"{plan_memory(p, cfg, bf16=False)[1].total:,}" in r.stdout


def test_estimate_counts_what_trains():
    """Gradients and AdamW state for the trainable set only; activations for the blocks the gradient
    reaches; logits of at most 8,192 rows at once (the loss chunks larger batches)."""
    est = training_memory(params_total=1000, params_trainable=100, grad_layers=2, tokens=10_000, d_model=8,
                          vocab_size=50, bf16=False)
    assert est == TrainingMemory(weights=4000, gradients=400, optimizer=800,
                                 activations=10_000 * 8 * 76 * 3 + 10_000 * 16, logits=8192 * 50 * 12)
    assert est.total == sum((4000, 400, 800, est.activations, est.logits))
    sharded = training_memory(params_total=1000, params_trainable=100, grad_layers=2, tokens=10_000, d_model=8,
                              vocab_size=50, bf16=True, world=4, sharded=True)
    assert (sharded.weights, sharded.gradients, sharded.optimizer) == (1000, 100, 200)
    cfg = ModelConfig(vocab_size=500, d_model=32, n_heads=2, context=32)
    plan = load_plan_text(SMALL_PLAN)
    grow, lora = plan_memory(plan, cfg, bf16=False)
    assert lora.activations > grow.activations  # the adapters on blocks 0-1 make the whole stack record
    assert lora.total < 8 << 20  # the suite's own plans pass the check on any machine
    assert available_bytes("cpu") is None or available_bytes("cpu") > 0
