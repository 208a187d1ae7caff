"""`growlm import` of a Hugging Face checkpoint that came from elsewhere: every file it reads is a regular
file inside the checkpoint, every value is checked before use, and what it writes verifies and loads. A bad
checkpoint gets one `growlm: error:` line naming the file and the key or tensor (exit code 2): never a
traceback, a hang, an --out dir, or a change to the checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_util import growlm, one_line_error, snapshot
from conftest import copy_of
from growlm.loading import load_model
from growlm.store.model import save_model
from test_catalogue_store import edit_json

INDEX = "model.safetensors.index.json"


def shard_checkpoint(d: Path) -> list[Path]:
    """Turn the single-file checkpoint ``d`` into two shards and an index, as transformers writes a
    sharded checkpoint; returns the two shards."""
    state = load_file(str(d / "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in halves.items():
        save_file({n: state[n] for n in part}, str(d / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: s for s, part in halves.items() for n in part}}
    (d / INDEX).write_text(json.dumps(index, indent=2))
    (d / "model.safetensors").unlink()
    return [d / s for s in halves]


@pytest.fixture
def ckpt(hf_export, tmp_path) -> Path:
    """A private copy of the exported tiny model, free to tamper with."""
    return copy_of(hf_export, tmp_path / "hf")


def refused(ckpt: Path, *needles: str) -> None:
    """`growlm import ckpt` fails on one line naming every needle, leaves no --out (not even a temp dir
    beside it) and every byte of the checkpoint as it was."""
    before, out = snapshot(ckpt), ckpt.parent / "imported"
    one_line_error(growlm("import", ckpt, "--out", out), *needles)
    assert not out.exists() and not out.is_symlink()
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".imported")]
    assert snapshot(ckpt) == before


def imports(ckpt: Path) -> Path:
    """`growlm import ckpt` succeeds, and what it wrote verifies and loads."""
    out = ckpt.parent / "imported"
    r = growlm("import", ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    assert growlm("verify", out).returncode == 0
    load_model(out)
    return out


def edit_tensors(f: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# D5: special files are refused before anything opens them


@contextlib.contextmanager
def fifo_watch(fifo: Path) -> Iterator[Callable[[], bool]]:
    """A check whether anything opened ``fifo`` for reading while the block ran. A shell opens its write
    end a second in, which blocks until a reader comes and then gives that reader end-of-file, so a
    command that opens the FIFO fails instead of hanging. (A thread could not do it: a reader blocked
    inside Rust code, safetensors' or tokenizers', holds the GIL.)"""
    writer = subprocess.Popen(["sh", "-c", 'sleep 1; : > "$0"', str(fifo)])
    try:
        yield lambda: writer.poll() is not None
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("name", ["config.json", "growlm_export.json", "tokenizer.json", "tokenizer_config.json",
                                  "model.safetensors", "shard"])
def test_import_refuses_a_fifo_in_the_checkpoint_without_opening_it(ckpt, name):
    if name == "shard":
        name = shard_checkpoint(ckpt)[1].name
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    with fifo_watch(ckpt / name) as opened:
        refused(ckpt, name, "FIFO")
        assert not opened(), f"import opened the FIFO {name}"


# ----------------------------------------------------------------------------------------------
# D6: every value read is checked for type and range, naming the file and the key

CONFIG_EDITS = {
    "heads_zero": ({"num_attention_heads": 0}, "num_attention_heads"),
    "heads_not_dividing": ({"num_attention_heads": 3}, "num_attention_heads"),
    "vocab_bool": ({"vocab_size": True}, "vocab_size"),
    "context_text": ({"max_position_embeddings": "abc"}, "max_position_embeddings"),
    "context_zero": ({"max_position_embeddings": 0}, "max_position_embeddings"),
    "eps_text": ({"layer_norm_eps": "x"}, "layer_norm_eps"),
    "eps_negative": ({"layer_norm_eps": -1e-5}, "layer_norm_eps"),
    "base_text": ({"rotary_emb_base": "abc"}, "rotary_emb_base"),
    "base_overflows": ({"rotary_emb_base": 10**400}, "rotary_emb_base"),
    "bases_disagree": ({"rotary_emb_base": 500.0}, "rotary_emb_base"),
    "rope_text": ({"rope_parameters": "abc"}, "rope_parameters"),
    "rope_theta_list": ({"rope_parameters": {"rope_type": "default", "rope_theta": [1]}}, "rope_theta"),
    "residual_text": ({"use_parallel_residual": "false"}, "use_parallel_residual"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_import_refuses_a_hostile_config_value_naming_the_key(ckpt, case):
    change, key = CONFIG_EDITS[case]
    edit_json(ckpt / "config.json", lambda c: c.update(change))
    refused(ckpt, "config.json", key)


RECORD_EDITS = {
    "no_config": (lambda r: r.pop("config"), "config"),
    "no_source": (lambda r: r.pop("source"), "source"),
    "lineage_text": (lambda r: r["source"].update(lineage="abc"), "lineage"),
    "width_text": (lambda r: r.update(substrate_width="abc"), "substrate_width"),
    "width_negative": (lambda r: r.update(substrate_width=-16), "substrate_width"),
    "substrate_text": (lambda r: r.update(substrate="x"), "substrate"),
    "recipe_text": (lambda r: r["substrate"].update(recipe="x"), "recipe"),
    "trainable_text": (lambda r: r["config"].update(trainable_embedding="yes"), "trainable_embedding"),
    "future_version": (lambda r: r.update(version=2), "version"),
}


@pytest.mark.parametrize("case", sorted(RECORD_EDITS))
def test_import_refuses_a_hostile_export_record_naming_the_key(ckpt, case):
    edit, key = RECORD_EDITS[case]
    edit_json(ckpt / "growlm_export.json", edit)
    refused(ckpt, "growlm_export.json", key)


@pytest.mark.parametrize("weight_map", [["gpt_neox.embed_in.weight"], {"gpt_neox.embed_in.weight": 3}, None])
def test_import_refuses_an_index_whose_weight_map_is_no_map_of_names(ckpt, weight_map):
    shard_checkpoint(ckpt)
    edit_json(ckpt / INDEX, lambda i: i.update(weight_map=weight_map))
    refused(ckpt, INDEX, "weight_map")


# ----------------------------------------------------------------------------------------------
# D7: a context whose rotary tables would not fit is refused up front, with the estimate


def test_import_refuses_a_context_whose_rotary_tables_no_machine_holds(ckpt):
    edit_json(ckpt / "config.json", lambda c: c.update(max_position_embeddings=10**9))
    refused(ckpt, "config.json", "max_position_embeddings=1,000,000,000", "119.2 GiB", "1 GiB")


def test_import_keeps_a_long_but_sane_context(ckpt):
    edit_json(ckpt / "config.json", lambda c: c.update(max_position_embeddings=1 << 20))  # 128 MiB of tables
    assert load_model(imports(ckpt)).model.cfg.context == 1 << 20


# ----------------------------------------------------------------------------------------------
# D8: only tokenizers of growlm's own structure are imported

TOKENIZER_EDITS = {
    "regex_pre_tokenizer": (lambda t: t.update(pre_tokenizer={
        "type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}), "pre_tokenizer"),
    "normalizer": (lambda t: t.update(normalizer={"type": "NFKC"}), "normalizer"),
    "truncation": (lambda t: t.update(truncation={"max_length": 4, "strategy": "LongestFirst", "stride": 0,
                                                  "direction": "Right"}), "truncation"),
    "byte_level_decoder": (lambda t: t.update(decoder={"type": "ByteLevel"}), "decoder"),
    "bpe_dropout": (lambda t: t["model"].update(dropout=0.5), "model.dropout"),
    "no_unk": (lambda t: t["model"].update(unk_token=None), "model.unk_token"),
    "wordpiece": (lambda t: t["model"].update(type="WordPiece"), "model"),
    "special_post_processor": (lambda t: t.update(post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}), "post_processor"),
    "lstrip_special": (lambda t: t["added_tokens"][2].update(lstrip=True), "lstrip"),
    "no_eos": (lambda t: (t["model"]["vocab"].pop("</s>"), t["added_tokens"].pop(2)), "</s>"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_EDITS))
def test_import_refuses_a_tokenizer_growlm_does_not_write(ckpt, case):
    edit, part = TOKENIZER_EDITS[case]
    edit_json(ckpt / "tokenizer.json", edit)
    refused(ckpt, "tokenizer.json", part)


def test_import_refuses_a_tokenizer_with_more_tokens_than_the_model_has_rows(ckpt):
    """Ids past the embedding would fail every later eval and generate with an index error."""
    rows = json.loads((ckpt / "config.json").read_text())["vocab_size"] - 6
    edit_json(ckpt / "config.json", lambda c: c.update(vocab_size=rows))
    edit_tensors(ckpt / "model.safetensors", lambda s: s.update(
        {k: s[k][:rows].clone() for k in ("gpt_neox.embed_in.weight", "embed_out.weight")}))
    os.unlink(ckpt / "growlm_export.json")  # it would name the substrate of the full table
    refused(ckpt, "tokenizer.json", f"vocab_size={rows}")


# ----------------------------------------------------------------------------------------------
# D14: a sharded checkpoint gives exactly the tensors its index maps, from files inside it


def test_a_sharded_checkpoint_imports_as_the_same_model(ckpt, tiny_model_dir):
    shard_checkpoint(ckpt)
    back = load_model(imports(ckpt))
    src = load_model(tiny_model_dir)
    assert back.meta.fingerprint == src.meta.fingerprint


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "subdir"])
def test_import_reads_no_shard_from_outside_the_checkpoint(ckpt, how):
    second = shard_checkpoint(ckpt)[1]
    outside = ckpt.parent / "outside"
    outside.mkdir()
    moved = outside / second.name
    second.rename(moved)
    if how == "symlink":
        second.symlink_to(moved)
        needles = (second.name, "symlink")
    else:
        name = {"absolute": str(moved), "dotdot": f"../outside/{second.name}", "subdir": f"sub/{second.name}"}[how]
        if how == "subdir":
            (ckpt / "sub").mkdir()
            moved.rename(ckpt / name)
        edit_json(ckpt / INDEX, lambda i: i["weight_map"].update(
            {k: name for k, v in i["weight_map"].items() if v == second.name}))
        needles = (INDEX, repr(name))
    refused(ckpt, *needles)


def test_a_symlink_inside_the_checkpoint_is_read(ckpt):
    (ckpt / "tokenizer.json").rename(ckpt / "tokenizer.real.json")
    (ckpt / "tokenizer.json").symlink_to("tokenizer.real.json")
    imports(ckpt)


def test_a_hugging_face_cache_snapshot_imports(hf_export, tmp_path):
    """``huggingface_hub``'s cache links each snapshot file to ``../../blobs/SHA``: those links are the repo's own
    files, while a link to anywhere else beside the cache still is not."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(hf_export.iterdir()):
        (blobs / f"blob-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob-{f.name}")
    shutil.rmtree(imports(snap))
    elsewhere = tmp_path / "hub" / "config.json"
    elsewhere.write_bytes((hf_export / "config.json").read_bytes())
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(elsewhere)
    refused(snap, "config.json", "outside the checkpoint")


