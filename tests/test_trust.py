"""What the method demands of every stage kind: exactly the declared tensors train, each of them
moves, nothing else moves by a single bit; the run-time audit stops a stage that breaks this, and
``growlm verify`` finds it from the files.

The expected sets are written out here by hand from the paper's rules, never taken from growlm's
own ``trainable_names``; the start of each stage is captured by a spy on the training loop, the end
is read back from the saved files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_util import REPO, growlm, write_plan
from conftest import copy_of
from growlm.errors import GrowlmError
from growlm.hashing import sha256_file
from growlm.inspection import info_model
from growlm.store.model import block_sha256, recorded_fingerprint_of
from growlm.store.records import ModelRecord
from growlm.training import Loop, train

HEAD = {"head.weight", "ln_f.weight", "ln_f.bias"}
HEADER = """\
[substrate]
{substrate}
[tokenizer]
corpus = ["train.txt"]
[model]
d_model = 32
n_heads = 2
context = 16
[data]
train = ["train.txt"]
valid = ["valid.txt"]
[train]
batch_size = 4
lr = 1e-2
seed = 0
checkpoint_every = 100
log_every = 100
"""
BINARY = HEADER.format(substrate='kind = "binary"\nbits = 16')
# 192 tokens = 3 optimizer steps of 4 x 16: from the second step on every trained tensor has a gradient
KINDS = """\
[[stage]]
grow = 2
tokens = 192
[[stage]]
grow = 1
init = "zero-out"
tokens = 192
[[stage]]
grow = 1
init = "copy-top"
tokens = 192
[[stage]]
grow = 1
tokens = 192
lora = { rank = 2, blocks = "frozen", targets = ["qkv", "fc"] }
[[stage]]
tokens = 192
lora = { rank = 2, blocks = "all", targets = ["attn_out"] }
[[stage]]
train = "head"
tokens = 192
[[stage]]
train = "adapters"
tokens = 192
lora = { rank = 2, blocks = [0], targets = ["mlp_out"] }
[[stage]]
train = "all"
tokens = 192
"""


class Spy:
    """Records every stage's parameters (cloned) and its trainable names as the loop starts and ends it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.start: dict[str, dict[str, torch.Tensor]] = {}
        self.end: dict[str, dict[str, torch.Tensor]] = {}
        self.trainable: dict[str, set[str]] = {}
        real = Loop.fit

        def fit(loop, key, model, *args, **kwargs):
            self.start[key] = _params(model)
            self.trainable[key] = {_plain(n) for n, p in model.named_parameters() if p.requires_grad}
            state = real(loop, key, model, *args, **kwargs)
            self.end[key] = _params(model)
            return state

        monkeypatch.setattr(Loop, "fit", fit)


def _plain(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_plain(n): p.detach().cpu().clone() for n, p in model.named_parameters()}


def _files(stage: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(stage / "model.safetensors"))
    if (stage / "adapters.safetensors").exists():
        t.update(load_file(str(stage / "adapters.safetensors")))
    return t


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    return {n for n in a if not torch.equal(a[n], b[n])}


def _blocks(names, *idx: int) -> set[str]:
    return {n for n in names if ".lora_" not in n and any(n.startswith(f"blocks.{i}.") for i in idx)}


def _adapters(names, stage: str) -> set[str]:
    return {n for n in names if f".lora_A.{stage}." in n or f".lora_B.{stage}." in n}


def _run(tmp: Path, corpus_dir: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Spy]:
    plan = write_plan(tmp, text, corpus_dir)
    spy = Spy(monkeypatch)
    train(plan, tmp / "run", progress=False)
    return tmp / "run", spy


