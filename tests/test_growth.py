"""Constructive growth end to end: plans, frozen-means-frozen, init modes, LoRA, resume, bad input.

The CLI runs in this process, except where the guarantee needs a real one (kill -9, Ctrl-C, SIGTERM). The
reference for a resumed run is the shared ``small_run`` (``SMALL_PLAN`` trained uninterrupted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_util import REPO, SMALL_PLAN, growlm, growlm_process, tensors_equal, write_plan
from growlm.errors import GrowlmError
from growlm.growth import grow, plan_active_params, set_trainable
from growlm.hashing import sha256_file
from growlm.inspection import info_model
from growlm.loading import load_model
from growlm.lora import add_lora, merge_adapters
from growlm.model import GrowLM, ModelConfig, block_param_count, head_param_count
from growlm.plan import StageSpec, load_plan
from growlm.training import train

ISSUE_PLAN = """\
[substrate]
kind = "glyph"                 # glyph | binary | random-bits | trainable
[tokenizer]
corpus = ["train.txt"]
compact = true
[model]
d_model = 64
n_heads = 4
context = 64
[data]
train = ["train.txt"]
valid = ["valid.txt"]
[train]
batch_size = 8
lr = 3e-3
seed = 0
checkpoint_every = 10          # optimizer steps between in-stage checkpoints
[[stage]]
grow = 2                       # add 2 blocks on top; train them and the LM head
tokens = 16384
[[stage]]
grow = 1
init = "zero-out"              # random (default, as the paper) | zero-out | copy-top
tokens = 16384
[[stage]]
grow = 1
lora = { rank = 4, blocks = "frozen" }   # LoRA on the frozen blocks while the new block trains
tokens = 16384
"""

@pytest.fixture(scope="session")
def issue_run(artefacts, corpus_dir) -> Path:
    """The issue's plan, run through the CLI (in this process) exactly as written, once a test run."""
    def build(d: Path) -> None:
        d.mkdir()
        r = growlm("train", str(write_plan(d, ISSUE_PLAN, corpus_dir)), "--out", str(d / "run"), "--no-progress")
        assert r.returncode == 0, r.stderr

    return artefacts.get("issue-run", build) / "run"