def test_import_never_writes_into_the_checkpoint(ckpt):
    before = snapshot(ckpt)
    one_line_error(growlm("import", ckpt, "--out", ckpt / "sub"), "inside the checkpoint")
    assert snapshot(ckpt) == before


def _duplicate(first: Path, second: Path, name: str) -> None:
    """A second, different copy of ``name`` (mapped to ``first``) in ``second``."""
    t = load_file(str(first))[name]
    edit_tensors(second, lambda s: s.update({name: t + 1}))


def _unmapped(first: Path, second: Path, name: str) -> None:
    edit_tensors(second, lambda s: s.update({"gpt_neox.layers.9.mlp.extra": torch.zeros(2)}))


def _moved(first: Path, second: Path, name: str) -> None:
    """``name`` taken out of the shard the index maps it to and put in the other."""
    t = load_file(str(first))[name]
    edit_tensors(first, lambda s: s.pop(name))
    edit_tensors(second, lambda s: s.update({name: t}))


@pytest.mark.parametrize("case", [_duplicate, _unmapped, _moved], ids=["duplicate", "unmapped", "moved"])
def test_import_refuses_a_tensor_outside_the_shard_its_index_names(ckpt, case):
    first, second = shard_checkpoint(ckpt)
    name = sorted(load_file(str(first)))[0]
    case(first, second, name)
    tensor = "gpt_neox.layers.9.mlp.extra" if case is _unmapped else name
    refused(ckpt, tensor, second.name, *([first.name] if case is not _unmapped else []))


