"""Model and mixture dirs as a store: what loads, verifies, merges and exports must be exactly what
was written, inside the dir, with the tokenizer and substrate its records name; killed writers
leave nothing behind for good; edited records fail on one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_util import growlm, growlm_process, one_line_error
from conftest import copy_of
from growlm.compose import merge
from growlm.errors import GrowlmError
from growlm.files import atomic_dir
from growlm.hashing import sha256_file
from growlm.loading import load_mixture, load_model
from growlm.store.mixture import info_mixture
from growlm.store.model import read_meta, recorded_fingerprint_of, save_model
from growlm.store.records import ModelRecord
from growlm.verification import verify


def verify_fails(path: Path) -> bool:
    """verify refuses ``path``, by a problem in its report or by an error it cannot get past."""
    try:
        return not verify(path)["ok"]
    except GrowlmError as e:
        assert "\n" not in str(e)
        return True


def refused(call, *needles: str) -> str:
    """The one-line GrowlmError ``call()`` raises, checked to contain ``needles``."""
    with pytest.raises(GrowlmError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() if p.is_file() else b"" for p in sorted(d.rglob("*"))}


def edit_json(f: Path, edit) -> None:
    obj = json.loads(f.read_text())
    edit(obj)
    f.write_text(json.dumps(obj))


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model, free to tamper with."""
    return copy_of(tiny_model_dir, tmp_path / "m")


# ----------------------------------------------------------------------------------------------
# 1. the docking port is what the files are, not what model.json says


def test_swapped_tokenizer_is_refused_by_load_verify_and_eval(model, foreign_tokenizer, corpus_dir):
    shutil.rmtree(model / "tokenizer")
    copy_of(foreign_tokenizer, model / "tokenizer")
    refused(lambda: load_model(model), str(model), "tokenizer", "replaced")
    report = verify(model)
    assert not report["ok"] and any("tokenizer" in p for p in report["problems"])
    assert verify_fails(model)
    one_line_error(growlm("eval", str(model), "--task", "ppl", "--data", str(corpus_dir / "valid.txt")), "tokenizer")


def test_merge_compares_recomputed_substrate_fingerprints(tiny_model_dir, tmp_path):
    from growlm.model import GrowLM
    from growlm.substrate import build_substrate
    from growlm.tokenizer import Tokenizer

    # another substrate over the same tokenizer, its model.json claiming the tiny model's port
    saved = load_model(tiny_model_dir)
    sub = build_substrate("random-bits", dim=64, tokenizer=Tokenizer.load(saved.tokenizer_dir), bits=16, seed=7)
    other = GrowLM(saved.model.cfg)
    with torch.no_grad():
        other.embed.weight.copy_(sub.table)
    d = save_model(other, tmp_path / "other", tokenizer_dir=saved.tokenizer_dir,
                   substrate={"kind": sub.kind, "fingerprint": sub.fingerprint, "recipe": sub.recipe})
    assert d.substrate_fingerprint != saved.meta.substrate_fingerprint
    edit_json(tmp_path / "other" / "model.json",
              lambda m: m.update(substrate_fingerprint=saved.meta.substrate_fingerprint,
                                 substrate=saved.meta.substrate.to_json()))
    refused(lambda: merge([tiny_model_dir, tmp_path / "other"], tmp_path / "mix"), "embedding does not match")
    assert not (tmp_path / "mix").exists()
    refused(lambda: load_model(tmp_path / "other"), "embedding does not match")


def test_claiming_a_trainable_substrate_does_not_skip_the_embedding_check(model):
    # only a trainable embedding moves; calling a frozen one trainable must not excuse a swap
    edit_json(model / "model.json", lambda m: m["substrate"].update(kind="trainable"))
    refused(lambda: load_model(model), "trainable")
    assert not verify(model)["ok"]


# ----------------------------------------------------------------------------------------------
# 2. symlinks and special files


