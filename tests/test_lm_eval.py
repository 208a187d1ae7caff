"""lm-evaluation-harness from the command line, as a user runs it: `--model hf` on an export through both of
lm-eval's entry points (`lm_eval` and `python -m lm_eval`), and `--model growlm` on a model dir through growlm's
(`python -m growlm.lm_eval_model`), offline, on local tasks of all three output types; a mixture dir through the
plug-in in this process (lm-eval's `simple_evaluate` with `model="growlm"`), on the same tasks.

One command line per entry point: each spends some 20-30 s of CPU importing and indexing lm-eval's thousands of
task YAMLs before it scores anything, so a fourth one, for the mixture, would test nothing the others do not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

TASKS = "growlm_tiny_mc,growlm_tiny_ppl,growlm_tiny_gen"
# `--model growlm` runs the export's own computation in growlm's code: float32 on the CPU agrees to
# rounding, and the log-likelihoods are sums over a few tokens
TOL = 1e-4
MC = [
    {"question": "What is the capital of France?", "choices": ["Paris", "red", "blue"], "answer": 0},
    {"question": "Which colour is the sky?", "choices": ["green", "blue", "yellow"], "answer": 1},
    {"question": "How does the model grow?", "choices": ["layer by layer", "never"], "answer": 0},
]
TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. A model grows layer by layer on a frozen substrate."},
    # longer than the tiny model's 128-token context, so the rolling windows really roll
    {"text": "Модель растёт слой за слоем. 我们的模型一层一层地生长。" * 6},
]


def _tasks(root: Path) -> Path:
    """A multiple-choice, a rolling log-likelihood and a generation task over local JSONL files."""
    for name, docs in (("mc", MC), ("text", TEXTS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                            encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    # datasets' cache beside the tasks, for the command lines and for a run in this process alike
    head = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n"
            f"  cache_dir: {json.dumps(str(root / 'hf_cache'))}\ntest_split: test\n")
    (tasks / "mc.yaml").write_text("task: growlm_tiny_mc\n" + head.format(root / "mc.jsonl") + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
        metadata:
          version: 1.0
    """))
    (tasks / "ppl.yaml").write_text("task: growlm_tiny_ppl\n" + head.format(root / "text.jsonl") + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        metadata:
          version: 1.0
    """))
    (tasks / "gen.yaml").write_text("task: growlm_tiny_gen\n" + head.format(root / "mc.jsonl") + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{choices[answer]}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
        metadata:
          version: 1.0
    """))
    return tasks