@pytest.fixture(scope="module")
def kinds(corpus_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return _run(tmp_path_factory.mktemp("kinds"), corpus_dir, BINARY + KINDS, mp)


def _expected(i: int, names: set[str]) -> set[str]:
    """The paper's rule for each stage of KINDS, written out by hand."""
    return {
        1: _blocks(names, 0, 1) | HEAD,                         # grow 2 (random)
        2: _blocks(names, 2) | HEAD,                            # grow 1 (zero-out)
        3: _blocks(names, 3) | HEAD,                            # grow 1 (copy-top)
        4: _blocks(names, 4) | HEAD | _adapters(names, "stage4"),  # grow + LoRA on the frozen blocks
        5: HEAD | _adapters(names, "stage5"),                    # LoRA only: adapters and head (default)
        6: HEAD,                                                # train = "head"
        7: _adapters(names, "stage7"),                          # train = "adapters"
        8: _blocks(names, 0, 1, 2, 3, 4) | HEAD,                # train = "all" (frozen substrate, old adapters)
    }[i]


@pytest.mark.parametrize("i", range(1, 9))
def test_each_stage_kind_trains_exactly_what_the_method_says(kinds, i):
    run, spy = kinds
    key = f"stage-{i}"
    saved = _files(run / key)
    expected = _expected(i, set(saved))
    assert expected, "the expected set must name tensors"
    assert spy.trainable[key] == expected
    assert _changed(spy.start[key], saved) == expected  # each declared tensor moved, nothing else did
    assert all(torch.equal(spy.end[key][n], saved[n]) for n in saved)  # what trained is what was saved
    if i > 1:  # the stage began from its parent, bit for bit
        parent = _files(run / f"stage-{i - 1}")
        assert all(torch.equal(spy.start[key][n], parent[n]) for n in parent)
    meta = json.loads((run / key / "model.json").read_text())
    assert meta["params_active"] == sum(saved[n].numel() for n in expected)
    assert info_model(run / key)["audit"]["trained"] == meta["audit"]["trained"]  # growlm info shows it
    assert meta["audit"]["trained_tensors"] == len(expected)
    assert meta["audit"]["frozen_tensors"] == len(saved) - len(expected)


def test_adapters_sit_exactly_where_the_plan_puts_them(kinds):
    run, _ = kinds
    names = set(_files(run / "stage-8"))
    assert _adapters(names, "stage4") == {f"blocks.{b}.{m}.lora_{ab}.stage4.weight" for b in range(4)
                                          for m in ("attn.qkv", "mlp.fc") for ab in "AB"}
    assert _adapters(names, "stage5") == {f"blocks.{b}.attn.proj.lora_{ab}.stage5.weight" for b in range(5) for ab in "AB"}
    assert _adapters(names, "stage7") == {f"blocks.0.mlp.proj.lora_{ab}.stage7.weight" for ab in "AB"}


def test_growth_inits_start_where_they_say(kinds):
    run, spy = kinds
    start = spy.start
    assert torch.equal(start["stage-1"]["blocks.1.ln1.weight"], torch.ones(32))  # random: GPT-2 init
    for lin in ("attn.proj", "mlp.proj"):  # zero-out: the new block starts as the identity
        assert not start["stage-2"][f"blocks.2.{lin}.weight"].any()
    parent = _files(run / "stage-2")
    top = _blocks(parent, 2)
    assert all(torch.equal(start["stage-3"][n.replace("blocks.2.", "blocks.3.")], parent[n]) for n in top)


def test_unfrozen_constructive_first_stage_trains_the_substrate_then_freezes_it(corpus_dir, tmp_path, monkeypatch):
    stages = "[[stage]]\ngrow = 2\ntrain = \"all\"\ntokens = 192\n[[stage]]\ngrow = 1\ntokens = 192\n"
    run, spy = _run(tmp_path, corpus_dir, HEADER.format(substrate='kind = "trainable"') + stages, monkeypatch)
    s1, s2 = _files(run / "stage-1"), _files(run / "stage-2")
    assert _changed(spy.start["stage-1"], s1) == _blocks(s1, 0, 1) | HEAD | {"embed.weight"}
    assert _changed(spy.start["stage-2"], s2) == _blocks(s2, 2) | HEAD
    assert growlm("verify", str(run)).returncode == 0


def test_router_and_post_merge_head_tuning_train_only_their_part(kinds, corpus_dir, tmp_path, monkeypatch):
    from growlm.compose import Tuning, merge
    from growlm.loading import load_mixture
    from growlm.plan import TrainSpec

    run, _ = kinds
    spy = Spy(monkeypatch)
    spec = TrainSpec(batch_size=4, lr=1e-2, compile=False, device="cpu", dtype="fp32")
    out = merge([run / "stage-1", run / "stage-3"], tmp_path / "mix",
                tuning=Tuning(data=[corpus_dir / "train.txt"], router=True, head=True, tokens=192, spec=spec))
    heads = {f"experts.{e}.{n}" for e in (0, 1) for n in HEAD}
    assert spy.trainable["router"] == {"router.proj.weight", "router.proj.bias"}
    assert _changed(spy.start["router"], spy.end["router"]) == {"router.proj.weight", "router.proj.bias"}
    assert spy.trainable["head"] == heads
    assert _changed(spy.start["head"], spy.end["head"]) == heads
    desc = json.loads((out / "mixture.json").read_text())
    assert [r["audit"]["trained_tensors"] for r in desc["tuning"]] == [2, 6]
    mixture, _ = load_mixture(out)  # the tuned tensors are the ones stored
    assert all(torch.equal(p, spy.end["head"][n]) for n, p in mixture.named_parameters() if n in heads)


# ----------------------------------------------------------------------------------------------
# the audit stops a stage that breaks the rule, and saves nothing


TWO = BINARY + "[[stage]]\ngrow = 1\ntokens = 192\n[[stage]]\ngrow = 1\ntokens = 192\n"


def _sabotaged_second_stage(tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run TWO with a sabotage in place for stage 2: the audit must stop it, keep stage 1 whole and
    save nothing; once the sabotage is gone, ``--resume`` completes the run."""
    with pytest.raises(GrowlmError) as e:
        _run(tmp_path, corpus_dir, TWO, monkeypatch)
    run = tmp_path / "run"
    assert (run / "stage-1").is_dir() and not (run / "stage-2").exists()
    assert not list(run.glob(".stage-2*"))
    assert growlm("verify", str(run)).returncode == 0
    monkeypatch.undo()
    train(tmp_path / "plan.toml", run, resume=True, progress=False)
    assert growlm("verify", str(run)).returncode == 0
    return str(e.value)


def test_audit_stops_a_stage_whose_trainable_tensor_never_moved(corpus_dir, tmp_path, monkeypatch):
    import growlm.training as tr

    real, calls = tr.make_optimizer, []

    def without_head(params, lr, wd):  # in stage 2 the head requires grad, but the optimizer never sees it
        calls.append(1)
        head = max(params, key=torch.Tensor.numel)  # [vocab, d]: the largest tensor of a tiny grow stage
        return real([p for p in params if p is not head or len(calls) == 1], lr, wd)

    monkeypatch.setattr(tr, "make_optimizer", without_head)
    message = _sabotaged_second_stage(tmp_path, corpus_dir, monkeypatch)
    assert re.search(r"stage-2: the trainable-set audit failed: 1 trainable tensor\(s\) did not change: head\.weight",
                     message)
    assert "nothing was saved" in message


def test_audit_stops_a_stage_that_moved_a_frozen_tensor(corpus_dir, tmp_path, monkeypatch):
    import growlm.training as tr

    real = tr.evaluate_loss

    def drifting(model, *args):  # a frozen block drifts just before stage 2 ends
        if len(model.blocks) == 2:
            with torch.no_grad():
                model.blocks[0].ln1.bias.add_(1e-3)
        return real(model, *args)

    monkeypatch.setattr(tr, "evaluate_loss", drifting)
    message = _sabotaged_second_stage(tmp_path, corpus_dir, monkeypatch)
    assert re.search(r"audit failed: 1 frozen tensor\(s\) changed: blocks\.0\.ln1\.bias", message)


# ----------------------------------------------------------------------------------------------
# growlm verify re-checks the audit from the files


def _forge(stage: Path, edit) -> None:
    """Edit a stage's tensors with ``edit`` and rewrite every record so the dir looks self-consistent."""
    w = load_file(str(stage / "model.safetensors"))
    edit(w)
    save_file(w, str(stage / "model.safetensors"))
    meta = json.loads((stage / "model.json").read_text())
    meta["blocks"] = [{"index": b["index"], "sha256": block_sha256(w, b["index"])} for b in meta["blocks"]]
    meta["files"]["model.safetensors"] = sha256_file(stage / "model.safetensors")
    adapters = load_file(str(stage / "adapters.safetensors")) if (stage / "adapters.safetensors").exists() else {}
    meta["fingerprint"] = recorded_fingerprint_of(ModelRecord.model_validate(meta), w, adapters)
    (stage / "model.json").write_text(json.dumps(meta))


def test_verify_rechecks_the_audit_from_the_files(kinds, tmp_path):
    run, _ = kinds
    r = growlm("verify", str(run))
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"stage-\d+: audit ok", r.stdout)) == 8

    forged = tmp_path / "untrained-head"
    copy_of(run, forged)
    parent = load_file(str(forged / "stage-1" / "model.safetensors"))
    _forge(forged / "stage-2", lambda w: w.update({"head.weight": parent["head.weight"]}))
    r = growlm("verify", str(forged))
    assert r.returncode != 0 and "stage-2: 1 trainable tensor(s) did not change: head.weight" in r.stdout + r.stderr

    relabelled = tmp_path / "relabelled"
    copy_of(run, relabelled)
    meta = json.loads((relabelled / "stage-6" / "model.json").read_text())
    meta["stage"]["train"] = "all"  # claims a monolithic stage where only the head trained
    (relabelled / "stage-6" / "model.json").write_text(json.dumps(meta))
    r = growlm("verify", str(relabelled), "--json")
    assert r.returncode != 0
    # what a stage trained is derived from the plan it recorded, so the claim is a contradiction, not a licence
    assert any(p.startswith("stage-6: the stage record says train = 'all'") and "'head'" in p
               for p in json.loads(r.stdout)["problems"])