# ----------------------------------------------------------------------------------------------
# D17: what import writes verifies and loads; non-finite weights are refused


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_import_refuses_non_finite_weights_naming_the_tensor(ckpt, value):
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"

    def poison(s: dict[str, torch.Tensor]) -> None:
        s[name][3, 5] = value

    edit_tensors(ckpt / "model.safetensors", poison)
    refused(ckpt, name, "NaN or infinite")


def test_import_refuses_weights_that_are_no_floats(ckpt):
    name = "gpt_neox.final_layer_norm.bias"
    edit_tensors(ckpt / "model.safetensors", lambda s: s.update({name: s[name].to(torch.int32)}))
    refused(ckpt, name, "int32")


def _second_head(s: dict[str, torch.Tensor]) -> None:
    s["lm_head.weight"] = s["embed_out.weight"] + 1


@pytest.mark.parametrize("case", ["tied_but_different", "two_heads"])
def test_import_refuses_a_head_transformers_would_not_compute_with(ckpt, case):
    """A tied checkpoint computes with its embedding (transformers drops a stored head); two heads are two models."""
    if case == "tied_but_different":
        edit_json(ckpt / "config.json", lambda c: c.update(tie_word_embeddings=True))
        refused(ckpt, "tie_word_embeddings", "embed_out.weight")
    else:
        edit_tensors(ckpt / "model.safetensors", _second_head)
        refused(ckpt, "embed_out.weight", "lm_head.weight")