def _run_all(root: Path, model: Path, export: Path) -> None:
    """The three CLI runs, started together (each spends most of its time importing and indexing); each
    one's output dir, exit code, stdout and stderr under ``root``."""
    root.mkdir()
    tasks = _tasks(root)
    # a private HF_HOME: nothing cached elsewhere can leak in, and the offline flags make any
    # attempt to reach the Hub fail loudly instead of downloading
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_HOME": str(root / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    common = ["--include_path", str(tasks), "--device", "cpu", "--log_samples"]
    growlm_cli = [sys.executable, "-m", "growlm.lm_eval_model", "--model", "growlm", "--tasks", TASKS]
    commands = {
        # the installed script and `python -m`, exactly as README shows them
        "hf_script": [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                      f"pretrained={export}", "--tasks", TASKS, "--batch_size", "4"],
        "hf_module": [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export}",
                      "--tasks", "growlm_tiny_mc"],
        "growlm_model": [*growlm_cli, "--model_args", f"path={model}", "--batch_size", "4"],
    }
    procs = {name: subprocess.Popen([*cmd, *common, "--output_path", str(root / name)], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in commands.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        (root / f"{name}.json").write_text(json.dumps({"args": proc.args, "rc": proc.returncode, "stdout": stdout,
                                                       "stderr": stderr}))


@pytest.fixture(scope="module")
def runs(artefacts, tiny_model_dir, hf_export) -> dict[str, Any]:
    """The three CLI runs on the tiny model and its export, made once a test run (the tests that read them may
    run on different xdist workers)."""
    root = artefacts.get("lm-eval-runs", lambda d: _run_all(d, tiny_model_dir, hf_export))
    done = {}
    for f in root.glob("*.json"):
        r = json.loads(f.read_text())
        done[f.stem] = (subprocess.CompletedProcess(r["args"], r["rc"], r["stdout"], r["stderr"]), root / f.stem)
    assert done.keys() == {"hf_script", "hf_module", "growlm_model"}
    return done


def _table(proc: subprocess.CompletedProcess) -> dict[tuple[str, str], float]:
    """The (task, metric) → value rows of the table the CLI prints."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, task = {}, ""
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[4] and cells[6] not in ("Value", "") and not set(cells[0]) <= {"-"}:
            task = cells[0] or task
            rows[task, cells[4]] = float(cells[6])
    return rows


def _samples(out: Path, task: str) -> list[dict]:
    (f,) = out.glob(f"*/samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda d: d["doc_id"])


def _loglikelihoods(out: Path | list[dict], task: str) -> list[float]:
    """The logged score of every request: ``[logp, greedy]`` (loglikelihood) or ``logp`` (rolling), from the
    samples a run wrote under ``out`` or those ``simple_evaluate`` returned (where the pair is a tuple)."""
    samples = _samples(out, task) if isinstance(out, Path) else sorted(out, key=lambda d: d["doc_id"])
    scores = [r[0] for d in samples for r in d["resps"]]
    return [float(s[0] if isinstance(s, list | tuple) else s) for s in scores]


@pytest.mark.e2e(seconds=40)
def test_lm_eval_cli_prints_its_table_on_an_export(runs):
    for name in ("hf_script", "hf_module"):
        table = _table(runs[name][0])
        assert 0.0 <= table["growlm_tiny_mc", "acc"] <= 1.0, runs[name][0].stdout
    table = _table(runs["hf_script"][0])
    assert table["growlm_tiny_ppl", "bits_per_byte"] > 0 and ("growlm_tiny_gen", "exact_match") in table


@pytest.mark.e2e
def test_growlm_model_scores_equal_the_hf_export(runs):
    table = _table(runs["growlm_model"][0])
    assert {("growlm_tiny_mc", "acc"), ("growlm_tiny_ppl", "bits_per_byte"), ("growlm_tiny_gen", "exact_match")} <= set(table)
    assert "growlm ({'path'" in runs["growlm_model"][0].stdout
    ours, theirs = runs["growlm_model"][1], runs["hf_script"][1]
    for task in ("growlm_tiny_mc", "growlm_tiny_ppl"):
        got, want = _loglikelihoods(ours, task), _loglikelihoods(theirs, task)
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL
    # greedy generation: the same text, token for token
    assert [d["resps"] for d in _samples(ours, "growlm_tiny_gen")] == \
           [d["resps"] for d in _samples(theirs, "growlm_tiny_gen")]


@pytest.mark.e2e
def test_growlm_mixture_is_scored_by_its_combine_rule(runs, mixture, tmp_path, monkeypatch):
    """A mixture dir scored by lm-eval through the plug-in, in this process: ``simple_evaluate`` with
    ``model="growlm"`` and ``model_args="path=MIX"``, what lm-eval's command line hands over (the command line
    itself, ``python -m growlm.lm_eval_model``, runs in ``runs`` on a model dir), offline, its global seeds left
    alone. All three output types; the log-likelihoods come from the mixture's combine rule, its own forward."""
    import datasets.config
    import huggingface_hub.constants
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import growlm
    import growlm.lm_eval_model  # noqa: F401  (registers `growlm` with lm-eval, as its command line does)

    for module, name in ((datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, True)  # any attempt to reach the Hub fails loudly
    tasks = _tasks(tmp_path)
    out = simple_evaluate(model="growlm", model_args=f"path={mixture}", tasks=TASKS.split(","),
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=2,
                          device="cpu", log_samples=True, random_seed=None, numpy_random_seed=None,
                          torch_random_seed=None)
    table = out["results"]
    assert 0.0 <= table["growlm_tiny_mc"]["acc,none"] <= 1.0, table
    assert table["growlm_tiny_ppl"]["bits_per_byte,none"] > 0 and "exact_match,none" in table["growlm_tiny_gen"]
    assert out["config"]["model"] == "growlm" and f"path={mixture}" in str(out["config"]["model_args"])
    loaded = growlm.load(mixture)
    model, tok = loaded.model, loaded.tokenizer
    got = _loglikelihoods(out["samples"]["growlm_tiny_mc"], "growlm_tiny_mc")
    want = []
    for doc in MC:
        context = f"Question: {doc['question']}\nAnswer:"
        for choice in doc["choices"]:
            ctx, whole = tok.encode(context), tok.encode(f"{context} {choice}")
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), dim=-1)[0]
            want.append(float(logp[len(ctx) - 1:].gather(-1, torch.tensor(whole[len(ctx):])[:, None]).sum()))
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL
    # and they are not the first expert's: the mixture really was scored
    assert max(abs(a - b) for a, b in zip(got, _loglikelihoods(runs["growlm_model"][1], "growlm_tiny_mc"),
                                            strict=True)) > 1e-3


def test_batch_size_batches_and_changes_no_score(tiny_model_dir):
    from lm_eval.api.instance import Instance

    from growlm.lm_eval_model import GrowlmLM

    reqs = [Instance("loglikelihood", {}, (f"Question: {d['question']}\nAnswer:", f" {c}"), i)
            for i, d in enumerate(MC) for c in d["choices"]]
    one, four = GrowlmLM(str(tiny_model_dir), batch_size=1, device="cpu"), GrowlmLM(str(tiny_model_dir), batch_size="4",
                                                                                    device="cpu")
    shapes: list[tuple[int, ...]] = []
    four.model.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    a, b = one.loglikelihood(reqs, disable_tqdm=True), four.loglikelihood(reqs, disable_tqdm=True)
    assert [s[0] for s in shapes] == [4, 4]  # 8 requests, padded into two batches of four
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= TOL
    assert [x[1] for x in a] == [y[1] for y in b]


def test_a_misspelt_model_arg_is_refused_on_one_line(tiny_model_dir):
    from growlm.errors import GrowlmError
    from growlm.lm_eval_model import GrowlmLM

    with pytest.raises(GrowlmError, match="unknown: pth") as err:
        GrowlmLM(str(tiny_model_dir), pth="x")
    assert "\n" not in str(err.value)