def test_verify_finds_a_stage_that_did_not_start_from_its_parent(kinds, tmp_path):
    run = tmp_path / "run"
    copy_of(kinds[0], run)
    meta = json.loads((run / "stage-3" / "model.json").read_text())
    meta["audit"]["start_sha256"]["blocks.0.ln1.weight"] = "0" * 64
    (run / "stage-3" / "model.json").write_text(json.dumps(meta))
    r = growlm("verify", str(run), "--json")
    problems = json.loads(r.stdout)["problems"]
    assert any(p.startswith("stage-3: did not start from stage-2") for p in problems), problems


# ----------------------------------------------------------------------------------------------
# the paper's plans, shrunk to tiny dimensions, end to end


def _shrink(config: Path, tmp: Path, corpus_dir: Path) -> Path:
    text = config.read_text()
    text = re.sub(r'\[tokenizer\][^\[]*', '[tokenizer]\ncorpus = ["train.txt"]\n\n', text)
    text = re.sub(r'"\.\./data/[^"]+"', '"train.txt"', text).replace('valid = ["train.txt"]', 'valid = ["valid.txt"]')
    for key, value in (("d_model", "32"), ("n_heads", "2"), ("context", "16"), ("batch_size", "4"),
                       ("tokens", "192"), ("rank", "2"), ("checkpoint_every", "100"), ("eval_every", "100")):
        text = re.sub(rf"\b{key} = [\d_]+", f"{key} = {value}", text)
    return write_plan(tmp, text, corpus_dir)