def test_symlink_in_model_dir_is_refused_everywhere(model, tiny_model_dir, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    link = model / "tokenizer" / "tokenizer_config.json"
    link.unlink()
    link.symlink_to(secret)
    refused(lambda: load_model(model), str(link), "symlink")
    refused(lambda: verify(model), str(link), "symlink")
    refused(lambda: merge([tiny_model_dir, model], tmp_path / "mix"), "symlink")
    one_line_error(growlm("export", str(model), "--out", str(tmp_path / "hf")), "symlink")
    assert not (tmp_path / "mix").exists() and not (tmp_path / "hf").exists()


def test_symlink_in_mixture_dir_is_refused(mixture, tmp_path):
    bad = copy_of(mixture, tmp_path / "mix")
    outside = tmp_path / "elsewhere"
    shutil.move(bad / "tokenizer", outside)
    (bad / "tokenizer").symlink_to(outside)
    refused(lambda: load_mixture(bad), "symlink")
    refused(lambda: info_mixture(bad), "symlink")
    assert not verify(bad)["ok"]


# ----------------------------------------------------------------------------------------------
# 3. descriptor names stay inside their dir


@pytest.mark.parametrize("name", ["/etc/hostname", "../m/model.json", "tokenizer/../../x", "tokenizer\\..\\x", ""])
def test_model_json_file_names_stay_inside(model, name):
    target = model / "model.json"  # any real file: the entry's digest must not be what lets it in
    edit_json(model / "model.json", lambda m: m["files"].update({name: sha256_file(target)}))
    msg = refused(lambda: load_model(model), "model.json", repr(name))
    assert refused(lambda: verify(model)) == msg


@pytest.mark.parametrize("key", ["files", "tensors"])
def test_mixture_json_names_stay_inside(mixture, tmp_path, key):
    bad = copy_of(mixture, tmp_path / "mix")
    outside = os.path.relpath(mixture / "experts" / "0" / "model.safetensors", bad)  # ../..., to a real file
    if key == "files":
        edit_json(bad / "mixture.json", lambda d: d["files"].update({outside: sha256_file(bad / outside)}))
    else:
        edit_json(bad / "mixture.json", lambda d: d["tensors"].append(outside))
    refused(lambda: load_mixture(bad), "mixture.json", outside)
    assert not verify(bad)["ok"]


def test_mixture_file_dropped_from_the_record_is_refused(mixture, tmp_path):
    bad = copy_of(mixture, tmp_path / "mix")
    edit_json(bad / "mixture.json", lambda d: d["files"].pop("experts/0/model.json"))
    refused(lambda: load_mixture(bad), "experts/0/model.json", "not recorded")
    assert not verify(bad)["ok"]


# ----------------------------------------------------------------------------------------------
# 4. merge into one of its inputs


@pytest.mark.parametrize("where", ["inside", "dotdot", "link"])
def test_merge_into_an_input_is_refused_before_writing(tiny_model_dir, tmp_path, where):
    a = copy_of(tiny_model_dir, tmp_path / "a")
    (tmp_path / "link").symlink_to(a)  # an input reached through a link is still that input
    out = {"inside": a / "mix", "dotdot": tmp_path / "x" / ".." / "a" / "mix", "link": tmp_path / "link" / "mix"}[where]
    before = tree(tmp_path)
    refused(lambda: merge([a, tiny_model_dir], out), "inside")
    refused(lambda: merge([tiny_model_dir, tmp_path / "link"], a / "mix"), "inside")
    assert tree(tmp_path) == before


def test_merge_into_an_input_cli(tiny_model_dir, tmp_path):
    a = copy_of(tiny_model_dir, tmp_path / "a")
    before = tree(tmp_path)
    r = growlm("merge", str(a), str(tiny_model_dir), "--out", str(a / "mix"))
    one_line_error(r, "inside")
    assert len(r.stderr) < 300 and tree(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# 5. leftovers of killed writers


@pytest.mark.process
def test_killed_merge_leaves_nothing_for_good(tiny_model_dir, expert_b, corpus_dir, tmp_path):
    data = tmp_path / "data.txt"  # a few batches' worth: the kill comes at the router's first step
    data.write_bytes((corpus_dir / "train.txt").read_bytes()[:3000])
    where = tmp_path / "out"
    experts = (str(tiny_model_dir), str(expert_b), "--out", str(where / "mix"))
    r = growlm_process("merge", *experts, "--router", "--data", str(data), "--tokens", "1024",
                       env={"GROWLM_FAULT": "kill@step:1:1"})  # a kill -9 needs a process of its own
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    # the mixture's temp dir and the router's training dir, both named for their killed owner
    assert sorted(p.name.split(".")[1] for p in where.iterdir()) == ["merge-train", "mix"]
    r = growlm("merge", *experts)  # no router: it still clears the killed merge's training dir
    assert r.returncode == 0, r.stderr
    assert [p.name for p in where.iterdir()] == ["mix"]
    assert not list((where / "mix").rglob(".*"))


def test_a_live_writers_temp_dir_is_never_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from growlm.files import _HOST

    mine = tmp_path / f".out.{_HOST}.{os.getpid()}.0123abcd.tmp"
    gone = tmp_path / f".out.{_HOST}.{int(dead.stdout)}.0123abcd.tmp"
    other_host = tmp_path / f".out.elsewhere-{_HOST}.{int(dead.stdout)}.0123abcd.tmp"
    other_name = tmp_path / f".out2.{_HOST}.{int(dead.stdout)}.0123abcd.tmp"
    for d in (mine, gone, other_host, other_name):
        d.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert mine.is_dir() and other_host.is_dir() and other_name.is_dir()
    assert not gone.exists() and (tmp_path / "out" / "f").is_file()


# ----------------------------------------------------------------------------------------------
# 6. modes


def test_saved_model_dir_has_the_umask_mode(tiny_model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        saved = load_model(tiny_model_dir)
        save_model(saved.model, tmp_path / "m", tokenizer_dir=saved.tokenizer_dir, substrate=saved.meta.substrate.to_json())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m" / "model.json").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------------------------
# 7. edited config


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: c.update(d_model=128), "blocks.0"),
    (lambda c: c.update(n_heads="4"), "config.n_heads"),
    (lambda c: c.pop("context"), "config.context"),
    (lambda c: c.update(n_heads=3), "n_heads"),
    (lambda c: c.update(trainable_embedding="no"), "config.trainable_embedding"),
])
def test_edited_config_is_one_line(model, edit, needle):
    edit_json(model / "model.json", lambda m: edit(m["config"]))
    msg = refused(lambda: load_model(model), needle)
    assert "model.json" in msg
    assert verify_fails(model)


