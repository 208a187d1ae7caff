"""Data parallelism through torchrun with 2 CPU ranks (gloo): same result as 1 rank, rank 0 writes alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_util import REPO, SMALL_PLAN, child_env, growlm, growlm_process, write_plan
from test_prepare import prepared_plan, prepared_train  # noqa: F401 (a fixture, shared with the prepare tests)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")]


def close(a: Path, b: Path, rtol: float = 1e-5) -> bool:
    """Relative error of the weights as a whole, ||a - b|| / ||b||, within ``rtol``.

    Ranks sum gradients in another order than one process does, so the runs agree to float
    rounding, not bit for bit.
    """
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    err = sum(((ta[k] - tb[k]).double() ** 2).sum() for k in ta).sqrt()
    return bool(err <= rtol * sum((tb[k].double() ** 2).sum() for k in tb).sqrt())


def torchrun(plan: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = child_env(REPO / "tests" / "audit", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "growlm", "train", str(plan), "--out", str(out), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)


@pytest.fixture(scope="session")
def one_rank(small_run) -> Path:
    """The same plan in one process, uninterrupted."""
    return small_run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_and_only_rank0_writes(corpus_dir, tmp_path, one_rank, parallel, request):
    """DDP, and FSDP2 sharding the trainable blocks; both with a LoRA stage (the plan's stage 2). The DDP run reads
    train.txt prepared by ``growlm data prepare`` (every rank maps the shards, rank 0 verifies them), the one-rank
    run the per-file cache: the same tokens, so the same loss curve and weights within 1e-5 relative."""
    text = prepared_plan(request.getfixturevalue("prepared_train")) if parallel == "ddp" else SMALL_PLAN
    plan = write_plan(tmp_path, text.replace("log_every = 2", f'log_every = 2\nparallel = "{parallel}"'), corpus_dir)
    audit = tmp_path / "audit"
    audit.mkdir()
    r = torchrun(plan, tmp_path / "run", env={"GROWLM_AUDIT_DIR": str(audit)})
    assert r.returncode == 0, r.stderr[-3000:]
    for n in (1, 2):
        for name in ("model.safetensors", "adapters.safetensors") if n == 2 else ("model.safetensors",):
            assert close(tmp_path / "run" / f"stage-{n}" / name, one_rank / f"stage-{n}" / name)
    run = str(tmp_path / "run")
    rank1 = (audit / "rank-1.txt").read_text().splitlines() if (audit / "rank-1.txt").exists() else []
    assert not [x for x in rank1 if run in x], rank1
    rank0 = (audit / "rank-0.txt").read_text().splitlines()
    assert any("stage-2" in x for x in rank0)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    curve = {(x["stage"], x["step"]): x["loss"] for x in map(json.loads, lines) if "loss" in x}
    ref = {(x["stage"], x["step"]): x["loss"] for x in map(json.loads, (one_rank / "metrics.jsonl").read_text().splitlines())
           if "loss" in x}
    assert curve.keys() == ref.keys() and len(curve) > 4
    assert all(abs(curve[k] - ref[k]) <= 1e-5 * abs(ref[k]) + 1e-6 for k in ref), (curve, ref)  # + the log's rounding


def test_indivisible_batch_is_a_clear_error(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, SMALL_PLAN.replace("batch_size = 4", "batch_size = 3"), corpus_dir)
    r = torchrun(plan, tmp_path / "run")
    assert r.returncode != 0
    assert "batch_size 3 is not divisible by the world size 2" in r.stderr


# SMALL_PLAN without its LoRA adapters: stage 2 grows one block over stage 1's two, and no rank imports peft (some
# 6 s of CPU in every process that does, and a dead-rank test starts four ranks)
NO_LORA_PLAN = SMALL_PLAN.replace('lora = { rank = 2, blocks = "frozen", targets = ["qkv", "fc"] }\n', "")


@pytest.mark.e2e(seconds=30)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_dead_rank_ends_the_run_and_resume_completes(corpus_dir, tmp_path, parallel, request):
    """Rank 1 is killed in stage 2 after the step-6 checkpoint: the run ends naming --resume and keeps stage 1;
    --resume finishes it to the weights of one rank uninterrupted. FSDP2 on SMALL_PLAN, whose stage 2 carries LoRA
    adapters (sharded, checkpointed, restored), against ``small_run``; DDP on the plan without them, against one
    rank of that plan (DDP with LoRA: the test above)."""
    assert "lora" not in NO_LORA_PLAN
    text = SMALL_PLAN if parallel == "fsdp" else NO_LORA_PLAN
    plan = write_plan(tmp_path, text.replace("log_every = 2", f'log_every = 2\nparallel = "{parallel}"'), corpus_dir)
    r = growlm_process("train", str(plan), "--out", str(tmp_path / "run"), "--nproc", "2",
                       env={"GROWLM_FAULT": "kill@step:2:7", "GROWLM_FAULT_RANK": "1"}, timeout=300)
    assert r.returncode != 0
    assert "a training process failed" in r.stderr and "--resume" in r.stderr
    assert (tmp_path / "run" / "stage-1" / "model.json").is_file()
    assert not (tmp_path / "run" / "stage-2").exists()
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    if parallel == "fsdp":
        one = request.getfixturevalue("one_rank")
    else:
        (tmp_path / "one").mkdir()
        one = tmp_path / "one" / "run"
        r = growlm("train", str(write_plan(tmp_path / "one", text, corpus_dir)), "--out", str(one), "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
    names = ("model.safetensors", "adapters.safetensors") if parallel == "fsdp" else ("model.safetensors",)
    for name in names:
        assert close(tmp_path / "run" / "stage-2" / name, one / "stage-2" / name), name