@pytest.mark.parametrize("config", ["9l-unicode-v1.toml", "16l-16bit-v3.toml"])
def test_paper_plans_shrunk_train_every_block_they_add(config, corpus_dir, tmp_path):
    plan = _shrink(REPO / "configs" / "paper" / config, tmp_path, corpus_dir)
    stages = train(plan, tmp_path / "run", progress=False)
    prev: dict[str, torch.Tensor] = {}
    for sdir in stages:
        meta = json.loads((sdir / "model.json").read_text())
        now = _files(sdir)
        st = meta["stage"]
        moved = {n for n in now if n not in prev or not torch.equal(prev[n], now[n])}
        for b in st["new_blocks"]:  # every added block trained: no tensor left at its initial value
            assert not torch.equal(now[f"blocks.{b}.ln1.weight"], torch.ones(32)), (sdir, b)
            assert _blocks(now, b) <= moved
        assert moved >= HEAD, sdir  # the paper trains the head at every stage, LoRA stages too
        if st["lora"]:
            assert _adapters(now, st["adapter"]) and _adapters(now, st["adapter"]) <= moved
        frozen_before = _blocks(now, *range(len(meta["blocks"]))) - _blocks(now, *st["new_blocks"])
        assert not (moved & frozen_before), sdir
        prev = now
    assert len(stages) == (9 if config.startswith("9l") else 8)
    assert growlm("verify", str(tmp_path / "run")).returncode == 0


# ----------------------------------------------------------------------------------------------
# verify derives what a stage trained from its recorded plan, never from the stage's own claims


def _digests(stage: Path) -> dict[str, str]:
    from growlm.audit import digests

    return digests(_files(stage).items())