CONTRADICTIONS = {
    "substrate_fingerprint": lambda r: r.update(substrate_fingerprint="0" * 64),
    "both_fingerprints": lambda r: (r.update(substrate_fingerprint="0" * 64), r["substrate"].update(fingerprint="0" * 64)),
    "recipe": lambda r: r["substrate"]["recipe"].update(bits=8),
    "kind": lambda r: r["substrate"].update(kind="glyph"),
    "trainable_but_frozen": lambda r: (r["substrate"].update(kind="trainable"),
                                       r["substrate"]["recipe"].update(kind="trainable")),
    "coarser_width": lambda r: r.update(substrate_width=32),  # the lift of width 16 is one of width 32 too
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_import_refuses_an_export_record_that_contradicts_the_weights(ckpt, case):
    """Each of these imported before: all but ``substrate_fingerprint`` as a model dir that then failed
    `growlm verify` and load (that one kept one of the two fingerprints and dropped the other)."""
    edit_json(ckpt / "growlm_export.json", CONTRADICTIONS[case])
    refused(ckpt, "growlm_export.json", "contradicts")


def test_eval_json_prints_null_for_a_score_that_is_no_number(tiny_model_dir, corpus_dir, tmp_path):
    """A diverged model scores NaN; `eval --json` still prints JSON (which has no NaN), with null there."""
    src = load_model(tiny_model_dir)
    with torch.no_grad():
        src.model.head.weight[0, 0] = math.nan
    save_model(src.model, tmp_path / "nan", tokenizer_dir=src.tokenizer_dir, substrate=src.meta.substrate.to_json())
    r = growlm("eval", tmp_path / "nan", "--task", "ppl", "--data", corpus_dir / "valid.txt", "--json")
    assert r.returncode == 0, r.stderr

    def no_constant(c: str) -> None:
        raise AssertionError(f"eval --json printed {c}, which is not JSON")

    result = json.loads(r.stdout, parse_constant=no_constant)
    assert result["loss"] is None and result["ppl"] is None and result["n_tokens"] > 0


def test_an_import_error_names_the_checkpoint_not_a_temp_dir(ckpt):
    """D18: the tokenizer is assembled in a temp dir that is gone when the error prints; the message names the
    checkpoint's own file instead, and every path it names exists."""
    edit_json(ckpt / "growlm_tokenizer.json", lambda t: t.update(fingerprint="0" * 64))
    r = growlm("import", ckpt, "--out", ckpt.parent / "imported")
    one_line_error(r, str(ckpt))
    named = [w.strip(",;:()'\"") for w in r.stderr.split() if w.startswith("/")]
    assert named and all(Path(p).exists() or Path(p).parent.exists() for p in named), r.stderr
