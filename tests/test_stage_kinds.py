"""Stage kinds with phases and the growth schedules they make (docs/growth.md): what each phase trains is
proved from the files, never from the loop's own records; a kill mid-phase resumes bit-identically;
verify checks every phase.

One run holds every schedule as a stage: the paper's grow stage, grow-then-unfreeze (``new-then-all``),
depth stacking (``layers``) trained in two phases, one late expansion (``grow`` with ``init = "copy-top"``,
``train = "all"``) and a joint phase at the end (``train = "all"``).
"""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_util import growlm, growlm_process, one_line_error, write_plan
from growlm.audit import digests
from growlm.compute import validation_curve
from growlm.hashing import sha256_file
from growlm.stages import STAGE_KINDS, Phase, StageKind, TrainSet

HEAD = """\
[substrate]
kind = "{kind}"
{bits}
[tokenizer]
corpus = ["train.txt"]
[model]
d_model = 32
n_heads = 2
context = 32
[data]
train = ["train.txt"]
valid = ["valid.txt"]
[train]
batch_size = 4
lr = 3e-3
seed = 0
checkpoint_every = 2
log_every = 1
eval_every = 3
"""
PAPER = "[[stage]]\ngrow = 2\ntokens = 640\n"
TWO_PHASE = '[[stage]]\ngrow = 1\ntrain = "new-then-all"\ntokens = 768\nunfreeze_tokens = 384\n'
STACK = '[[stage]]\nlayers = [0, 1, 2, 0, 1, 2]\ntrain = "new-then-all"\ntokens = 512\nunfreeze_tokens = 256\n'
LATE = '[[stage]]\ngrow = 1\ninit = "copy-top"\ntrain = "all"\ntokens = 384\n'
JOINT = '[[stage]]\ntrain = "all"\ntokens = 256\n'
SCHEDULES = PAPER + TWO_PHASE + STACK + LATE + JOINT


def plan_text(kind: str, stages: str) -> str:
    return HEAD.format(kind=kind, bits="bits = 16" if kind == "binary" else "") + stages


def files(stage: Path) -> dict[str, str]:
    """Every tensor's digest, read from the stage's own files."""
    tensors = load_file(stage / "model.safetensors")
    if (stage / "adapters.safetensors").is_file():
        tensors.update(load_file(stage / "adapters.safetensors"))
    return digests(tensors.items())


def changed(a: dict[str, str], b: dict[str, str], rename=lambda n: n) -> set[str]:
    """The tensors of ``b`` that differ from the ``a`` tensor they began as (``rename``: b's name -> a's)."""
    return {n for n in b if rename(n) in a and a[rename(n)] != b[n]}