def _reseal(stage: Path, edit_meta, parent: Path | None) -> None:
    """Rewrite ``stage``'s records around its current files after ``edit_meta``: block hashes, checksums,
    fingerprint, lineage and a self-consistent audit (its start digests taken from ``parent``)."""
    from growlm.audit import record
    from growlm.growth import trainable_names
    from growlm.plan import StageSpec
    from growlm.stages import Shape, stage_kind

    meta = json.loads((stage / "model.json").read_text())
    edit_meta(meta)
    now = _digests(stage)
    if meta.get("audit") is not None:
        st = meta["stage"]
        spec = StageSpec(grow=st["grow"], train=st["train"], tokens=st["tokens"],
                         lora=st["lora"], unfreeze_tokens=st.get("unfreeze_tokens"))
        shape = Shape(len(meta["blocks"]), tuple(st["new_blocks"]))
        declared = set().union(*(trainable_names(now, ph.trains, st["adapter"])
                                 for ph in stage_kind(st["train"]).phases(spec, shape, False)))
        before, began = _digests(parent) if parent else {}, meta["audit"]["start_sha256"]
        start = {n: before.get(n, began.get(n)) if n in declared else d for n, d in now.items()}
        meta["audit"] = record(start, now, declared, meta["audit"]["steps"])
    if parent is not None:
        meta["lineage"][-1] = json.loads((parent / "model.json").read_text())["fingerprint"]
    (stage / "model.json").write_text(json.dumps(meta))
    _forge(stage, lambda w: None)


def _problems(run: Path) -> list[str]:
    r = growlm("verify", str(run), "--json")
    assert r.returncode != 0, r.stdout
    return json.loads(r.stdout)["problems"]


def test_verify_derives_the_new_blocks_from_the_plan_not_from_the_stage_record(kinds, tmp_path):
    """A frozen block changed in stages 2 and 3, stage 2's ``new_blocks`` relabelled to name it, every hash,
    audit, fingerprint and lineage rewritten to agree: the plan says stage 2 grew block 2 over 2 blocks."""
    run = copy_of(kinds[0], tmp_path / "run")
    for i in range(4, 9):
        shutil.rmtree(run / f"stage-{i}")
    for i in (2, 3):  # every tensor of block 0 moves, as if stage 2 had trained it
        _forge(run / f"stage-{i}", lambda w: [t.add_(0.5) for k, t in w.items() if k.startswith("blocks.0.")])
    _reseal(run / "stage-2", lambda m: m["stage"].update(new_blocks=[0]), run / "stage-1")
    _reseal(run / "stage-3", lambda m: None, run / "stage-2")
    problems = _problems(run)
    assert any(p.startswith("stage-2:") and "new_blocks" in p and "[2]" in p for p in problems), problems
    assert any(p.startswith("stage-2:") and "blocks.0." in p for p in problems), problems


def test_a_deleted_audit_hides_nothing(kinds, tmp_path):
    """The head changed in the adapters-only stage 7, the audit deleted from stages 7 and 8, the rest rewritten
    to agree: the lineage shows the head moved where the plan freezes it, and the missing audits are failures
    (this growlm records audits)."""
    run = copy_of(kinds[0], tmp_path / "run")
    _forge(run / "stage-7", lambda w: w["head.weight"].mul_(1.5))
    for i in (7, 8):
        _reseal(run / f"stage-{i}", lambda m: m.pop("audit"), run / f"stage-{i - 1}")
    problems = _problems(run)
    assert any(p.startswith("stage-7:") and "head.weight" in p for p in problems), problems
    assert sum("no trainable-set audit" in p for p in problems) == 2, problems


def test_stage_records_are_checked_against_the_recorded_plan(kinds, tmp_path):
    """Stage 4's LoRA alpha edited (4 -> 400) and resealed: the plan it recorded gives 2 x rank."""
    run = copy_of(kinds[0], tmp_path / "run")
    for i in range(5, 9):
        shutil.rmtree(run / f"stage-{i}")
    _reseal(run / "stage-4", lambda m: m["lora"][-1].update(alpha=400.0), run / "stage-3")
    problems = _problems(run)
    assert any(p.startswith("stage-4:") and "alpha" in p for p in problems), problems


def test_verify_names_a_missing_middle_stage_and_labels_the_rest_truly(kinds, tmp_path):
    """D18: with stage-2 deleted, stage-3 is checked against stage-1 and said to be, never against a "stage-2"."""
    run = copy_of(kinds[0], tmp_path / "run")
    shutil.rmtree(run / "stage-2")
    problems = _problems(run)
    assert "stage-2 is missing: stage-3 has no parent in the run" in problems
    assert any(p.startswith("stage-3: its lineage does not name stage-1") for p in problems), problems
    assert not any("stage-2 (" in p or "from stage-2" in p or "since stage-2" in p for p in problems), problems
