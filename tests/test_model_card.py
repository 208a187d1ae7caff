"""Model cards: ``growlm eval --save`` records results beside the model (never in its stage files),
and ``growlm export`` writes a Hugging Face README.md with the docking port, lineage and results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import copy_of
from growlm.cli import main
from growlm.loading import load_model
from growlm.model_card import EVALS, read_evals, save_eval
from growlm.store.model import read_meta


@pytest.fixture(scope="module")
def run(small_run, tmp_path_factory) -> Path:
    """A trained two-stage run (stage 2 adds a block and LoRA adapters on the frozen ones): this module's
    copy of the shared one, since ``eval --save`` writes a sidecar into its stage dirs."""
    return copy_of(small_run, tmp_path_factory.mktemp("card") / "run")


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a dir but the sidecar, by relative name."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != EVALS}


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, fm, body = text.split("---\n", 2)
    return yaml.safe_load(fm), body


def test_saved_eval_goes_into_the_exported_card(run, corpus_dir, tmp_path, capsys):
    stage = run / "stage-2"
    before = _files(stage)
    valid = str(corpus_dir / "valid.txt")
    assert main(["eval", str(stage), "--task", "ppl", "--data", valid, "--save", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    # the stage files are byte-identical; only the sidecar is new, and the dir still verifies and loads
    assert _files(stage) == before
    (saved,) = read_evals(stage)
    assert saved["ppl"] == printed["ppl"] and saved["data"] == [valid] and saved["saved_at"]
    assert main(["verify", str(run)]) == 0
    load_model(stage)

    assert main(["export", str(stage), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    fm, body = _front_matter((tmp_path / "hf" / "README.md").read_text(encoding="utf-8"))
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert "growlm" in fm["tags"] and "license" not in fm  # growlm records no licence: none is guessed
    (result,) = fm["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "perplexity", "name": "ppl", "value": pytest.approx(printed["ppl"])}
    names = {m["name"] for m in result["metrics"]}
    assert {"bits_per_byte", "bits_per_char"} <= names and not names & {"n_tokens", "n_bytes", "n_chars"}  # counts are no scores
    meta, parent = read_meta(stage), read_meta(run / "stage-1")
    for fp in (meta.fingerprint, meta.substrate_fingerprint, meta.tokenizer_fingerprint, parent.fingerprint[:12]):
        assert fp in body
    assert f"ppl={printed['ppl']:.4g}" in body and f"{meta.params_active:,}" in body
    assert f"{parent.params_active:,}" in body and f"{parent.metrics.tokens:,}" in body
    assert json.dumps(meta.substrate.recipe, sort_keys=True) in body


def test_card_without_results_and_foreign_lines(run, tmp_path):
    """A stage never evaluated gets a card saying so; a sidecar line of another model, or a torn one,
    never reaches the card."""
    stage = run / "stage-1"
    (stage / EVALS).write_text('{"task": "ppl", "model_fingerprint": "not-this-model", "ppl": 1.5}\n{torn\n')
    assert read_evals(stage, read_meta(stage).fingerprint) == []
    assert main(["export", str(stage), "--out", str(tmp_path / "hf")]) == 0
    fm, body = _front_matter((tmp_path / "hf" / "README.md").read_text(encoding="utf-8"))
    assert "model-index" not in fm and "No evaluation results" in body and "1.5" not in body
    (stage / EVALS).unlink()


def test_per_stage_save_writes_each_stage(run, corpus_dir, capsys):
    for n in (1, 2):
        (run / f"stage-{n}" / EVALS).unlink(missing_ok=True)
    before = {n: _files(run / f"stage-{n}") for n in (1, 2)}
    assert main(["eval", str(run), "--per-stage", "--task", "ppl", "--data", str(corpus_dir / "valid.txt"),
                 "--save", "--json"]) == 0
    for n in (1, 2):
        (rec,) = read_evals(run / f"stage-{n}")
        assert rec["stage"] == n and rec["model_fingerprint"] == read_meta(run / f"stage-{n}").fingerprint
        assert _files(run / f"stage-{n}") == before[n]
    capsys.readouterr()
    # a run as a whole is many models: without --per-stage it is refused in one line, and nothing is saved
    assert main(["eval", str(run), "--task", "ppl", "--data", str(corpus_dir / "valid.txt"), "--save"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("growlm: error:") and "\n" not in err
    assert all(len(read_evals(run / f"stage-{n}")) == 1 for n in (1, 2))
    assert not (run / EVALS).exists()


def test_save_on_a_mixture_is_refused(tiny_model_dir, expert_b, corpus_dir, tmp_path, capsys):
    """A mixture records every file it holds, so a sidecar would fail its verification: --save is
    refused in one line before any scoring, and the mixture stays as it was (it still verifies)."""
    from growlm.api import merge

    other = copy_of(expert_b, tmp_path / "b")  # a copy: it gets a sidecar of its own
    # an expert's own saved results travel into the mixture as a recorded file, and it verifies
    save_eval(other, {"task": "ppl", "model_fingerprint": read_meta(other).fingerprint, "ppl": 2.0})
    mix = merge([tiny_model_dir, other], tmp_path / "mix", progress=False)
    before = _files(mix)
    capsys.readouterr()
    assert main(["eval", str(mix), "--task", "ppl", "--data", str(corpus_dir / "valid.txt"), "--save"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("growlm: error: --save") and out.err.count("\n") == 1 and not out.out
    assert _files(mix) == before and not (mix / EVALS).exists() and not (tiny_model_dir / EVALS).exists()
    assert main(["verify", str(mix)]) == 0


def test_save_refuses_a_symlinked_sidecar(tiny_model_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("")
    link = tmp_path / "m"
    link.mkdir()
    (link / EVALS).symlink_to(elsewhere)
    with pytest.raises(Exception, match="symlink"):
        save_eval(link, {"task": "ppl"})
    assert elsewhere.read_text() == ""


def test_save_after_a_torn_last_line_is_read_back(tiny_model_dir, tmp_path):
    """A sidecar whose last line was torn (a kill mid-append): the next result starts a line of its own, so it is
    read back (and reaches the card) instead of being glued onto the torn one."""
    model = copy_of(tiny_model_dir, tmp_path / "m")
    fp = read_meta(model).fingerprint
    (model / EVALS).write_text('{"task": "ppl", "model_fingerprint": "' + fp + '", "ppl": 3.0}\n{"task": "pp')
    save_eval(model, {"task": "ppl", "model_fingerprint": fp, "ppl": 2.0})
    assert [r["ppl"] for r in read_evals(model, fp)] == [3.0, 2.0]