def groups(names: set[str]) -> set[str]:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.3``; ``head.weight`` -> ``head``."""
    return {".".join(n.split(".")[:2]) if n.startswith("blocks.") else n.split(".")[0] for n in names}


@pytest.fixture(scope="module")
def schedules(artefacts, corpus_dir) -> dict[str, Path]:
    """The run of every schedule over the binary substrate, and a run of the same plan cut after each
    multi-phase stage's first phase (its stage then trains ``new`` on the first phase's tokens), whose
    files are where the next phase must have started, bit for bit. Built once for every worker."""
    cuts = (("full", SCHEDULES),
            ("cut2", PAPER + "[[stage]]\ngrow = 1\ntokens = 384\n"),
            ("cut3", PAPER + TWO_PHASE + '[[stage]]\nlayers = [0, 1, 2, 0, 1, 2]\ntokens = 256\n'))

    def build(d: Path) -> None:
        from growlm.training import train

        for name, stages in cuts:
            (d / name).mkdir(parents=True)
            train(write_plan(d / name, plan_text("binary", stages), corpus_dir), d / name / "run", progress=False,
                  log=lambda m: None)

    root = artefacts.get("stage-kind-schedules", build)
    return {name: root / name / "run" for name, _ in cuts}


def phases(stage: Path) -> list[dict]:
    return json.loads((stage / "model.json").read_text())["stage"].get("phases")


def test_grow_then_unfreeze_trains_the_new_block_then_every_block(schedules):
    run, cut = schedules["full"], schedules["cut2"]
    parent, middle, end = files(run / "stage-1"), files(cut / "stage-2"), files(run / "stage-2")
    assert files(cut / "stage-1") == parent  # the same first stage, bit for bit
    # phase 1 (new): the grown block, the head and the final norm moved; the trunk and the substrate did not
    assert groups(changed(parent, middle)) == {"head", "ln_f"}
    grown = set(middle) - set(parent)
    assert grown == {n for n in middle if n.startswith("blocks.2.")}
    start = json.loads((run / "stage-2" / "model.json").read_text())["audit"]["start_sha256"]
    assert changed(start, middle) & grown == grown  # every tensor of the grown block moved from its init
    # phase 2 (all) began where phase 1 ended, and moved every block, head and norm, never the frozen substrate
    rec = phases(run / "stage-2")
    assert [p["name"] for p in rec] == ["new", "all"]
    assert rec[1]["audit"]["start_sha256"] == middle
    moved = changed(middle, end)
    assert moved == {n for n in end if n != "embed.weight"}
    assert end["embed.weight"] == parent["embed.weight"]


def test_depth_stacking_copies_the_listed_blocks_then_trains_in_phases(schedules):
    run, cut = schedules["full"], schedules["cut3"]
    layers = [0, 1, 2, 0, 1, 2]

    def rename(n: str) -> str:  # a stacked block's tensor -> the parent's tensor it copies
        return re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{layers[int(m[1])]}.", n)

    parent, middle, end = files(run / "stage-2"), files(cut / "stage-3"), files(run / "stage-3")
    meta = json.loads((run / "stage-3" / "model.json").read_text())
    assert len(meta["blocks"]) == 6 and meta["stage"]["new_blocks"] == [3, 4, 5]
    # every stacked block began as a copy of the parent's block it lists
    start = meta["audit"]["start_sha256"]
    assert all(start[n] == parent[rename(n)] for n in start)
    # phase 1 trains the later copies (and the head): the first copies stay the parent's blocks
    assert groups(changed(parent, middle, rename)) == {"blocks.3", "blocks.4", "blocks.5", "head", "ln_f"}
    assert phases(run / "stage-3")[1]["audit"]["start_sha256"] == middle
    assert changed(middle, end) == {n for n in end if n != "embed.weight"}


def test_late_expansion_and_joint_phase_train_everything_from_their_start(schedules):
    run = schedules["full"]
    parent, end = files(run / "stage-3"), files(run / "stage-4")
    meta = json.loads((run / "stage-4" / "model.json").read_text())
    start = meta["audit"]["start_sha256"]
    # copy-top: the new top block began as a copy of the trained top block
    assert {k.split(".", 2)[2]: v for k, v in start.items() if k.startswith("blocks.6.")} == \
        {k.split(".", 2)[2]: v for k, v in parent.items() if k.startswith("blocks.5.")}
    assert changed(start, end) == {n for n in end if n != "embed.weight"}
    assert meta["stage"].get("phases") is None  # a one-phase kind keeps the old record, byte for byte
    last = files(run / "stage-5")
    assert changed(end, last) == {n for n in last if n != "embed.weight"}


def test_each_phase_is_logged_and_counted_and_verify_checks_every_phase(schedules):
    run = schedules["full"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    two = [x for x in lines if x["stage"] == 2]
    assert [x["phase"] for x in two] == [1, 1, 1, 2, 2, 2] and [x["step"] for x in two] == [1, 2, 3, 1, 2, 3]
    assert all("phase" not in x for x in lines if x["stage"] in (1, 4, 5))
    # the stage's FLOPs run on through its phases; the record's total is the sum of the phases'
    assert two[3]["flops"] > two[2]["flops"]
    meta = json.loads((run / "stage-2" / "model.json").read_text())
    assert meta["metrics"]["flops"] == pytest.approx(sum(p["metrics"]["flops"] for p in meta["stage"]["phases"]), abs=2)
    assert meta["metrics"]["flops"] == pytest.approx(two[-1]["flops"], abs=2)
    # so do its tokens and training seconds: the stage's log is one curve, and so is the run's
    assert [x["tokens"] for x in two] == [128, 256, 384, 512, 640, 768] == sorted({x["tokens"] for x in two})
    assert all(a["wall_s"] <= b["wall_s"] for a, b in pairwise(two)) and two[3]["wall_s"] >= two[2]["wall_s"] > 0
    assert meta["metrics"]["tokens"] == two[-1]["tokens"]
    curve = validation_curve(run)
    assert all(a.tokens < b.tokens and a.flops < b.flops and a.seconds <= b.seconds for a, b in pairwise(curve))
    stage1 = json.loads((run / "stage-1" / "model.json").read_text())["metrics"]
    mid = [p for p in curve if stage1["tokens"] < p.tokens < stage1["tokens"] + 768]
    assert [p.tokens - stage1["tokens"] for p in mid] == [384]  # phase 1's end (step 3), before phase 2
    # a phase of all blocks costs more per token than a phase over the frozen trunk
    ph = meta["stage"]["phases"]
    assert ph[1]["metrics"]["flops"] / ph[1]["metrics"]["tokens"] > ph[0]["metrics"]["flops"] / ph[0]["metrics"]["tokens"]
    r = growlm("verify", str(run), "--json")
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    assert sum("in 2 phases" in x for x in report["lines"]) == 2  # stages 2 and 3


def test_info_plan_foretells_what_each_phase_trains_and_costs(schedules):
    """``growlm info PLAN`` before training: each stage's depth, kind and phases with their tokens, active
    parameters and FLOPs, equal to what training then records in model.json; their sum is the run's cost."""
    r = growlm("info", str(schedules["full"].parent / "plan.toml"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [(st["stage"], st["depth"], st["train"]) for st in info["schedule"]] == \
        [(1, 2, "new"), (2, 3, "new-then-all"), (3, 6, "new-then-all"), (4, 7, "all"), (5, 7, "all")]
    recorded = 0
    for st in info["schedule"]:
        meta = json.loads((schedules["full"] / f"stage-{st['stage']}" / "model.json").read_text())
        done = meta["stage"].get("phases") or [{"name": st["phases"][0]["name"], "metrics": meta["metrics"]}]
        assert [p["name"] for p in st["phases"]] == [p["name"] for p in done]
        for p, d in zip(st["phases"], done, strict=True):
            assert p["tokens"] == d["metrics"]["tokens"] and p["flops"] == pytest.approx(d["metrics"]["flops"], abs=2)
        assert max(p["active_params"] for p in st["phases"]) == meta["params_active"]
        recorded += meta["metrics"]["flops"]
    assert info["training_flops"] == pytest.approx(recorded, abs=10)
    text = growlm("info", str(schedules["full"].parent / "plan.toml")).stdout
    assert "stage 2                  depth 3, train 'new-then-all', phase 'all': 384 tokens" in text


@pytest.mark.parametrize("edit", [lambda ph: ph.clear(), lambda ph: ph.pop(), lambda ph: ph.append(dict(ph[0]))])
def test_verify_refuses_phase_records_that_are_not_the_plans(schedules, tmp_path, edit):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(schedules["full"], run)
    f = run / "stage-2" / "model.json"
    meta = json.loads(f.read_text())
    edit(meta["stage"]["phases"])
    f.write_text(json.dumps(meta))
    r = growlm("verify", str(run), "--json")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert any("stage-2: the phases recorded in model.json" in p for p in json.loads(r.stdout)["problems"])


def test_verify_refuses_a_phase_that_trained_what_it_should_not(schedules, tmp_path):
    """A phase-2 start record claiming a trunk tensor other than phase 1 left it: phase 1 'changed' a frozen tensor."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(schedules["full"], run)
    f = run / "stage-2" / "model.json"
    meta = json.loads(f.read_text())
    meta["stage"]["phases"][1]["audit"]["start_sha256"]["blocks.0.attn.qkv.weight"] = "0" * 64
    f.write_text(json.dumps(meta))
    r = growlm("verify", str(run), "--json")
    assert r.returncode != 0
    problems = json.loads(r.stdout)["problems"]
    assert any("phase 1 (new)" in p and "frozen tensor" in p and "blocks.0.attn.qkv.weight" in p for p in problems), problems


@pytest.mark.process
def test_a_kill_mid_phase_resumes_bit_identically(corpus_dir, tmp_path, schedules):
    plan = write_plan(tmp_path, plan_text("binary", PAPER + TWO_PHASE), corpus_dir)
    killed = growlm_process("train", plan, "--out", tmp_path / "run", "--no-progress",
                            env={"GROWLM_FAULT": "kill@step:2.2:2"})
    assert killed.returncode == -9
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "stage-2-phase-1" / "step-00000003").is_dir() and (ck / "stage-2-phase-2" / "step-00000002").is_dir()
    resumed = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert sha256_file(tmp_path / "run" / "stage-2" / "model.safetensors") == \
        sha256_file(schedules["full"] / "stage-2" / "model.safetensors")
    assert not ck.exists() or not any(ck.iterdir())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x.get("phase"), x["step"]) for x in lines if x["stage"] == 2] == \
        [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


@pytest.mark.process
@pytest.mark.e2e(seconds=20)  # three torchrun launches of two ranks
def test_two_ddp_ranks_train_a_stage_of_phases_as_one_process_does(corpus_dir, tmp_path, schedules):
    """Under torchrun with DDP each phase wraps the model anew, for the tensors it trains: the two phases'
    losses and weights equal one process's (to float rounding: the ranks sum gradients in another order), and
    a kill mid-phase resumes bit-identically."""
    from test_distributed import close, torchrun

    plan = write_plan(tmp_path, plan_text("binary", PAPER + TWO_PHASE), corpus_dir)
    r = torchrun(plan, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    for n in (1, 2):
        assert close(tmp_path / "run" / f"stage-{n}" / "model.safetensors",
                     schedules["full"] / f"stage-{n}" / "model.safetensors")
    mine, ref = ([(x["stage"], x.get("phase"), x["step"], x["loss"]) for x in map(json.loads, lines)]
                 for lines in ((tmp_path / "run" / "metrics.jsonl").read_text().splitlines(),
                               (schedules["full"] / "metrics.jsonl").read_text().splitlines()))
    ref = [x for x in ref if x[0] <= 2]
    assert [x[:3] for x in mine] == [x[:3] for x in ref] and (2, 2, 3) in [x[:3] for x in mine]
    assert all(abs(a[3] - b[3]) <= 1e-5 * abs(b[3]) + 1e-6 for a, b in zip(mine, ref, strict=True))
    assert [p["name"] for p in phases(tmp_path / "run" / "stage-2")] == ["new", "all"]
    r = growlm("verify", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stdout
    # killed mid-phase 2 on both ranks, resumed under torchrun: bit-identical to the run that was not
    killed = torchrun(plan, tmp_path / "killed", env={"GROWLM_FAULT": "kill@step:2.2:2"})
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "stage-2-phase-2").is_dir()
    resumed = torchrun(plan, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sha256_file(tmp_path / "killed" / "stage-2" / "model.safetensors") == \
        sha256_file(tmp_path / "run" / "stage-2" / "model.safetensors")


def test_fsdp_refuses_a_stage_of_phases_in_one_line(corpus_dir):
    from growlm.growth import phases_problem
    from growlm.plan import plan_from_dict

    text = str(corpus_dir / "train.txt")

    def plan(parallel: str, stage: dict) -> object:
        return plan_from_dict({"substrate": {"kind": "binary"}, "tokenizer": {"corpus": [text]},
                               "model": {"d_model": 32, "n_heads": 2, "context": 32},
                               "data": {"train": [text]}, "train": {"batch_size": 4, "parallel": parallel},
                               "stage": [{"grow": 2, "tokens": 256}, stage]})

    two = {"grow": 1, "train": "new-then-all", "tokens": 256, "unfreeze_tokens": 128}
    assert phases_problem(plan("fsdp", two), 0, False, 2) == (
        "stage 2 (train = 'new-then-all') trains in several phases, which FSDP2 cannot (it shards the model "
        'once); set [train] parallel = "ddp", or give each phase its own stage')
    assert phases_problem(plan("fsdp", two), 0, False, 1) is None  # one process: no sharding
    assert phases_problem(plan("ddp", two), 0, False, 2) is None
    assert phases_problem(plan("fsdp", {"grow": 1, "train": "all", "tokens": 256}), 0, False, 2) is None


def test_nproc_refuses_fsdp_phases_before_torchrun_starts(corpus_dir, tmp_path):
    text = plan_text("binary", PAPER + TWO_PHASE).replace("log_every = 1", 'log_every = 1\nparallel = "fsdp"')
    plan = write_plan(tmp_path, text, corpus_dir)
    one_line_error(growlm("train", str(plan), "--out", str(tmp_path / "run"), "--nproc", "2"),
                   "stage 2 (train = 'new-then-all') trains in several phases, which FSDP2 cannot")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["glyph", "trainable"])
def test_every_schedule_runs_and_verifies_over_every_substrate_kind(corpus_dir, tmp_path, kind):
    # the binary substrate runs every schedule in the module's fixture; the kinds of stage that train every
    # block in one phase ("all": late expansion, the joint phase) are the phases of these two
    plan = write_plan(tmp_path, plan_text(kind, PAPER + TWO_PHASE + STACK), corpus_dir)
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = growlm("verify", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stdout
    embed = [files(tmp_path / "run" / f"stage-{i}")["embed.weight"] for i in range(1, 4)]
    if kind == "trainable":  # a trainable table trains wherever every block does, and only there
        assert len(set(embed)) == 3
        assert phases(tmp_path / "run" / "stage-2")[0]["trains"]["embedding"] is False
    else:
        assert len(set(embed)) == 1


@pytest.mark.parametrize(("stage", "message"), [
    ('grow = 1\ntokens = 256\nunfreeze_tokens = 128', 'stage[2]: unfreeze_tokens belongs to train = "new-then-all", not "new"'),
    ('grow = 1\ntrain = "new-then-all"\ntokens = 256', "stage[2]: train = \"new-then-all\" needs unfreeze_tokens"),
    ('grow = 1\ntrain = "new-then-all"\ntokens = 256\nunfreeze_tokens = 256', "must be below tokens"),
    ('layers = [0, 5]\ntokens = 256', "stage[2].layers: block 5 does not exist there"),
    ('layers = [0, 1]\ngrow = 1\ntokens = 256', "it replaces grow"),
    ('train = "sideways"\ntokens = 256', "unknown stage kind 'sideways'"),
])
def test_a_bad_stage_table_is_one_line_naming_it(corpus_dir, tmp_path, stage, message):
    plan = write_plan(tmp_path, plan_text("binary", PAPER + "[[stage]]\n" + stage + "\n"), corpus_dir)
    r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_paper_size_schedules_spend_the_studys_budget():
    from growlm.growth import plan_active_params
    from growlm.model import ModelConfig
    from growlm.plan import load_plan

    root = Path(__file__).resolve().parents[1] / "configs" / "paper"
    cfg = ModelConfig(vocab_size=65536, d_model=1024, n_heads=32, n_layers=0, context=1024)
    grown = load_plan(root / "9l-unicode.toml", check_paths=False)
    # a stage's active count is its largest phase's: here, the phase that trains every block
    for name, active in (("9l-unicode-two-phase", [104_899_584, 142_688_256, 180_476_928]),
                         ("9l-unicode-late-expansion", [104_899_584, 180_476_928])):
        plan = load_plan(root / f"{name}.toml", check_paths=False)
        assert sum(st.tokens for st in plan.stage) == sum(st.tokens for st in grown.stage)
        assert (plan.substrate, plan.model, plan.data) == (grown.substrate, grown.model, grown.data)
        assert plan_active_params(plan, cfg) == active


def test_info_counts_the_depth_a_stack_leaves(corpus_dir, tmp_path):
    plan = write_plan(tmp_path, plan_text("binary", PAPER + '[[stage]]\nlayers = [0, 1, 0, 1, 0]\ntrain = "all"\n'
                                          'tokens = 256\n'), corpus_dir)
    r = growlm("info", str(plan), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_layers"] == 5


@pytest.mark.parametrize(("phases", "message"), [
    (lambda st, shape: [], "gives no phase"),
    (lambda st, shape: [Phase("a", st.tokens - 1, TrainSet((0,)))], "add up"),
    (lambda st, shape: [Phase("a", st.tokens, TrainSet((shape.depth,)))], "lacks"),
    (lambda st, shape: [Phase("a", 1, TrainSet(())), Phase("a", st.tokens - 1, TrainSet(()))], "share a name"),
])
def test_a_kind_that_gives_unusable_phases_is_one_line_before_training(corpus_dir, tmp_path, phases, message):
    class Broken(StageKind):
        name = "broken"

        def phases(self, stage, shape, trainable_embedding):
            return phases(stage, shape)

    plan = write_plan(tmp_path, plan_text("binary", PAPER + '[[stage]]\ntrain = "broken"\ntokens = 256\n'), corpus_dir)
    with STAGE_KINDS.registered("broken", Broken()):
        r = growlm("train", str(plan), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "stage-1").exists()  # refused before the first stage trained