def test_issue_plan_runs_and_info_shows_depths(issue_run):
    depths = []
    for n in (1, 2, 3):
        r = growlm("info", str(issue_run / f"stage-{n}"), "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        depths.append(info["n_layers"])
        assert len(info["blocks"]) == info["n_layers"]
        assert {"params_active", "substrate_fingerprint", "tokenizer_fingerprint", "fingerprint", "lineage"} <= info.keys()
        assert len(info["lineage"]) == n - 1
    assert depths == [2, 3, 4]
    lines = [json.loads(x) for x in (issue_run / "metrics.jsonl").read_text().splitlines()]
    assert {"stage", "step", "tokens", "loss", "lr", "tokens_per_s", "params_active"} <= lines[0].keys()
    assert {x["stage"] for x in lines} == {1, 2, 3}


def test_frozen_blocks_and_substrate_bit_identical_across_stages(issue_run):
    infos = [info_model(issue_run / f"stage-{n}") for n in (1, 2, 3)]
    for earlier, later in zip(infos, infos[1:], strict=False):
        assert later["substrate_fingerprint"] == earlier["substrate_fingerprint"]
        for blk in earlier["blocks"]:
            assert later["blocks"][blk["index"]]["sha256"] == blk["sha256"]
        assert later["lineage"][-1] == earlier["fingerprint"]
    emb = [load_file(str(issue_run / f"stage-{n}" / "model.safetensors"))["embed.weight"] for n in (1, 2, 3)]
    assert torch.equal(emb[0], emb[1]) and torch.equal(emb[1], emb[2])


def test_lora_adapters_stored_apart_and_merge_equivalent(issue_run, tmp_path):
    st3 = issue_run / "stage-3"
    assert (st3 / "adapters.safetensors").is_file()
    adapters = load_file(str(st3 / "adapters.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    assert not any(".lora_" in k for k in load_file(str(st3 / "model.safetensors")))
    # the adapters moved something: the LoRA B matrices are no longer zero
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)

    r = growlm("lora-merge", str(st3), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    a, b = load_model(st3).model.eval(), load_model(tmp_path / "merged").model.eval()
    assert b.lora_records == [] and not (tmp_path / "merged" / "adapters.safetensors").exists()
    ids = torch.randint(0, a.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids), b(ids)
    assert ((la - lb).abs().max() / la.abs().max()).item() <= 1e-5


def test_active_count_is_new_blocks_plus_head(issue_run):
    cfg = ModelConfig(**load_model(issue_run / "stage-1").meta.config)
    meta1 = load_model(issue_run / "stage-1").meta
    meta2 = load_model(issue_run / "stage-2").meta
    assert meta1.params_active == 2 * block_param_count(cfg) + head_param_count(cfg)
    assert meta2.params_active == block_param_count(cfg) + head_param_count(cfg)


def test_readme_plan_trains_every_block_it_adds_and_the_head(issue_run):
    """The README's plan: stage 3 grows a block under LoRA; the block, head and norm train with the adapters."""
    prev = {}
    for n in (1, 2, 3):
        stage = issue_run / f"stage-{n}"
        meta = json.loads((stage / "model.json").read_text())
        now = load_file(str(stage / "model.safetensors"))
        for b in meta["stage"]["new_blocks"]:
            assert not torch.equal(now[f"blocks.{b}.ln1.weight"], torch.ones_like(now[f"blocks.{b}.ln1.weight"]))
            assert f"blocks.{b}" in meta["audit"]["trained"]
        assert not any(torch.equal(prev[k], now[k]) for k in ("head.weight", "ln_f.weight") if k in prev)
        prev = now
    assert set(meta["audit"]["trained"]) == {"blocks.3", "head", "ln_f"} | {f"blocks.{b}.lora.stage3" for b in range(3)}


def test_paper_9l_unicode_active_count_per_stage():
    plan = load_plan(REPO / "configs/paper/9l-unicode.toml", check_paths=False)
    cfg = ModelConfig(vocab_size=65536, d_model=1024, n_heads=32, context=1024)
    assert plan_active_params(plan, cfg) == [104_899_584] * 3
    mono = load_plan(REPO / "configs/paper/9l-unicode-monolith.toml", check_paths=False)
    assert plan_active_params(mono, cfg) == [180_476_928]


def _tiny_model(n_layers: int = 2) -> GrowLM:
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=n_layers, context=16)
    m = GrowLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.embed.weight.normal_(generator=g)
        m.head.weight.normal_(0, 0.02, generator=g)
    for b in m.blocks:
        b.init_weights(g)
    return m


def test_frozen_params_get_no_grad_and_optimizer_holds_only_trainable():
    m = _tiny_model(2)
    new = grow(m, 1, "random", torch.Generator().manual_seed(1))
    names = set_trainable(m, StageSpec(grow=1, tokens=1), new)
    expected = {id(p) for p in (*m.blocks[2].parameters(), *m.head.parameters(), *m.ln_f.parameters())}
    assert {id(p) for n, p in m.named_parameters() if n in names} == expected
    assert m.frozen_prefix() == 2
    ids = torch.randint(0, 50, (2, 16))
    m(ids, targets=ids).backward()
    for name, p in m.named_parameters():
        assert (p.grad is not None) == (id(p) in expected), name


def test_zero_out_growth_leaves_logits_unchanged():
    m = _tiny_model(2).eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = m(ids)
        grow(m, 2, "zero-out", torch.Generator().manual_seed(1))
        after = m(ids)
    assert (before - after).abs().max().item() <= 1e-6


def test_copy_top_copies_the_top_block():
    m = _tiny_model(2)
    grow(m, 1, "copy-top", torch.Generator())
    for a, b in zip(m.blocks[1].parameters(), m.blocks[2].parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with pytest.raises(GrowlmError, match="copy-top"):
        grow(_tiny_model(0), 1, "copy-top", torch.Generator())


def test_lora_merge_equivalence_in_memory():
    m = _tiny_model(2)
    add_lora(m, "s1", rank=2, alpha=4.0, blocks=[0, 1], targets=["qkv", "attn_out", "fc", "mlp_out"])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 50, (2, 16))
    m.eval()
    with torch.no_grad():
        before = m(ids)
        merge_adapters(m)
        after = m(ids)
    assert not any(".lora_" in k for k in m.state_dict())
    assert ((before - after).abs().max() / before.abs().max()).item() <= 1e-5


# ----------------------------------------------------------------------------------------------
# resume and faults


@pytest.mark.process
def test_resume_after_kill_is_bit_identical(corpus_dir, tmp_path, small_run):
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    # kill -9 needs a process of its own; the calls after it run here
    killed = growlm_process("train", plan, "--out", tmp_path / "run", "--no-progress",
                            env={"GROWLM_FAULT": "kill@step:2:7"})
    assert killed.returncode == -9
    assert (tmp_path / "run" / "stage-1").is_dir() and not (tmp_path / "run" / "stage-2").exists()
    assert any((tmp_path / "run" / "checkpoints" / "stage-2").glob("step-*"))
    s1 = sha256_file(tmp_path / "run" / "stage-1" / "model.safetensors")
    fresh = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert fresh.returncode == 2 and "--resume" in fresh.stderr
    resumed = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert sha256_file(tmp_path / "run" / "stage-1" / "model.safetensors") == s1
    for name in ("model.safetensors", "adapters.safetensors"):
        assert tensors_equal(small_run / "stage-2" / name, tmp_path / "run" / "stage-2" / name)
    steps = [(x["stage"], x["step"]) for x in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps))


@pytest.mark.process
@pytest.mark.parametrize("sig", ["sigint", "sigterm"])
def test_sigint_checkpoints_and_resumes(corpus_dir, tmp_path, sig):
    """Ctrl-C, and a scheduler's SIGTERM, write a checkpoint at the current step and exit cleanly."""
    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    # the signal and the exit code 130 need a process of their own; the resume runs here
    r = growlm_process("train", plan, "--out", tmp_path / "run", "--no-progress",
                       env={"GROWLM_FAULT": f"{sig}@step:1:5"})
    assert r.returncode == 130, r.stderr
    assert "interrupted" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "stage-1" / "step-00000005" / "state.json").is_file()
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "stage-2" / "model.json").is_file()