def test_edited_config_cli(model):
    edit_json(model / "model.json", lambda m: m["config"].update(n_heads="4"))
    one_line_error(growlm("info", str(model)), "model.json", "config.n_heads")


@pytest.mark.parametrize("edit", [
    lambda m: m["lora"][0].update(alpha=400.0),  # changed eval's loss under the same fingerprint, before
    lambda m: m["lora"][0].update(blocks=[0]),  # valid, but not the blocks the adapters were trained on
    lambda m: m["config"].update(rope_theta=5.0),  # every shape as before: only the fingerprint tells
], ids=["alpha", "blocks", "config"])
def test_a_record_that_changes_what_the_model_computes_is_inside_its_fingerprint(small_run, corpus_dir, tmp_path,
                                                                                 edit):
    stage = copy_of(small_run / "stage-2", tmp_path / "stage")
    assert growlm("verify", str(stage)).returncode == 0
    edit_json(stage / "model.json", edit)
    one_line_error(growlm("verify", str(stage)), "fingerprint")
    one_line_error(growlm("eval", str(stage), "--task", "ppl", "--data", str(corpus_dir / "valid.txt")),
                   "model.json", "fingerprint")


def test_a_model_from_before_lora_was_fingerprinted_still_loads_with_a_note(small_run, tmp_path):
    """model.json version 1 (its fingerprint made without the LoRA records) loads and verifies, and says so."""
    from growlm.store.model import model_fingerprint

    stage = copy_of(small_run / "stage-2", tmp_path / "stage")
    weights, adapters = (load_file(str(stage / n)) for n in ("model.safetensors", "adapters.safetensors"))

    def as_before(m: dict) -> None:
        m["version"] = 1
        m["fingerprint"] = model_fingerprint(m["config"], m["substrate_fingerprint"], m["tokenizer_fingerprint"],
                                             weights, adapters)

    edit_json(stage / "model.json", as_before)
    r = growlm("verify", str(stage))
    assert r.returncode == 0 and "written before fingerprints covered the LoRA records" in r.stdout, r.stderr
    load_model(stage)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["lora"][0].pop("alpha"), "lora[0].alpha is missing"),
    (lambda m: m["lora"][0].update(rank=0), "lora[0].rank is 0: Input should be greater than or equal to 1"),
    (lambda m: m.update(lora=None), "records adapters.safetensors but no LoRA record"),  # never dropped silently
    (lambda m: m["lora"][0].update(blocks=[0, 0]), "lora[0].blocks is [0, 0]: must be distinct"),
    (lambda m: m["lora"][0].update(blocks=[7]), "lora[0].blocks must be block indices below 3"),
    (lambda m: m["lora"][0].update(targets=["qkv", "nope"]), "lora[0].targets is ['qkv', 'nope']: must name qkv"),
    (lambda m: m["lora"][0].update(targets=[]), "lora[0].targets"),
], ids=["no-alpha", "rank-0", "null", "duplicate-blocks", "block-out-of-range", "unknown-target", "no-targets"])
def test_edited_lora_records_are_refused_by_verify_and_every_load(small_run, tmp_path, edit, needle):
    """The adapters a load builds come from model.json's LoRA records: one it cannot build from is refused in
    one line by ``verify`` as by every command that loads, never a traceback or adapters dropped silently."""
    stage = copy_of(small_run / "stage-2", tmp_path / "stage")
    edit_json(stage / "model.json", edit)
    for argv in (["verify", str(stage)], ["info", str(stage)], ["generate", str(stage), "--prompt", "The"]):
        one_line_error(growlm(*argv), "model.json", needle)