def test_nan_loss_stops_with_advice_and_keeps_completed_stages(corpus_dir, tmp_path):
    text = SMALL_PLAN.replace("[[stage]]\ngrow = 1\ntokens = 1280\nlora", "[[stage]]\ngrow = 1\nlr = 1e30\ntokens = 1280\nlora")
    plan = write_plan(tmp_path, text, corpus_dir)
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2
    assert "not finite" in r.stderr and "learning rate" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "run" / "stage-1" / "model.json").is_file()
    kept = load_model(tmp_path / "run" / "stage-1")  # checksums, shapes and docking port checked
    assert len(kept.model.blocks) == 2 and kept.meta.lineage == []  # stage 1 alone, as trained
    assert all(torch.isfinite(p).all() for p in kept.model.parameters())


@pytest.mark.parametrize("edit, expected", [
    (("grow = 2\ntokens = 1280\n", "grow = 2\ntokens = 1280\ngorw = 2\n"), "stage[1].gorw: unknown key"),
    (("batch_size = 4", "batch_size = -4"), "train.batch_size"),
    (("tokens = 1280", "tokens = 0"), "stage[1].tokens"),
    (("n_heads = 2", "n_heads = 3"), "not divisible"),
    (('train = ["train.txt"]\nvalid', 'train = ["missing.txt"]\nvalid'), "missing.txt"),
    (("rank = 2", "rank = 32"), "exceed the budget"),
    (("batch_size = 4", 'batch_size = "four"'), "train.batch_size"),
])
def test_plan_errors_before_training(corpus_dir, tmp_path, edit, expected):
    plan = write_plan(tmp_path, SMALL_PLAN.replace(*edit), corpus_dir)
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "run").glob("stage-*"))


def test_grow_on_another_substrate_is_refused(corpus_dir, tmp_path, small_run):
    other = SMALL_PLAN.replace('kind = "binary"\nbits = 16', 'kind = "random-bits"\nbits = 16')
    other = f'base = "{small_run / "stage-1"}"\n' + other  # read only: the shared run's first stage
    plan = write_plan(tmp_path, other, corpus_dir)
    r = growlm("train", str(plan), "--out", str(tmp_path / "b"), "--no-progress")
    assert r.returncode == 2 and "substrate fingerprint" in r.stderr
    assert not any((tmp_path / "b").glob("stage-*"))


def test_second_writer_is_refused(corpus_dir, tmp_path):
    import fcntl

    plan = write_plan(tmp_path, SMALL_PLAN, corpus_dir)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2 and "lock" in r.stderr


def test_trunk_cache_skips_the_trunk_and_changes_nothing(corpus_dir, tmp_path, capsys):
    text = SMALL_PLAN.replace('tokens = 1280\nlora = { rank = 2, blocks = "frozen", targets = ["qkv", "fc"] }',
                              "tokens = 25600")
    assert "lora" not in text
    runs = {}
    for flag in ("false", "true"):
        d = tmp_path / flag
        d.mkdir()
        plan = write_plan(d, text.replace("log_every = 2", f"log_every = 2\ntrunk_cache = {flag}"), corpus_dir)
        runs[flag] = train(plan, d / "run", progress=False)
    out = capsys.readouterr().out
    served = int(out.split("trunk cache served ")[1].split(" ")[0].replace(",", ""))
    assert served > 0  # more than one epoch: later epochs read the trunk from the cache
    assert tensors_equal(runs["false"][1] / "model.safetensors", runs["true"][1] / "model.safetensors")