# ----------------------------------------------------------------------------------------------
# 8. stray stage-* dirs


def test_info_ignores_stray_stage_dirs(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    copy_of(tiny_model_dir, run / "stage-1")
    (run / "stage-old").mkdir()
    (run / "stage-x").write_text("not a stage")
    r = growlm("info", str(run), "--json")
    assert r.returncode == 0, r.stderr
    assert [s["path"] for s in json.loads(r.stdout)["stages"]] == [str(run / "stage-1")]


# ----------------------------------------------------------------------------------------------
# 9. corrupt mixture.json


@pytest.mark.parametrize("edit", [
    lambda d: d.update(experts={"0": "experts/0"}),
    lambda d: d.update(weights="0.5,0.5"),
    lambda d: d.update(weights=[0.5]),
    lambda d: d.pop("experts"),
    lambda d: d.pop("combine"),
    lambda d: d.update(router={"in_features": "64"}),
    lambda d: d["experts"].__setitem__(0, "experts/0"),
    lambda d: d.update(tuning=[1]),
    lambda d: d.update(files=[]),
])
def test_corrupt_mixture_json_is_one_line(mixture, tmp_path, edit):
    bad = copy_of(mixture, tmp_path / "mix")
    edit_json(bad / "mixture.json", edit)
    msg = refused(lambda: load_mixture(bad), "mixture.json")
    assert refused(lambda: info_mixture(bad)) == msg
    assert msg in verify(bad)["problems"]


def test_corrupt_mixture_json_cli(mixture, tmp_path, corpus_dir):
    bad = copy_of(mixture, tmp_path / "mix")
    edit_json(bad / "mixture.json", lambda d: d.update(experts="experts/0"))
    one_line_error(growlm("eval", str(bad), "--task", "ppl", "--data", str(corpus_dir / "valid.txt")), "experts")
    assert read_meta(bad / "experts" / "0")  # the experts themselves are untouched and fine


@pytest.mark.parametrize("edit", [
    lambda m: m["substrate"].update(fingerprint="0" * 64),
    lambda m: m["substrate"].update(kind="glyph"),
], ids=["nested fingerprint", "kind"])
def test_a_model_json_that_contradicts_itself_about_its_substrate_is_refused(model, edit):
    edit_json(model / "model.json", edit)
    assert verify_fails(model)
    refused(lambda: load_model(model), "contradicts itself about its substrate")


def test_a_router_over_identical_experts_is_refused_before_training(model, corpus_dir, tmp_path):
    from growlm.compose import Tuning

    twin = copy_of(model, tmp_path / "twin")
    refused(lambda: merge([model, twin], tmp_path / "mix", tuning=Tuning(data=[corpus_dir / "train.txt"], router=True)),
            "--router needs experts that differ")
    assert not (tmp_path / "mix").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["lora"][0].update(rank=3), "has shape [2, 32], the records give [3, 32]"),
    (lambda m: m["lora"][0].update(blocks=[0]), "blocks.1.attn.qkv.lora_A.stage2.weight is not made by"),
    (lambda m: m["lora"][0].update(targets=["qkv", "fc", "mlp_out"]), "blocks.0.mlp.proj.lora_A.stage2.weight is missing"),
], ids=["rank", "fewer-blocks", "more-targets"])
def test_lora_records_resealed_over_other_tensors_never_verify(small_run, tmp_path, edit, needle):
    """A plain model dir (no stage record to derive from) whose LoRA records were edited and its fingerprint
    recomputed to agree: the adapter tensors do not fit the records, so verify fails as every load does."""
    stage = copy_of(small_run / "stage-2", tmp_path / "stage")

    def reseal(m: dict) -> None:
        edit(m)
        for key in ("stage", "plan", "audit"):
            m.pop(key)
        weights, adapters = (load_file(str(stage / f)) for f in ("model.safetensors", "adapters.safetensors"))
        m["fingerprint"] = recorded_fingerprint_of(ModelRecord.model_validate(m), weights, adapters)

    edit_json(stage / "model.json", reseal)
    for argv in (["verify", str(stage)], ["generate", str(stage), "--prompt", "The"]):
        one_line_error(growlm(*argv), "adapter tensors do not match the recorded LoRA stages", needle)
